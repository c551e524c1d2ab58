"""Drive the real server like the browser does: a uvicorn subprocess on 127.0.0.1 and
Chainlit's socket.io protocol (events as the frontend sends and receives them)."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import cast

import httpx

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`python -m app` in a subprocess; stop() sends SIGTERM like a service manager would."""

    def __init__(self, checkpoint: Path, data_dir: Path, log_level: str = "warning", **env: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = data_dir.parent / f"server-{self.port}.log"
        full_env = {
            **os.environ,
            "PAGECHAT_MODEL": str(checkpoint),
            "PAGECHAT_DATA_DIR": str(data_dir),
            "PAGECHAT_KV_CACHE_MEMORY_GB": "0.1",
            "PAGECHAT_MAX_MODEL_LEN": "2048",
            "CHAINLIT_APP_ROOT": str(ROOT),
            **env,
        }
        full_env.pop("CHAINLIT_AUTH_SECRET", None)
        self.env = full_env
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "app", "--host", "127.0.0.1", "--port", str(self.port), "--log-level", log_level],
            cwd=ROOT, env=full_env, stdout=self.log, stderr=subprocess.STDOUT,
        )

    def wait_ready(self, timeout: float = 60.0) -> dict:
        """Wait until the page is served and the engine is loaded."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.log_path.read_text()[-3000:]}")
            try:
                response = httpx.get(self.url + "/pagechat/status", headers=self.ops_auth(), timeout=2)
                if response.status_code == 401:  # users but no key: /health says enough
                    health = httpx.get(self.url + "/health", timeout=2).json()
                    if health["status"] == "ok":
                        return {"engine": "ready"}
                    if health["status"] == "error":
                        return {"engine": "error", "error": health.get("error")}
                else:
                    status = response.json()
                    if status["engine"] != "loading":
                        return status
            except (httpx.HTTPError, ValueError, KeyError):
                pass
            time.sleep(0.2)
        raise TimeoutError(f"server not ready: {self.log_path.read_text()[-3000:]}")

    def ops_auth(self) -> dict[str, str]:
        """The Authorization header /metrics and /pagechat/status need once keys are set."""
        keys = [k for k in self.env.get("PAGECHAT_API_KEYS", "").split(",") if k.strip()]
        token = self.env.get("PAGECHAT_METRICS_TOKEN") or (keys[0].strip() if keys else "")
        return {"Authorization": f"Bearer {token}"} if token else {}

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()

    def output(self) -> str:
        return self.log_path.read_text()


class ChatClient:
    """One browser tab: logs in, opens the websocket, sends messages and files, stops."""

    def __init__(self, base_url: str, language: str = "en-US") -> None:
        import socketio

        self.base_url = base_url
        self.language = language
        self.session_id = str(uuid.uuid4())
        self.events: list[tuple[str, object]] = []
        self.sio = socketio.AsyncClient(reconnection=False)
        self.http = httpx.AsyncClient(base_url=base_url, timeout=30)
        self.cookie = ""
        self.sent_ids: list[str] = []
        self._task_end = asyncio.Event()

        @self.sio.on("*")
        async def _any(event: str, data: object = None) -> None:
            self.events.append((event, data))
            if event == "task_end":
                self._task_end.set()

    async def login(self, username: str | None = None, password: str | None = None) -> None:
        if username is None:
            response = await self.http.post("/auth/header")
        else:
            response = await self.http.post("/login", data={"username": username, "password": password})
        response.raise_for_status()
        token = response.cookies.get("access_token")
        if token is None:
            raise RuntimeError(f"{response.url.path} set no access_token cookie")
        self.cookie = f"access_token={token}"
        self.http.cookies.set("access_token", token)

    async def connect(self, thread_id: str = "") -> None:
        self._task_end.clear()
        await self.sio.connect(
            self.base_url,
            socketio_path="/ws/socket.io",
            transports=["websocket"],
            headers={"Cookie": self.cookie, "Accept-Language": self.language},
            auth={"clientType": "webapp", "sessionId": self.session_id, "threadId": thread_id,
                  "userEnv": "{}", "chatProfile": ""},
        )
        await self.sio.emit("connection_successful")

    async def wait_event(self, name: str, timeout: float = 30.0) -> object:
        """The first event called `name` (waiting for it if needed)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for event, data in self.events:
                if event == name:
                    return data
            await asyncio.sleep(0.05)
        raise TimeoutError(f"no {name} event; got {[e for e, _ in self.events]}")

    async def wait_task_end(self, timeout: float = 60.0) -> None:
        await asyncio.wait_for(self._task_end.wait(), timeout)

    async def upload(self, name: str, data: bytes, mime: str = "text/plain") -> str:
        response = await self.http.post(
            "/project/file", params={"session_id": self.session_id}, files={"file": (name, data, mime)}
        )
        response.raise_for_status()
        return response.json()["id"]

    async def send(self, text: str, file_ids: tuple[str, ...] = (), wait: bool = True) -> int:
        """Send a user message; returns the index of its first event in `events`."""
        start = len(self.events)
        self._task_end.clear()
        message_id = str(uuid.uuid4())
        self.sent_ids.append(message_id)
        await self.sio.emit("client_message", {
            "message": {"id": message_id, "threadId": "", "name": "User", "type": "user_message",
                        "output": text, "createdAt": datetime.now(UTC).isoformat()},
            "fileReferences": [{"id": f} for f in file_ids],
        })
        if wait:
            await self.wait_task_end()
        return start

    async def edit(self, message_id: str, text: str) -> int:
        """Edit an earlier message (the UI's pencil button): it runs again from there."""
        start = len(self.events)
        self._task_end.clear()
        await self.sio.emit("edit_message", {"message": {
            "id": message_id, "threadId": "", "name": "User", "type": "user_message", "output": text,
            "createdAt": datetime.now(UTC).isoformat()}})
        await self.wait_task_end()
        return start

    async def settings(self, values: dict) -> None:
        await self.sio.emit("chat_settings_change", values)
        await asyncio.sleep(0.2)

    async def stop(self) -> None:
        await self.sio.emit("stop")

    async def close(self) -> None:
        await self.sio.disconnect()
        await self.http.aclose()

    # ---- reading what came back ---------------------------------------------------------

    def messages(self, start: int = 0) -> dict[str, dict]:
        """Final state of each message/step sent since `start`, by id, in order of appearance."""
        out: dict[str, dict] = {}
        for event, data in self.events[start:]:
            if event in ("new_message", "update_message", "stream_start") and isinstance(data, dict):
                out.setdefault(data["id"], {}).update(data)
        return out

    def assistant_messages(self, start: int = 0) -> list[dict]:
        return [m for m in self.messages(start).values() if m.get("type") == "assistant_message"]

    def tokens(self, start: int = 0) -> list[str]:
        # stream_token events carry a dict
        return [cast(dict, d)["token"] for e, d in self.events[start:] if e == "stream_token"]

    def thread_id(self) -> str | None:
        for event, data in self.events:
            if event == "first_interaction":
                return cast(dict, data)["thread_id"]  # first_interaction carries a dict
        return None
