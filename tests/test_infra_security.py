"""Who may reach and run what, read from infra/'s YAML: the restricted Pod Security Standard for
every pod and container, default-deny NetworkPolicies with explicit allows in both namespaces, the
MinIO application user's least-privilege policy, MLflow's basic-auth and the identities the pods
carry. A new manifest without these fails here."""

from __future__ import annotations

import json
import re

import pytest
import yaml

from infra.cmdlines import dockerfile_instructions, invocations_in_node, yaml_command_texts
from infra.manifests import INFRA, docs_of_kind, k8s_docs, load_docs, rel, walk

NAMESPACES = ("mlflow", "frcnn")


def pod_specs() -> list[tuple[str, dict]]:
    """(where, pod spec) for every pod template in infra/k8s: any mapping holding `containers`."""
    out = []
    for path, doc in k8s_docs():
        for node in walk(doc):
            if isinstance(node.get("containers"), list):
                out.append((f"{rel(path)}:{doc['kind']}/{doc['metadata']['name']}", node))
    return out


def test_every_pod_spec_is_found():
    kinds = {where.split(":")[1].split("/")[0] for where, _ in pod_specs()}
    assert {"Deployment", "StatefulSet", "Job", "CronJob", "RayCluster", "RayJob"} <= kinds, kinds


@pytest.mark.parametrize("where,spec", pod_specs(), ids=[w for w, _ in pod_specs()])
def test_pods_meet_the_restricted_pod_security_standard(where, spec):
    pod = spec.get("securityContext") or {}
    assert pod.get("runAsNonRoot") is True, f"{where}: pod securityContext.runAsNonRoot"
    assert pod.get("runAsUser", 1) != 0 and pod.get("runAsGroup", 1) != 0, where
    assert (pod.get("seccompProfile") or {}).get("type") == "RuntimeDefault", f"{where}: seccompProfile"
    assert not spec.get("hostNetwork") and not spec.get("hostPID") and not spec.get("hostIPC"), where
    claims = {t["metadata"]["name"] for _, d in k8s_docs() for t in d.get("spec", {}).get("volumeClaimTemplates", [])}
    mounted = {v["name"] for v in spec.get("volumes", [])} | claims
    for c in spec["containers"] + spec.get("initContainers", []):
        sc = c.get("securityContext") or {}
        name = f"{where} container {c['name']}"
        assert sc.get("allowPrivilegeEscalation") is False, f"{name}: allowPrivilegeEscalation"
        assert "ALL" in (sc.get("capabilities") or {}).get("drop", []), f"{name}: capabilities.drop ALL"
        assert not (sc.get("capabilities") or {}).get("add"), f"{name}: adds capabilities"
        assert sc.get("readOnlyRootFilesystem") is True, f"{name}: readOnlyRootFilesystem"
        assert sc.get("privileged") is not True and sc.get("runAsUser", 1) != 0, name
        assert sc.get("runAsNonRoot", True) is True, name
        # A read-only root needs its writable places as volumes; /tmp at least.
        paths = {m["mountPath"] for m in c.get("volumeMounts", [])}
        assert "/tmp" in paths or "/tmp" in str(c.get("env")), f"{name}: no writable /tmp"
        assert {m["name"] for m in c.get("volumeMounts", [])} <= mounted, f"{name}: mounts an undeclared volume"
    for vol in spec.get("volumes", []):
        assert "hostPath" not in vol, f"{where}: hostPath volume {vol['name']}"


def test_kuberays_autoscaler_sidecar_is_restricted_too():
    (cluster,) = docs_of_kind("RayCluster")
    sc = cluster["spec"]["autoscalerOptions"]["securityContext"]
    assert sc["runAsNonRoot"] is True and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"] and sc["seccompProfile"]["type"] == "RuntimeDefault"
    assert sc["readOnlyRootFilesystem"] is True


def test_namespaces_enforce_restricted():
    found = {d["metadata"]["name"]: d["metadata"].get("labels", {}) for d in docs_of_kind("Namespace")}
    assert set(found) == set(NAMESPACES)
    for name, labels in found.items():
        assert labels.get("pod-security.kubernetes.io/enforce") == "restricted", name
    # Every namespaced object lives in one of them (so under the label).
    for path, doc in k8s_docs():
        if doc["kind"] != "Namespace":
            assert doc["metadata"].get("namespace") in NAMESPACES, f"{rel(path)}: {doc['metadata']['name']}"


