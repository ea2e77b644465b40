"""Where data lives: local paths and object-store URIs, JSON files, the staged publish.

Locations
---------
A path is local (``/data/voc``, ``~/voc``, ``out/pre``) or a URI understood by
``pyarrow.fs.FileSystem.from_uri`` (``s3://``, ``gs://``, ``file://``...). :class:`Location` pairs
the pyarrow filesystem, the path on it and the user-facing form (``shown``: a URI stays a URI, a
local path becomes absolute, so a Ray worker with another working directory finds it).

Staged publish
--------------
A job that produces a folder never writes into its destination. It writes into a staging folder,
``<parent of dest>/_staging/<dest name>.<run>`` (:func:`staging_location`; ``<run>`` is a
:func:`new_run_name`), then :func:`publish` makes it visible:

* local filesystem: the marker file is written last into staging and staging is renamed to the
  destination, one atomic step. With ``replace`` the old destination is first moved aside (to
  ``_staging/<dest name>.<run>.old``) and moved back if the rename fails.
* object stores (no rename): when replacing, the old destination's marker is deleted first (the
  old output becomes unreadable before anything of it changes), its files are deleted, the staged
  files are copied, the marker is written LAST, then staging is deleted.

Readers trust only a destination holding its marker (:func:`is_published`). A killed run leaves
its staging folder (and, on an object store, perhaps an unmarked destination). Who may clean that
up is decided by leases (``pipelines/lease.py``): a writer first claims its destination
(``lease.claim``: a lease with a heartbeat beside the staging folder), and a staging or ``.old``
folder is deleted or restored (:func:`clean_stale_staging`) only when no live lease names its run.
A claimed run's :func:`publish` first checks that its lease is still its own; :func:`publish` and
:func:`discard` end the claim (:func:`register_writer`).
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import posixpath
import re
import uuid
from dataclasses import dataclass
from typing import Any

import pyarrow.fs as pafs

__all__ = [
    "STAGING_DIR",
    "Location",
    "clean_stale_staging",
    "discard",
    "drop_if_empty",
    "is_published",
    "is_uri",
    "new_run_name",
    "publish",
    "register_writer",
    "resolve_filesystem",
    "run_time",
    "shown",
    "staging_location",
    "unregister_writer",
]

log = logging.getLogger(__name__)

STAGING_DIR = "_staging"
_URI_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*://")
_RUN = r"\d{8}T\d{6}\.\d{3}Z-[0-9a-f]{8}"
_RUN_RE = re.compile(rf"^{_RUN}$")
_STAGED_RE = re.compile(rf"^(?P<dest>.+)\.(?P<run>{_RUN})(?P<old>\.old)?$")


# --------------------------------------------------------------------------- paths


def is_uri(text: str | os.PathLike[str]) -> bool:
    """``scheme://...`` (as opposed to a local path)."""
    return bool(_URI_RE.match(os.fspath(text)))


def resolve_filesystem(path_or_uri: str | os.PathLike[str]) -> tuple[pafs.FileSystem, str]:
    """``(filesystem, path on it)`` for a local path or a URI."""
    text = os.fspath(path_or_uri)
    if is_uri(text):
        return pafs.FileSystem.from_uri(text)
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(text))


def shown(path_or_uri: str | os.PathLike[str]) -> str:
    """The user-facing form: a URI as given without trailing slash, a local path absolute."""
    text = os.fspath(path_or_uri)
    if is_uri(text):
        stripped = text.rstrip("/")
        return text if stripped.endswith(":") else stripped  # "file:///" stays whole
    return os.path.abspath(os.path.expanduser(text))


