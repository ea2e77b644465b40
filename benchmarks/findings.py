"""What was found for each missed goal, and other findings of the benchmark work.

Written by whoever profiled it, against the commit in ``DIAGNOSED_AT``; ``report.render`` puts a
row's entry into RESULTS.md only while that row misses its goal (the measured figures and the
profile tables there come from the run itself). Numbers quoted here were measured while
diagnosing, on the same shared 2-core machine (load average 4 to 12 from other work): take them
as ratios, like the table's.
"""

DIAGNOSED_AT = "a86f540"

FINDINGS: dict[str, dict[str, str]] = {
    "1": {
        "cause_short": ("if this row misses, the profile below says where the time went; the creator was measured "
                        "at 180-230x (2 boxes) and 220-340x (20 boxes) in CPU time while it was built (load 20-36)."),
        "fix_short": "see the profile; the history is in the details.",
        "cause": (
            "History. At `a86f540` `assign_anchor_targets` ran torchvision's `box_iou` on the (8,940 x M x 2) "
            "float64 layout: fresh multi-MB tensors page-faulted on every op, and every call rebuilt what depends "
            "only on the grid (28x / 13x). Now (`frcnn.anchors.AnchorTargetCreator`, cached per grid behind "
            "`assign_anchor_targets`): the inside anchors, their shapes (exact width and height) and their "
            "distinct x- and y-extents are found once per grid; per image, the overlap width of each box with "
            "each distinct x-extent and height with each y-extent are small tables (M x 274 here), and within a "
            "(box, shape) block the IoU is a non-decreasing function of the intersection (same area), so each "
            "box's best IoU comes from its largest overlap height and width, and an anchor can reach IoU t only "
            "if its height >= t S / (1 + t) / (largest width) and its width likewise. IoU is computed, in "
            "float64 and bit-identical to `box_iou`, only for those pairs (t = the smaller threshold, or the "
            "box's best when lower: every non-negative anchor, positive and tie is among them): a few hundred "
            "pairs per box instead of 8,940. Positives come back sparse (index, deltas); the dense deltas and "
            "the matched box of every anchor are computed only when read. Anchors that are not a full grid "
            "take a dense path (the whole IoU matrix into per-thread buffers). Both paths are tested against "
            "the loop port on 300 random sets with exact ties, and the cache across grids, canvases and "
            "in-place changes against fresh creators (tests/test_anchors.py). Nothing runs in float32."),
        "fix": "Read the profile of this run; the per-call fixed cost is about 40 numpy calls on small arrays.",
    },
    "2": {
        "cause_short": ("at 200 images on a quiet machine the floor takes 1.6-1.8 s and precompute pays about 1.5 s "
                        "per call beyond its work: Ray Data runs the first tasks of its single stage one at a time "
                        "(its per-operator resource reservation) before it uses both CPUs. At 2,000 images "
                        "most of that cost is amortised (79-96 % in two full runs). Under load the floor slows "
                        "~10x and it matters less."),
        "fix_short": ("none kept: turning Ray Data's reservation off for this stage helped 200 images and hurt "
                      "2,000 (details below)."),
        "cause": (
            "Quiet machine, 2 Dec 2026 (load 1-2; the full run that measured 51 % / 96 %): per image the "
            "pipeline's `process()` is within 5-12 % of the floor's steps in one process (13.7 vs 13.1 ms, "
            "10.3 vs 9.0 ms), so the gap at 200 is per call. Timed phases of a 200-image `precompute()` "
            "(monkeypatched wrappers, warm workers): everything but `write_parquet` (the Ray Data execution) "
            "takes 0.02 s; the execution 2.6-3.2 s for 1.7 s of floor. Task timestamps in the workers: the "
            "first task starts 0.1-0.5 s after the call; the first three of the 8 tasks (25 images each) "
            "ran one at a time on one worker while the second CPU idled (0.6-1.0 s); tasks took 0.5 s "
            "(20 ms an image against 13-15 ms in one process: the driver, raylet and GCS take 0.9 CPU-s per "
            "run of the 2 cores). A toy reproduces the serial start: 8 tasks of 0.35 s on 2 CPUs take "
            "2.56 s (the first three alone), 1.53 s with `DataContext.op_resource_reservation_enabled = "
            "False`; `op_resource_reservation_ratio = 1.0` or `TaskPoolStrategy(size=2)` alone do not change "
            "it. Earlier, under load 25 (the floor at 11 img/s instead of 120), the same code gave 82 %. "
            "History (load 4-12, before row 1's fix), two factors (this run's figures are in the table's "
            "note and in results.json, `per_image_breakdown_1_thread`, `cpu_s_pipeline_runs`). (1) Work per "
            "image: in one process at "
            "one thread, the floor's steps (read, decode, canvas, encode) and the pipeline's whole per-image "
            "`process()` were measured image by image on the same images: the floor is 70-75 % of `process()`, "
            "and the anchor targets on the 800x800 grid are 18 % of it (2-5 ms an image; XML parsing about 1 "
            "ms). py-spy on a worker during a 2,000-image run agrees: `apply_image` 50 %, "
            "`assign_anchor_targets` 14 %, JPEG encode 14 %, the synchronous `ray.get(ledger.report.remote(...))` "
            "after every 8-image batch 4 %, XML 2 %. So even with no orchestration cost the pipeline could not "
            "pass ~75 % of the floor today. (2) Orchestration: each `precompute()` call pays about 0.4-0.6 s of "
            "fixed cost (listing, Ray Data plan and executor start, ledger finish, manifest, publish: a "
            "16-image run takes that long), 10-15 % of a 200-image run; the split is cut into exactly one "
            "block per CPU (`shard_rows = ceil(N / cpus)`), so there is no load balancing and the slower block "
            "sets the wall; and the workers were busy for only 40-60 % of wall x cores (the floor's pool: "
            "85-95 % under the same load). At 10N the fixed cost is amortised, yet the rate stayed at 44-59 % of "
            "the floor's in the full runs (with the memory sampler running): the per-image cost is the larger "
            "factor. The figure itself moves with the load (49 % and 59 % in two full runs of the same code)."),
        "fix": (
            "Tried on the quiet machine, not kept: the reservation off for precompute's dataset "
            "(`ds.context`): 200 images 1.7-2.5 s instead of 2.6-3.4 (12 runs), but 2,000 images 20-32 s instead "
            "of 19.5-20.5, with a `ray::IDLE` worker at 80 % CPU during the run (Ray Data then submits every "
            "task at once and Ray starts a worker for the backlog); the reservation off plus "
            "`TaskPoolStrategy(size=cpus)`: 2,000 images back to 19-20 s, but 200-image calls of 6-10 s in two "
            "of four series (never seen without it); 2 blocks per CPU instead of 4: no difference. What is "
            "left to try: a Ray Data version whose reservation starts a lone operator at full width, or a "
            "driver-side path for small splits (one Ray task per CPU, no Dataset). Earlier proposals: "
            "(a) Row 1's fix: it takes 1.5-4 ms off each image at this canvas, most of the per-image gap. "
            "(b) For small splits, cut the input into a few blocks per CPU (e.g. `shard_rows = max(16, "
            "ceil(N / (4 * cpus)))`) so that the last block is short; the shard count then grows on small "
            "splits only. (c) Report to the ledger once per block (accumulate in the task, send with the last "
            "batch) or use larger map batches (32 rows is still only ~4 MB at 800x800), so that a worker does "
            "not wait for the ledger process to be scheduled after every 8 images. (b) and (c) were tried from "
            "the driver side (rows_per_shard=25; batch 32) at load average ~8 and the differences stayed "
            "inside the noise (52-69 img/s): measure them again on a quiet machine before relying on them; "
            "(a) is the measured one."),
    },
    "6": {
        "when_met": ("met in this run, but load-sensitive: two earlier full-size runs of the same code at higher "
                     "load gave 8.5 % and 8.1 % (epoch-start windows 32-44 %); same cause and fix as below."),
        "cause_short": ("the wait sits in the first window of every epoch: each epoch's `iter_batches` starts "
                        "a new Ray Data execution (read + decode + split) and its first batch waits 0.3-0.4 s."),
        "fix_short": ("materialise the decoded datasets once in run_training when they fit the object store: "
                      "8.1 % -> 3.5 % measured."),
        "cause": (
            "Per logged window (results.json, `data_wait_frac`), the wait is 0.3-1.9 % inside an epoch and "
            "12-44 % in the first window of each epoch (steps 9-10, 17-18, 25-26 at 8 steps an epoch), "
            "depending on the machine's load. "
            "`train_loop` calls `train_shard.iter_batches(...)` once per epoch, and each call executes the "
            "Ray Data pipeline again from the start: read the Parquet shards, launch the decode "
            "`map_batches` tasks (JPEG decode, densify the anchor targets), restart the streaming split. The "
            "first batch of the epoch waits for all of it (0.1-0.4 s here, with the load), and "
            "`prefetch_batches` cannot "
            "reach across the epoch boundary. With 64 images at batch 8 an epoch is only 8 steps, so the "
            "stall is a large share; on the demo's ~490 training images (about 61 steps an epoch) it would be "
            "about an eighth of this. With 2 workers the epoch start also waits for the slower rank (the "
            "split is synchronised), and the decode tasks compete with both workers for the 2 cores."),
        "fix": (
            "In `jobs/train.py` `run_training`, materialise the decoded datasets once before the trainer "
            "when they fit comfortably in the object store (a decoded row at 192x192 is about 130 KB, so the "
            "demo's ~490 train images are ~65 MB): `datasets = {k: ds.materialize() for k, ds in "
            "datasets.items()}` behind a size check (rows x bytes per row against a fraction of "
            "`ray.available_resources()['object_store_memory']`), streaming as today above it. Each epoch then "
            "reads decoded blocks from the object store instead of re-reading and re-decoding, and the "
            "per-epoch decode CPU disappears too. Measured with the same run (1 worker, 64 images, 4 epochs, "
            "batch 8), by wrapping `TorchTrainer` so that it receives `{name: ds.materialize()}`: "
            "`data_wait_frac` 8.1 % -> 3.5 %, epoch-start windows 32-42 % -> 12-20 %, throughput unchanged "
            "(32.3 vs 31.4 img/s, within noise). The block order is fixed by `randomize_block_order(seed)` "
            "already, and the per-epoch local shuffle is unchanged, so training sees the same stream."),
    },
}

