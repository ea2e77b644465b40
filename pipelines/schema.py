"""The precomputed-shard contract: one Parquet row per image, plus a manifest written last.

| column              | type            | meaning                                                       |
| ------------------- | --------------- | ------------------------------------------------------------- |
| image_id            | string          | the split entry (``YEAR/id`` when several years are joined)    |
| image               | binary          | the canvas (H x W x 3), JPEG-encoded                          |
| orig_height/width   | int32           | the original image size                                       |
| scale               | float32         | canvas = original * scale (resized region at the top left)     |
| boxes               | list<float32>   | N x 4 flattened, canvas xyxy                                  |
| labels              | list<int32>     | 1..C                                                          |
| difficult           | list<bool>      | VOC's flag; difficult boxes are stored, not used as targets    |
| anchor_labels       | list<int8>      | H*W*A values in the detector's anchor order, before sampling   |
| pos_anchor_index    | list<int32>     | indices of the positive anchors                               |
| pos_anchor_deltas   | list<float32>   | 4 per positive (RPN weights 1, 1, 1, 1)                       |
| canvas_height/width | int32           | the row's canvas: its bucket (``canvas.buckets``) or the one canvas |

``_frcnn_manifest.json`` is written last, into the published folder: its presence is what makes
a folder readable, and ``check_manifest`` refuses shards made for another model config.
"""

from __future__ import annotations

import io
import json
from collections.abc import Mapping
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from PIL import Image

from frcnn.errors import DatasetError

MANIFEST_NAME = "_frcnn_manifest.json"

SCHEMA = pa.schema([
    ("image_id", pa.string()),
    ("image", pa.binary()),
    ("orig_height", pa.int32()),
    ("orig_width", pa.int32()),
    ("scale", pa.float32()),
    ("boxes", pa.list_(pa.float32())),
    ("labels", pa.list_(pa.int32())),
    ("difficult", pa.list_(pa.bool_())),
    ("anchor_labels", pa.list_(pa.int8())),
    ("pos_anchor_index", pa.list_(pa.int32())),
    ("pos_anchor_deltas", pa.list_(pa.float32())),
    ("canvas_height", pa.int32()),
    ("canvas_width", pa.int32()),
])


class ManifestMismatch(DatasetError):
    """Shards were precomputed for a different model configuration."""


