"""Cluster rehearsal: infra/'s shape run for real on one machine, with faults.

    .venv/bin/python infra/rehearsal/rehearse.py [--keep] [--summary FILE]      (make cluster-rehearsal)

On 127.0.0.1 only, every piece in its own process group, in a fresh temp folder, on free ports:

* PostgreSQL from the OS packages (``initdb``/``pg_ctl`` as the ``postgres`` user when run as root);
* moto's S3 server, buckets ``mlflow`` (MLflow's artifacts) and ``frcnn`` (data, checkpoints,
  detections), made here;
* ``mlflow server`` on PostgreSQL with proxied artifacts whose destination is ``s3://mlflow``;
* a Ray cluster: a head with 0 CPUs and two worker nodes (``ray start``), token auth on, the
  venv's ``bin`` first on every node's PATH, S3 and MLflow settings in the nodes' environment (as
  KubeRay's ConfigMap and Secret put them in the pods').

The Ray nodes reach S3 through a TCP relay in this process, so that the S3 endpoint can be made
unreachable to the jobs (fault c) without losing moto's in-memory buckets.

Then the infra/README command lines go through ``ray job submit`` (addresses, sizes and buckets
changed): synth -> upload -> precompute train/val/test -> train (2 ranks, one per worker node,
``--storage-path s3://``) -> evaluate -> promote -> infer --incremental, with four faults: a
worker node killed mid-training and replaced; the tracking server stopped ~20 s mid-training; S3
unreachable during a precompute; an infer job stopped mid-write. Each step's result is asserted
against what the engines hold (PostgreSQL rows, objects in the bucket, Ray job states), and at the
end no MLflow param, tag or artifact and no object may hold the AWS keys or the Ray token.

Exit status 0 when every assertion held; a JSON summary (timings, observations) is printed and
written to ``--summary``. Everything started is stopped at the end, also on failure: the process
groups this script created, then any process still carrying this run's marker variable.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
CONFIG = Path(__file__).resolve().parent / "rehearsal.yaml"  # the tiny detector, 128x128 canvas
VENV_BIN = Path(sys.executable).parent
MARKER = "FRCNN_REHEARSAL_ID"  # in the environment of every process this run starts
CLASSES = ("ellipse", "rectangle", "triangle", "cross", "diamond")
MODEL_NAME = "frcnn-rehearsal"
EXPERIMENT = "frcnn-rehearsal"
# Sizes: 40 generated images (28 train, 6 val, 6 test), a 128x128 canvas, batch 2 per rank.
# EPOCHS and BATCH are rehearsal.yaml's train section.
IMAGES, BATCH, EPOCHS = 40, 2, 12


class RehearsalError(AssertionError):
    pass


def check(cond: Any, message: str) -> None:
    if not cond:
        raise RehearsalError(message)


def log(msg: str) -> None:
    print(f"[rehearsal {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def free_range(width: int) -> int:
    """A base port whose next ``width`` ports are free now (Ray's per-node worker port range)."""
    import random

    for _ in range(200):
        base = random.randrange(20000, 30000)
        socks = []
        try:
            for p in range(base, base + width):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", p))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RehearsalError("no free port range")


# Every wait below is sized for an idle 2-core machine, times this: a shared machine can be many
# times slower (seen here: load average 45 on 2 cores), and a wait that gives up early fails the
# rehearsal for nothing. The test's own time limit bounds the whole.
SLACK = 4


def wait_for(what: str, fn, timeout: float, every: float = 0.5) -> Any:
    timeout *= SLACK
    deadline = time.monotonic() + timeout
    while True:
        value = fn()
        if value:
            return value
        if time.monotonic() > deadline:
            raise RehearsalError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(every)


# ---------------------------------------------------------------------------------------------
# A TCP relay that can be cut (the S3 endpoint as the Ray nodes see it)
# ---------------------------------------------------------------------------------------------


class Relay:
    def __init__(self, port: int, target: int) -> None:
        self.port, self.target = port, target
        self._listener: socket.socket | None = None
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self.bytes_up = 0
        self.open()

    def open(self) -> None:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", self.port))
        s.listen(64)
        self._listener = s
        threading.Thread(target=self._accept, args=(s,), daemon=True).start()

    def cut(self) -> None:
        """Refuse new connections and reset the open ones: the endpoint is gone."""
        with self._lock:
            listener, self._listener = self._listener, None
            conns, self._conns = self._conns, []
        if listener is not None:
            listener.close()
        for c in conns:
            with contextlib.suppress(OSError):
                c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                c.close()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target))
            except OSError:
                client.close()
                continue
            with self._lock:
                if self._listener is not listener:
                    client.close()
                    upstream.close()
                    return
                self._conns += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, up: bool) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if up:
                    self.bytes_up += len(data)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)


# ---------------------------------------------------------------------------------------------
# The stack
# ---------------------------------------------------------------------------------------------