FINDINGS["9"] = {
    "when_met": ("met for a driver's calls after its first; the first call after Ray's start (one `frcnn-jobs "
                 "infer` run) also imports torch and loads the model in Ray's worker processes, 5-7 s here, "
                 "which at 600 images is about half the call (its figure is in the note)."),
    "cause_short": ("warm calls are model-bound (tasks back to back, ~20 ms between them), but the model in the "
                    "Ray worker ran 1.3-1.5x slower per image than detect() in the benchmark's process: 2 cores "
                    "shared with the driver's Ray Data executor, the raylet and the write tasks; the same code gave "
                    "58-80 % in five runs. The first call after Ray's start also pays 5-7 s of torch import."),
    "fix_short": ("none found on 2 cores beyond what is in: decode overlapped with the model (no difference "
                  "measurable against serial), tasks kept warm; a larger model makes the fixed costs smaller."),
    "cause": (
        "History. Until `7e1563a` the predictor was a Ray Data actor pool: Ray Data starts and ends its actors "
        "per execution, so every call paid a fresh actor importing torch and torchvision (a 16-image call 6.4-7.1 "
        "s on the quiet machine, 5.0-5.2 s of it `import frcnn.inference` in the actor: torch 2.5-2.8 s, "
        "torchvision 2.3-2.7 s, 2.1 s of that torch._dynamo imported by `torchvision.ops.roi_align`), and a "
        "600-image call reached 31-46 % of detect() (47 % was the ceiling of any pipeline paying that start). "
        "Tried then without gain: a Ray `worker_process_setup_hook` importing torch in every worker (the actor "
        "got a freshly started worker, still importing); one call per actor instead of two; the driver's "
        "priority for the actor. Now (`pipelines/predict.py`): on CPU the predictor runs as Ray tasks, and Ray "
        "reuses its task worker processes across the datasets of a driver (seen here: the same two pooled "
        "workers served five successive 600-image calls); each keeps the model it loaded last, keyed by the "
        "checkpoint's sha256 and the settings, so a later call starts at once (a warm 16-image call: 0.2-0.3 s "
        "instead of 6.4-7.8 s). A task takes 4 model batches and runs them on two threads, one decoding the "
        "next batch while the other holds the model (the overlap the actors' two concurrent calls gave). "
        "Measured with `--only 9` on the quiet machine (load 0.4-1.5), three runs: warm 600-image calls 6.8-8.3 "
        "s, 72-88 img/s, against detect() 97-152 img/s in the same runs: 58 %, 80 %, 67 % (the best rounds). "
        "A cold worker still costs its 5-7 s: with one predictor at a time Ray alternates tasks between its "
        "two pooled workers, so a driver's second call can meet the second worker cold (one round in three "
        "above: 13.9 s instead of 8.3); the first call after Ray's start meets both (15.9 s, then 7.4-7.8 s "
        "for each later call). A GPU keeps the actor pool: Ray ends a worker after each GPU task "
        "(`max_calls=1`), so a GPU task could not keep its model. Where the rest goes (warm calls, task "
        "timestamps in the worker, 08:30 UTC): 19 tasks of 32 images back to back, 16-57 ms between them "
        "(0.4 s a call), the first 0.09 s after the call starts; each task 0.27-0.42 s, 8.4-13 ms an image, "
        "against detect() at 5.8-10 ms in the benchmark's process in the runs of that hour: the model itself "
        "runs slower in the worker, whose core it shares with the driver, the raylet and the write tasks. "
        "Decoding on a second thread against decoding in line: warm 600-image calls 5.6-7.4 s against 5.8-8.2 "
        "s in alternating series (no difference beyond the machine's drift). Two full `make bench` runs of the "
        "same prediction code: 76 % (74.8 vs 98.7 img/s) and 64 % (110.7 vs 173.4)."),
    "fix": (
        "For a single `frcnn-jobs infer` run the start is paid once per run: amortised by larger inputs (at "
        "2,000 images 6 s is about a fifth of the call at this model's speed, and nothing at VGG16's). Levers "
        "not taken: a long-lived predictor service across runs; a CPU-only torch wheel on CPU machines may "
        "import faster (not measured). Measure with `python -m benchmarks.run --only 9`: the note gives the "
        "cold call, the 16-image and 600-image warm calls' walls."),

}

