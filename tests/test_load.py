"""Load and memory. The load runs on the demo server (`python -m bench.load`, shortened): 64
streaming API clients and 8 Chainlit chat clients at once for 30 s; no errors, every stream
equal to its solo answer, every KV block free at the end, the server's memory flat
(`pytest -m slow tests/test_load.py`; the full two-minute run is `python -m bench.load`)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from bench.load import LoadConfig, demo_server, run_load


@pytest.mark.slow
def test_load_api_and_chat_clients_together(tmp_path):
    config = LoadConfig(duration_s=30, api_clients=64, chat_clients=8, num_prompts=16,
                        max_rss_slope_mb_per_min=20.0)
    with demo_server(tmp_path / "data", kv_cache_memory_gb=0.5, max_model_len=4096) as server:
        result = asyncio.run(run_load(server.url, server.process.pid, config))
    assert result["errors"] == []
    assert result["mismatches"] == []
    assert result["status_at_end"]["kv_blocks_used"] == 0
    assert result["api_requests"] >= 64 and result["chats"] >= 8
    assert result["client_itl_s"]["p99"] is not None
    # Thirty seconds are mostly warm-up for the allocator: a looser bound than the full run's.
    assert result["checks"]["rss_flat"], (result["rss_slope_mb_per_min"], result["rss_samples"])
    assert result["passed"], result["checks"]


def test_an_ended_chat_leaves_no_copy_of_its_messages(tmp_path):
    """Chainlit's `chat_contexts` would keep every message of every session forever (a pasted
    document per session adds up); ending a chat drops it. Run in its own interpreter: loading
    app/chat/handlers.py registers Chainlit callbacks process-wide."""
    script = textwrap.dedent(f"""
        import asyncio, uuid
        from unittest.mock import Mock
        from app.serving.runtime import Runtime, set_runtime
        from app.settings import AppSettings
        set_runtime(Runtime(settings=AppSettings(data_dir={str(tmp_path)!r})))
        from chainlit.chat_context import chat_context, chat_contexts
        from chainlit.context import ChainlitContext, context_var
        from chainlit.emitter import BaseChainlitEmitter
        from chainlit.message import Message
        from chainlit.session import WebsocketSession
        from app.chat import handlers as chat

        async def main():
            session = Mock(spec=WebsocketSession)
            session.id, session.thread_id = str(uuid.uuid4()), None
            session.user, session.user_env, session.chat_settings = None, {{}}, {{}}
            session.chat_profile, session.client_type = None, "webapp"
            context_var.set(ChainlitContext(session, emitter=Mock(spec=BaseChainlitEmitter)))
            chat_context.add(Message(content="a pasted document " * 1000))
            assert len(chat_contexts[session.id]) == 1
            await chat._on_chat_end()
            assert session.id not in chat_contexts
            print("released")

        asyncio.run(main())
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          cwd=str(Path(__file__).resolve().parent.parent))
    assert done.returncode == 0 and "released" in done.stdout, done.stderr[-3000:]
