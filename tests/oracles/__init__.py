"""Independent re-derivations that tests and benchmarks compare the project against.

- ``walkthrough_port``: the walkthrough's anchors and anchor targets as plain Python loops.
- ``voc_devkit_port``: py-faster-rcnn's ``voc_eval`` / ``voc_ap`` as plain Python loops.

Neither imports ``frcnn``.
"""