def test_images_run_as_a_non_root_user():
    for dockerfile in INFRA.rglob("Dockerfile"):
        users = [rest.split()[0] for instr, rest in dockerfile_instructions(dockerfile.read_text()) if instr == "USER"]
        assert users, f"{rel(dockerfile)}: no USER"
        assert users[-1].split(":")[0] not in ("root", "0"), f"{rel(dockerfile)}: runs as {users[-1]}"


# ------------------------------------------------------------------------------------ network policies


def policies(namespace: str) -> list[dict]:
    return [d for d in docs_of_kind("NetworkPolicy") if d["metadata"]["namespace"] == namespace]


def _selects(selector: dict, labels: dict) -> bool:
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expr in selector.get("matchExpressions", []):
        if expr["operator"] != "In" or labels.get(expr["key"]) not in expr["values"]:
            return False
    return True


def admitted(namespace: str, pod_labels: dict, port: int, from_ns: str, from_labels: dict) -> bool:
    """Whether the policies of `namespace` let a pod (from_ns, from_labels) reach `port` of a pod."""
    for pol in policies(namespace):
        if not _selects(pol["spec"]["podSelector"], pod_labels):
            continue
        for rule in pol["spec"].get("ingress", []):
            ports = [p["port"] for p in rule.get("ports", [])]
            if ports and port not in ports:
                continue
            for peer in rule.get("from", []):
                ns_ok = ("namespaceSelector" in peer and _selects(peer["namespaceSelector"],
                                                                  {"kubernetes.io/metadata.name": from_ns})) or \
                        ("namespaceSelector" not in peer and from_ns == namespace)
                pod_ok = "podSelector" not in peer or _selects(peer["podSelector"], from_labels)
                if ns_ok and pod_ok:
                    return True
    return False


@pytest.mark.parametrize("namespace", NAMESPACES)
def test_ingress_is_denied_by_default_and_each_namespace_has_one_policy_file(namespace):
    pols = policies(namespace)
    deny = [p for p in pols if p["spec"]["podSelector"] == {} and p["spec"].get("policyTypes") == ["Ingress"]
            and not p["spec"].get("ingress")]
    assert len(deny) == 1, f"{namespace}: no default-deny ingress policy"
    files = {rel(path) for path, d in k8s_docs() if d["kind"] == "NetworkPolicy"
             and d["metadata"]["namespace"] == namespace}
    assert len(files) == 1, files
    # A comment per rule: each policy document in the file starts with a comment saying what it allows.
    (file,) = files
    chunks = [c for c in (INFRA.parent / file).read_text().split("\n---\n") if "kind: NetworkPolicy" in c]
    assert len(chunks) == len(pols)
    for chunk in chunks:
        assert re.search(r"^# Rule \d+: .+", chunk, re.M), chunk[:200]
    for pol in pols:
        assert pol["spec"].get("policyTypes") == ["Ingress"], pol["metadata"]["name"]


def _label(app: str, **more) -> dict:
    return {"app.kubernetes.io/name": app, **more}


RAY_HEAD = _label("frcnn-ray", **{"app.kubernetes.io/component": "head"})
RAY_WORKER = _label("frcnn-ray", **{"app.kubernetes.io/component": "gpu-worker"})

