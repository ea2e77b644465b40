"""Independent re-derivations that tests and benchmarks compare the project against.

- ``walkthrough_port``: the walkthrough's anchors and anchor targets as plain Python loops.
- ``voc_devkit_port``: py-faster-rcnn's ``voc_eval`` / ``voc_ap`` as plain Python loops.
- ``anchor_coverage_loop``: each box's best anchor IoU, every anchor against every box.

Neither imports ``frcnn``.
"""
