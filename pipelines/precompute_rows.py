"""Precompute, per image: read the annotation and the image, decode, put on the canvas, label the
anchors, encode; and the rows -> Arrow table step. No Ray here: ``pipelines.precompute_job`` runs
this in Ray Data tasks, tests and benchmarks call it directly.

Per image (``ImageWorker.process``, one named step each): read the annotation through pyarrow's
filesystem layer (local paths, ``s3://``, ``gs://``...) and parse it with defusedxml
(``pipelines.voc_xml.parse_annotation``); read and decode the image (``frcnn.images.decode_image``:
the frame a viewer shows, 8-bit RGB, bombs refused, a truncated file a problem); reconcile the
annotation's size with the image's; check there is something to learn; then the row: the image on
the canvas, boxes scaled, anchors labelled (difficult boxes excluded unless ``use_difficult``; all
boxes are stored, with their flags). Rows are the ``pipelines.schema.SCHEMA`` contract.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from frcnn.config import ModelConfig
from frcnn.errors import StorageError
from pipelines.datasets import parse_item
from pipelines.storage import read_bytes, resolve_filesystem
from pipelines.voc_xml import AnnotationError

__all__ = ["BoxFit", "ImageResult", "ImageWorker", "get_worker", "process_item", "record", "rows_to_table"]

# ``pipelines.schema`` and torch are imported inside the functions that use them: the ledger
# actor unpickles the job module, which imports this one, and needs none of it.

Record = dict[str, str]


def record(image_id: str, source: str, reason: str) -> Record:
    return {"image_id": image_id, "source": source, "reason": reason}


class StorageReadError(StorageError):
    """A file the split lists could not be read (the store failed, not the file): the run stops
    and publishes nothing, whatever ``on_error`` says. A missing file is bad input (skipped)."""


@dataclass(frozen=True)
class ImageResult:
    """What one split entry gave.

    ``row``: the ``SCHEMA`` row, or None when the entry was skipped; ``skipped``: the record of
    why (one, or none); ``warnings``: problems that did not stop the image; ``fatal``: the
    records that stop an ``on_error="fail"`` run (the problems and the skip); ``positives``: the
    row's positive anchors; ``left_out``: objects of classes the model does not have, per class;
    ``fit``: the row's target boxes against the anchors (``frcnn.anchor_coverage``).
    """

    row: dict[str, Any] | None
    skipped: tuple[Record, ...] = ()
    warnings: tuple[Record, ...] = ()
    fatal: tuple[Record, ...] = ()
    positives: int = 0
    left_out: Mapping[str, int] = field(default_factory=dict)
    fit: BoxFit | None = None


@dataclass(frozen=True)
class BoxFit:
    """The target boxes of a row: ``best_iou`` (M,) with any inside anchor, ``areas`` (M,) in the
    original image's pixels, ``canvas_boxes`` (M, 4)."""

    best_iou: np.ndarray
    areas: np.ndarray
    canvas_boxes: np.ndarray


@dataclass(frozen=True)
class _Objects:
    """An image's objects in original pixels: ``boxes`` (N, 4) xyxy, ``labels`` (N,), ``difficult`` (N,)."""

    boxes: np.ndarray
    labels: np.ndarray
    difficult: np.ndarray


class _Skip(Exception):
    """Raised by a step: the entry is skipped, ``source`` and ``reason`` say why."""

    def __init__(self, source: str, reason: str) -> None:
        super().__init__(source, reason)
        self.source, self.reason = source, reason


class _Notes:
    """The problem records of one entry as its steps find them."""

    def __init__(self, image_id: str) -> None:
        self.image_id = image_id
        self.warnings: list[Record] = []
        self.fatal: list[Record] = []
        self.left_out: dict[str, int] = {}

    def problem(self, source: str, reason: str, *, fatal: bool = True) -> None:
        rec = record(self.image_id, source, reason)
        self.warnings.append(rec)
        if fatal:
            self.fatal.append(rec)