ALLOWED = [  # (target ns, target pod, port, source ns, source pod)
    ("frcnn", RAY_HEAD, 6379, "frcnn", RAY_WORKER),  # Ray pods among themselves
    ("frcnn", RAY_WORKER, 12345, "frcnn", RAY_HEAD),
    ("frcnn", RAY_HEAD, 8265, "frcnn", _label("frcnn-infer")),  # the CronJob submits
    ("frcnn", RAY_HEAD, 8265, "frcnn", _label("frcnn-submitter")),  # RayJob submitters
    ("frcnn", RAY_HEAD, 8265, "kuberay-system", {}),  # the operator
    ("mlflow", _label("mlflow"), 5000, "frcnn", RAY_WORKER),  # Ray pods and CronJob to MLflow
    ("mlflow", _label("mlflow"), 5000, "frcnn", _label("frcnn-infer")),
    ("mlflow", _label("postgres"), 5432, "mlflow", _label("mlflow")),  # MLflow to PostgreSQL and MinIO
    ("mlflow", _label("minio"), 9000, "mlflow", _label("mlflow")),
    ("mlflow", _label("minio"), 9000, "frcnn", RAY_WORKER),  # Ray pods to MinIO
    ("mlflow", _label("minio"), 9000, "mlflow", _label("minio-buckets")),
]
DENIED = [
    ("mlflow", _label("postgres"), 5432, "frcnn", RAY_WORKER),  # only MLflow talks to the database
    ("mlflow", _label("minio"), 9000, "frcnn", _label("frcnn-infer")),  # the submitter needs no S3
    ("mlflow", _label("mlflow"), 5000, "default", {}),  # other namespaces
    ("mlflow", _label("minio"), 9001, "frcnn", RAY_WORKER),  # the console
    ("frcnn", RAY_HEAD, 8265, "default", {}),
    ("frcnn", RAY_HEAD, 6379, "frcnn", _label("frcnn-infer")),  # the CronJob only uses the job API
    ("mlflow", _label("mlflow"), 5000, "frcnn", _label("frcnn-submitter")),
]


@pytest.mark.parametrize("case", ALLOWED)
def test_policies_admit_what_is_needed(case):
    assert admitted(*case), case


@pytest.mark.parametrize("case", DENIED)
def test_policies_admit_nothing_else(case):
    assert not admitted(*case), case


def test_every_served_port_is_admitted_from_somewhere():
    """A Service whose pods no policy admits on its port would be dead behind default-deny."""
    sources = [("frcnn", RAY_WORKER), ("frcnn", _label("frcnn-infer")), ("mlflow", _label("mlflow")),
               ("mlflow", _label("minio-buckets")), ("kuberay-system", {})]
    for svc in docs_of_kind("Service"):
        ns, selector = svc["metadata"]["namespace"], svc["spec"]["selector"]
        ports = [p["port"] for p in svc["spec"]["ports"] if p.get("name") != "console"]
        for port in ports:
            assert any(admitted(ns, selector, port, s_ns, s_labels) for s_ns, s_labels in sources), \
                f"Service {ns}/{svc['metadata']['name']}:{port} is reachable by nobody"


def test_ingress_namespace_reaches_the_uis_only_by_label():
    ingress = {"frcnn.example.com/ingress": "true"}
    for ns, pod, port in (("mlflow", _label("mlflow"), 5000), ("frcnn", RAY_HEAD, 8265)):
        peers = [peer for pol in policies(ns) if _selects(pol["spec"]["podSelector"], pod)
                 for rule in pol["spec"].get("ingress", []) for peer in rule.get("from", [])]
        assert any(peer.get("namespaceSelector", {}).get("matchLabels") == ingress for peer in peers), (ns, port)


# ------------------------------------------------------------------------------------ object storage


def _policy_docs() -> tuple[dict, dict]:
    (cm,) = [d for d in docs_of_kind("ConfigMap") if d["metadata"]["name"] == "minio-policies"]
    compose = json.loads((INFRA / "mlflow" / "frcnn-app-policy.json").read_text())
    return json.loads(cm["data"]["frcnn-app.json"]), compose


def test_minio_app_policy_is_least_privilege():
    k8s, compose = _policy_docs()
    assert k8s == compose, "the compose and Kubernetes copies of the policy differ"
    grants: dict[str, set[str]] = {}
    for st in k8s["Statement"]:
        assert st["Effect"] == "Allow"
        for action in st["Action"]:
            assert not action.endswith("*") and not action.startswith("admin:"), action
            assert not re.search(r"Bucket(Policy|Versioning|Lifecycle|Notification|Tagging|Encryption)|"
                                 r"CreateBucket|DeleteBucket", action), action
            for res in st["Resource"]:
                grants.setdefault(res, set()).add(action)
    written = {r for r, a in grants.items() if "s3:PutObject" in a}
    assert written == {"arn:aws:s3:::frcnn/precomputed/*", "arn:aws:s3:::frcnn/ray-results/*",
                       "arn:aws:s3:::frcnn/detections/*", "arn:aws:s3:::mlflow/*"}
    assert grants["arn:aws:s3:::frcnn/raw/*"] == {"s3:GetObject"}
    assert all("s3:DeleteObject" not in grants.get(r, set()) for r in ("arn:aws:s3:::frcnn/raw/*",))


