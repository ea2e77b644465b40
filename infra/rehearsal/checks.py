"""What the rehearsal asserts against the engines: runs and metrics in PostgreSQL, published
partitions in the bucket, no secret anywhere, loopback-only listeners, an isolated Ray cluster."""

from __future__ import annotations

from infra.rehearsal.stack import Stack, check


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


def check_isolated(st: Stack) -> dict[str, str | None]:
    """The cluster's address file is in this run's temp dir, not in the default one that a plain
    ``ray.init()`` on this machine reads: no other process attaches to this cluster by accident."""
    from ray._private.utils import read_ray_address

    ours, default = read_ray_address(str(st.ray_temp)), read_ray_address(None)
    check(ours and ours.endswith(f":{st.gcs_port}"), f"no address file for this cluster in {st.ray_temp}: {ours}")
    check(default is None or not default.endswith(f":{st.gcs_port}"),
          f"the default Ray address file points at this run's cluster: {default}")
    return {"address_file": ours, "default_address_file": default}


def published_ids(st: Stack, parts: list[str]) -> list[str]:
    import io

    import pyarrow.parquet as pq

    ids: list[str] = []
    for part in parts:
        for key in st.keys("frcnn", f"detections/{part}/"):
            if key.endswith(".parquet") and "/_errors/" not in key:
                ids += pq.read_table(io.BytesIO(st.get("frcnn", key)), columns=["image_id"]).column(0).to_pylist()
    return ids


def check_secrets(st: Stack) -> dict[str, int]:
    """No secret (AWS keys, Ray token, MLflow passwords and Flask key) in either database (every
    table: params, tags, metrics, registry, users), in any object of either bucket, nor in any
    job's log."""
    needles = {"AWS_ACCESS_KEY_ID": st.access_key, "AWS_SECRET_ACCESS_KEY": st.secret_key,
               "RAY_AUTH_TOKEN": st.ray_token, **st.mlflow_creds.secrets()}
    sizes = {}
    for db in ("mlflow", "mlflow_auth"):
        dump = st.run(["pg_dump", "-h", "127.0.0.1", "-p", str(st.pg_port), "-U", "postgres", "--data-only", db],
                      timeout=120).stdout
        sizes[db] = len(dump)
        for name, value in needles.items():
            check(value not in dump, f"{name} is in the database {db}")
    check(sizes["mlflow"] > 10_000, "the tracking database dump looks empty")
    n = 0
    for bucket in ("mlflow", "frcnn"):
        for key in st.keys(bucket):
            data = st.get(bucket, key)
            n += 1
            for name, value in needles.items():
                check(value.encode() not in data, f"{name} is in s3://{bucket}/{key}")
    logs = 0
    for job in st.jobs.list_jobs():
        text = st.jobs.get_job_logs(job.submission_id)
        logs += 1
        for name, value in needles.items():
            check(value not in text, f"{name} is in the log of job {job.submission_id}")
    return {"database_bytes": sizes["mlflow"], "auth_database_bytes": sizes["mlflow_auth"],
            "objects_scanned": n, "job_logs_scanned": logs}


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