def encode_canvas(canvas: np.ndarray, quality: int = 95) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(canvas).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def decode_canvas(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def read_manifest(fs, root: str) -> dict[str, Any]:
    path = f"{root.rstrip('/')}/{MANIFEST_NAME}"
    try:
        with fs.open_input_stream(path, compression=None) as f:
            return json.loads(f.read().decode())
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{path}: no manifest: not a published precompute output (was the run killed?)") from None


def read_manifest_at(path_or_uri: str) -> dict[str, Any]:
    """The manifest of a published precompute output, local path or object-store URI."""
    from .storage import Location

    loc = Location.of(path_or_uri)
    return read_manifest(loc.fs, loc.path)


def check_manifest(manifest: Mapping[str, Any], expected: Mapping[str, Any], where: str) -> None:
    """Refuse shards whose anchor-target fields differ from the model config's, naming the field."""
    got = manifest.get("targets", {})
    # A field only some configs set (the scale rule, the buckets) may be in the shards and not in
    # the config: shards with buckets hold rows of several canvases, which a one-canvas model cannot take.
    expected = {**{k: None for k in got if k not in expected}, **expected}
    for key, want in expected.items():
        have = got.get(key)
        if not _same(have, want):
            raise ManifestMismatch(
                f"{where}: shards were precomputed with {key}={have!r}, the model config has {key}={want!r}; "
                "precompute again with this config")


def _same(have: Any, want: Any) -> bool:
    """JSON (lists, ints) against the config's values (tuples, floats): equal numbers, nested."""
    if isinstance(have, list) and isinstance(want, (list, tuple)):
        return len(have) == len(want) and all(_same(a, b) for a, b in zip(have, want))
    if isinstance(have, (int, float)) and isinstance(want, (int, float)) and not isinstance(have, bool):
        return float(have) == float(want)
    return have == want


def decode_batch(batch: Mapping[str, Any], num_anchor_positions: int | Mapping[tuple[int, int], int]
                 ) -> dict[str, Any]:
    """Rows (Ray Data ``batch_format="numpy"``) -> dense numpy arrays, ready for ``torch.from_numpy``.

    Runs inside Ray Data's ``map_batches`` during training, so JPEG decoding and densifying the
    sparse deltas overlap with the training step instead of stalling it.

    ``num_anchor_positions``: the model's anchors, or per canvas ``{(height, width): anchors}``
    (``ModelConfig.anchor_positions``) when rows may be on different buckets. Rows of one canvas
    give ``(B, ...)`` arrays; rows of several give object arrays of per-row arrays (a training
    batch then takes rows of one bucket, ``canvas_height``/``canvas_width``, and stacks them).
    """
    n = len(batch["image_id"])
    decoded = [decode_canvas(b) for b in batch["image"]]
    counts = num_anchor_positions if isinstance(num_anchor_positions, Mapping) else None
    labels, deltas = [], []
    for i, img in enumerate(decoded):
        hw = img.shape[:2]
        want = num_anchor_positions if counts is None else counts.get(hw)
        if want is None:
            raise ManifestMismatch(f"row {batch['image_id'][i]} is on a {hw[0]}x{hw[1]} canvas, the model's canvases "
                                   f"are {' and '.join(f'{h}x{w}' for h, w in counts)}")
        a_labels = np.asarray(batch["anchor_labels"][i], dtype=np.int8)
        if a_labels.shape[0] != want:
            raise ManifestMismatch(f"rows hold {a_labels.shape[0]} anchor labels, the model has {want} anchors")
        a_deltas = np.zeros((want, 4), dtype=np.float32)
        idx = np.asarray(batch["pos_anchor_index"][i], dtype=np.int64)
        if idx.size:
            a_deltas[idx] = np.asarray(batch["pos_anchor_deltas"][i], dtype=np.float32).reshape(-1, 4)
        labels.append(a_labels)
        deltas.append(a_deltas)
    out = {k: batch[k] for k in ("image_id", "orig_height", "orig_width", "scale", "boxes", "labels", "difficult")}
    out["canvas_height"] = np.array([d.shape[0] for d in decoded], dtype=np.int32)
    out["canvas_width"] = np.array([d.shape[1] for d in decoded], dtype=np.int32)
    if len({d.shape for d in decoded}) <= 1:
        out.update(image=np.stack(decoded) if n else np.zeros((0, 0, 0, 3), np.uint8),
                   anchor_labels=np.stack(labels) if n else np.zeros((0, 0), np.int8),
                   anchor_deltas=np.stack(deltas) if n else np.zeros((0, 0, 4), np.float32))
    else:
        out.update(image=_objects(decoded), anchor_labels=_objects(labels), anchor_deltas=_objects(deltas))
    return out


def _objects(arrays: list[np.ndarray]) -> np.ndarray:
    out = np.empty(len(arrays), dtype=object)
    out[:] = arrays
    return out


def _stacked(column: np.ndarray) -> np.ndarray:
    """A column of one canvas's rows: as given, or stacked from per-row arrays (``decode_batch``)."""
    if column.dtype != object:
        return column
    shapes = {np.shape(x) for x in column}
    if len(shapes) != 1:
        raise ValueError(f"a batch mixes canvases {sorted(shapes)}: a batch holds rows of one bucket")
    return np.stack(list(column))


def to_model_inputs(decoded: Mapping[str, Any], use_difficult: bool = False) -> tuple[torch.Tensor, dict[str, Any]]:
    """Decoded numpy batch -> ``images`` (B, 3, H, W) uint8 and the model's ``targets``: boxes and
    labels (difficult boxes dropped unless ``use_difficult``), dense anchor labels and deltas."""
    images = torch.from_numpy(np.ascontiguousarray(_stacked(decoded["image"]))).permute(0, 3, 1, 2)
    boxes, labels = [], []
    for bx, lb, df in zip(decoded["boxes"], decoded["labels"], decoded["difficult"]):
        bx = torch.from_numpy(np.asarray(bx, dtype=np.float32)).view(-1, 4)
        lb = torch.from_numpy(np.asarray(lb, dtype=np.int64))
        if not use_difficult:
            keep = ~torch.from_numpy(np.asarray(df, dtype=bool))
            bx, lb = bx[keep], lb[keep]
        boxes.append(bx)
        labels.append(lb)
    targets = {
        "boxes": boxes,
        "labels": labels,
        "anchor_labels": torch.from_numpy(np.ascontiguousarray(_stacked(np.asarray(decoded["anchor_labels"])))),
        "anchor_deltas": torch.from_numpy(np.ascontiguousarray(_stacked(np.asarray(decoded["anchor_deltas"])))),
    }
    return images, targets


def batch_to_tensors(batch: Mapping[str, Any], num_anchor_positions: int | Mapping[tuple[int, int], int],
                     use_difficult: bool = False) -> tuple[torch.Tensor, dict[str, Any]]:
    """Rows -> model inputs in one call (``decode_batch`` then ``to_model_inputs``)."""
    return to_model_inputs(decode_batch(batch, num_anchor_positions), use_difficult)


_VOLATILE = ("content_hash", "created_at", "seconds", "package_version", "shards")


def content_hash(manifest: Mapping[str, Any]) -> str:
    """The manifest's content hash: what was precomputed (the split listing's digest, classes,
    target config, counts and problems), not when, how fast or under which shard file names.
    Two precomputes of the same data for the same config share it (MLflow's dataset digest)."""
    import hashlib
    import json

    kept = {k: v for k, v in manifest.items() if k not in _VOLATILE}
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()[:32]
