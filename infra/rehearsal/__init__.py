"""The cluster rehearsal's library: infra/'s shape on one machine with the real engines.

``stack`` starts and drives the services, ``relay`` is the S3 endpoint a test can cut or hold,
``checks`` reads what the engines hold. The scenario itself (the infra/README jobs and the four
faults) is tests/cluster/: one fixture per service, one test per fault.
"""