@dataclass(frozen=True)
class Location:
    """A file or folder: ``(filesystem, path on it)`` plus the form shown to users and workers."""

    fs: pafs.FileSystem
    path: str
    shown: str

    @classmethod
    def of(cls, path_or_uri: str | os.PathLike[str] | Location) -> Location:
        if isinstance(path_or_uri, Location):
            return path_or_uri
        text = os.fspath(path_or_uri)
        fs, path = resolve_filesystem(text)
        return cls(fs, path.rstrip("/") or "/", shown(text))

    def child(self, *parts: str) -> Location:
        return Location(self.fs, posixpath.join(self.path, *parts), posixpath.join(self.shown, *parts))

    @property
    def parent(self) -> Location:
        return Location(self.fs, posixpath.dirname(self.path.rstrip("/")) or "/",
                        posixpath.dirname(self.shown.rstrip("/")))

    @property
    def name(self) -> str:
        return posixpath.basename(self.path.rstrip("/"))

    def __str__(self) -> str:
        return self.shown

    # -- inspection
    def kind(self) -> pafs.FileType:
        return self.fs.get_file_info(self.path).type

    def exists(self) -> bool:
        return self.kind() != pafs.FileType.NotFound

    def is_dir(self) -> bool:
        return self.kind() == pafs.FileType.Directory

    def is_file(self) -> bool:
        return self.kind() == pafs.FileType.File

    def _entries(self, recursive: bool = False) -> list[pafs.FileInfo]:
        if not self.is_dir():
            return []
        return self.fs.get_file_info(pafs.FileSelector(self.path, recursive=recursive))

    def list_names(self) -> list[tuple[str, pafs.FileType]]:
        """Every entry (name, type), hidden ones included, unsorted."""
        return [(posixpath.basename(i.path.rstrip("/")), i.type) for i in self._entries()]

    def list_dirs(self) -> list[str]:
        """Names of the sub-folders, sorted (none when this is not a folder)."""
        return sorted(n for n, t in self.list_names() if t == pafs.FileType.Directory)

    def list_files(self, suffix: str | None = None) -> list[str]:
        """Names of the files, sorted, skipping names that start with ``_`` or ``.`` (markers,
        hidden files: what pyarrow's and Spark's dataset readers skip too)."""
        return sorted(n for n, t in self.list_names()
                      if t == pafs.FileType.File and not n.startswith(("_", "."))
                      and (suffix is None or n.endswith(suffix)))

    # -- content
    def read_bytes(self) -> bytes:
        # compression=None: pyarrow would otherwise guess a codec from the extension.
        with self.fs.open_input_stream(self.path, compression=None) as stream:
            return stream.read()

    def write_bytes(self, data: bytes) -> None:
        try:
            stream = self.fs.open_output_stream(self.path, compression=None)
        except FileNotFoundError:  # a local parent folder that does not exist yet
            self.fs.create_dir(posixpath.dirname(self.path), recursive=True)
            stream = self.fs.open_output_stream(self.path, compression=None)
        with stream:
            stream.write(data)

    def read_json(self) -> Any:
        return json.loads(self.read_bytes())

    def write_json(self, obj: Any) -> None:
        self.write_bytes(json.dumps(obj, indent=2).encode())

    def create_dir(self) -> None:
        self.fs.create_dir(self.path, recursive=True)

    def delete(self) -> None:
        """Delete this file or folder (recursively); nothing to do when it does not exist."""
        kind = self.kind()
        if kind == pafs.FileType.Directory:
            self.fs.delete_dir(self.path)
        elif kind == pafs.FileType.File:
            self.fs.delete_file(self.path)


def read_bytes(fs: pafs.FileSystem, path: str) -> bytes:
    """Read a whole (small) file given as ``(filesystem, path)``."""
    with fs.open_input_stream(path, compression=None) as stream:
        return stream.read()


# --------------------------------------------------------------------------- runs


def new_run_name(now: _dt.datetime | None = None) -> str:
    """``YYYYMMDDTHHMMSS.mmmZ-<8 hex>`` (UTC): names sort by start time."""
    now = now or _dt.datetime.now(_dt.UTC)
    return now.strftime("%Y%m%dT%H%M%S.") + f"{now.microsecond // 1000:03d}Z-{uuid.uuid4().hex[:8]}"


def run_time(run: str) -> str:
    """The sortable start-time part of a run name (runs of the same millisecond compare equal)."""
    return run.split("-", 1)[0]


# --------------------------------------------------------------------------- staged publish


def _can_rename(fs: pafs.FileSystem) -> bool:
    # Only a local filesystem renames a folder in one step; object stores copy object by object.
    return isinstance(fs, pafs.LocalFileSystem)


def staging_location(dest: Location | str, run: str) -> Location:
    """Where a run writes before :func:`publish`: ``<parent>/_staging/<dest name>.<run>``."""
    dest = Location.of(dest)
    if not _RUN_RE.match(run):
        raise ValueError(f"run name {run!r} is not a new_run_name()")
    return dest.parent.child(STAGING_DIR, f"{dest.name}.{run}")


def _aside(dest: Location, run: str) -> Location:
    return dest.parent.child(STAGING_DIR, f"{dest.name}.{run}.old")


# The runs of this process that hold a claim on a destination (``pipelines.lease.Claim``), by
# staging folder: publish checks the claim before anything becomes visible; publish and discard
# end it.
_WRITERS: dict[str, Any] = {}


def register_writer(staging: Location, writer: Any) -> None:
    """Tie ``writer`` (``check()``, ``release()``) to ``staging``: :func:`publish` calls ``check``
    before it makes anything visible, and ``release`` after; :func:`discard` calls ``release``."""
    _WRITERS[staging.shown] = writer


def unregister_writer(staging: Location) -> None:
    _WRITERS.pop(staging.shown, None)


def _end_writer(staging: Location) -> None:
    writer = _WRITERS.pop(staging.shown, None)
    if writer is not None:
        writer.release()


