"""Static checks for everything under infra/.

Nothing here talks to a cluster, a registry or a docker daemon: the manifests
are checked by parsing them, by cross-checking them against each other, and by
checking every command line they contain against the real click CLIs
(``frcnn-jobs`` from ``jobs.cli``, plus the pinned ``ray`` and ``mlflow``) with
infra/cmdlines.py. The security properties of the manifests (pod security,
network policies, credentials) are in tests/test_infra_security.py.
"""
from __future__ import annotations

import importlib.util
import json
import re
import shlex
import tomllib
from pathlib import Path
from urllib.parse import urlparse

import click
import pytest
import yaml

from infra.cmdlines import (
    check_invocation,
    dockerfile_instructions,
    extract_invocations,
    invocations_in_node,
    invocations_in_shell,
    yaml_command_texts,
)
from infra.manifests import (
    INFRA,
    REPO,
    docs_of_kind,
    infra_files,
    k8s_docs,
    load_docs,
    pod_containers,
    pyproject_pins,
    rel,
    walk,
    yaml_files,
)


def all_invocations(program: str) -> list[tuple[str, list[str]]]:
    return [(rel(p), inv) for p in infra_files() for inv in extract_invocations(p, program)]



def check_all(program: str, group: click.Command) -> list[str]:
    problems = []
    for where, args in all_invocations(program):
        for problem in check_invocation(group, args, prog=program):
            problems.append(f"{where}: {program} {shlex.join(args)}\n    -> {problem}")
    return problems



# --------------------------------------------------------------------------
# YAML / Kubernetes structure
# --------------------------------------------------------------------------


def test_infra_has_the_expected_files():
    names = {rel(p) for p in infra_files()}
    for expected in (
        "infra/README.md",
        "infra/docker/Dockerfile",
        "infra/k8s/kuberay/raycluster.yaml",
        "infra/k8s/kuberay/rayjob-train.yaml",
        "infra/k8s/kuberay/rayjob-precompute.yaml",
        "infra/k8s/kuberay/cronjob-infer.yaml",
        "infra/k8s/kuberay/secret-example.yaml",
        "infra/ray-cluster/aws.yaml",
        "infra/mlflow/docker-compose.yaml",
    ):
        assert expected in names


@pytest.mark.parametrize("path", yaml_files(), ids=rel)
def test_yaml_parses_to_mappings(path):
    docs = list(yaml.safe_load_all(path.read_text()))
    assert [d for d in docs if d is not None], f"{rel(path)} is empty"
    for doc in docs:
        assert doc is None or isinstance(doc, dict), f"{rel(path)}: a document is a {type(doc).__name__}"


def test_kubernetes_documents_have_identity():
    k8s_files = [p for p in yaml_files() if "k8s" in p.relative_to(INFRA).parts]
    assert k8s_files
    for path in k8s_files:
        for doc in load_docs(path):
            where = f"{rel(path)}: {doc.get('kind')}"
            assert isinstance(doc.get("apiVersion"), str) and doc["apiVersion"], where
            assert isinstance(doc.get("kind"), str) and doc["kind"], where
            assert isinstance(doc.get("metadata"), dict), where
            assert isinstance(doc["metadata"].get("name"), str) and doc["metadata"]["name"], where
            if doc["kind"] != "Namespace":
                # Explicit namespaces: cross-namespace DNS names below rely on them.
                assert doc["metadata"].get("namespace") in {"frcnn", "mlflow"}, where


def test_container_commands_args_and_env_are_strings():
    # The API server rejects `args: [5000]` or `value: 1`; YAML makes that easy.
    for path, doc in k8s_docs():
        for c in pod_containers(doc):
            for key in ("command", "args"):
                for item in c.get(key, []):
                    assert isinstance(item, str), f"{rel(path)}: {c['name']}.{key} has {item!r}"
            for env in c.get("env", []):
                if "value" in env:
                    assert isinstance(env["value"], str), f"{rel(path)}: {c['name']} env {env['name']}"
    for cm in docs_of_kind("ConfigMap"):
        for k, v in cm.get("data", {}).items():
            assert isinstance(v, str), f"ConfigMap {cm['metadata']['name']}: {k}"


def _raycluster() -> dict:
    clusters = docs_of_kind("RayCluster")
    assert len(clusters) == 1
    return clusters[0]


