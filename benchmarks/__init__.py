"""Performance benchmarks of frcnn-jobs: ``python -m benchmarks.run [--device cpu|cuda] [--quick] [--only ROWS]``.

One row alone: ``python -m benchmarks.run --only 8`` (any row 1-9, or a list ``--only 1,9``; results
go to a temporary folder unless ``--out`` is given).

Every figure is a ratio against a baseline measured in the same run, on the same machine, with
baseline and candidate interleaved (absolute timings depend on the machine and its load).
``benchmarks/rows.py`` registers the rows; ``benchmarks/run.py`` runs them, writes ``results.json``
and regenerates ``RESULTS.md``; docs/benchmarks.md holds what was found about them.

| module                 | rows                                                                  |
| ---------------------- | --------------------------------------------------------------------- |
| ``anchor_targets``     | 1: anchor targets vs the walkthrough's plain loop                     |
| ``precompute_bench``   | 2, 3: Ray Data precompute vs the decode+resize+encode floor; memory    |
| ``detector``           | 4, 5 (and 4g, 5g on CUDA): training / inference vs torchvision         |
| ``training_bench``     | 6, 7: data wait during Ray Train training; 1 -> 2 workers              |
| ``jobs_bench``         | 8, 9: `frcnn-jobs train` vs the bare loop; `infer` vs detect() alone   |
| ``workspace``          | the synthetic data the rows share, made once per run                   |
| ``common``             | interleaved timing, peak-RSS sampler, environment capture             |
| ``rows``               | the registry: each row's ids, goal, description and measuring function |
| ``report``             | RESULTS.md from results.json                                           |
"""
