"""COCO ingest at train2017's scale: ``pipelines.datasets.coco`` vs a plain ``json.load``.

    python -m benchmarks.coco_ingest_bench [--quick]

Generates an instances JSON the size of COCO's train2017 file (118,287 images, 860,001 objects
with polygon segmentations, about 450 MB), then measures, each in its own fresh process so that
peak memory is the process's own: the floor, ``json.load`` of the file; and the ingest, the COCO
reader's ``open_split`` (parse, validate, group the objects by image into split items); both
processes load the same modules first. Figures: CPU time (wall time beside it) and peak RSS of
the ingest over the floor's (goal: at most 1.5x both). It also checks that no task would receive
the whole file: the largest split item (what one image's task gets) against the file's size.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from .common import say

IMAGES, OBJECTS = 118_287, 860_001
GOAL = 1.5
_POLYGONS = 997  # distinct pre-formatted polygons, reused round-robin


def write_instances(path: Path, n_images: int = IMAGES, n_objects: int = OBJECTS) -> int:
    """A COCO instances file of ``n_images`` images and ``n_objects`` objects (80 categories with
    COCO's non-contiguous ids, polygons of 14-30 points); returns its size in bytes."""
    import numpy as np

    rng = np.random.default_rng(0)
    cat_ids = [i for i in range(1, 91) if i not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)]
    polys = []
    for _ in range(_POLYGONS):
        pts = rng.uniform(0, 600, size=2 * int(rng.integers(16, 35))).round(2)
        polys.append("[[" + ",".join(f"{v:.2f}" for v in pts) + "]]")
    with open(path, "w", encoding="utf-8") as f:
        f.write('{"info":{"description":"frcnn-jobs benchmark, COCO train2017 sized"},"licenses":[],"images":[')
        f.write(",".join(
            f'{{"license":3,"file_name":"{i:012d}.jpg","coco_url":"http://images.cocodataset.org/train2017/'
            f'{i:012d}.jpg","height":{480 - i % 97},"width":640,"date_captured":"2013-11-14 11:18:45",'
            f'"flickr_url":"http://farm3.staticflickr.com/2/{i}_z.jpg","id":{i}}}' for i in range(1, n_images + 1)))
        f.write('],"annotations":[')
        img = rng.integers(1, n_images + 1, size=n_objects)
        xywh = rng.uniform(0, 300, size=(n_objects, 4)).round(2) + [0, 0, 1, 1]
        chunk = []
        for k in range(n_objects):
            x, y, w, h = xywh[k]
            chunk.append(f'{{"segmentation":{polys[k % _POLYGONS]},"area":{w * h:.3f},"iscrowd":0,'
                         f'"image_id":{img[k]},"bbox":[{x:.2f},{y:.2f},{w:.2f},{h:.2f}],'
                         f'"category_id":{cat_ids[k % 80]},"id":{k + 1}}}')
            if len(chunk) == 50_000:
                f.write(("," if k >= 50_000 else "") + ",".join(chunk))
                chunk = []
        if chunk:
            f.write(("," if n_objects > len(chunk) else "") + ",".join(chunk))
        f.write('],"categories":[' + ",".join(f'{{"supercategory":"s","id":{c},"name":"class{c}"}}'
                                              for c in cat_ids) + "]}")
    return path.stat().st_size


_FLOOR = """
import json, resource, sys, time
import pipelines.datasets  # the same modules loaded as the ingest's process: only the data differs
t = time.perf_counter()
c = time.process_time()
with open(sys.argv[1], encoding="utf-8") as f:
    doc = json.load(f)
s, c = time.perf_counter() - t, time.process_time() - c
print(json.dumps({"seconds": s, "cpu_s": c, "peak_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                  "images": len(doc["images"])}))
"""

_INGEST = """
import json, resource, sys, time
from pipelines.datasets import DatasetSource, open_split
t, c = time.perf_counter(), time.process_time()
reader = open_split(DatasetSource("coco", annotations=sys.argv[1], images=sys.argv[2]), "train")
items = reader.items()
s, c = time.perf_counter() - t, time.process_time() - c
print(json.dumps({"seconds": s, "cpu_s": c, "peak_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                  "images": len(items), "objects": sum((len(r.records) - 16) // 53 for r in items),
                  "largest_item": max(len(r.records) for r in items), "problems": len(reader.problems)}))
"""


def _child(code: str, *args: str) -> dict[str, Any]:
    out = subprocess.run([sys.executable, "-c", code, *args], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def run(quick: bool = False, rounds: int = 2) -> dict[str, Any]:
    """The benchmark row: ingest time and peak memory over ``json.load``'s (best of ``rounds``)."""
    n_images, n_objects = (IMAGES // 20, OBJECTS // 20) if quick else (IMAGES, OBJECTS)
    with tempfile.TemporaryDirectory(prefix="frcnn-coco-bench-") as tmp:
        path = Path(tmp) / "instances_train.json"
        size = write_instances(path, n_images, n_objects)
        say(f"coco ingest: {size / 1e6:.0f} MB instances file, {n_images} images, {n_objects} objects")
        floors, ingests = [], []
        for _ in range(rounds):  # interleaved: the shared machine's load hits both alike
            floors.append(_child(_FLOOR, str(path)))
            ingests.append(_child(_INGEST, str(path), tmp))
    best = {k: (min(r[k] for r in floors), min(r[k] for r in ingests)) for k in ("cpu_s", "seconds", "peak_kb")}
    t_ratio, m_ratio = best["cpu_s"][1] / best["cpu_s"][0], best["peak_kb"][1] / best["peak_kb"][0]
    wall_ratio = best["seconds"][1] / best["seconds"][0]
    largest = max(r["largest_item"] for r in ingests)
    figure = (f"{t_ratio:.2f}x the CPU time ({wall_ratio:.2f}x wall), {m_ratio:.2f}x the peak memory of json.load "
              f"({best['cpu_s'][1]:.1f} s vs {best['cpu_s'][0]:.1f} s CPU, {best['peak_kb'][1] / 1024:.0f} vs "
              f"{best['peak_kb'][0] / 1024:.0f} MiB) on {size / 1e6:.0f} MB; largest task input {largest} bytes")
    return {"id": "10", "what": "COCO instances ingest (train2017-sized) vs json.load", "baseline": "json.load",
            "figure": figure, "goal": f"<= {GOAL}x time and memory",
            "met": t_ratio <= GOAL and m_ratio <= GOAL and largest < size / 1000, "value": max(t_ratio, m_ratio),
            "data": {"file_bytes": size, "images": n_images, "objects": n_objects, "floor": floors,
                     "ingest": ingests, "time_ratio": t_ratio, "wall_ratio": wall_ratio, "memory_ratio": m_ratio,
                     "largest_item": largest},
            "auto_note": "each measurement in a fresh process (peak RSS = ru_maxrss); time is the process's CPU "
                         "time (the wall time on a shared machine depends on its neighbours); best of "
                         f"{rounds} interleaved rounds"}


if __name__ == "__main__":
    row = run(quick="--quick" in sys.argv)
    print(json.dumps(row, indent=1, default=str))