class ImageWorker:
    """Everything one image needs that does not change between images (built once per process)."""

    def __init__(self, spec: dict[str, Any]) -> None:
        from frcnn.anchor_coverage import CoverageMeter
        from frcnn.anchors import AnchorTargetCreator, grid_anchors
        from frcnn.boxes import BoxCoder
        from frcnn.canvas import CanvasTransform

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
        self.grids, self.targets, self.meters = {}, {}, {}
        for hw in cfg.canvas.sizes:
            fh, fw = cfg.feature_size_for(hw)
            grid = self.grids[hw] = grid_anchors(fh, fw, cfg.anchors.stride, cfg.anchors.scales, cfg.anchors.ratios)
            self.targets[hw] = AnchorTargetCreator(grid, hw, cfg.rpn.pos_iou, cfg.rpn.neg_iou, self.coder)
            self.meters[hw] = CoverageMeter(grid, hw)
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

    def process(self, item: dict[str, Any]) -> ImageResult:
        """One split entry -> its row, or the record of why it was skipped (see :class:`ImageResult`)."""
        notes = _Notes(item["image_id"])
        try:
            ann = self._annotation(item, notes)
            image = self._image(item)
            objects = self._objects(ann, image, item, notes)
            self._check_targets(objects, item["annotation_path"], notes)
        except _Skip as skip:
            rec = record(notes.image_id, skip.source, skip.reason)
            return ImageResult(None, (rec,), tuple(notes.warnings), (*notes.fatal, rec), 0, notes.left_out)
        row, fit = self._row(notes.image_id, image, objects)
        return ImageResult(row, (), tuple(notes.warnings), tuple(notes.fatal), len(row["pos_anchor_index"]),
                           notes.left_out, fit)

    def _annotation(self, item: dict[str, Any], notes: _Notes):
        """Read and parse the entry's annotation in its dataset's format (``pipelines.datasets``):
        its problems noted, its left-out objects counted."""
        ann_path = item["annotation_path"]
        try:
            ann, problems = parse_item(item, self.read, self.class_names, self.left_out, self.dataset_classes)
        except AnnotationError as exc:
            raise _Skip(exc.source, exc.reason) from None
        except FileNotFoundError as exc:
            raise _Skip(ann_path, f"file not found: {exc}") from None
        except OSError as exc:  # the store failing is not bad input: skipping would publish a short dataset
            raise StorageReadError(f"{ann_path}: cannot read: {exc}") from exc
        notes.left_out.update(ann.left_out)
        for p in problems:
            notes.problem(p.source, p.reason)
        return ann

    def _image(self, item: dict[str, Any]):
        """Read and decode the entry's image: upright, RGB (``frcnn.images``)."""
        from frcnn.images import decode_error_reason, decode_image

        img_path = item["image_path"]
        try:
            data = self.read(img_path)
        except FileNotFoundError:
            raise _Skip(img_path, "image file not found") from None
        except OSError as exc:
            raise StorageReadError(f"{img_path}: cannot read: {exc}") from exc
        try:
            return decode_image(data)
        except Exception as exc:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError...
            raise _Skip(img_path, decode_error_reason(exc)) from None

    def _objects(self, ann, image, item: dict[str, Any], notes: _Notes) -> _Objects:
        """The annotation's boxes in the decoded image's frame: clipped to it (and noted) when the
        annotation's ``<size>`` is not the image's."""
        boxes = np.asarray(ann.boxes, dtype=np.float32).reshape(-1, 4)
        labels = np.asarray(ann.labels, dtype=np.int32).reshape(-1)
        difficult = np.asarray(ann.difficult, dtype=bool).reshape(-1)
        if (image.width, image.height) == (ann.width, ann.height):
            return _Objects(boxes, labels, difficult)
        hint = (" (the annotation has the stored pixels' size: was it made without the EXIF orientation?)"
                if (image.height, image.width) == (ann.width, ann.height) else "")
        notes.problem(item["annotation_path"],
                      f"annotation <size> {ann.width}x{ann.height} differs from the image's "
                      f"{image.width}x{image.height} as shown ({item['image_path']}); boxes clipped to the image{hint}")
        limits = np.array([image.width, image.height] * 2, dtype=np.float32)
        boxes = np.clip(boxes, 0.0, limits)
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        return _Objects(boxes[keep], labels[keep], difficult[keep])

    def _check_targets(self, objects: _Objects, ann_path: str, notes: _Notes) -> None:
        """An image with nothing for the RPN to find is an all-negative example, or dropped (``drop_empty``)."""
        labels, difficult = objects.labels, objects.difficult
        if (len(labels) if self.use_difficult else int((~difficult).sum())) > 0:
            return
        if len(labels):
            what = "only difficult objects (not targets without use_difficult)"
        else:
            what = ("no valid object left" if notes.warnings else
                    "only objects of classes the model does not have" if notes.left_out else "no objects")
        if self.drop_empty:
            raise _Skip(ann_path, f"{what}: dropped (drop_empty)")
        notes.problem(ann_path, f"{what}: kept as an all-negative example", fatal=False)

    def _row(self, image_id: str, image, objects: _Objects) -> tuple[dict[str, Any], BoxFit]:
        """The image on its canvas, boxes scaled, anchors labelled: one ``SCHEMA`` row, and how
        its target boxes fit the anchors."""
        import torch

        from pipelines import schema

        canvas, scale = self.transform.apply_image(image)
        H, W = canvas.shape[:2]
        cboxes = objects.boxes * np.float32(scale)
        cboxes[:, 0::2] = np.clip(cboxes[:, 0::2], 0.0, W)
        cboxes[:, 1::2] = np.clip(cboxes[:, 1::2], 0.0, H)
        cboxes = cboxes.astype(np.float32)
        targets = slice(None) if self.use_difficult else ~objects.difficult
        target_boxes = np.ascontiguousarray(cboxes[targets])
        t = self.targets[(H, W)](torch.from_numpy(target_boxes))
        orig = objects.boxes[targets]
        fit = BoxFit(self.meters[(H, W)].best_iou(target_boxes),
                     (orig[:, 2] - orig[:, 0]) * (orig[:, 3] - orig[:, 1]), target_boxes)
        return {
            "image_id": image_id,
            "image": schema.encode_canvas(canvas, self.jpeg_quality),
            "orig_height": int(image.height),
            "orig_width": int(image.width),
            "scale": float(scale),
            "boxes": cboxes.reshape(-1),
            "labels": objects.labels,
            "difficult": objects.difficult,
            "anchor_labels": t.labels.numpy().astype(np.int8),
            "pos_anchor_index": t.pos_index.numpy().astype(np.int32),
            "pos_anchor_deltas": t.pos_deltas.numpy().astype(np.float32).reshape(-1),
            "canvas_height": H,
            "canvas_width": W,
        }, fit


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


def process_item(item: dict[str, Any], spec: dict[str, Any]) -> ImageResult:
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