def _group_gpus(group: dict) -> int:
    gpus = 0
    for c in group["template"]["spec"]["containers"]:
        gpus += int(c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0))
    return gpus


def test_raycluster_head_is_cpu_only_and_gpu_group_fits_8x1_training():
    rc = _raycluster()
    spec = rc["spec"]
    assert rc["apiVersion"] == "ray.io/v1"
    assert spec["rayVersion"] == pyproject_pins()["ray"]

    head = spec["headGroupSpec"]
    assert _group_gpus(head) == 0
    assert str(head["rayStartParams"].get("num-cpus")) == "0"

    gpu_groups = [g for g in spec["workerGroupSpecs"] if _group_gpus(g) > 0]
    assert len(gpu_groups) == 1
    gpu = gpu_groups[0]
    assert gpu["replicas"] == 8
    assert gpu["minReplicas"] <= gpu["replicas"] <= gpu["maxReplicas"]
    (container,) = gpu["template"]["spec"]["containers"]
    limits = container["resources"]["limits"]
    assert int(limits["nvidia.com/gpu"]) == 1
    # Extended resources: a request, if given, must equal the limit.
    requests = container["resources"].get("requests", {})
    assert int(requests.get("nvidia.com/gpu", limits["nvidia.com/gpu"])) == 1

    for group in [head, *spec["workerGroupSpecs"]]:
        for c in group["template"]["spec"]["containers"]:
            assert c["image"] == container["image"], "head and workers must run the same image"


def test_raycluster_requires_a_token_from_an_existing_secret():
    # Job submission runs arbitrary code with the pods' credentials: the head
    # must demand Ray's auth token, kept in a Secret we ship an example of.
    rc = _raycluster()
    auth = rc["spec"]["authOptions"]
    assert auth["mode"] == "token"
    keys = _secret_keys()[(rc["metadata"]["namespace"], auth["secretName"])]
    assert "auth_token" in keys  # the key name KubeRay reads


def _rayjob(name: str) -> dict:
    (job,) = [j for j in docs_of_kind("RayJob") if j["metadata"]["name"] == name]
    return job


def _option(args: list[str], name: str) -> str | None:
    for k, tok in enumerate(args):
        if tok == name and k + 1 < len(args):
            return args[k + 1]
        if tok.startswith(name + "="):
            return tok.split("=", 1)[1]
    return None


def test_rayjobs_attach_to_the_raycluster():
    rc = _raycluster()
    jobs = docs_of_kind("RayJob")
    assert {j["metadata"]["name"] for j in jobs} >= {"frcnn-train", "frcnn-precompute"}
    for job in jobs:
        spec = job["spec"]
        # One of the two ways to get a cluster, never both.
        assert ("clusterSelector" in spec) != ("rayClusterSpec" in spec)
        assert spec["clusterSelector"]["ray.io/cluster"] == rc["metadata"]["name"]
        assert job["metadata"]["namespace"] == rc["metadata"]["namespace"]
        assert invocations_in_shell(spec["entrypoint"], "frcnn-jobs"), job["metadata"]["name"]


def test_train_rayjob_matches_gpu_group_and_uses_object_store():
    (train,) = [
        a for a in invocations_in_shell(_rayjob("frcnn-train")["spec"]["entrypoint"], "frcnn-jobs")
        if a[0] == "train"
    ]
    workers = int(_option(train, "--workers"))
    gpus_per_worker = int(_option(train, "--gpus-per-worker"))
    assert (workers, gpus_per_worker) == (8, 1)
    gpu = [g for g in _raycluster()["spec"]["workerGroupSpecs"] if _group_gpus(g) > 0][0]
    assert gpus_per_worker <= _group_gpus(gpu)
    assert workers * gpus_per_worker <= gpu["replicas"] * _group_gpus(gpu)
    for opt in ("--data", "--val-data", "--storage-path"):
        assert urlparse(_option(train, opt)).scheme == "s3", opt


def test_model_configs_exist_in_the_image_and_match_between_precompute_and_train():
    # Shards carry anchor targets for one model config and training refuses
    # shards made for another: every cluster precompute/train must pass the
    # same --config, and that config must ship inside the installed package.
    from frcnn.config import CONFIG_NAMES

    configs = set()
    for where, args in all_invocations("frcnn-jobs"):
        if args and args[0] in ("precompute", "train") and "s3://" in " ".join(args):
            config = _option(args, "--config")
            assert config, f"{where}: {args[0]} on VOC without --config (defaults to the tiny synth config)"
            configs.add(config)
    assert len(configs) == 1, configs
    (config,) = configs
    assert config in CONFIG_NAMES, f"--config {config} is not a packaged config {CONFIG_NAMES}"
    assert (REPO / "frcnn" / "configs" / f"{config}.yaml").is_file()


