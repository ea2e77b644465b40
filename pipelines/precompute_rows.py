"""Precompute, per image: read the annotation and the image, decode, put on the canvas, label the
anchors, encode; and the rows -> Arrow table step. No Ray here: ``pipelines.precompute_job`` runs
this in Ray Data tasks, tests and benchmarks call it directly.

Per image: read the annotation and the image through pyarrow's filesystem layer (local paths,
``s3://``, ``gs://``...), parse the XML with defusedxml (``pipelines.voc_xml.parse_annotation``),
decode the image with PIL (``load()`` inside ``try``, ``LOAD_TRUNCATED_IMAGES`` off, so a truncated
JPEG is a problem, not a grey half-image), resize it onto the canvas, scale the boxes, label the
anchors (difficult boxes excluded unless ``use_difficult``; all boxes are stored, with their
flags). Rows are the ``pipelines.schema.SCHEMA`` contract.
"""

from __future__ import annotations

import io
import json
from typing import Any

import numpy as np
import pyarrow as pa

from frcnn.config import ModelConfig
from pipelines.datasets import parse_item
from pipelines.storage import read_bytes, resolve_filesystem
from pipelines.voc_xml import AnnotationError

__all__ = ["ImageWorker", "get_worker", "process_item", "record", "rows_to_table"]

# ``pipelines.schema`` and torch are imported inside the functions that use them: the ledger
# actor unpickles the job module, which imports this one, and needs none of it.


def record(image_id: str, source: str, reason: str) -> dict[str, str]:
    return {"image_id": image_id, "source": source, "reason": reason}


class StorageReadError(OSError):
    """A file the split lists could not be read (the store failed, not the file): the run stops
    and publishes nothing, whatever ``on_error`` says. A missing file is bad input (skipped)."""


class ImageWorker:
    """Everything one image needs that does not change between images (built once per process)."""

    def __init__(self, spec: dict[str, Any]) -> None:
        from PIL import ImageFile

        from frcnn.anchors import AnchorTargetCreator, grid_anchors
        from frcnn.boxes import BoxCoder
        from frcnn.canvas import CanvasTransform

        ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is a problem, not half an image
        cfg = ModelConfig.from_dict(spec["cfg"])
        self.cfg = cfg
        self.class_names = tuple(spec["class_names"])
        # Dataset classes the model does not have: their objects are left out and counted.
        self.dataset_classes = tuple(spec.get("dataset_classes") or ())
        self.left_out = frozenset(self.dataset_classes) - set(self.class_names)
        self.use_difficult = bool(spec["use_difficult"])
        self.drop_empty = bool(spec["drop_empty"])
        self.jpeg_quality = int(spec["jpeg_quality"])
        self.transform = CanvasTransform.from_config(cfg.canvas)  # the scale rule, when the config sets one
        self.coder = BoxCoder(cfg.rpn.box_weights)
        # Built once per canvas (bucket): everything that does not depend on the boxes (frcnn.anchors).
        self.grids, self.targets = {}, {}
        for hw in cfg.canvas.sizes:
            fh, fw = cfg.feature_size_for(hw)
            grid = self.grids[hw] = grid_anchors(fh, fw, cfg.anchors.stride, cfg.anchors.scales, cfg.anchors.ratios)
            self.targets[hw] = AnchorTargetCreator(grid, hw, cfg.rpn.pos_iou, cfg.rpn.neg_iou, self.coder)
        self.anchors = self.grids[(cfg.canvas.height, cfg.canvas.width)]  # the default canvas's grid
        # Paths from list_split keep the data root's form: map them onto one filesystem handle
        # instead of building a filesystem (S3 credentials...) per file.
        self.root_shown = spec["root_shown"]
        self.fs, self.root_path = resolve_filesystem(spec["data_root"])

    def read(self, path: str) -> bytes:
        if path.startswith(self.root_shown):
            return read_bytes(self.fs, self.root_path.rstrip("/") + path[len(self.root_shown):])
        fs, p = resolve_filesystem(path)
        return read_bytes(fs, p)

    def process(self, item: dict[str, Any]):
        """-> (row or None, skipped records, warning records, fatal records, positives, left out per class)."""
        import torch
        from PIL import Image

        from pipelines import schema

        image_id = item["image_id"]
        ann_path = item["annotation_path"]
        img_path = item["image_path"]
        warnings: list[dict[str, str]] = []
        fatal: list[dict[str, str]] = []  # warnings that stop an on_error="fail" run

        left: dict[str, int] = {}

        def skip(source: str, reason: str):
            rec = record(image_id, source, reason)
            return None, [rec], warnings, fatal + [rec], 0, left

        try:
            ann, problems = parse_item(item, self.read, self.class_names, self.left_out, self.dataset_classes)
        except AnnotationError as exc:
            return skip(exc.source, exc.reason)
        except FileNotFoundError as exc:
            return skip(ann_path, f"file not found: {exc}")
        except OSError as exc:  # the store failing is not bad input: skipping would publish a short dataset
            raise StorageReadError(f"{ann_path}: cannot read: {exc}") from exc
        left.update(ann.left_out)
        for p in problems:
            rec = record(image_id, p.source, p.reason)
            warnings.append(rec)
            fatal.append(rec)

        try:
            data = self.read(img_path)
        except FileNotFoundError:
            return skip(img_path, "image file not found")
        except OSError as exc:
            raise StorageReadError(f"{img_path}: cannot read: {exc}") from exc
        try:
            image = Image.open(io.BytesIO(data))
            image.load()
        except Exception as exc:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError, bombs...
            return skip(img_path, f"image does not decode: {type(exc).__name__}: {exc}")

        boxes = np.asarray(ann.boxes, dtype=np.float32).reshape(-1, 4)
        labels = np.asarray(ann.labels, dtype=np.int32).reshape(-1)
        difficult = np.asarray(ann.difficult, dtype=bool).reshape(-1)
        if (image.width, image.height) != (ann.width, ann.height):
            rec = record(image_id, ann_path,
                         f"annotation <size> {ann.width}x{ann.height} differs from the image's "
                         f"{image.width}x{image.height} ({img_path}); boxes clipped to the image")
            warnings.append(rec)
            fatal.append(rec)
            limits = np.array([image.width, image.height] * 2, dtype=np.float32)
            boxes = np.clip(boxes, 0.0, limits)
            keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
            boxes, labels, difficult = boxes[keep], labels[keep], difficult[keep]

        n_targets = len(labels) if self.use_difficult else int((~difficult).sum())
        if n_targets == 0:  # nothing for the RPN to find: every anchor is a negative
            if len(labels):
                what = "only difficult objects (not targets without use_difficult)"
            else:
                what = ("no valid object left" if problems else
                        "only objects of classes the model does not have" if left else "no objects")
            if self.drop_empty:
                return skip(ann_path, f"{what}: dropped (drop_empty)")
            warnings.append(record(image_id, ann_path, f"{what}: kept as an all-negative example"))

        canvas, scale = self.transform.apply_image(image)
        H, W = canvas.shape[:2]
        cboxes = boxes * np.float32(scale)
        cboxes[:, 0::2] = np.clip(cboxes[:, 0::2], 0.0, W)
        cboxes[:, 1::2] = np.clip(cboxes[:, 1::2], 0.0, H)
        cboxes = cboxes.astype(np.float32)
        target_boxes = cboxes if self.use_difficult else cboxes[~difficult]
        t = self.targets[(H, W)](torch.from_numpy(np.ascontiguousarray(target_boxes)))
        pos = t.pos_index
        row = {
            "image_id": image_id,
            "image": schema.encode_canvas(canvas, self.jpeg_quality),
            "orig_height": int(image.height),
            "orig_width": int(image.width),
            "scale": float(scale),
            "boxes": cboxes.reshape(-1),
            "labels": labels,
            "difficult": difficult,
            "anchor_labels": t.labels.numpy().astype(np.int8),
            "pos_anchor_index": pos.numpy().astype(np.int32),
            "pos_anchor_deltas": t.pos_deltas.numpy().astype(np.float32).reshape(-1),
            "canvas_height": H,
            "canvas_width": W,
        }
        return row, [], warnings, fatal, int(pos.numel()), ann.left_out