def test_bucket_setup_applies_the_policy_and_not_readwrite():
    (job,) = [d for d in docs_of_kind("Job") if d["metadata"]["name"] == "minio-buckets"]
    compose = yaml.safe_load((INFRA / "mlflow" / "docker-compose.yaml").read_text())["services"]["minio-init"]
    for script in ("\n".join(yaml_command_texts(job)), "\n".join(compose["command"])):
        assert re.search(r"mc admin policy create local frcnn-app \S+", script), script
        assert re.search(r"mc admin policy attach local frcnn-app --user", script), script
        assert not re.search(r"policy attach local readwrite", script), script


# ------------------------------------------------------------------------------------ MLflow identities


def _env_sources(container: dict) -> tuple[set[str], dict[str, dict]]:
    secrets = {e["secretRef"]["name"] for e in container.get("envFrom", []) if "secretRef" in e}
    return secrets, {e["name"]: e for e in container.get("env", [])}


def test_mlflow_server_authenticates_with_an_admin_password_from_a_secret():
    (deploy,) = [d for d in docs_of_kind("Deployment") if d["metadata"]["name"] == "mlflow"]
    (c,) = deploy["spec"]["template"]["spec"]["containers"]
    _, env = _env_sources(c)
    for key in ("MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY"):
        assert env[key]["valueFrom"]["secretKeyRef"]["name"] == "mlflow-auth", key
    script = "\n".join(yaml_command_texts(c))
    (server,) = [i for i in invocations_in_node(c, "mlflow") if i[:1] == ["server"]]
    assert server[server.index("--app-name") + 1] == "basic-auth"
    assert "default_permission = READ" in script and "/mlflow_auth" in script
    compose = yaml.safe_load((INFRA / "mlflow" / "docker-compose.yaml").read_text())["services"]["mlflow"]
    text = "\n".join(compose["command"])
    assert "--app-name basic-auth" in text and "default_permission = READ" in text and "/mlflow_auth" in text


def test_the_auth_database_is_created_beside_the_tracking_store():
    (cm,) = [d for d in docs_of_kind("ConfigMap") if d["metadata"]["name"] == "postgres-initdb"]
    assert [v.strip() for v in cm["data"].values()] == ["CREATE DATABASE mlflow_auth;"]
    assert "CREATE DATABASE mlflow_auth;" in (INFRA / "mlflow" / "postgres-init" / "10-mlflow-auth.sql").read_text()


def test_jobs_and_inference_carry_their_own_identities():
    (cluster,) = docs_of_kind("RayCluster")
    for c in [c for node in walk(cluster) for c in node.get("containers", []) if isinstance(c, dict)]:
        assert "frcnn-mlflow-jobs" in _env_sources(c)[0], c["name"]
    (cron,) = docs_of_kind("CronJob")
    (c,) = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]
    assert "frcnn-mlflow-infer" in _env_sources(c)[0]
    script = "\n".join(yaml_command_texts(c))
    assert "--runtime-env /tmp/runtime-env.json" in script and "MLFLOW_TRACKING_PASSWORD" in script
    secrets = {d["metadata"]["name"]: d["stringData"] for d in docs_of_kind("Secret")}
    assert secrets["frcnn-mlflow-jobs"]["MLFLOW_TRACKING_USERNAME"] == "frcnn-jobs"
    assert secrets["frcnn-mlflow-infer"]["MLFLOW_TRACKING_USERNAME"] == "frcnn-infer"
    assert {"FRCNN_JOBS_PASSWORD", "FRCNN_READER_PASSWORD", "FRCNN_INFER_PASSWORD"} <= set(secrets["mlflow-auth"])


def test_example_secrets_say_how_to_generate_their_values():
    for path in (INFRA / "k8s").rglob("secret-example.yaml"):
        chunks = path.read_text().split("\n---\n")
        docs = load_docs(path)
        assert len(chunks) == len(docs)
        for chunk in chunks:
            assert "openssl rand" in chunk, f"{rel(path)}: a Secret without a way to generate its values"
