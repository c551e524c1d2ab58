"""The Kubernetes manifests (deploy/k8s/): every document validates against the Kubernetes
OpenAPI schemas offline (`kubernetes-validate`, strict: no unknown fields); the probes call
routes the app serves on the port the container listens on; every PAGECHAT_* variable they set
is a real setting listed in the README; the Secrets, volumes and Services they reference exist;
and, where kubectl is installed, `kubectl kustomize` renders both the base and the Postgres
overlay (`kubectl apply --dry-run=client` needs a cluster to talk to, so it is not used).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from app.serving.metrics import router as ops_router
from app.settings import AppSettings
from engine.config import EngineConfig

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "k8s"
KUBE_VERSION = "1.30.0"  # a Kubernetes release still supported by the major clouds
KUBECTL = shutil.which("kubectl")


def documents(paths: list[Path]) -> list[dict]:
    return [doc for path in paths for doc in yaml.safe_load_all(path.read_text()) if doc]


def manifests() -> list[dict]:
    """Every Kubernetes object under deploy/k8s (kustomization and patch files left out)."""
    files = [
        p
        for p in sorted(K8S.rglob("*.yaml"))
        if p.name != "kustomization.yaml" and p.name != "database-url.yaml"
    ]
    return documents(files)


def by_kind(docs: list[dict], kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def app_container(docs: list[dict]) -> dict:
    deployment = by_kind(docs, "Deployment")["pagechat"]
    return deployment["spec"]["template"]["spec"]["containers"][0]


def rendered(overlay: str) -> list[dict]:
    done = subprocess.run(
        [KUBECTL, "kustomize", str(K8S / overlay)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return [d for d in yaml.safe_load_all(done.stdout) if d]


def test_every_manifest_validates_against_the_kubernetes_schema():
    docs = manifests()
    assert {d["kind"] for d in docs} >= {
        "Deployment",
        "Service",
        "PersistentVolumeClaim",
        "Secret",
        "StatefulSet",
    }
    for doc in docs:
        kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
    patch = documents([K8S / "postgres" / "database-url.yaml"])[0]
    assert patch["kind"] == "Deployment" and patch["metadata"]["name"] == "pagechat"


def test_a_broken_manifest_is_caught():
    """The validator is strict: a misspelt field or a wrong type fails (the test above can fail)."""
    deployment = by_kind(manifests(), "Deployment")["pagechat"]
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    container["livenessProbe"]["httpGet"]["pathh"] = "/health"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBE_VERSION, strict=True)
    del container["livenessProbe"]["httpGet"]["pathh"]
    deployment["spec"]["replicas"] = "one"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBE_VERSION, strict=True)


def test_probes_call_routes_the_app_serves_on_the_container_port():
    docs = manifests()
    container = app_container(docs)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    args = container["args"]
    assert args[args.index("--port") + 1] == str(ports["http"]) == "8000"
    assert args[args.index("--host") + 1] == "0.0.0.0"
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert f"CMD {args}".replace("'", '"') in dockerfile  # the image's own command
    served = {route.path for route in ops_router.routes}  # type: ignore[attr-defined]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        get = container[probe]["httpGet"]
        assert get["path"] in served and get["path"] == "/health", probe
        assert get["port"] in ports, probe
    # Liveness must not kill a pod that is still loading: the startup probe covers the download.
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 15 * 60
    spec = by_kind(docs, "Deployment")["pagechat"]["spec"]
    assert spec["strategy"]["type"] == "Recreate"  # one server per data directory
    grace = spec["template"]["spec"]["terminationGracePeriodSeconds"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert grace > float(env["PAGECHAT_SHUTDOWN_GRACE_S"])
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    service = by_kind(docs, "Service")["pagechat"]
    assert service["spec"]["ports"][0]["targetPort"] in ports
    assert service["spec"]["selector"].items() <= spec["template"]["metadata"]["labels"].items()
    assert service["metadata"]["annotations"]["prometheus.io/path"] in served | {"/metrics"}


def test_every_variable_is_a_real_setting_listed_in_the_readme():
    docs = manifests()
    names: set[str] = set()
    for doc in docs:
        text = yaml.safe_dump(doc)
        names |= set(re.findall(r"\bPAGECHAT_[A-Z0-9_]+\b", text))
    names |= {
        e["name"]
        for e in documents([K8S / "postgres" / "database-url.yaml"])[0]["spec"]["template"]["spec"][
            "containers"
        ][0]["env"]
    }
    fields = {
        f"PAGECHAT_{f.upper()}" for f in (*AppSettings.model_fields, *EngineConfig.model_fields)
    }
    readme = (ROOT / "README.md").read_text()
    table_rows = set(re.findall(r"^\| `(PAGECHAT_[A-Z0-9_]+)`", readme, re.M))
    table_rows |= {
        m
        for row in re.findall(r"^\| `PAGECHAT_[^|]*\|", readme, re.M)
        for m in re.findall(r"PAGECHAT_[A-Z0-9_]+", row)
    }
    assert {"PAGECHAT_DATABASE_URL", "PAGECHAT_API_KEYS", "PAGECHAT_MODEL"} <= names
    for name in names:
        assert name in fields, f"{name} is not a setting"
        assert name in table_rows, f"{name} is not in the README's configuration tables"


def test_references_resolve():
    docs = manifests()
    secrets = {
        name: set(doc.get("stringData", {})) for name, doc in by_kind(docs, "Secret").items()
    }
    claims = set(by_kind(docs, "PersistentVolumeClaim"))
    container = app_container(docs)
    for source in container["envFrom"]:
        assert source["secretRef"]["name"] in secrets
    assert {"PAGECHAT_API_KEYS", "PAGECHAT_AUTH_USERS"} <= secrets["pagechat-secrets"]
    pod = by_kind(docs, "Deployment")["pagechat"]["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    for mount in container["volumeMounts"]:
        assert volumes[mount["name"]]["persistentVolumeClaim"]["claimName"] in claims
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["PAGECHAT_DATA_DIR"] in mounts and env["HF_HOME"] in mounts
    patch = documents([K8S / "postgres" / "database-url.yaml"])[0]
    ref = patch["spec"]["template"]["spec"]["containers"][0]["env"][0]["valueFrom"]["secretKeyRef"]
    assert ref["key"] in secrets[ref["name"]]
    url = by_kind(docs, "Secret")[ref["name"]]["stringData"][ref["key"]]
    assert url.startswith("postgresql+asyncpg://") and "@pagechat-postgres:5432/" in url
    assert "pagechat-postgres" in by_kind(docs, "Service")


@pytest.mark.skipif(
    KUBECTL is None, reason="kubectl is not installed (its kustomize renders the overlays)"
)
def test_kustomize_renders_the_base_and_the_postgres_overlay():
    base = rendered("base")
    assert {d["kind"] for d in base} == {"Deployment", "Service", "PersistentVolumeClaim", "Secret"}
    with_postgres = rendered("postgres")
    env = {e["name"]: e for e in app_container(with_postgres)["env"]}
    assert env["PAGECHAT_DATABASE_URL"]["valueFrom"]["secretKeyRef"]["name"] == "pagechat-postgres"
    assert "PAGECHAT_MODEL" in env  # the patch adds to the base's variables, not replaces them
    assert "StatefulSet" in {d["kind"] for d in with_postgres}
    for doc in base + with_postgres:
        kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
