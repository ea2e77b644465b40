"""pipelines.storage: locations, the staged publish (local rename, object-store copy), stale cleanup.

The object-store protocol runs on a real non-local pyarrow filesystem (fsspec's in-memory store
behind ``pyarrow.fs.PyFileSystem``), with a handler that records the order of operations.
"""

import datetime as dt
import json
import os
import re
import uuid

import fsspec
import pyarrow.fs as pafs
import pytest

from pipelines import storage
from pipelines.storage import Location

MARKER = "_SUCCESS"


class _Recording(pafs.FSSpecHandler):
    """fsspec handler that logs writes and deletes, and fails a move when told to."""

    def __init__(self, fs, fail_move_from: str | None = None):
        super().__init__(fs)
        self.ops: list[tuple[str, str]] = []
        self.fail_move_from = fail_move_from

    def open_output_stream(self, path, metadata):
        self.ops.append(("write", path))
        return super().open_output_stream(path, metadata)

    def copy_file(self, src, dest):
        self.ops.append(("write", dest))
        return super().copy_file(src, dest)

    def delete_file(self, path):
        self.ops.append(("delete", path))
        return super().delete_file(path)

    def delete_dir(self, path):
        self.ops.append(("delete", path))
        return super().delete_dir(path)

    def move(self, src, dest):
        if self.fail_move_from and src.rstrip("/") == self.fail_move_from:
            raise OSError(f"injected: cannot rename {src}")
        return super().move(src, dest)


def _memory_root():
    handler = _Recording(fsspec.filesystem("memory"))
    root = f"/t-{uuid.uuid4().hex[:8]}"
    fs = pafs.PyFileSystem(handler)
    fs.create_dir(root)
    return Location(fs, root, f"memory://{root}"), handler


def _stage(dest: Location, run: str, files: dict[str, bytes]) -> Location:
    staging = storage.staging_location(dest, run)
    for name, data in files.items():
        staging.child(name).write_bytes(data)
    return staging


def _tree(loc: Location) -> dict[str, bytes]:
    base = loc.path.rstrip("/") + "/"
    infos = loc.fs.get_file_info(pafs.FileSelector(loc.path, recursive=True))
    return {i.path[len(base):]: Location(loc.fs, i.path, i.path).read_bytes()
            for i in infos if i.type == pafs.FileType.File}


# --------------------------------------------------------------------------- locations


