"""Leases: which run writes a destination, and whether it is still alive.

A run that writes under an output root first takes the destination's lease, a small JSON file
beside its staging folder (``<parent>/_staging/<dest name>.lease``; ``infer`` keeps it inside its
output root, see :func:`claim`). The lease names its holder (the staging run name, the job and its
MLflow run id, host, pid, start time, command line) and carries a heartbeat that a daemon thread
renews every ``ttl / 4`` seconds while the run lives.

* A lease is **live** until its heartbeat is older than the time-to-live (``FRCNN_LEASE_TTL``
  seconds, default 60), or, on the same machine, its owner pid is gone (a killed run's lease ends at
  once there). A second run of the same destination is refused while the lease is live
  (:class:`LeaseHeld`, one line naming the holder) or, with ``wait``, polls until it is free.
* A run takes over an expired lease atomically; only then does it clean up: staging and ``.old``
  folders are deleted, or restored, only when no live lease names their run
  (``storage.clean_stale_staging``'s ``keep``).
* The holder renews the heartbeat with a compare-and-swap: a holder whose lease was taken over
  (it stalled longer than the time-to-live) notices, and its publish fails cleanly
  (:class:`LeaseLost`) instead of overwriting the newer run's work.

Atomicity by store:

* local filesystem: every read-modify-write of a lease runs under ``flock`` on the folder that
  holds ``_staging`` (held for microseconds, never across a run);
* S3 (a ``pyarrow.fs.S3FileSystem``): conditional writes through boto3, ``If-None-Match: *`` to
  create, ``If-Match: <ETag>`` to renew, take over and delete;
* any other store: write, then read back the token; two runs starting within the same instant on
  such a store may both believe they hold the lease (the limit stated in the docs).

Heartbeat times are the writer's wall clock compared with the reader's: clocks of machines that
share a destination must agree to well within the time-to-live.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import logging
import os
import posixpath
import shlex
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import Any

import pyarrow.fs as pafs

from frcnn.errors import ConfigError, StorageError
from pipelines import storage
from pipelines.storage import Location

__all__ = ["LEASE_SUFFIX", "TTL_ENV", "Claim", "Holder", "Lease", "LeaseHeld", "LeaseLost", "claim", "lease_ttl",
           "live_runs", "set_owner", "wait_free"]

log = logging.getLogger(__name__)

TTL_ENV = "FRCNN_LEASE_TTL"
DEFAULT_TTL_S = 60.0
LEASE_SUFFIX = ".lease"
_POLL_S = 1.0
_owner: dict[str, str] = {}


def lease_ttl() -> float:
    """Seconds without a heartbeat after which a lease has expired (``FRCNN_LEASE_TTL``)."""
    raw = os.environ.get(TTL_ENV, "")
    try:
        ttl = float(raw) if raw else DEFAULT_TTL_S
    except ValueError as exc:
        raise ConfigError(f"{TTL_ENV}={raw!r}: not a number of seconds") from exc
    if ttl <= 0:
        raise ConfigError(f"{TTL_ENV}={raw!r}: must be > 0")
    return ttl


def set_owner(job: str | None, run_id: str | None = None) -> None:
    """Name the job (and its MLflow run) that the leases of this process belong to (also those
    already held: named at their next heartbeat); ``None`` forgets it."""
    _owner.update(job=job or "", run_id=run_id or "")


def _machine() -> str:
    """This machine and pid namespace: pids are compared only between equal machines."""
    parts = [socket.gethostname()]
    for path in ("/proc/sys/kernel/random/boot_id", "/proc/self/ns/pid"):
        with contextlib.suppress(OSError):
            parts.append(open(path).read().strip() if path.endswith("boot_id") else os.readlink(path))
    return "|".join(parts)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _utc(ts: float) -> str:
    return _dt.datetime.fromtimestamp(ts, _dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


@dataclass(frozen=True)
class Holder:
    """Who holds a lease (the JSON content of the lease file)."""

    run: str  # the staging run name (pipelines.storage.new_run_name)
    job: str
    run_id: str  # the MLflow run, when the job has one
    host: str
    machine: str
    pid: int
    started: float  # unix time
    heartbeat: float
    token: str
    command: str

    @classmethod
    def new(cls, run: str) -> Holder:
        now = time.time()
        return cls(run=run, job=_owner.get("job", ""), run_id=_owner.get("run_id", ""), host=socket.gethostname(),
                   machine=_machine(), pid=os.getpid(), started=now, heartbeat=now, token=uuid.uuid4().hex,
                   command=shlex.join([posixpath.basename(sys.argv[0]), *sys.argv[1:]]) if sys.argv else "")

    @classmethod
    def parse(cls, data: bytes) -> Holder | None:
        try:
            raw = json.loads(data)
            return cls(**{k: raw[k] for k in cls.__dataclass_fields__})
        except (ValueError, KeyError, TypeError):
            return None

    def dumps(self) -> bytes:
        return json.dumps(asdict(self), indent=1).encode()

    def expired(self, ttl: float, now: float | None = None) -> bool:
        """No heartbeat for ``ttl`` seconds, or an owner pid on this machine that is gone."""
        if (now if now is not None else time.time()) - self.heartbeat > ttl:
            return True
        return self.machine == _machine() and not _pid_alive(self.pid)

    def describe(self) -> str:
        who = f"{self.job or 'a run'}" + (f" (MLflow run {self.run_id})" if self.run_id else "")
        return (f"{who} started {_utc(self.started)} on {self.host} pid {self.pid}, "
                f"last heartbeat {max(time.time() - self.heartbeat, 0):.0f} s ago")


class LeaseHeld(StorageError, FileExistsError):
    """The destination is being written by a live run."""

    def __init__(self, where: str, holder: Holder) -> None:
        super().__init__(f"{where}: in use by {holder.describe()}; try again when it ends")
        self.where, self.holder = where, holder


class LeaseLost(StorageError):
    """This run's lease expired and another run took the destination over: nothing is published."""