def test_storage_paths_are_object_store_uris_everywhere():
    # Ray Train workers on different nodes share no disk: storage_path must be
    # an object store (or a shared filesystem, which none of our targets have).
    found = 0
    for where, args in all_invocations("frcnn-jobs"):
        if args and args[0] == "train":
            storage = _option(args, "--storage-path")
            multi = int(_option(args, "--workers") or 1) > 1
            if multi or storage is not None:
                found += 1
                assert storage is not None, f"{where}: multi-worker train without --storage-path"
                assert urlparse(storage).scheme in {"s3", "gs", "abfs", "az"}, f"{where}: {storage}"
    assert found


def _cronjob() -> dict:
    (cron,) = docs_of_kind("CronJob")
    return cron


def test_cronjob_is_scheduled_and_forbids_overlap():
    cron = _cronjob()
    assert cron["apiVersion"] == "batch/v1"
    spec = cron["spec"]
    assert isinstance(spec["schedule"], str) and len(spec["schedule"].split()) == 5
    assert spec["concurrencyPolicy"] == "Forbid"
    # A run must end before the next one is due.
    assert spec["jobTemplate"]["spec"]["activeDeadlineSeconds"] < 3600


def _container_env(container: dict) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}


def _expand(value: str, env: dict[str, str]) -> str:
    return re.sub(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?", lambda m: env.get(m.group(1), m.group(0)), value)


def test_cronjob_submits_champion_inference_to_the_raycluster_head():
    cron = _cronjob()
    rc = _raycluster()
    (container,) = pod_containers(cron)
    env = _container_env(container)

    ray = invocations_in_node(container, "ray")
    (submit,) = [a for a in ray if a[:2] == ["job", "submit"]]
    address = urlparse(_expand(_option(submit, "--address"), env))
    head_svc = f"{rc['metadata']['name']}-head-svc"
    assert address.scheme == "http" and address.port == 8265
    assert address.hostname in {head_svc, f"{head_svc}.{rc['metadata']['namespace']}.svc.cluster.local"}
    assert "--" in submit
    # The head requires Ray token auth; the client sends the token only in token mode.
    auth_secret = rc["spec"]["authOptions"]["secretName"]
    assert env["RAY_AUTH_MODE"] == "token"
    (token_env,) = [e for e in container["env"] if e["name"] == "RAY_AUTH_TOKEN"]
    assert token_env["valueFrom"]["secretKeyRef"] == {"name": auth_secret, "key": "auth_token"}
    # The trap that stops the Ray job when the pod is killed targets the same job.
    (stop,) = [a for a in ray if a[:2] == ["job", "stop"]]
    assert _option(stop, "--address") == _option(submit, "--address")
    assert _option(submit, "--submission-id") in stop

    (infer,) = invocations_in_node(container, "frcnn-jobs")
    assert infer[0] == "infer"
    assert "--incremental" in infer
    assert _option(infer, "--model") == "models:/frcnn@champion"
    assert urlparse(_option(infer, "--input")).scheme == "s3"
    assert urlparse(_option(infer, "--output")).scheme == "s3"
    # --concurrency x --gpus-per-actor must fit next to a full 8-GPU training run.
    gpu = [g for g in rc["spec"]["workerGroupSpecs"] if _group_gpus(g) > 0][0]
    need = int(_option(infer, "--concurrency") or 1) * float(_option(infer, "--gpus-per-actor") or 0)
    assert 8 + need <= gpu["maxReplicas"] * _group_gpus(gpu)


def test_example_secrets_hold_only_placeholders():
    secrets = docs_of_kind("Secret")
    assert secrets
    for s in secrets:
        assert "data" not in s, "use stringData with visible placeholders, not base64 data"
        for key, value in s.get("stringData", {}).items():
            if any(w in key.upper() for w in ("PASSWORD", "SECRET", "ACCESS_KEY", "TOKEN", "ROOT_USER")):
                assert "CHANGE-ME" in str(value), f"Secret {s['metadata']['name']}.{key} looks real"
    env_example = INFRA / "mlflow" / ".env.example"
    for line in env_example.read_text().splitlines():
        if "=" in line and not line.startswith("#"):
            key, _, value = line.partition("=")
            if any(w in key for w in ("PASSWORD", "SECRET", "ACCESS_KEY")):
                assert "CHANGE-ME" in value, key


def _secret_keys() -> dict[tuple[str, str], set[str]]:
    return {
        (s["metadata"]["namespace"], s["metadata"]["name"]): set(s.get("stringData", {}))
        for s in docs_of_kind("Secret")
    }


def test_secret_and_configmap_references_resolve():
    secrets = _secret_keys()
    configmaps = {(c["metadata"]["namespace"], c["metadata"]["name"]) for c in docs_of_kind("ConfigMap")}
    for path, doc in k8s_docs():
        ns = doc["metadata"].get("namespace")
        for m in walk(doc):
            if "secretRef" in m:
                assert (ns, m["secretRef"]["name"]) in secrets, f"{rel(path)}: {m}"
            if "configMapRef" in m:
                assert (ns, m["configMapRef"]["name"]) in configmaps, f"{rel(path)}: {m}"
            if "secretKeyRef" in m:
                ref = m["secretKeyRef"]
                assert ref["key"] in secrets.get((ns, ref["name"]), set()), f"{rel(path)}: {ref}"
    # The Ray pods and MLflow must use the same S3 application user.
    assert secrets[("frcnn", "frcnn-credentials")] <= secrets[("mlflow", "mlflow-credentials")]


def test_cluster_dns_names_point_at_existing_services():
    services = {}
    for svc in docs_of_kind("Service"):
        key = (svc["metadata"]["namespace"], svc["metadata"]["name"])
        services[key] = {p["port"] for p in svc["spec"]["ports"]}
    # KubeRay creates `<name>-head-svc` with the dashboard on 8265.
    for rc in docs_of_kind("RayCluster"):
        services[(rc["metadata"]["namespace"], f"{rc['metadata']['name']}-head-svc")] = {6379, 8265, 10001}
    pattern = re.compile(r"://(?:[^@/\s]*@)?([a-z0-9-]+)\.([a-z0-9-]+)\.svc\.cluster\.local:(\d+)")
    checked = 0
    for path in yaml_files():
        for match in pattern.finditer(path.read_text()):
            name, ns, port = match.group(1), match.group(2), int(match.group(3))
            assert port in services.get((ns, name), set()), f"{rel(path)}: {match.group(0)}"
            checked += 1
    assert checked >= 4


def test_services_select_existing_pods():
    workloads = [d for _, d in k8s_docs() if d["kind"] in ("Deployment", "StatefulSet")]
    for svc in docs_of_kind("Service"):
        selector = svc["spec"]["selector"]
        ns = svc["metadata"]["namespace"]
        matches = [
            w for w in workloads
            if w["metadata"]["namespace"] == ns
            and selector.items() <= w["spec"]["template"]["metadata"]["labels"].items()
        ]
        assert matches, f"Service {ns}/{svc['metadata']['name']} selects no pods"
        for w in matches:
            assert w["spec"]["selector"]["matchLabels"].items() <= w["spec"]["template"]["metadata"]["labels"].items()


def _mlflow_server_argv(node) -> list[str]:
    """``mlflow server ...`` as the container or compose service runs it (from its script)."""
    (args,) = [inv for inv in invocations_in_node(node, "mlflow") if inv[:1] == ["server"]]
    return ["mlflow", *args]


def test_mlflow_k8s_server_uses_postgres_and_proxied_s3():
    (deploy,) = [d for d in docs_of_kind("Deployment") if d["metadata"]["name"] == "mlflow"]
    (container,) = pod_containers(deploy)
    argv = _mlflow_server_argv(container)
    assert _option(argv, "--app-name") == "basic-auth"
    assert _option(argv, "--backend-store-uri").startswith(PG_URI_PREFIX)
    assert _option(argv, "--artifacts-destination") == "s3://mlflow"
    assert "--serve-artifacts" in argv
    assert _option(argv, "--host") == "0.0.0.0"
    # In-cluster clients use the Service DNS name; MLflow must accept that Host.
    allowed = _option(argv, "--allowed-hosts").split(",")
    from fnmatch import fnmatch

    for host in ("mlflow:5000", "mlflow.mlflow.svc.cluster.local:5000", "localhost:5000"):
        assert any(fnmatch(host, pattern) for pattern in allowed), host


# --------------------------------------------------------------------------
# docker compose
# --------------------------------------------------------------------------


# The store URIs name their driver: SQLAlchemy 2.1 (what MLflow 3.17.2 resolves) maps a bare
# `postgresql://` to psycopg 3, so a URI that relies on the default breaks when either moves.
PG_URI_PREFIX = "postgresql+psycopg://"


def test_mlflow_image_installs_the_driver_its_store_uris_name():
    instructions = dockerfile_instructions((INFRA / "mlflow" / "Dockerfile").read_text())
    runs = " ".join(rest for instr, rest in instructions if instr == "RUN")
    assert re.search(r"pip install [^&]*[\"']?psycopg\[binary\]", runs), runs
    assert "psycopg2" not in runs
    assert "import psycopg" in runs  # the build fails, not the first server start
    (deploy,) = [d for d in docs_of_kind("Deployment") if d["metadata"]["name"] == "mlflow"]
    (container,) = pod_containers(deploy)
    uris = [_option(_mlflow_server_argv(container), "--backend-store-uri"),
            _option(_mlflow_server_argv({"command": _compose()["services"]["mlflow"]["command"]}),
                    "--backend-store-uri")]
    for uri in uris:
        assert uri.split("://")[0] == "postgresql+psycopg", uri
    # The package itself carries the same driver (the rehearsal's server runs from it).
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    assert any(re.match(r"psycopg\[binary\]", d) for d in deps), deps


def test_package_carries_the_job_server():
    # `ray job submit` needs the head's job server, which only `ray[default]` installs.
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    (ray,) = [d for d in deps if re.match(r"ray\[", d)]
    extras = set(re.match(r"ray\[([^\]]*)\]", ray).group(1).split(","))
    assert {"default", "train", "data"} <= extras, ray


def _compose() -> dict:
    (doc,) = load_docs(INFRA / "mlflow" / "docker-compose.yaml")
    return doc


def test_compose_has_postgres_minio_and_mlflow_on_postgres():
    services = _compose()["services"]
    assert "postgres" in services
    assert "minio" in services or "s3" in services
    assert "mlflow" in services
    mlflow = services["mlflow"]
    argv = _mlflow_server_argv({"command": mlflow["command"]})
    assert _option(argv, "--app-name") == "basic-auth"
    env = mlflow.get("environment", {})
    uri = _option(argv, "--backend-store-uri") or env.get("MLFLOW_BACKEND_STORE_URI")
    assert uri and uri.startswith(PG_URI_PREFIX), uri
    assert _option(argv, "--artifacts-destination").startswith("s3://")
    assert "--serve-artifacts" in argv
    # MLflow needs the database healthy and the buckets created before it starts.
    deps = mlflow["depends_on"]
    assert deps["postgres"]["condition"] == "service_healthy"
    assert deps["minio-init"]["condition"] == "service_completed_successfully"
    for name in ("postgres", "minio", "mlflow"):
        assert "test" in services[name].get("healthcheck", {}), name
    # The S3 endpoint MLflow uses must be the compose MinIO service.
    assert urlparse(env["MLFLOW_S3_ENDPOINT_URL"]).hostname == "minio"


def test_compose_volumes_are_declared():
    doc = _compose()
    declared = set(doc.get("volumes") or {})
    for name, svc in doc["services"].items():
        for vol in svc.get("volumes", []):
            source = vol.split(":", 1)[0]
            if not source.startswith((".", "/", "~", "$")):
                assert source in declared, f"{name}: {source}"


# --------------------------------------------------------------------------
# Ray cluster launcher
# --------------------------------------------------------------------------


def test_ray_cluster_launcher_config_matches_rays_schema():
    import jsonschema  # a dependency of ray itself

    spec = importlib.util.find_spec("ray")
    assert spec and spec.submodule_search_locations, "ray is a pinned dependency"
    schema_path = Path(next(iter(spec.submodule_search_locations))) / "autoscaler" / "ray-schema.json"
    schema = json.loads(schema_path.read_text())
    (config,) = load_docs(INFRA / "ray-cluster" / "aws.yaml")
    jsonschema.validate(config, schema)

    assert config["provider"]["type"] == "aws"
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["node_config"]["InstanceType"] == "m5.2xlarge"
    assert head["resources"].get("CPU") == 0
    workers = [t for name, t in types.items() if name != config["head_node_type"]]
    (gpu,) = [t for t in workers if t["node_config"]["InstanceType"] == "g5.xlarge"]
    assert (gpu["min_workers"], gpu["max_workers"]) == (0, 8)
    assert gpu["resources"].get("GPU") == 1
    assert config["max_workers"] >= gpu["max_workers"]
    assert "frcnn-jobs" in config["docker"]["image"]


# --------------------------------------------------------------------------
# Versions pinned in infra/ follow pyproject.toml
# --------------------------------------------------------------------------


def _from_images(dockerfile: Path) -> list[str]:
    args = {}
    images = []
    for instr, rest in dockerfile_instructions(dockerfile.read_text()):
        if instr == "ARG" and "=" in rest:
            k, v = rest.split("=", 1)
            args[k.strip()] = v.strip()
        elif instr == "FROM":
            image = rest.split()[0]
            images.append(re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), m.group(0)), image))
    return images