def is_published(dest: Location | str, marker_name: str) -> bool:
    """True when ``dest`` holds its marker: the only state readers may trust."""
    return Location.of(dest).child(marker_name).is_file()


def publish(staging: Location, dest: Location, marker_name: str, marker_obj: Any, replace: bool = False) -> None:
    """Make the staged folder visible at ``dest``, the marker (``marker_obj`` as JSON) last.

    ``replace``: an existing ``dest`` is replaced (else ``FileExistsError``). See the module
    docstring for the two protocols (rename locally, copy + marker last on object stores).
    """
    if dest.exists() and not replace:
        raise FileExistsError(f"{dest.shown}: already exists")
    if not staging.is_dir():
        raise FileNotFoundError(f"{staging.shown}: staging folder is gone (deleted by a later run of the same "
                                "destination?); nothing published")
    writer = _WRITERS.get(staging.shown)
    if writer is not None:
        writer.check()  # a run whose lease was taken over publishes nothing
    if _can_rename(dest.fs):
        _publish_by_rename(staging, dest, marker_name, marker_obj)
    else:
        _publish_by_copy(staging, dest, marker_name, marker_obj)
    _end_writer(staging)
    drop_if_empty(staging.parent)


def _publish_by_rename(staging: Location, dest: Location, marker_name: str, marker_obj: Any) -> None:
    staging.child(marker_name).write_json(marker_obj)
    old = None
    try:  # a stop request (Ctrl-C, SIGTERM) between the two moves puts the old output back too
        if dest.exists():
            match = _STAGED_RE.match(staging.name)
            old = _aside(dest, match.group("run") if match else new_run_name())
            dest.fs.move(dest.path, old.path)
        dest.fs.move(staging.path, dest.path)
    except BaseException:
        if old is not None and old.exists() and not dest.exists():
            dest.fs.move(old.path, dest.path)
        raise
    if old is not None:
        old.delete()


def _publish_by_copy(staging: Location, dest: Location, marker_name: str, marker_obj: Any) -> None:
    if dest.exists():
        dest.child(marker_name).delete()  # first: the old output is unreadable before it changes
        dest.delete()
    dest.create_dir()
    base = staging.path.rstrip("/") + "/"
    for info in sorted(staging._entries(recursive=True), key=lambda i: i.path):
        rel = info.path[len(base):]
        if rel == marker_name:
            continue
        if info.type == pafs.FileType.Directory:
            dest.child(rel).create_dir()
        elif info.type == pafs.FileType.File:
            dest.fs.copy_file(info.path, dest.child(rel).path)
    dest.child(marker_name).write_json(marker_obj)  # LAST: the publish signal
    staging.delete()


def discard(staging: Location) -> None:
    """Delete a run's staging folder (a failed or interrupted run publishes nothing) and end its
    claim on the destination."""
    try:
        staging.delete()
    except OSError as exc:  # best effort: the next run of the destination deletes it
        log.warning("%s: could not delete staging (%s); the next run will", staging.shown, exc)
    _end_writer(staging)
    drop_if_empty(staging.parent)


def drop_if_empty(folder: Location) -> None:
    """Delete a ``_staging`` folder that holds nothing any more."""
    try:
        if folder.name == STAGING_DIR and folder.is_dir() and not folder.list_names():
            folder.fs.delete_dir(folder.path)
    except OSError:  # another run created something in it meanwhile: keep it
        pass


def clean_stale_staging(dest: Location | str, run: str, *, any_dest: bool = False,
                        keep: set[str] | frozenset[str] = frozenset()) -> list[str]:
    """Delete staging folders that runs of ``dest`` started before ``run`` left behind (killed
    runs), warning once per folder; returns what was deleted (as shown). ``any_dest``: also those
    of other destinations in the same parent (a job whose every run publishes a new folder).
    ``keep``: runs whose folders are never touched (the runs holding a live lease, see
    ``pipelines.lease.claim``, which is how writers call this).

    A folder moved aside for a replace (``.old``) whose run died before publishing is moved back
    when ``dest`` is missing: the old output is never lost to a killed replace.
    """
    dest = Location.of(dest)
    root = dest.parent.child(STAGING_DIR)
    removed: list[str] = []
    for name in root.list_dirs():
        match = _STAGED_RE.match(name)
        if not match or match.group("run") in keep or run_time(match.group("run")) >= run_time(run):
            continue
        if match.group("dest") != dest.name and not any_dest:
            continue
        loc = root.child(name)
        target = dest.parent.child(match.group("dest"))
        if match.group("old") and not target.exists():
            loc.fs.move(loc.path, target.path)
            log.warning("%s: restored from %s (a replace interrupted before it published)",
                        target.shown, loc.shown)
            continue
        loc.delete()
        removed.append(loc.shown)
        log.warning("%s: staging left by an interrupted run; deleted", loc.shown)
    drop_if_empty(root)
    return removed
