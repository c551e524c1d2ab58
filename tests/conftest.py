"""Shared fixtures. Triton's interpreter must be chosen before triton is first imported."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A tiny random-weight Qwen3 checkpoint with the real tokenizer, written once per session."""
    from engine.tiny import write_checkpoint

    return write_checkpoint(tmp_path_factory.mktemp("tiny-qwen3"), shape="tiny", seed=0)


@pytest.fixture(scope="session")
def postgres_server():
    """A real PostgreSQL server on a loopback port for the session (tests/postgres_server.py)."""
    from tests.postgres_server import INSTALL_HINT, PostgresServer, postgres_bin_dir

    bin_dir = postgres_bin_dir()
    if bin_dir is None:
        pytest.skip(INSTALL_HINT)
    server = PostgresServer(bin_dir)
    try:
        yield server
    finally:
        server.stop()