def test_image_versions_follow_pyproject_pins():
    pins = pyproject_pins()
    (ray_image,) = _from_images(INFRA / "docker" / "Dockerfile")
    m = re.fullmatch(r"rayproject/ray:(\d+\.\d+\.\d+)-py(\d)(\d+)-(gpu|cu\d+)", ray_image)
    assert m, ray_image
    assert m.group(1) == pins["ray"]
    requires = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["requires-python"]
    assert f">={m.group(2)}.{m.group(3)}" in requires

    (mlflow_image,) = _from_images(INFRA / "mlflow" / "Dockerfile")
    assert mlflow_image == f"ghcr.io/mlflow/mlflow:v{pins['mlflow']}"
    assert _compose()["services"]["mlflow"]["image"].endswith(":" + pins["mlflow"])
    (deploy,) = [d for d in docs_of_kind("Deployment") if d["metadata"]["name"] == "mlflow"]
    assert pod_containers(deploy)[0]["image"].endswith(":" + pins["mlflow"])


def test_dockerfile_installs_the_package():
    instructions = dockerfile_instructions((INFRA / "docker" / "Dockerfile").read_text())
    runs = " ".join(rest for instr, rest in instructions if instr == "RUN")
    assert re.search(r"pip install [^&]*\.(\s|$)", runs), "the image must `pip install .` the package"
    copied = {rest.split()[-2] for instr, rest in instructions if instr == "COPY"}
    assert {"pyproject.toml", "jobs", "frcnn", "pipelines"} <= copied