# --------------------------------------------------------------------------- stores


class _Store:
    """Conditional operations on one small object; ``version`` is opaque (bytes or an ETag)."""

    def __init__(self, loc: Location) -> None:
        self.loc = loc

    def read(self) -> tuple[bytes, Any] | None:
        try:
            data = self.loc.read_bytes()
        except (FileNotFoundError, OSError) as exc:
            if self.loc.exists():
                raise OSError(f"{self.loc.shown}: cannot read lease: {exc}") from exc
            return None
        return data, data

    @contextlib.contextmanager
    def _mutex(self):
        yield

    def create(self, data: bytes) -> Any | None:
        with self._mutex():
            if self.loc.exists():
                return None
            self._write(data)
            return self._confirm(data)

    def replace(self, data: bytes, version: Any) -> Any | None:
        with self._mutex():
            current = self.read()
            if current is None or current[1] != version:
                return None
            self._write(data)
            return self._confirm(data)

    def delete(self, version: Any) -> None:
        with self._mutex():
            current = self.read()
            if current is not None and current[1] == version:
                self.loc.delete()

    def _write(self, data: bytes) -> None:
        self.loc.write_bytes(data)

    def _confirm(self, data: bytes) -> Any | None:
        current = self.read()
        return current[1] if current is not None and current[0] == data else None


class _LocalStore(_Store):
    """Local files: each operation under ``flock`` on the folder holding ``_staging``; content
    replaced by rename, so a reader never sees half a lease."""

    @contextlib.contextmanager
    def _mutex(self):
        import fcntl

        folder = posixpath.dirname(posixpath.dirname(self.loc.path))
        os.makedirs(posixpath.dirname(self.loc.path), exist_ok=True)
        fd = os.open(folder, os.O_RDONLY)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
            except OSError as exc:  # a filesystem without flock (some NFS mounts): rename only
                log.debug("%s: no flock (%s)", folder, exc)
            yield
        finally:
            os.close(fd)  # releases the lock

    def _write(self, data: bytes) -> None:
        tmp = f"{self.loc.path}.{uuid.uuid4().hex[:8]}.tmp"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, self.loc.path)