def test_shown_and_is_uri(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert storage.is_uri("s3://b/k") and storage.is_uri("file:///x") and not storage.is_uri("/a/b")
    assert not storage.is_uri("C:/data") and not storage.is_uri("rel/path")
    assert storage.shown("s3://bucket/pre/") == "s3://bucket/pre"
    assert storage.shown("file:///") == "file:///"
    assert storage.shown("out/pre") == str(tmp_path / "out" / "pre")
    assert storage.shown("~/x") == os.path.expanduser("~/x")


def test_location_round_trips_and_listing(tmp_path):
    root = Location.of(str(tmp_path) + "/")
    assert root.path == str(tmp_path) and root.shown == str(tmp_path)
    a = root.child("a", "b.json")
    assert (a.name, a.parent.shown, a.parent.parent.path) == ("b.json", str(tmp_path / "a"), str(tmp_path))
    assert not a.exists()
    a.write_json({"x": [1, 2]})  # creates the missing parent folder
    assert a.is_file() and not a.is_dir() and a.parent.is_dir()
    assert a.read_json() == {"x": [1, 2]}
    for name in ("z.parquet", "y.parquet", "_SUCCESS", ".hidden.parquet", "w.txt"):
        root.child("a", name).write_bytes(name.encode())
    root.child("a", "sub").create_dir()
    assert root.child("a").list_files() == ["b.json", "w.txt", "y.parquet", "z.parquet"]
    assert root.child("a").list_files(".parquet") == ["y.parquet", "z.parquet"]
    assert root.child("a").list_dirs() == ["sub"]
    assert root.child("nope").list_dirs() == [] and root.child("nope").list_files() == []
    assert root.child("a", "w.txt").read_bytes() == b"w.txt"
    root.child("a", "w.txt").delete()
    root.child("a").delete()
    root.child("a").delete()  # deleting what is gone is not an error
    assert os.listdir(tmp_path) == []


def test_location_of_a_uri_keeps_the_uri(tmp_path):
    loc = Location.of(tmp_path.as_uri() + "/")
    assert loc.shown == tmp_path.as_uri() and loc.path == str(tmp_path)
    assert loc.child("x").shown == tmp_path.as_uri() + "/x"


def test_run_names_sort_by_start_time():
    t0 = dt.datetime(2026, 1, 2, 3, 4, 5, 678_000, tzinfo=dt.UTC)
    names = [storage.new_run_name(t0 + dt.timedelta(milliseconds=ms)) for ms in (1000, 1, 0, 999)]
    assert re.fullmatch(r"20260102T030405\.678Z-[0-9a-f]{8}", names[2])
    assert [storage.run_time(n) for n in sorted(names)] == [
        "20260102T030405.678Z", "20260102T030405.679Z", "20260102T030406.677Z", "20260102T030406.678Z"]


# --------------------------------------------------------------------------- publish, local


def test_local_publish_renames_with_the_marker_inside(tmp_path):
    dest = Location.of(tmp_path / "out")
    run = storage.new_run_name()
    staging = _stage(dest, run, {"a.parquet": b"A", "sub/b.parquet": b"B"})
    assert staging.parent.shown == str(tmp_path / "_staging") and staging.name == f"out.{run}"
    assert not storage.is_published(dest, MARKER)
    storage.publish(staging, dest, MARKER, {"rows": 2})
    assert _tree(dest) == {"a.parquet": b"A", "sub/b.parquet": b"B", MARKER: b'{\n  "rows": 2\n}'}
    assert storage.is_published(dest, MARKER)
    assert sorted(os.listdir(tmp_path)) == ["out"]  # staging and the empty _staging folder are gone


def test_local_publish_refuses_or_replaces_an_existing_dest(tmp_path):
    dest = Location.of(tmp_path / "out")
    storage.publish(_stage(dest, storage.new_run_name(), {"old.parquet": b"O"}), dest, MARKER, {"v": 1})
    staging = _stage(dest, storage.new_run_name(), {"new.parquet": b"N"})
    with pytest.raises(FileExistsError, match="out: already exists"):
        storage.publish(staging, dest, MARKER, {"v": 2})
    assert _tree(dest) == {"old.parquet": b"O", MARKER: b'{\n  "v": 1\n}'}
    storage.publish(staging, dest, MARKER, {"v": 2}, replace=True)
    assert _tree(dest) == {"new.parquet": b"N", MARKER: b'{\n  "v": 2\n}'}
    assert sorted(os.listdir(tmp_path)) == ["out"]  # the old output moved aside is deleted


@pytest.mark.parametrize("where", ["local", "memory"])
def test_publish_refuses_a_staging_folder_that_is_gone(tmp_path, where):
    root = Location.of(tmp_path) if where == "local" else _memory_root()[0]
    dest = root.child("out")
    staging = _stage(dest, storage.new_run_name(), {"a.parquet": b"A"})
    staging.delete()  # what a later run's clean_stale_staging does to an overlapping earlier run
    with pytest.raises(FileNotFoundError, match="staging folder is gone"):
        storage.publish(staging, dest, MARKER, {"rows": 1})
    assert not dest.exists() and not staging.exists()


def test_local_replace_restores_the_old_dest_when_the_rename_fails(tmp_path, monkeypatch):
    # A local filesystem whose rename of the staging folder fails (injected through fsspec).
    handler = _Recording(fsspec.filesystem("file"))
    fs = pafs.PyFileSystem(handler)
    monkeypatch.setattr(storage, "_can_rename", lambda f: True)
    dest = Location(fs, str(tmp_path / "out"), str(tmp_path / "out"))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.parquet").write_bytes(b"O")
    (tmp_path / "out" / MARKER).write_text("{}")
    staging = _stage(dest, storage.new_run_name(), {"new.parquet": b"N"})
    handler.fail_move_from = staging.path
    with pytest.raises(OSError, match="injected"):
        storage.publish(staging, dest, MARKER, {"v": 2}, replace=True)
    assert _tree(dest) == {"old.parquet": b"O", MARKER: b"{}"}
    assert [p.name for p in (tmp_path / "_staging").iterdir()] == [staging.name]  # nothing aside is left


# --------------------------------------------------------------------------- publish, object store


def test_object_store_publish_copies_and_writes_the_marker_last():
    root, handler = _memory_root()
    dest = root.child("out")
    staging = _stage(dest, storage.new_run_name(), {"a.parquet": b"A", "_errors/e.parquet": b"E"})
    handler.ops.clear()
    storage.publish(staging, dest, MARKER, {"rows": 1})
    assert _tree(dest) == {"a.parquet": b"A", "_errors/e.parquet": b"E", MARKER: b'{\n  "rows": 1\n}'}
    writes = [p for op, p in handler.ops if op == "write"]
    assert writes[-1] == dest.child(MARKER).path and len(writes) == 3
    assert not staging.exists()
    assert storage.is_published(dest, MARKER)


def test_object_store_replace_deletes_the_old_marker_first():
    root, handler = _memory_root()
    dest = root.child("out")
    storage.publish(_stage(dest, storage.new_run_name(), {"old.parquet": b"O", "x.parquet": b"X"}),
                    dest, MARKER, {"v": 1})
    staging = _stage(dest, storage.new_run_name(), {"new.parquet": b"N"})
    with pytest.raises(FileExistsError):
        storage.publish(staging, dest, MARKER, {"v": 2})
    assert _tree(dest)[MARKER] == b'{\n  "v": 1\n}'
    handler.ops.clear()
    storage.publish(staging, dest, MARKER, {"v": 2}, replace=True)
    assert handler.ops[0] == ("delete", dest.child(MARKER).path)  # before anything else changes
    assert handler.ops[-2] == ("write", dest.child(MARKER).path)  # the marker, then staging goes
    assert handler.ops[-1] == ("delete", staging.path)
    assert _tree(dest) == {"new.parquet": b"N", MARKER: b'{\n  "v": 2\n}'}


# --------------------------------------------------------------------------- stale staging


def _run_at(seconds_ago: float) -> str:
    return storage.new_run_name(dt.datetime.now(dt.UTC) - dt.timedelta(seconds=seconds_ago))


@pytest.mark.parametrize("where", ["local", "memory"])
def test_clean_stale_staging_deletes_only_older_runs_of_the_same_dest(tmp_path, where, caplog):
    root = Location.of(tmp_path) if where == "local" else _memory_root()[0]
    dest, other = root.child("out"), root.child("other")
    old1, old2, now, later = _run_at(60), _run_at(30), _run_at(0), storage.new_run_name(
        dt.datetime.now(dt.UTC) + dt.timedelta(seconds=5))
    stale = [_stage(dest, r, {"p.parquet": b"x"}) for r in (old1, old2)]
    mine = _stage(dest, now, {"p.parquet": b"x"})
    newer = _stage(dest, later, {"p.parquet": b"x"})
    other_old = _stage(other, old1, {"p.parquet": b"x"})
    with caplog.at_level("WARNING", logger="pipelines.storage"):
        removed = storage.clean_stale_staging(dest, now)
    assert removed == [s.shown for s in stale]
    assert [r.getMessage() for r in caplog.records] == [
        f"{s.shown}: staging left by an interrupted run; deleted" for s in stale]
    assert all(not s.exists() for s in stale)
    assert mine.exists() and newer.exists() and other_old.exists()
    assert storage.clean_stale_staging(dest, now, any_dest=True) == [other_old.shown]


def test_clean_stale_staging_restores_a_dest_moved_aside_by_a_killed_replace(tmp_path):
    dest = Location.of(tmp_path / "out")
    killed = _run_at(10)
    aside = storage._aside(dest, killed)
    aside.child(MARKER).write_json({"v": 1})  # the killed run had moved the old output aside
    _stage(dest, killed, {"new.parquet": b"N"})
    assert storage.clean_stale_staging(dest, storage.new_run_name()) == [
        str(tmp_path / "_staging" / f"out.{killed}")]
    assert _tree(dest) == {MARKER: b'{\n  "v": 1\n}'}
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_staging_location_wants_a_run_name(tmp_path):
    with pytest.raises(ValueError, match="not a new_run_name"):
        storage.staging_location(tmp_path / "out", "abc")
    assert json.loads(json.dumps(storage.staging_location(tmp_path / "o", _run_at(0)).shown))