def test_embedded_python_compiles():
    # Heredoc scripts (`python - <<'PY' ... PY`) inside YAML are code too.
    heredoc = re.compile(r"python3?\s+-\s*<<-?\s*'?(\w+)'?[^\n]*\n(.*?)\n\s*\1\s*$", re.S | re.M)
    count = 0
    for path in yaml_files():
        for doc in load_docs(path):
            for text in yaml_command_texts(doc):
                for m in heredoc.finditer(text):
                    compile(m.group(2), f"{rel(path)}:<heredoc {m.group(1)}>", "exec")
                    count += 1
    assert count >= 1


# --------------------------------------------------------------------------
# Every command line in infra/ against the real CLIs
# --------------------------------------------------------------------------


def test_infra_invokes_every_workflow_step():
    commands = {args[0] for _, args in all_invocations("frcnn-jobs") if args and not args[0].startswith("-")}
    assert {"precompute", "train", "evaluate", "promote", "infer"} <= commands, commands


def test_frcnn_jobs_invocations_match_cli():
    # Deliberately not skipped when jobs.cli is missing: the CLI is part of the
    # package these manifests deploy, so its absence is a failure.
    from jobs.cli import main

    assert isinstance(main, click.Group)
    invocations = all_invocations("frcnn-jobs")
    assert len(invocations) >= 10
    problems = check_all("frcnn-jobs", main)
    assert not problems, "\n".join(problems)


def test_ray_invocations_match_pinned_ray_cli():
    from ray.scripts.scripts import cli

    assert all_invocations("ray")
    problems = check_all("ray", cli)
    assert not problems, "\n".join(problems)


def test_mlflow_invocations_match_pinned_mlflow_cli():
    from mlflow.cli import cli

    assert all_invocations("mlflow")
    problems = check_all("mlflow", cli)
    assert not problems, "\n".join(problems)
