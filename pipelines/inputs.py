"""What ``infer`` reads: a folder or prefix of images, or a Parquet table of encoded images.

* a folder or object-store prefix: every image file below it (``INPUT_EXTENSIONS``: ``.jpg``,
  ``.jpeg``, ``.png``, ``.tif``, ``.tiff``, ``.webp``, ``.bmp``; recursive, case-insensitive
  extension; names starting with ``.`` or ``_`` are skipped); the image id is the path relative to
  the input root (``sub/dir/img.jpg``);
* a Parquet table (one file, or a folder of ``*.parquet`` files holding no image): an ``image``
  column (the encoded bytes) and an id column, ``image_id`` or else ``path``.

Every image is decoded by ``frcnn.images.decode_image`` (EXIF orientation applied, high bit
depths scaled, any colour mode to RGB, decompression bombs refused per image).
"""

from __future__ import annotations

import logging
import posixpath
from collections import Counter
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.fs as pafs

from frcnn.errors import DatasetError
from pipelines.predict import IMAGES_SCHEMA
from pipelines.storage import Location

__all__ = ["INPUT_EXTENSIONS", "Inputs", "list_inputs", "table_images"]

# What cameras, scanners and exports write, and PIL decodes.
INPUT_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".webp", ".bmp")

log = logging.getLogger(__name__)


@dataclass
class Inputs:
    kind: str  # "files" | "table"
    root: Location
    items: list[dict[str, str]]  # files: image_id, fs_path, path (as shown); table: image_id
    table_files: list[str] = field(default_factory=list)  # table: paths on root.fs of the Parquet files
    id_column: str = "image_id"


def list_inputs(input_uri: str | Location) -> Inputs:
    """Images below a folder/prefix, or the ids of a Parquet table (file or folder)."""
    root = Location.of(input_uri)
    kind = root.kind()
    if kind == pafs.FileType.NotFound:
        raise FileNotFoundError(f"{root.shown}: input not found")
    if kind == pafs.FileType.File:
        if not root.path.endswith(".parquet"):
            raise DatasetError(f"{root.shown}: a file input must be a Parquet table (.parquet); "
                               "give the folder for images")
        return _table_inputs(root, [root.path])
    infos = root.fs.get_file_info(pafs.FileSelector(root.path, recursive=True))
    images, tables = [], []
    for path in sorted(i.path for i in infos if i.type == pafs.FileType.File):
        rel = path[len(root.path):].lstrip("/") if path.startswith(root.path) else posixpath.basename(path)
        if any(part.startswith((".", "_")) for part in rel.split("/")):
            continue  # hidden files, _staging, _SUCCESS...
        if rel.lower().endswith(INPUT_EXTENSIONS):
            images.append({"image_id": rel, "fs_path": path, "path": posixpath.join(root.shown, rel)})
        elif rel.endswith(".parquet"):
            tables.append(path)
    if images:
        if tables:
            log.warning("%s: holds both images and Parquet files; reading the %d images, ignoring %d Parquet "
                        "file(s)", root.shown, len(images), len(tables))
        return Inputs("files", root, images)
    if tables:
        return _table_inputs(root, tables)
    log.warning("%s: no image (%s) and no Parquet table found", root.shown, ", ".join(INPUT_EXTENSIONS))
    return Inputs("files", root, [])


def _table_inputs(root: Location, files: list[str]) -> Inputs:
    import pyarrow.dataset as ds

    dataset = ds.dataset(files, filesystem=root.fs, format="parquet")
    names = dataset.schema.names
    if "image" not in names:
        raise DatasetError(f"{root.shown}: Parquet input needs an 'image' column (encoded bytes); it has {names}")
    image_type = dataset.schema.field("image").type
    if not (pa.types.is_binary(image_type) or pa.types.is_large_binary(image_type)):
        raise DatasetError(f"{root.shown}: column 'image' is {image_type}, not binary")
    id_col = "image_id" if "image_id" in names else "path" if "path" in names else None
    if id_col is None:
        raise DatasetError(f"{root.shown}: Parquet input needs an id column 'image_id' or 'path'; it has {names}")
    ids = [str(v) for v in dataset.to_table(columns=[id_col]).column(id_col).to_pylist() if v is not None]
    dupes = [i for i, n in Counter(ids).items() if n > 1]
    if dupes:
        raise DatasetError(f"{root.shown}: {len(dupes)} {id_col} value(s) appear more than once (first: {dupes[0]!r}); "
                           "ids must be unique")
    return Inputs("table", root, [{"image_id": i} for i in ids], table_files=files, id_column=id_col)


def table_images(batch: pa.Table, *, id_column: str, keep: frozenset[str] | None) -> pa.Table:
    """Ray Data map over a Parquet input: -> IMAGES_SCHEMA, only the rows still to do."""
    import pyarrow.compute as pc

    ids = batch.column(id_column).cast(pa.string())
    mask = pc.is_valid(ids)
    if keep is not None:
        mask = pc.and_(mask, pc.is_in(ids, value_set=pa.array(sorted(keep), pa.string())))
    batch = batch.filter(mask)
    ids = batch.column(id_column).cast(pa.string())
    paths = batch.column("path").cast(pa.string()) if "path" in batch.column_names else ids
    paths = pc.coalesce(paths, ids)
    images = batch.column("image").cast(pa.binary())
    errors = pc.if_else(pc.is_null(images), "no image bytes (null)",
                        pc.if_else(pc.equal(pc.binary_length(images), 0), "empty image bytes (0 bytes)", ""))
    return pa.Table.from_arrays([ids, paths, pc.fill_null(images, b""), errors], schema=IMAGES_SCHEMA)
