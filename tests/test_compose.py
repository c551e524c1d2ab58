"""compose.yaml and the Dockerfile, validated by docker-compose itself (no Docker engine needed).

CI installs Debian's `docker-compose` package (1.29.2); `docker-compose config` parses the
file against the Compose schema and resolves variables and profiles exactly as `up` would.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = shutil.which("docker-compose")
needs_compose = pytest.mark.skipif(
    COMPOSE is None, reason="docker-compose is not installed (apt-get install -y docker-compose)"
)


def compose(*args: str, env: dict[str, str] | None = None) -> str:
    result = subprocess.run(
        [COMPOSE, "-f", str(ROOT / "compose.yaml"), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin", **(env or {})},
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


@needs_compose
def test_app_service_gets_one_gpu_port_volumes_and_healthcheck():
    config = yaml.safe_load(compose("config"))
    app = config["services"]["pagechat"]
    assert app["build"]["context"] == str(ROOT)
    assert [(p["published"], p["target"]) for p in app["ports"]] == [(8000, 8000)]
    devices = app["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    mounts = {v.split(":")[1] for v in app["volumes"]}
    assert {"/cache/huggingface", "/data"} <= mounts
    test = " ".join(app["healthcheck"]["test"])
    assert "http://127.0.0.1:8000/health" in test
    # Empty by default: the in-process engine and SQLite.
    assert app["environment"]["PAGECHAT_ENGINE_URL"] == ""
    assert app["environment"]["PAGECHAT_DATABASE_URL"] == ""


@needs_compose
def test_postgres_and_vllm_start_only_with_their_profiles():
    # docker-compose 1.29 lists every service in `config --services`; the profiles say what `up` starts.
    services = yaml.safe_load(compose("config"))["services"]
    assert "profiles" not in services["pagechat"]
    assert services["postgres"]["profiles"] == ["postgres"]
    assert services["vllm"]["profiles"] == ["vllm"]


@needs_compose
def test_profile_settings_reach_the_app():
    url = "postgresql+asyncpg://pagechat:pagechat@postgres:5432/pagechat"
    env = {"PAGECHAT_DATABASE_URL": url, "PAGECHAT_ENGINE_URL": "http://vllm:8000/v1"}
    config = yaml.safe_load(
        compose("--profile", "postgres", "--profile", "vllm", "config", env=env)
    )
    services = config["services"]
    assert services["pagechat"]["environment"]["PAGECHAT_DATABASE_URL"] == url
    assert services["pagechat"]["environment"]["PAGECHAT_ENGINE_URL"] == "http://vllm:8000/v1"
    assert services["postgres"]["environment"]["POSTGRES_DB"] == "pagechat"
    assert "pg_isready" in " ".join(services["postgres"]["healthcheck"]["test"])
    vllm = services["vllm"]
    assert vllm["command"][:2] == ["--model", "Qwen/Qwen3-4B-Instruct-2507"]
    assert (
        "--port" in vllm["command"]
        and vllm["command"][vllm["command"].index("--port") + 1] == "8000"
    )
    assert vllm["deploy"]["resources"]["reservations"]["devices"][0]["driver"] == "nvidia"


def test_dockerfile_serves_the_app_on_port_8000_with_a_healthcheck():
    text = (ROOT / "Dockerfile").read_text()
    assert "EXPOSE 8000" in text
    assert 'CMD ["python", "-m", "app", "--host", "0.0.0.0", "--port", "8000"]' in text
    assert "HEALTHCHECK" in text and "/health" in text
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".git", ".venv", "data", ".files"} <= set(ignored)
