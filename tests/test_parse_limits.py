"""Parsing limits (issue 19 item 2): a DOCX bomb, memory, time and a dying worker.

The bomb is the one from the report: a small DOCX holding 245 MiB of XML. It must be refused
with a message naming the limit, counted while inflating, while the server's event loop and
memory stay unaffected (the work happens in a worker process).
"""

from __future__ import annotations

import asyncio
import os
import signal
import time

import psutil
import pytest

from app.documents.extraction import DocumentError, ParseLimits, extract_bytes, extract_file_async
from tests.fixtures import documents as corpus

MB = 1024 * 1024


@pytest.fixture(scope="module")
def bomb(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("bomb") / "bomb.docx"
    path.write_bytes(corpus.docx_bomb(245))
    assert path.stat().st_size < 3 * MB
    return str(path)


def _workers() -> list[psutil.Process]:
    return [
        child
        for child in psutil.Process().children(recursive=True)
        if "app.documents.worker" in " ".join(child.cmdline())
    ]


async def _max_loop_lag(stop: asyncio.Event) -> float:
    """The longest the event loop went without running this task (10 ms ticks)."""
    worst = 0.0
    while not stop.is_set():
        start = time.perf_counter()
        await asyncio.sleep(0.01)
        worst = max(worst, time.perf_counter() - start - 0.01)
    return worst


@pytest.mark.timing
async def test_docx_bomb_refused_naming_the_limit_while_the_server_stays_fast(bomb, tmp_path):
    rss_before = psutil.Process().memory_info().rss
    small = tmp_path / "small.txt"
    small.write_text("another user's document")
    stop = asyncio.Event()
    lag = asyncio.create_task(_max_loop_lag(stop))
    limits = ParseLimits(max_unpacked_mb=100)
    refused, other = await asyncio.gather(
        extract_file_async(bomb, "bomb.docx", 50 * MB, limits=limits),
        extract_file_async(small, "small.txt", 50 * MB, limits=limits),
        return_exceptions=True,
    )
    stop.set()
    assert isinstance(refused, DocumentError) and refused.code == "too_much_unpacked"
    assert "100 MB limit" in str(refused) and "PAGECHAT_MAX_UNPACKED_MB" in str(refused)
    assert refused.params == {"name": "bomb.docx", "limit_mb": 100}
    assert not isinstance(other, BaseException) and other.text == "another user's document"
    assert await lag < 0.5  # the event loop never stalled
    assert psutil.Process().memory_info().rss - rss_before < 100 * MB  # nothing inflated here
    assert _workers() == []


def test_unpacked_size_counted_while_inflating_not_from_headers():
    """Headers that claim 1 KB for 20 MiB of XML do not get it past a 5 MB limit."""
    data = corpus.docx_bomb(20, declared_small=True)
    with pytest.raises(DocumentError) as err:
        extract_bytes("liar.docx", data, 50 * MB, limits=ParseLimits(max_unpacked_mb=5))
    assert err.value.code in {"too_much_unpacked", "corrupt"}
    honest = corpus.docx_bomb(20)
    with pytest.raises(DocumentError) as err:
        extract_bytes("honest.docx", honest, 50 * MB, limits=ParseLimits(max_unpacked_mb=5))
    assert err.value.code == "too_much_unpacked"


def test_docx_under_the_limit_parses():
    doc = extract_bytes(
        "plan.docx", corpus.structured_docx(), 50 * MB, limits=ParseLimits(max_unpacked_mb=1)
    )
    assert doc.text.startswith("# Annual Plan")


async def test_memory_limit_stops_the_worker(bomb):
    limits = ParseLimits(max_unpacked_mb=1000, memory_mb=300)
    start = time.monotonic()
    with pytest.raises(DocumentError) as err:
        await extract_file_async(bomb, "bomb.docx", 50 * MB, limits=limits)
    assert err.value.code == "parse_memory"
    assert "300 MB memory limit" in str(err.value) and "PAGECHAT_PARSE_MEMORY_MB" in str(err.value)
    assert time.monotonic() - start < 30 and _workers() == []


async def test_time_limit_kills_the_worker(bomb):
    limits = ParseLimits(max_unpacked_mb=1000, timeout_s=0.3)
    with pytest.raises(DocumentError) as err:
        await extract_file_async(bomb, "bomb.docx", 50 * MB, limits=limits)
    assert err.value.code == "parse_timeout" and err.value.params["limit_s"] == 0.3
    assert "PAGECHAT_PARSE_TIMEOUT_S" in str(err.value)
    assert _workers() == []


async def test_a_worker_that_dies_is_reported(tmp_path):
    path = tmp_path / "long.pdf"
    path.write_bytes(corpus.two_column_pdf(pages=6))

    def kill_worker(step):
        for worker in _workers():
            os.kill(worker.pid, signal.SIGKILL)

    with pytest.raises(DocumentError) as err:
        await extract_file_async(path, "long.pdf", 50 * MB, progress=kill_worker)
    assert err.value.code == "parse_failed" and err.value.params["exit_code"] == -signal.SIGKILL


async def test_workers_limit_parses_documents_in_turn(tmp_path):
    paths = []
    for i in range(3):
        paths.append(tmp_path / f"r{i}.pdf")
        paths[-1].write_bytes(corpus.two_column_pdf(pages=3))
    seen = []

    def count(step):
        seen.append(len(_workers()))

    docs = await asyncio.gather(
        *(
            extract_file_async(p, p.name, 50 * MB, limits=ParseLimits(workers=1), progress=count)
            for p in paths
        )
    )
    assert [d.pages for d in docs] == [3, 3, 3] and max(seen) == 1


async def test_worker_gets_no_settings_or_secrets(tmp_path, monkeypatch):
    monkeypatch.setenv("PAGECHAT_API_KEYS", "sk-secret-key")
    monkeypatch.setenv("CHAINLIT_AUTH_SECRET", "jwt-secret")
    monkeypatch.setenv("SOME_SERVICE_TOKEN", "tok")
    path = tmp_path / "report.pdf"
    path.write_bytes(corpus.two_column_pdf(pages=3))
    seen: list[dict[str, str]] = []

    def look(step):
        seen.extend(worker.environ() for worker in _workers())

    await extract_file_async(path, "report.pdf", 50 * MB, progress=look)
    assert seen and all(
        not ({"PAGECHAT_API_KEYS", "CHAINLIT_AUTH_SECRET", "SOME_SERVICE_TOKEN"} & set(env))
        for env in seen
    )
    assert all("PATH" in env for env in seen)


async def test_cancelled_read_ends_its_worker(bomb):
    """Stop in the chat cancels the handler: the worker process must not outlive it."""
    limits = ParseLimits(max_unpacked_mb=1000, timeout_s=60)
    task = asyncio.create_task(extract_file_async(bomb, "bomb.docx", 50 * MB, limits=limits))
    for _ in range(100):  # until the worker runs
        await asyncio.sleep(0.05)
        if _workers():
            break
    assert _workers()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert _workers() == []


def test_killing_a_worker_that_just_died_leaves_its_status_to_the_watcher():
    """The kill in the worker's cleanup must not reap: asyncio's child watcher reports how the
    worker ended, and a reaping kill (asyncio's Process.kill polls first) made it report 255."""
    import subprocess
    import sys

    from app.documents.worker import _kill, _open_pidfd

    child = subprocess.Popen([sys.executable, "-c", "import os; os._exit(7)"])
    pidfd = _open_pidfd(child.pid)
    assert pidfd is not None  # Linux 5.3+: the pidfd path is the one taken
    deadline = time.monotonic() + 30
    while psutil.Process(child.pid).status() != psutil.STATUS_ZOMBIE:  # dead, not yet reaped
        assert time.monotonic() < deadline
        time.sleep(0.01)
    _kill(child.pid, pidfd)
    _kill(child.pid, None)
    os.close(pidfd)
    pid, status = os.waitpid(child.pid, 0)  # still ours to reap, with the real exit status
    assert pid == child.pid and os.waitstatus_to_exitcode(status) == 7
    child.returncode = 7  # reaped here; keep Popen from polling a pid that may be reused
