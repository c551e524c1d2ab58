"""Start an OpenAI-compatible server in its own process on a free loopback port, and stop it.

`pagechat_server` runs the real app (`python -m app`: the engine, the API and the Chainlit UI
in one process); `transformers_server` runs `transformers serve` with continuous batching, the
peer a transformers user would deploy. A separate process keeps the benchmark's client off
the server's interpreter (the GIL), as a real client would be.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import httpx

REPO_ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    """A server subprocess; `with` waits until `ready(client)` says it serves, then stops it."""

    def __init__(self, name: str, argv: list[str], port: int,
                 ready: Callable[[httpx.Client], bool], env: dict | None = None,
                 startup_timeout: float = 600.0) -> None:
        self.name, self.argv, self.port, self.ready = name, argv, port, ready
        self.url = f"http://127.0.0.1:{port}"
        self.env = {**os.environ, **(env or {})}
        self.startup_timeout = startup_timeout
        self.log = tempfile.NamedTemporaryFile("w+", prefix=f"{name}-", suffix=".log", delete=False)
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> ServerProcess:
        self.process = subprocess.Popen(
            self.argv, cwd=REPO_ROOT, env=self.env, stdout=self.log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + self.startup_timeout
        with httpx.Client(base_url=self.url, timeout=5.0) as client:
            while True:
                if self.process.poll() is not None:
                    raise RuntimeError(f"{self.name} exited ({self.process.returncode}):\n{self.log_tail()}")
                try:
                    if self.ready(client):
                        return self
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"{self.name} did not start in {self.startup_timeout:.0f} s:\n"
                                       f"{self.log_tail()}")
                time.sleep(0.5)

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)  # its own session: the server and its children
        try:
            self.process.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)

    def log_tail(self, chars: int = 3000) -> str:
        self.log.flush()
        return Path(self.log.name).read_text(errors="replace")[-chars:]


def pagechat_server(model_dir: Path, device: str, dtype: str, max_num_seqs: int,
                    kv_cache_memory_gb: float | None, data_dir: Path,
                    max_num_batched_tokens: int | None = None) -> ServerProcess:
    """`python -m app` serving `model_dir`; ready when /pagechat/status says the engine is."""
    port = free_port()
    env = {
        "PAGECHAT_MODEL": str(model_dir),
        "PAGECHAT_DEVICE": device,
        "PAGECHAT_DTYPE": dtype,
        "PAGECHAT_MAX_NUM_SEQS": str(max_num_seqs),
        "PAGECHAT_DATA_DIR": str(data_dir),
        "PAGECHAT_MAX_QUEUED_REQUESTS": str(max(256, 4 * max_num_seqs)),
        "PAGECHAT_API_KEYS": "",
    }
    if kv_cache_memory_gb is not None:
        env["PAGECHAT_KV_CACHE_MEMORY_GB"] = str(kv_cache_memory_gb)
    if max_num_batched_tokens:
        env["PAGECHAT_MAX_NUM_BATCHED_TOKENS"] = str(max_num_batched_tokens)

    def ready(client: httpx.Client) -> bool:
        status = client.get("/pagechat/status").json()
        if status.get("engine") == "error":
            raise RuntimeError(f"pagechat could not load the model: {status.get('error')}")
        return status.get("engine") == "ready"

    argv = [sys.executable, "-m", "app", "--host", "127.0.0.1", "--port", str(port),
            "--log-level", "warning"]
    return ServerProcess("pagechat", argv, port, ready, env)


def transformers_server(model_dir: Path, device: str, dtype: str) -> ServerProcess:
    """`transformers serve MODEL --continuous-batching`; ready when /health answers."""
    port = free_port()
    argv = [sys.executable, "-m", "transformers.cli.transformers", "serve", str(model_dir),
            "--continuous-batching", "--device", device, "--dtype", dtype,
            "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"]
    return ServerProcess("transformers-serve", argv, port,
                         lambda client: client.get("/health").status_code == 200)