def _list_column(arrays: list[np.ndarray], value_type: pa.DataType) -> pa.Array:
    """Python list of 1-d numpy arrays -> ListArray, without a per-element Python loop."""
    lengths = np.fromiter((len(a) for a in arrays), dtype=np.int32, count=len(arrays))
    offsets = np.zeros(len(arrays) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    dtype = value_type.to_pandas_dtype()
    values = np.concatenate([np.asarray(a, dtype=dtype) for a in arrays]) if arrays else np.zeros(0, dtype)
    return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(values, type=value_type))


def rows_to_table(rows: list[dict[str, Any]]) -> pa.Table:
    """Rows as built by ``process_item`` -> a table with exactly ``schema.SCHEMA``."""
    from pipelines import schema

    columns = []
    for f in schema.SCHEMA:
        values = [r[f.name] for r in rows]
        if pa.types.is_list(f.type):
            columns.append(_list_column(values, f.type.value_type))
        else:
            columns.append(pa.array(values, type=f.type))
    return pa.Table.from_arrays(columns, schema=schema.SCHEMA)


def process_item(item: dict[str, Any], spec: dict[str, Any]):
    """One split entry, outside Ray (for tests and debugging); see ``ImageWorker.process``."""
    return get_worker(spec).process(item)


_WORKERS: dict[str, ImageWorker] = {}  # per process: built for the first image, reused after


def get_worker(spec: dict[str, Any]) -> ImageWorker:
    """The process's worker for ``spec`` (the anchor grid, box coder, canvas, filesystem handle
    are built once per process, which is what a callable class on an actor pool would buy)."""
    key = json.dumps(spec, sort_keys=True)
    worker = _WORKERS.get(key)
    if worker is None:
        _WORKERS.clear()
        worker = _WORKERS[key] = ImageWorker(spec)
    return worker