class _S3Store(_Store):
    """S3 conditional writes (``If-None-Match`` / ``If-Match``) through boto3, configured like the
    pyarrow filesystem (its endpoint, region and keys; else boto3's own environment)."""

    def __init__(self, loc: Location) -> None:
        super().__init__(loc)
        import boto3

        opts = loc.fs.__reduce__()[1][0]
        endpoint = opts.get("endpoint_override") or None
        if endpoint and "://" not in endpoint:
            endpoint = f"{opts.get('scheme') or 'https'}://{endpoint}"
        keys = {"aws_access_key_id": opts["access_key"], "aws_secret_access_key": opts["secret_key"],
                "aws_session_token": opts.get("session_token")} if opts.get("access_key") else {}
        self.client = boto3.client("s3", endpoint_url=endpoint, region_name=opts.get("region") or None, **keys)
        self.bucket, _, self.key = loc.path.partition("/")

    def _call(self, fn, **kw) -> Any | None:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return fn(Bucket=self.bucket, Key=self.key, **kw)
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            if code in ("PreconditionFailed", "ConditionalRequestConflict", "NoSuchKey", "404", "412", "409"):
                return None
            raise OSError(f"{self.loc.shown}: lease: {exc}") from exc
        except BotoCoreError as exc:  # the store does not answer (connection refused, timeouts)
            raise OSError(f"{self.loc.shown}: lease: {exc}") from exc

    def read(self) -> tuple[bytes, Any] | None:
        got = self._call(self.client.get_object)
        return None if got is None else (got["Body"].read(), got["ETag"])

    def create(self, data: bytes) -> Any | None:
        put = self._call(self.client.put_object, Body=data, IfNoneMatch="*")
        return None if put is None else put["ETag"]

    def replace(self, data: bytes, version: Any) -> Any | None:
        put = self._call(self.client.put_object, Body=data, IfMatch=version)
        return None if put is None else put["ETag"]

    def delete(self, version: Any) -> None:
        self._call(self.client.delete_object, IfMatch=version)


def _store(loc: Location) -> _Store:
    if isinstance(loc.fs, pafs.LocalFileSystem):
        return _LocalStore(loc)
    if isinstance(loc.fs, pafs.S3FileSystem):
        return _S3Store(loc)
    return _Store(loc)


# --------------------------------------------------------------------------- the lease


class Lease:
    """A lease this process holds; a daemon thread renews its heartbeat until :meth:`release`."""

    def __init__(self, loc: Location, store: _Store, holder: Holder, version: Any, ttl: float) -> None:
        self.loc, self._store, self.holder, self._version, self.ttl = loc, store, holder, version, ttl
        self.lost: Holder | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"lease-{holder.run}", daemon=True)
        self._thread.start()

    @classmethod
    def acquire(cls, loc: Location, run: str, *, wait: float = 0.0, ttl: float | None = None,
                where: str | None = None) -> Lease:
        """Take the lease at ``loc`` for ``run``: create it, or take over an expired one. A live one
        is waited for up to ``wait`` seconds, then :class:`LeaseHeld` naming ``where`` (default: the
        lease file)."""
        ttl = lease_ttl() if ttl is None else ttl
        store = _store(loc)
        deadline = time.monotonic() + max(wait, 0.0)
        while True:
            holder = Holder.new(run)
            version = store.create(holder.dumps())
            if version is not None:
                return cls(loc, store, holder, version, ttl)
            current = store.read()
            if current is None:
                continue  # released meanwhile
            other = Holder.parse(current[0])
            if other is None or other.expired(ttl):
                version = store.replace(holder.dumps(), current[1])
                if version is not None:
                    log.warning("%s: took over the expired lease of %s", loc.shown,
                                other.describe() if other else "an unreadable holder")
                    return cls(loc, store, holder, version, ttl)
                continue
            if time.monotonic() >= deadline:
                raise LeaseHeld(where or loc.shown, other)
            time.sleep(min(_POLL_S, ttl / 4, max(deadline - time.monotonic(), 0.01)))

    def _beat(self) -> None:
        interval = max(self.ttl / 4, 0.05)
        while not self._stop.wait(interval) and self._beat_once():
            pass

    def _beat_once(self) -> bool:
        """Renew the heartbeat if the lease is still this run's; False once it is lost or released."""
        with self._lock:
            if self._stop.is_set() or self.lost is not None:
                return False
            fresh = replace(self.holder, heartbeat=time.time(), job=_owner.get("job") or self.holder.job,
                            run_id=_owner.get("run_id") or self.holder.run_id)
            try:
                version = self._store.replace(fresh.dumps(), self._version)
            except OSError as exc:  # a store that does not answer: try again at the next beat
                log.warning("%s: heartbeat not renewed (%s)", self.loc.shown, exc)
                return True
            if version is None:
                current = self._store.read()
                self.lost = (Holder.parse(current[0]) if current else None) or self.holder
                log.warning("%s: lease lost to %s", self.loc.shown, self.lost.describe())
                return False
            self.holder, self._version = fresh, version
            return True

    def check(self) -> None:
        """Raise :class:`LeaseLost` when another run took this lease over."""
        if self.lost is not None:
            raise LeaseLost(f"{self.loc.shown}: this run's lease expired and {self.lost.describe()} took over; "
                            "nothing published")

    def release(self) -> None:
        """Stop the heartbeat and delete the lease (when it is still this run's)."""
        with self._lock:
            self._stop.set()
        self._thread.join(timeout=5)
        if self.lost is None:
            try:
                self._store.delete(self._version)
            except OSError as exc:
                log.warning("%s: lease not deleted (%s); it expires by itself", self.loc.shown, exc)

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