class Stack:
    def __init__(self, keep: bool = False) -> None:
        self.keep = keep
        self.id = secrets.token_hex(6)
        # Short: Ray's Unix socket paths live under it (108-byte limit).
        self.tmp = Path(tempfile.mkdtemp(prefix="rh", dir="/tmp"))
        os.chmod(self.tmp, 0o711)  # PostgreSQL's user must reach its data folder inside
        self.logs = self.tmp / "logs"
        self.logs.mkdir()
        self.groups: dict[str, subprocess.Popen] = {}
        self.root = os.geteuid() == 0
        (self.pg_port, self.moto_port, self.s3_port, self.s3_fault_port, self.mlflow_port, self.gcs_port,
         self.dash_port, self.client_port) = free_ports(8)
        self.access_key = "AKIA" + secrets.token_hex(8).upper()
        self.secret_key = secrets.token_urlsafe(30)
        self.ray_token = secrets.token_hex(32)
        self.relay: Relay | None = None
        self.fault_relay: Relay | None = None  # the endpoint one job sees (fault c), cut on its own
        self.nodes: dict[str, int] = {}  # node name -> process group id

    # -- environment ---------------------------------------------------------------------------

    def base_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("RAY_", "MLFLOW_", "AWS_")) and k not in ("PYTHONPATH",)}
        env.update({
            MARKER: self.id,
            "PATH": f"{VENV_BIN}{os.pathsep}{env.get('PATH', '/usr/bin:/bin')}",
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": "us-east-1",
            "PYTHONUNBUFFERED": "1",
        })
        return env

    def node_env(self) -> dict[str, str]:
        """What KubeRay's ConfigMap + Secrets give the Ray pods (infra/k8s/kuberay/)."""
        env = self.base_env()
        env.update({
            "MLFLOW_TRACKING_URI": self.mlflow_uri,
            "AWS_ENDPOINT_URL": f"http://127.0.0.1:{self.s3_port}",
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": self.ray_token,
            "RAY_TRAIN_V2_ENABLED": "1",
            "RAY_USAGE_STATS_ENABLED": "0",
        })
        return env

    @property
    def mlflow_uri(self) -> str:
        return f"http://127.0.0.1:{self.mlflow_port}"

    @property
    def ray_address(self) -> str:
        return f"http://127.0.0.1:{self.dash_port}"

    @property
    def pg_dsn(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.pg_port}/mlflow"

    # -- processes -----------------------------------------------------------------------------

    def spawn(self, name: str, argv: list[str], env: dict[str, str], cwd: Path | None = None) -> subprocess.Popen:
        out = open(self.logs / f"{name}.log", "ab")
        proc = subprocess.Popen(argv, env=env, cwd=cwd or self.tmp, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        self.groups[name] = proc
        return proc

    def run(self, argv: list[str], env: dict[str, str] | None = None, timeout: float = 120,
            check_rc: bool = True) -> subprocess.CompletedProcess:
        res = subprocess.run(argv, env=env or self.base_env(), cwd=self.tmp, capture_output=True, text=True,
                             timeout=timeout)
        if check_rc and res.returncode != 0:
            raise RehearsalError(f"{shlex.join(argv)} exited {res.returncode}:\n{res.stdout[-3000:]}\n"
                                 f"{res.stderr[-3000:]}")
        return res

    def kill_group(self, name: str, sig: int = signal.SIGKILL) -> None:
        proc = self.groups.pop(name, None)
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)

    def sweep(self) -> list[int]:
        """Kill what is left carrying this run's marker (processes that left our groups)."""
        needle = f"{MARKER}={self.id}".encode()
        killed = []
        for pid_dir in Path("/proc").iterdir():
            if not pid_dir.name.isdigit() or int(pid_dir.name) == os.getpid():
                continue
            try:
                environ = (pid_dir / "environ").read_bytes()
            except OSError:
                continue
            if needle in environ.split(b"\0"):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid_dir.name), signal.SIGKILL)
                    killed.append(int(pid_dir.name))
        return killed

    # -- how much of the machine the rehearsal got ---------------------------------------------

    def start_sampler(self, every: float = 2.0) -> None:
        """Sum the CPU time of every process carrying this run's marker (and this one), and the
        machine's load, every ``every`` seconds: the wall time against the CPU time actually used
        tells how much of it was waiting for cores other work held."""
        self.cpu_seen: dict[int, float] = {}
        self.load_samples: list[float] = []
        self._sampling = True
        needle = f"{MARKER}={self.id}".encode()
        tick = os.sysconf("SC_CLK_TCK")

        def sample() -> None:
            while self._sampling:
                for pid_dir in Path("/proc").iterdir():
                    if not pid_dir.name.isdigit():
                        continue
                    pid = int(pid_dir.name)
                    try:
                        if pid != os.getpid() and needle not in (pid_dir / "environ").read_bytes().split(b"\0"):
                            continue
                        fields = (pid_dir / "stat").read_text().rsplit(")", 1)[1].split()
                    except (OSError, IndexError):
                        continue
                    self.cpu_seen[pid] = (int(fields[11]) + int(fields[12])) / tick
                self.load_samples.append(os.getloadavg()[0])
                time.sleep(every)

        threading.Thread(target=sample, daemon=True).start()

    def cpu_report(self, wall: float) -> dict[str, float]:
        self._sampling = False
        cpu = sum(self.cpu_seen.values())
        load = sum(self.load_samples) / max(len(self.load_samples), 1)
        return {"cpu_seconds_used": round(cpu, 1), "wall_seconds": round(wall, 1),
                "cores": os.cpu_count() or 0, "mean_load_average_1m": round(load, 1),
                # What the run would need on an idle machine if CPU were its only limit.
                "cpu_bound_floor_seconds": round(cpu / (os.cpu_count() or 1), 1)}

    def close(self) -> None:
        log("stopping everything this run started")
        for name in [n for n in self.groups if n.startswith("ray-") and n != "ray-head"] + ["ray-head"]:
            self.kill_group(name, signal.SIGTERM)
        for name in ("mlflow", "moto"):
            self.kill_group(name, signal.SIGTERM)
        for relay in (self.relay, self.fault_relay):
            if relay:
                relay.cut()
        if (self.tmp / "pg" / "postmaster.pid").exists():
            self.run(self.pg("pg_ctl", "-D", str(self.tmp / "pg"), "-m", "immediate", "-w", "stop"),
                     check_rc=False, timeout=60)
        for name in list(self.groups):
            self.kill_group(name)
        time.sleep(1)
        left = self.sweep()
        if left:
            log(f"killed {len(left)} leftover process(es) of this run")
        if not self.keep:
            shutil.rmtree(self.tmp, ignore_errors=True)
        else:
            log(f"kept {self.tmp}")

    # -- PostgreSQL ----------------------------------------------------------------------------

    def pg(self, *argv: str) -> list[str]:
        return ["runuser", "-u", "postgres", "--", *argv] if self.root else list(argv)

    def start_postgres(self) -> None:
        data = self.tmp / "pg"
        data.mkdir()
        if self.root:
            shutil.chown(data, "postgres", "postgres")
        self.run(self.pg("initdb", "-D", str(data), "-A", "trust", "-U", "postgres", "--no-sync"), timeout=120)
        # Loopback only, socket in the data folder, a free port; fsync off: a throwaway database.
        opts = f"-p {self.pg_port} -k {data} -h 127.0.0.1 -c fsync=off -c full_page_writes=off"
        self.run(self.pg("pg_ctl", "-D", str(data), "-o", opts, "-l", str(data / "server.log"), "-w", "start"),
                 timeout=120)
        self.run(["createdb", "-h", "127.0.0.1", "-p", str(self.pg_port), "-U", "postgres", "mlflow"])

    def sql(self, query: str, params: tuple = ()) -> list[tuple]:
        import psycopg

        with psycopg.connect(self.pg_dsn, autocommit=True) as conn:
            return conn.execute(query, params).fetchall()

    # -- S3 ------------------------------------------------------------------------------------

    def start_s3(self) -> None:
        self.spawn("moto", [str(VENV_BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(self.moto_port)],
                   self.base_env())
        wait_for("moto", lambda: _port_open(self.moto_port), 60)
        for bucket in ("mlflow", "frcnn"):
            self.s3.create_bucket(Bucket=bucket)
        self.relay = Relay(self.s3_port, self.moto_port)
        self.fault_relay = Relay(self.s3_fault_port, self.moto_port)

    @property
    def s3(self):
        if not hasattr(self, "_s3"):
            import boto3

            self._s3 = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{self.moto_port}",
                                    aws_access_key_id=self.access_key, aws_secret_access_key=self.secret_key,
                                    region_name="us-east-1")
        return self._s3

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        out = []
        for page in self.s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            out += [o["Key"] for o in page.get("Contents", [])]
        return out

    def get(self, bucket: str, key: str) -> bytes:
        return self.s3.get_object(Bucket=bucket, Key=key)["Body"].read()

    # -- MLflow --------------------------------------------------------------------------------

    def mlflow_argv(self) -> list[str]:
        return [str(VENV_BIN / "mlflow"), "server",
                "--backend-store-uri", f"postgresql+psycopg://postgres@127.0.0.1:{self.pg_port}/mlflow",
                "--artifacts-destination", "s3://mlflow", "--serve-artifacts",
                "--host", "127.0.0.1", "--port", str(self.mlflow_port), "--workers", "1"]

    def start_mlflow(self) -> None:
        env = self.base_env()
        env["MLFLOW_S3_ENDPOINT_URL"] = f"http://127.0.0.1:{self.moto_port}"
        # MLflow 3.17 starts seven huey worker processes for its GenAI jobs (scorers, prompt
        # optimisation) that no frcnn job uses: off, which saves a core-minute per start here.
        env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
        self.spawn("mlflow", self.mlflow_argv(), env)

    def mlflow_healthy(self) -> bool:
        import urllib.request

        try:
            with urllib.request.urlopen(f"{self.mlflow_uri}/health", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    # -- Ray -----------------------------------------------------------------------------------

    def ray_start(self, name: str, head: bool, cpus: int) -> None:
        ports = free_ports(6)
        base = free_range(40)
        argv = [str(VENV_BIN / "ray"), "start", "--node-ip-address", "127.0.0.1", "--num-cpus", str(cpus),
                "--object-store-memory", str(150 * 2**20),
                "--node-manager-port", str(ports[0]), "--object-manager-port", str(ports[1]),
                "--dashboard-agent-listen-port", str(ports[2]), "--dashboard-agent-grpc-port", str(ports[3]),
                "--metrics-export-port", str(ports[4]), "--runtime-env-agent-port", str(ports[5]),
                "--min-worker-port", str(base), "--max-worker-port", str(base + 39)]
        if head:
            argv += ["--head", "--port", str(self.gcs_port), "--dashboard-host", "127.0.0.1",
                     "--dashboard-port", str(self.dash_port), "--ray-client-server-port", str(self.client_port),
                     "--temp-dir", str(self.tmp / "ray"), "--disable-usage-stats"]
        else:
            argv += ["--address", f"127.0.0.1:{self.gcs_port}"]
        for attempt in range(6):
            proc = self.spawn(f"ray-{name}", argv, self.node_env())
            rc = proc.wait(timeout=240)
            if rc == 0:
                break
            # Ray gives a starting raylet 30 s (hard-coded) to register; a loaded machine can miss it.
            log(f"ray start for {name} exited {rc} (attempt {attempt + 1}); retrying")
            self.kill_group(f"ray-{name}")
        check(rc == 0, f"ray start for {name} exited {rc}; see {self.logs}/ray-{name}.log")
        self.nodes[name] = proc.pid
        # `ray start` exits once its daemons run; they stay in its process group.
        self.groups[f"ray-{name}"] = proc

    def job_server_up(self) -> bool:
        try:
            self.jobs.list_jobs()
            return True
        except Exception:  # noqa: BLE001 - not answering yet
            self.__dict__.pop("_jobs", None)
            return False

    def alive_worker_nodes(self) -> int:
        from ray.util.state import list_nodes

        nodes = list_nodes(address=self.ray_address, filters=[("state", "=", "ALIVE")])
        return sum(1 for n in nodes if not n.is_head_node)

    # -- jobs ----------------------------------------------------------------------------------

    def client_env(self) -> dict[str, str]:
        env = self.base_env()
        env.update({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.ray_token, "MLFLOW_TRACKING_URI": self.mlflow_uri})
        return env

    def submit(self, sid: str, command: str, env_vars: dict[str, str] | None = None) -> None:
        """``ray job submit --address ... -- COMMAND`` (not waiting: the harness watches it)."""
        argv = [str(VENV_BIN / "ray"), "job", "submit", "--address", self.ray_address, "--submission-id", sid,
                "--no-wait"]
        if env_vars:
            argv += ["--runtime-env-json", json.dumps({"env_vars": env_vars})]
        argv += ["--", *shlex.split(command)]
        log(f"submit {sid}: {command}")
        self.run(argv, env=self.client_env(), timeout=120)

    @property
    def jobs(self):
        if not hasattr(self, "_jobs"):
            from ray.job_submission import JobSubmissionClient

            self._jobs = JobSubmissionClient(self.ray_address)
        return self._jobs

    def job_status(self, sid: str) -> str:
        return str(self.jobs.get_job_status(sid).value)

    def wait_job(self, sid: str, timeout: float = 300) -> tuple[str, str]:
        status = wait_for(f"job {sid}", lambda: (s := self.job_status(sid)) in ("SUCCEEDED", "FAILED", "STOPPED")
                          and s, timeout, every=1.0)
        logs = self.jobs.get_job_logs(sid)
        (self.logs / f"job-{sid}.log").write_text(logs)
        return status, logs

    def run_job(self, sid: str, command: str, timeout: float = 300) -> str:
        self.submit(sid, command)
        status, logs = self.wait_job(sid, timeout)
        check(status == "SUCCEEDED", f"job {sid} {status}:\n{logs[-4000:]}")
        return logs


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


# ---------------------------------------------------------------------------------------------
# The rehearsal
# ---------------------------------------------------------------------------------------------


def run_ids(st: Stack, job: str) -> list[tuple[str, str]]:
    """(run id, status) of the runs tagged frcnn.job=<job>, oldest first."""
    return [(r[0], r[1]) for r in st.sql(
        "SELECT r.run_uuid, r.status FROM runs r JOIN tags t ON t.run_uuid = r.run_uuid "
        "WHERE t.key = 'frcnn.job' AND t.value = %s ORDER BY r.start_time", (job,))]


def metric_steps(st: Stack, run_id: str, key: str) -> list[int]:
    return [r[0] for r in st.sql("SELECT step FROM metrics WHERE run_uuid = %s AND key = %s ORDER BY step",
                                 (run_id, key))]


def published(st: Stack, prefix: str) -> list[str]:
    """Partitions under s3://frcnn/<prefix>/ that hold their _SUCCESS marker."""
    return sorted({k.rsplit("/", 2)[-2] for k in st.keys("frcnn", prefix + "/") if k.endswith("/_SUCCESS")})


def rehearse(st: Stack, summary: dict[str, Any]) -> None:
    timings: dict[str, float] = summary.setdefault("seconds", {})
    obs: dict[str, Any] = summary.setdefault("observed", {})

    def timed(name: str):
        @contextlib.contextmanager
        def cm():
            t = time.monotonic()
            log(f"== {name}")
            yield
            timings[name] = round(time.monotonic() - t, 1)
        return cm()

    fj = "frcnn-jobs"
    config = CONFIG
    with timed("start"):
        st.start_postgres()
        log("postgres up")
        st.start_s3()
        log("s3 up")
        st.start_mlflow()  # migrates the fresh schema while Ray starts and synth runs
        st.ray_start("head", head=True, cpus=0)
        # The head's dashboard (a dozen Python processes) starts after `ray start` returns; a raylet
        # registering during that burst on a loaded machine misses Ray's 30 s window.
        wait_for("the job server", st.job_server_up, 60, every=1.0)
        log("ray head up")
        # Logical CPUs: 2 for the rank, the rest for Ray Data beside it (force one rank a node).
        # One after the other: two raylets registering at once on a loaded machine miss Ray's
        # 30 s registration window more often than one.
        st.ray_start("w1", head=False, cpus=3)
        st.ray_start("w2", head=False, cpus=3)
        wait_for("2 worker nodes", lambda: st.alive_worker_nodes() == 2, 60)
        log("ray workers up")

    # The head requires the token: a client without it is refused.
    res = st.run([str(VENV_BIN / "ray"), "job", "list", "--address", st.ray_address], env=st.base_env(),
                 check_rc=False)
    check(res.returncode != 0, "the Ray head accepted a job request without the token")

    with timed("synth + upload"):
        raw = st.tmp / "raw"
        st.run_job("synth", f"{fj} synth --out {raw} --images {IMAGES} --seed 0 --min-size 96 --max-size 160")
        # infra/README: `aws s3 sync ~/data/VOCdevkit s3://frcnn/raw/VOCdevkit`
        files = [p for p in raw.rglob("*") if p.is_file()]
        for p in files:
            st.s3.upload_file(str(p), "frcnn", f"raw/{p.relative_to(raw).as_posix()}")
        voc = next(p for p in raw.rglob("VOC2007") if p.is_dir()).relative_to(raw).as_posix()
        data_root = f"s3://frcnn/raw/{voc.rsplit('/', 1)[0]}" if "/" in voc else "s3://frcnn/raw"
        splits = {s: len((raw / voc / "ImageSets" / "Main" / f"{s}.txt").read_text().split())
                  for s in ("train", "val", "trainval", "test")}
        obs["splits"] = splits
        wait_for("the tracking server", st.mlflow_healthy, 180)

    def precompute(split: str, out: str, on_error: str = "fail") -> str:
        return (f"{fj} precompute --dataset voc --data-root {data_root} --split {split} --year 2007 "
                f"--out {out} --config {config} --on-error {on_error} --experiment frcnn-precompute")

    pre = {s: f"s3://frcnn/precomputed/synth-{s}" for s in ("train", "val", "test")}
    cut_out = "s3://frcnn/precomputed/synth-trainval"
    with timed("precompute train/val/test + fault c"):
        # The three splits chained in one job, as the precompute RayJob does (`ray job submit`
        # quotes a bare `&&`, hence `bash -c`); beside it fault c: a second precompute whose S3
        # endpoint (its own relay, passed in the job's runtime env) goes away once it has staged a
        # shard. Two jobs at once, not four: each precompute job holds ~3 GB (driver, ledger, tasks).
        chain = " && ".join(precompute(s, pre[s]) for s in ("train", "val", "test"))
        submits = [threading.Thread(target=st.submit, args=("precompute", f"bash -c {shlex.quote(chain)}")),
                   threading.Thread(target=st.submit,
                                    args=("precompute-s3-down", precompute("trainval", cut_out, on_error="skip")),
                                    kwargs={"env_vars": {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{st.s3_fault_port}"}})]
        for t in submits:  # each `ray job submit` is a Python start-up: both at once
            t.start()
        for t in submits:
            t.join()
        staged = "precomputed/_staging/synth-trainval."
        wait_for("fault c's precompute to stage a shard",
                 lambda: any(k.endswith(".parquet") for k in st.keys("frcnn", staged))
                 or st.job_status("precompute-s3-down") in ("SUCCEEDED", "FAILED"), 400, every=0.1)
        st.fault_relay.cut()
        staged_at_cut = [k for k in st.keys("frcnn", staged) if k.endswith(".parquet")]
        log(f"S3 cut for precompute-s3-down after {len(staged_at_cut)} staged shard(s)")
        status, logs = st.wait_job("precompute-s3-down", 300)
        tail = [ln for ln in logs.splitlines() if ln.strip()][-3:]
        obs["fault_c"] = {"status": status, "staged_shards_at_cut": len(staged_at_cut), "last_lines": tail}
        check(staged_at_cut, "fault c's precompute finished before the S3 endpoint could be cut")
        check(status == "FAILED", f"precompute with S3 unreachable ended {status}")
        status_p, logs_p = st.wait_job("precompute", 600)
        check(status_p == "SUCCEEDED", f"precompute {status_p}:\n{logs_p[-4000:]}")
        for s, uri in pre.items():
            key = uri[len("s3://frcnn/"):]
            manifest = json.loads(st.get("frcnn", f"{key}/_frcnn_manifest.json"))
            check(manifest["rows"] == splits[s], f"{uri}: {manifest['rows']} rows, split has {splits[s]}")
            check(any(k.endswith(".parquet") for k in st.keys("frcnn", key + "/")), f"{uri}: no shards")
        runs = run_ids(st, "precompute")
        check(sorted(s for _, s in runs) == ["FAILED", "FINISHED", "FINISHED", "FINISHED"], f"precompute runs: {runs}")
        # Nothing published: no object at all under the output prefix.
        published_keys = st.keys("frcnn", cut_out[len("s3://frcnn/"):] + "/")
        check(not published_keys, f"something was published at {cut_out}: {published_keys[:5]}")
        obs["fault_c"]["staging_left"] = len(st.keys("frcnn", staged))
        # A clear error: the job's last line names the URI (not a traceback's bucket/key pair).
        check(tail and tail[-1].startswith("Error:") and cut_out in tail[-1],
              f"precompute with S3 gone did not end with an error naming {cut_out}: {tail}")

    storage = "s3://frcnn/ray-results"
    with timed("train (faults a and b)"):
        cmd = (f"{fj} train --data {pre['train']} --val-data {pre['val']} --config {config} --workers 2 "
               f"--gpus-per-worker 0 --cpus-per-worker 2 --storage-path {storage} --experiment {EXPERIMENT} "
               f"--model-name {MODEL_NAME} --progress-every 10")
        st.submit("train", cmd)
        run_id = wait_for("the train run", lambda: (r := run_ids(st, "train")) and r[-1][0], 120)
        steps_per_epoch = splits["train"] // (2 * BATCH)
        total = steps_per_epoch * EPOCHS
        rid = run_id

        def last_step() -> int:
            steps = metric_steps(st, rid, "train/loss_total")
            return steps[-1] if steps else 0

        def checkpoints() -> list[str]:
            return sorted({k.split("/")[2] for k in st.keys("frcnn", f"ray-results/train-{rid}/")
                           if k.split("/")[2].startswith("checkpoint_")})

        # Ray Train's checkpoint manager snapshot names the latest checkpoint's reported metrics:
        # watched through the run, its epochs must only go up. A group restarted from scratch would
        # report epoch 0 again; restarted from the last checkpoint, it reports the next epoch.
        epochs_seen: list[tuple[float, int]] = []
        watching = threading.Event()

        def watch_snapshot() -> None:
            while not watching.is_set():
                with contextlib.suppress(Exception):
                    for key in st.keys("frcnn", f"ray-results/train-{rid}/"):
                        if key.endswith("snapshot.json"):
                            latest = json.loads(st.get("frcnn", key)).get("latest_checkpoint_result") or {}
                            epoch = latest.get("metrics", {}).get("epoch")
                            if epoch is not None and (not epochs_seen or epochs_seen[-1][1] != epoch):
                                epochs_seen.append((time.monotonic(), int(epoch)))
                watching.wait(0.3)

        threading.Thread(target=watch_snapshot, daemon=True).start()

        # Fault a: kill a worker node (its raylet's process group) after the first checkpoint.
        wait_for("a checkpoint and steps past it", lambda: checkpoints() and last_step() >= steps_per_epoch + 3
                 or st.job_status("train") != "RUNNING", 300)
        check(st.job_status("train") == "RUNNING", "training ended before the node could be killed")
        kill_step, ckpts_before = last_step(), checkpoints()
        epoch_at_kill = epochs_seen[-1][1] if epochs_seen else -1
        log(f"killing worker node w2 at step {kill_step} (checkpoints: {len(ckpts_before)})")
        st.kill_group("ray-w2", signal.SIGKILL)
        t_kill = time.monotonic()
        st.ray_start("w3", head=False, cpus=3)  # KubeRay would start a new pod
        wait_for("steps after the restart", lambda: last_step() > kill_step + 2
                 or st.job_status("train") != "RUNNING", 300)
        check(st.job_status("train") == "RUNNING", f"training ended after the node kill: {st.job_status('train')}")
        obs["fault_a"] = {"killed_at_step": kill_step, "checkpoints_before": len(ckpts_before),
                          "seconds_to_next_step": round(time.monotonic() - t_kill, 1)}

        # Fault b: the tracking server away for ~20 s (killed: no graceful drain).
        st.kill_group("mlflow", signal.SIGKILL)
        pre_outage = set(metric_steps(st, rid, "train/loss_total"))  # what reached the store before it
        outage_start = max(pre_outage)
        log(f"tracking server stopped at step {outage_start}")
        time.sleep(20)
        steps_during = last_step()
        check(st.job_status("train") == "RUNNING", "training ended during the tracking outage")
        st.start_mlflow()
        wait_for("the tracking server back", st.mlflow_healthy, 120)
        obs["fault_b"] = {"outage_from_step": outage_start}
        status, logs = st.wait_job("train", 400)
        check(status == "SUCCEEDED", f"train {status}:\n{logs[-5000:]}")
        check(steps_during == outage_start, "metrics arrived while the server was down?")

        (runs,) = [r for r in run_ids(st, "train")]
        check(runs == (rid, "FINISHED"), f"train run: {runs}")
        rows = st.sql("SELECT step, count(*) FROM metrics WHERE run_uuid = %s AND key = 'train/loss_total' "
                      "GROUP BY step ORDER BY step", (rid,))
        steps = [r[0] for r in rows]
        twice = [r[0] for r in rows if r[1] > 1]
        check(not twice, f"steps logged twice: {twice}")
        check(pre_outage <= set(steps), f"steps lost from before the outage: {sorted(pre_outage - set(steps))}")
        missing = sorted(set(range(1, total + 1)) - set(steps))
        obs["fault_b"].update(missing_steps=missing, last_step=steps[-1] if steps else None, total_steps=total)
        check(steps and steps[-1] == total, f"last logged step {steps[-1] if steps else None}, expected {total}")
        # jobs/tracking.MetricBuffer holds rank 0's metrics while the server is away and writes
        # them when it answers again: no step may be missing, the outage's included.
        check(not missing, f"steps missing from the run (logged during the outage?): {missing}")
        watching.set()
        epochs = [e for _, e in epochs_seen]
        after_kill = [e for t, e in epochs_seen if t > t_kill]
        obs["fault_a"].update(checkpoint_epochs_seen=epochs, epoch_at_kill=epoch_at_kill)
        check(epochs == sorted(set(epochs)), f"checkpoint epochs went back (restart from scratch?): {epochs}")
        check(after_kill and after_kill[0] > epoch_at_kill,
              f"first checkpoint after the kill is epoch {after_kill[:1]}, last before it {epoch_at_kill}")
        # A restart from scratch would have reported epoch 0 again (its checkpoint and its val_* row
        # at the first epoch's step); a restart from the checkpoint reports each epoch's step once.
        val_rows = st.sql("SELECT step, count(*) FROM metrics WHERE run_uuid = %s AND key = 'val/map50' "
                          "GROUP BY step", (rid,))
        check(all(c == 1 for _, c in val_rows), f"validation logged twice: {val_rows}")
        # The restarted group's rank 0 records the step of the checkpoint it loaded (metric
        # system/perf/resumed_from_step, jobs/train_loop.py): proof the kill cost the group its ranks and that
        # it went on from a checkpoint, at least the one in the bucket at the kill, not from scratch.
        resumed = [int(r[0]) for r in st.sql("SELECT step FROM metrics WHERE run_uuid = %s AND "
                                             "key = 'system/perf/resumed_from_step' ORDER BY step", (rid,))]
        obs["fault_a"]["resumed_from_steps"] = resumed
        check(resumed, "no restart from a checkpoint was recorded after the node was killed")
        check(all(s >= (epoch_at_kill + 1) * steps_per_epoch for s in resumed),
              f"resumed from step(s) {resumed}; the checkpoint at the kill was at step "
              f"{(epoch_at_kill + 1) * steps_per_epoch}")
        ckpts = checkpoints()
        check(ckpts, "no checkpoint in the bucket")
        art = st.keys("mlflow")
        check(any("/checkpoints/final/" in k for k in art), "no checkpoints/final artifact in s3://mlflow")
        check(any(k.endswith("MLmodel") for k in art), "no MLmodel artifact in s3://mlflow")
        versions = st.sql("SELECT version FROM model_versions WHERE name = %s", (MODEL_NAME,))
        check(versions == [(1,)], f"registered versions: {versions}")
        obs["train"] = {"run_id": rid, "steps_logged": len(steps), "checkpoints_in_bucket": len(ckpts)}
        if missing:
            log(f"steps not in the run (logged while the tracking server was down): {missing}")

    with timed("evaluate"):
        st.run_job("evaluate", f"{fj} evaluate --model models:/{MODEL_NAME}/1 --dataset voc --data-root {data_root} "
                               f"--split test --year 2007 --concurrency 1 --experiment {EXPERIMENT}")
        runs = run_ids(st, "evaluate")
        check(len(runs) == 1 and runs[0][1] == "FINISHED", f"evaluate runs: {runs}")
        m = st.sql("SELECT value FROM latest_metrics WHERE run_uuid = %s AND key = 'map50'", (runs[0][0],))
        check(m, "no map50 in the evaluation run")
        obs["evaluate"] = {"map50": m[0][0]}

    with timed("promote"):
        # As infra/README: from the workstation, with MLFLOW_TRACKING_URI pointing at the server.
        st.run([str(VENV_BIN / fj), "promote", f"models:/{MODEL_NAME}/1", "--alias", "champion",
                "--if-better-than", "champion", "--metric", "map50"], env=st.client_env())
        alias = st.sql("SELECT version FROM registered_model_aliases WHERE name = %s AND alias = 'champion'",
                       (MODEL_NAME,))
        check(alias == [(1,)], f"champion alias: {alias}")

    infer_cmd = (f"{fj} infer --model models:/{MODEL_NAME}@champion --input s3://frcnn/incoming "
                 f"--output s3://frcnn/detections --incremental --experiment frcnn-infer --batch-size 2")
    with timed("fault d + infer twice"):
        images = sorted(p for p in (raw / voc / "JPEGImages").iterdir())
        for p in images:
            st.s3.upload_file(str(p), "frcnn", f"incoming/{p.name}")
        st.submit("infer-killed", infer_cmd)
        # Stop it as soon as its partition is open (the staging folder exists): the run is then
        # predicting and writing. `stop_job` is the REST call behind `ray job stop` (SIGTERM to the
        # driver's process group, SIGKILL after a few seconds), without the CLI's start-up time.
        wait_for("infer to open its partition",
                 lambda: any("/_staging/" in "/" + k for k in st.keys("frcnn", "detections/"))
                 or st.job_status("infer-killed") not in ("RUNNING", "PENDING"), 300, every=0.05)
        staged_at_stop = [k for k in st.keys("frcnn", "detections/") if "_staging/" in k]
        stopped = st.jobs.stop_job("infer-killed")
        status, _ = st.wait_job("infer-killed", 120)
        obs["fault_d"] = {"status": status, "stop_accepted": stopped, "staged_at_stop": staged_at_stop,
                          "objects_left": st.keys("frcnn", "detections/")[:10]}
        check(staged_at_stop, "the infer job ended before its partition was opened")
        check(status == "STOPPED", f"the infer job was not stopped mid-write (it ended {status})")
        check(published(st, "detections") == [], f"a partition is visible: {published(st, 'detections')}")
        st.run_job("infer-1", infer_cmd)
        parts = published(st, "detections")
        check(len(parts) == 1, f"partitions after the first complete run: {parts}")
        st.run_job("infer-2", infer_cmd)
        parts2 = published(st, "detections")
        ids = _published_ids(st, parts2)
        check(sorted(ids) == sorted(p.name for p in images),
              f"published image ids ({len(ids)}) != inputs ({len(images)}); duplicates: "
              f"{sorted({i for i in ids if ids.count(i) > 1})}")
        runs = run_ids(st, "infer")
        obs["fault_d"]["staging_left_after_next_run"] = [k for k in st.keys("frcnn", "detections/")
                                                         if "_staging/" in k][:5]
        obs["infer"] = {"partitions": parts2, "runs": runs}
        finished = [r for r in runs if r[1] == "FINISHED"]
        check(len(finished) == 2, f"infer runs: {runs}")

    with timed("secrets"):
        summary["secrets"] = check_secrets(st)
        summary["listening"] = check_loopback(st)


def _published_ids(st: Stack, parts: list[str]) -> list[str]:
    import io

    import pyarrow.parquet as pq

    ids: list[str] = []
    for part in parts:
        for key in st.keys("frcnn", f"detections/{part}/"):
            if key.endswith(".parquet") and "/_errors/" not in key:
                ids += pq.read_table(io.BytesIO(st.get("frcnn", key)), columns=["image_id"]).column(0).to_pylist()
    return ids


def check_secrets(st: Stack) -> dict[str, int]:
    """No secret in the whole tracking store (every PostgreSQL table) nor in any object."""
    needles = {"AWS_ACCESS_KEY_ID": st.access_key, "AWS_SECRET_ACCESS_KEY": st.secret_key,
               "RAY_AUTH_TOKEN": st.ray_token}
    dump = st.run(["pg_dump", "-h", "127.0.0.1", "-p", str(st.pg_port), "-U", "postgres", "--data-only", "mlflow"],
                  timeout=120).stdout
    check(len(dump) > 10_000 and "loss_total" in dump, "the database dump looks empty")
    for name, value in needles.items():
        check(value not in dump, f"{name} is in the MLflow database")
    n = 0
    for bucket in ("mlflow", "frcnn"):
        for key in st.keys(bucket):
            data = st.get(bucket, key)
            n += 1
            for name, value in needles.items():
                check(value.encode() not in data, f"{name} is in s3://{bucket}/{key}")
    return {"database_bytes": len(dump), "objects_scanned": n}


def check_loopback(st: Stack) -> dict[str, str]:
    import psutil

    ports = {"postgres": st.pg_port, "mlflow": st.mlflow_port, "s3": st.moto_port, "ray-dashboard": st.dash_port}
    found = {}
    conns = psutil.net_connections(kind="inet")
    for name, port in ports.items():
        addrs = {c.laddr.ip for c in conns if c.status == psutil.CONN_LISTEN and c.laddr.port == port}
        check(addrs, f"{name} is not listening on {port}")
        check(addrs <= {"127.0.0.1"}, f"{name} listens on {addrs}, not only 127.0.0.1")
        found[name] = ",".join(sorted(addrs))
    # Ray turns `--node-ip-address 127.0.0.1` into the machine's routable address (on purpose:
    # services.resolve_ip_for_localhost), so the GCS is not loopback-only: recorded, not asserted.
    found["ray-gcs (recorded)"] = ",".join(sorted({c.laddr.ip for c in conns if c.status == psutil.CONN_LISTEN
                                                   and c.laddr.port == st.gcs_port}))
    return found


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--keep", action="store_true", help="keep the temp folder (logs, data) at the end")
    ap.add_argument("--summary", type=Path, help="write the JSON summary here")
    args = ap.parse_args(argv)
    for tool in ("initdb", "pg_ctl", "pg_dump", "createdb"):
        if shutil.which(tool) is None:
            print(f"cluster rehearsal: {tool} not found (PostgreSQL's server package)", file=sys.stderr)
            return 2
    sys.path.insert(0, str(REPO))
    t0 = time.monotonic()
    summary: dict[str, Any] = {"ok": False}
    st = Stack(keep=args.keep)
    # This process talks to the head too (job status, logs): it holds the token, as a workstation would.
    os.environ.update({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": st.ray_token})
    log(f"temp folder {st.tmp}, logs in {st.logs}")
    st.start_sampler()

    def terminated(signum, frame):  # `timeout`, CI cancelling: still stop everything
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, terminated)
    try:
        rehearse(st, summary)
        summary["ok"] = True
    except BaseException as exc:
        summary["error"] = f"{type(exc).__name__}: {exc}"
        log(f"FAILED: {summary['error']}")
        st.keep = True
        raise
    finally:
        with contextlib.suppress(Exception):
            summary["machine"] = st.cpu_report(time.monotonic() - t0)
        st.close()
        summary.setdefault("seconds", {})["total"] = round(time.monotonic() - t0, 1)
        text = json.dumps(summary, indent=2, default=str)
        print(text, flush=True)
        if args.summary:
            args.summary.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
