"""The rehearsal's services on one machine: PostgreSQL, moto's S3 behind relays, an MLflow server
and a multi-node Ray cluster, each in its own process group, on 127.0.0.1, in a fresh temp folder.

``Stack`` starts them one by one (tests/cluster/conftest.py has one fixture per service), sends the
infra/README command lines through ``ray job submit`` and reads what the engines hold (PostgreSQL
rows, objects in the buckets, Ray job states). ``close()`` stops everything it started, also after
a failure: its process groups, then any process still carrying its marker variable; never
``ray stop``, which would stop other people's clusters on the machine.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from infra.rehearsal import auth
from infra.rehearsal.relay import Relay, free_ports, port_open

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


# Every wait below is sized for an idle 2-core machine, times this: a shared machine can be many
# times slower, and a wait that gives up early fails the
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
        self.pg_port, self.moto_port, self.s3_port, self.s3_fault_port, self.mlflow_port = free_ports(5)
        self.gcs_port = self.dash_port = self.client_port = 0  # the head's, chosen by ray_start
        self.ray_temp = self.tmp / "ray"  # every node's --temp-dir (the address file lies there)
        self.access_key = "AKIA" + secrets.token_hex(8).upper()
        self.secret_key = secrets.token_urlsafe(30)
        self.ray_token = secrets.token_hex(32)
        self.mlflow_creds = auth.Credentials()  # admin, Flask key, the three identities (auth.py)
        self.relay: Relay | None = None
        self.fault_relay: Relay | None = None  # the endpoint one job sees (fault c), cut on its own
        self.nodes: dict[str, int] = {}  # node name -> process group id
        self.summary: dict[str, Any] = {"seconds": {}, "observed": {}}  # timings and observations, as JSON
        self.observed: dict[str, Any] = self.summary["observed"]

    @contextlib.contextmanager
    def timed(self, name: str):
        """Log a phase and record its wall time in ``summary["seconds"]``."""
        t = time.monotonic()
        log(f"== {name}")
        yield
        self.summary["seconds"][name] = round(time.monotonic() - t, 1)

    # -- environment ---------------------------------------------------------------------------

    def base_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_", "AWS_"))}
        env.update({
            MARKER: self.id,
            # This checkout's code, whatever checkout the venv's editable install points at.
            "PYTHONPATH": str(REPO),
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
            **self.mlflow_creds.env(auth.JOBS),  # the pods' frcnn-mlflow-jobs Secret
            "AWS_ENDPOINT_URL": f"http://127.0.0.1:{self.s3_port}",
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": self.ray_token,
            "RAY_TRAIN_V2_ENABLED": "1",
            "RAY_USAGE_STATS_ENABLED": "0",
            # Ray's memory monitor kills workers when the *machine* is above 95 % of its memory, other
            # people's processes included: on a shared machine it killed the rehearsal's training
            # group for memory it did not use. The kernel's OOM killer still guards the machine.
            "RAY_memory_monitor_refresh_ms": "0",
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
        for db in ("mlflow", "mlflow_auth"):  # the tracking store; basic-auth's permission store
            self.run(["createdb", "-h", "127.0.0.1", "-p", str(self.pg_port), "-U", "postgres", db])

    def sql(self, query: str, params: tuple = ()) -> list[tuple]:
        import psycopg

        with psycopg.connect(self.pg_dsn, autocommit=True) as conn:
            return conn.execute(query, params).fetchall()

    # -- S3 ------------------------------------------------------------------------------------

    def start_s3(self) -> None:
        self.spawn("moto", [str(VENV_BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(self.moto_port)],
                   self.base_env())
        wait_for("moto", lambda: port_open(self.moto_port), 60)
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
                "--host", "127.0.0.1", "--port", str(self.mlflow_port), "--workers", "1",
                "--app-name", "basic-auth"]

    def start_mlflow(self) -> None:
        env = self.base_env()
        env["MLFLOW_S3_ENDPOINT_URL"] = f"http://127.0.0.1:{self.moto_port}"
        # MLflow 3.17 starts seven huey worker processes for its GenAI jobs (scorers, prompt
        # optimisation) that no frcnn job uses: off, which saves a core-minute per start here.
        env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
        env.update(auth.server_env(auth.write_auth_config(self.tmp / "basic_auth.ini", self.pg_port),
                                   self.mlflow_creds))
        self.spawn("mlflow", self.mlflow_argv(), env)

    def create_mlflow_users(self) -> None:
        auth.create_users(self.mlflow_uri, self.mlflow_creds)

    def mlflow_healthy(self) -> bool:
        import urllib.request

        try:
            with urllib.request.urlopen(f"{self.mlflow_uri}/health", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    # -- Ray -----------------------------------------------------------------------------------

    def ray_start(self, name: str, head: bool, cpus: int) -> None:
        """``ray start`` for one node, retried on a fresh set of ports each time.

        The raylet's own servers and the workers get port 0 (the kernel picks, the raylet knows).
        The Python agents' ports (dashboard agent HTTP and gRPC, runtime-env agent, metrics export)
        are probed here: with port 0 the raylet waits a fixed few seconds for each agent to report
        its port, which a loaded machine misses. A probed port can be taken by another process
        before the agent binds it, so every attempt probes a fresh set (the head's GCS, dashboard
        and Ray client ports too): a collision costs one attempt, not all of them. Every node's
        ``--temp-dir`` is this run's folder: the cluster's address file lies there, not in
        /tmp/ray, so a plain ``ray.init()`` elsewhere on the machine never finds this cluster."""
        for attempt in range(6):
            agent_http, agent_grpc, metrics, runtime_env = free_ports(4)
            argv = [str(VENV_BIN / "ray"), "start", "--node-ip-address", "127.0.0.1", "--num-cpus", str(cpus),
                    "--object-store-memory", str(150 * 2**20), "--temp-dir", str(self.ray_temp),
                    "--node-manager-port", "0", "--object-manager-port", "0",
                    "--dashboard-agent-listen-port", str(agent_http), "--dashboard-agent-grpc-port", str(agent_grpc),
                    "--metrics-export-port", str(metrics), "--runtime-env-agent-port", str(runtime_env),
                    "--min-worker-port", "0", "--max-worker-port", "0"]
            if head:
                self.gcs_port, self.dash_port, self.client_port = free_ports(3)
                argv += ["--head", "--port", str(self.gcs_port), "--dashboard-host", "127.0.0.1",
                         "--dashboard-port", str(self.dash_port), "--ray-client-server-port", str(self.client_port),
                         "--disable-usage-stats"]
            else:
                argv += ["--address", f"127.0.0.1:{self.gcs_port}"]
            proc = self.spawn(f"ray-{name}", argv, self.node_env())
            rc = proc.wait(timeout=240)
            if rc == 0:
                break
            # Ray gives a starting raylet 30 s (hard-coded) to register; a loaded machine can miss
            # it, and a probed head port can be taken before Ray binds it.
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
        env.update({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.ray_token, "MLFLOW_TRACKING_URI": self.mlflow_uri,
                    **self.mlflow_creds.env(auth.JOBS)})
        return env

    def submit(self, sid: str, command: str, env_vars: dict[str, str] | None = None) -> None:
        """``ray job submit --address ... -- COMMAND`` (not waiting: the harness watches it)."""
        argv = [str(VENV_BIN / "ray"), "job", "submit", "--address", self.ray_address, "--submission-id", sid,
                "--no-wait"]
        if env_vars:  # in a file, not on the command line (an identity's password may be among them)
            runtime_env = self.tmp / f"runtime-env-{sid}.yaml"
            runtime_env.touch(0o600)
            runtime_env.write_text(json.dumps({"env_vars": env_vars}))
            argv += ["--runtime-env", str(runtime_env)]
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

    def run_job(self, sid: str, command: str, timeout: float = 300, env_vars: dict[str, str] | None = None) -> str:
        self.submit(sid, command, env_vars)
        status, logs = self.wait_job(sid, timeout)
        check(status == "SUCCEEDED", f"job {sid} {status}:\n{logs[-4000:]}")
        return logs