def live_runs(staging_root: Location | str, ttl: float | None = None) -> set[str]:
    """Runs named by a live lease in a ``_staging`` folder."""
    root = Location.of(staging_root)
    ttl = lease_ttl() if ttl is None else ttl
    runs = set()
    for name, kind in root.list_names():
        if kind != pafs.FileType.File or not name.endswith(LEASE_SUFFIX):
            continue
        current = _store(root.child(name)).read()
        holder = Holder.parse(current[0]) if current else None
        if holder is not None and not holder.expired(ttl):
            runs.add(holder.run)
    return runs


def wait_free(loc: Location, wait: float = 0.0, *, where: str | None = None, ttl: float | None = None,
              on_wait: Callable[[str], None] | None = None) -> None:
    """Return once the lease at ``loc`` is free or expired, waiting up to ``wait`` seconds, else
    :class:`LeaseHeld`. Only a look (nothing is taken): a command calls it before it starts its
    MLflow run, so that a refused run leaves none; :func:`claim` is what decides. ``on_wait`` gets
    one line when the wait begins."""
    ttl = lease_ttl() if ttl is None else ttl
    deadline = time.monotonic() + max(wait, 0.0)
    told = False
    while True:
        current = _store(loc).read()
        holder = Holder.parse(current[0]) if current else None
        if holder is None or holder.expired(ttl):
            return
        if time.monotonic() >= deadline:
            raise LeaseHeld(where or loc.shown, holder)
        if on_wait is not None and not told:
            told = True
            on_wait(f"{where or loc.shown}: in use by {holder.describe()}; waiting up to {wait:g} s")
        time.sleep(min(_POLL_S, ttl / 4, max(deadline - time.monotonic(), 0.01)))


# --------------------------------------------------------------------------- claims


@dataclass
class Claim:
    """A run's hold on a destination: its lease and its staging folder. ``storage.publish`` checks
    it before anything becomes visible; ``publish`` and ``storage.discard`` release it."""

    dest: Location
    run: str
    staging: Location
    lease: Lease

    def check(self) -> None:
        self.lease.check()

    def release(self) -> None:
        storage.unregister_writer(self.staging)
        self.lease.release()
        storage.drop_if_empty(self.lease.loc.parent)

    def __enter__(self) -> Claim:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


def claim(dest: Location | str, run: str, *, wait: float = 0.0, lease_at: Location | None = None,
          any_dest: bool = False, where: str | None = None) -> Claim:
    """Take ``dest``'s lease for ``run`` (waiting up to ``wait`` seconds for a live holder), then
    clean what dead runs left in its ``_staging`` folder: a folder is deleted, or an ``.old`` one
    restored, only when no live lease names its run. ``lease_at``: where the lease lives (default
    ``<parent>/_staging/<dest name>.lease``); ``any_dest``: clean staging of every destination in
    that folder (a job whose every run publishes a new folder); ``where``: what a refusal names
    (default ``dest``)."""
    dest = Location.of(dest)
    root = dest.parent.child(storage.STAGING_DIR)
    loc = lease_at or root.child(dest.name + LEASE_SUFFIX)
    lease = Lease.acquire(loc, run, wait=wait, where=where or dest.shown)
    staging = storage.staging_location(dest, run)
    try:
        storage.clean_stale_staging(dest, run, any_dest=any_dest, keep=live_runs(root) | {run})
    except BaseException:
        lease.release()
        raise
    held = Claim(dest, run, staging, lease)
    storage.register_writer(staging, held)
    return held
