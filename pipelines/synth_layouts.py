"""The synthetic dataset in COCO and YOLO layouts (``pipelines.synth.generate(format=...)``).

The same images, boxes and splits as the VOC layout, so the three readers can be checked against
each other:

- COCO: ``annotations/instances_<split>.json`` and ``<split>/<id>.jpg``. Image ids are
  ``int(id) + 1``; category ids are ``1, 3, 5, 7, 9`` (deliberately not contiguous, so the
  mapping onto labels is exercised); ``bbox = [x1, y1, x2 - x1, y2 - y1]`` of the tight box;
  difficult objects are written as crowd (``iscrowd: 1``), which, like VOC's difficult, is no
  anchor target and is ignored by the scoring.
- YOLO: ``data.yaml``, ``images/<split>/<id>.jpg`` and ``labels/<split>/<id>.txt`` (``class cx
  cy w h``, normalised). YOLO has no difficult flag: difficult objects are not written, so the
  anchor targets match the VOC layout's (whose difficult objects are no targets either).

An image that belongs to several splits is one file, hard-linked into each split's folder
(copied where links are not possible).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["CocoWriter", "YoloWriter", "category_ids"]


def category_ids(classes: Sequence[str]) -> tuple[int, ...]:
    """The COCO layout's category id of each class: ``1, 3, 5, ...``."""
    return tuple(2 * k + 1 for k in range(len(classes)))


def _link(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.unlink(missing_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


class _SplitImages:
    """Images written once into a pool folder, linked into each split's folder at the end."""

    def __init__(self, out: Path, pool: str, classes: Sequence[str], splits: Sequence[str]) -> None:
        self.root = out
        self.classes, self.splits = tuple(classes), tuple(splits)
        self.pool = out / pool
        self.pool.mkdir(parents=True, exist_ok=True)
        self.meta: dict[str, tuple[int, int, list[dict[str, Any]]]] = {}

    def add(self, image_id: str, jpeg: bytes, width: int, height: int, objects: list[dict[str, Any]]) -> None:
        (self.pool / f"{image_id}.jpg").write_bytes(jpeg)
        self.meta[image_id] = (width, height, objects)


class CocoWriter(_SplitImages):
    def __init__(self, out: Path, classes: Sequence[str], splits: Sequence[str]) -> None:
        super().__init__(out, ".images", classes, splits)
        (out / "annotations").mkdir(parents=True, exist_ok=True)

    def finish(self, splits: dict[str, list[str]]) -> None:
        ids = category_ids(self.classes)
        categories = [{"id": c, "name": n, "supercategory": "shape"} for c, n in zip(ids, self.classes)]
        cat_of = dict(zip(self.classes, ids))
        for split in self.splits:
            images, anns = [], []
            for image_id in splits[split]:
                _link(self.pool / f"{image_id}.jpg", self.root / split / f"{image_id}.jpg")
                width, height, objects = self.meta[image_id]
                images.append({"id": int(image_id) + 1, "file_name": f"{image_id}.jpg", "width": width,
                               "height": height})
                for o in objects:
                    x1, y1, x2, y2 = o["box"]
                    anns.append({"id": len(anns) + 1, "image_id": int(image_id) + 1, "category_id": cat_of[o["name"]],
                                 "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1),
                                 "iscrowd": int(o["difficult"])})
            doc = {"info": {"description": "frcnn-jobs synthetic shapes"}, "images": images,
                   "annotations": anns, "categories": categories}
            (self.root / "annotations" / f"instances_{split}.json").write_text(json.dumps(doc), encoding="utf-8")


class YoloWriter(_SplitImages):
    def __init__(self, out: Path, classes: Sequence[str], splits: Sequence[str]) -> None:
        super().__init__(out, ".images", classes, splits)

    def finish(self, splits: dict[str, list[str]]) -> None:
        label_of = {n: k for k, n in enumerate(self.classes)}
        for split in self.splits:
            for image_id in splits[split]:
                _link(self.pool / f"{image_id}.jpg", self.root / "images" / split / f"{image_id}.jpg")
                width, height, objects = self.meta[image_id]
                lines = []
                for o in objects:
                    if o["difficult"]:
                        continue
                    x1, y1, x2, y2 = o["box"]
                    lines.append(f"{label_of[o['name']]} {(x1 + x2) / 2 / width!r} {(y1 + y2) / 2 / height!r} "
                                 f"{(x2 - x1) / width!r} {(y2 - y1) / height!r}\n")
                label = self.root / "labels" / split / f"{image_id}.txt"
                label.parent.mkdir(parents=True, exist_ok=True)
                label.write_text("".join(lines), encoding="utf-8")
        names = "".join(f"  {k}: {n}\n" for k, n in enumerate(self.classes))
        splits_yaml = "".join(f"{s}: images/{s}\n" for s in self.splits)
        (self.root / "data.yaml").write_text(f"path: .\n{splits_yaml}names:\n{names}", encoding="utf-8")