OTHER_FINDINGS: list[str] = [
    ("**Fixed (0173203): the precompute ledger actor could die under a running precompute (`ActorDiedError`).** "
     "`pipelines.precompute_job.get_ledger` finds or creates the named actor `frcnn-precompute-ledger` with "
     "`get_if_exists=True`, but nothing keeps a handle between runs: the handles of a finished run sit in "
     "reference cycles, and when Python's cyclic GC frees them Ray kills the actor (`The actor is dead because "
     "all references to the actor were removed`). A `precompute()` that starts around that moment gets a "
     "handle to the dying actor and fails; the first full run of this benchmark did (the call after a "
     "2,000-image run). Reproduced: four back-to-back calls reuse one ledger process, `gc.collect()` kills "
     "it, the next call starts a new one. Fix (pipelines/precompute.py): keep the handle in a module-level "
     "variable for the life of the Ray session (what the `_Ledger` docstring intends: \"one ledger serves "
     "all the runs of a driver\"), and retry `get_ledger` once on `ActorDiedError`. The benchmark holds a "
     "handle itself meanwhile."),
    ("**Two torch threads on two shared cores are many times slower than one.** With other processes on "
     "the machine (load average 4-12 while this was measured), every OpenMP parallel region waits for a "
     "preempted thread: one training step of row 4's batch took 0.25 s at 1 thread and 2.25 s at 2 threads "
     "(torchvision's: 0.55 s and 1.9-2.8 s), and `assign_anchor_targets` 25 ms vs 75-150 ms. This is why "
     "rows 1, 4 and 5 report one thread as the headline (the 2-thread figures are in the notes and in "
     "results.json, and swing wildly between runs with the load). `frcnn-jobs demo` trains with "
     "`cpus_per_worker=2` by default (jobs/demo.py), so 2 torch threads beside Ray Data's decode tasks: "
     "worth measuring against 1 thread (or `OMP_WAIT_POLICY=PASSIVE`) before keeping it."),
    ("**Large fresh tensors page-fault.** glibc hands allocations above its mmap threshold (128 KB to "
     "start with) straight from mmap and returns them on free, so a multi-MB temporary is faulted in page by "
     "page every time. This was most of row 1's old miss (fixed by the creator's precomputed tables and "
     "pruned IoU); it may matter elsewhere (decoding, the training step). `MALLOC_MMAP_THRESHOLD_` / "
     "`MALLOC_TRIM_THRESHOLD_` or jemalloc/tcmalloc in the "
     "runtime image are environment-level levers; only row 1 was measured with them."),
]
