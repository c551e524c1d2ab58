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


def pytest_generate_tests(metafunc):
    if "bf16_math" in metafunc.fixturenames:
        from engine.cpu_kernels import packed_bf16

        maths = ["dot", "fma"] if packed_bf16.kernel_level() == 1 else ["own"]
        metafunc.parametrize("bf16_math", maths, indirect=True)


@pytest.fixture
def bf16_math(request):
    """Without AMX the AVX512-BF16 kernels (matmuls, prompt attention) multiply with vdpbf16ps
    or with float32 FMAs (chosen per CPU when the library loads): a test that takes this
    fixture runs both ways there, then restores the choice; elsewhere once ("own")."""
    from engine.cpu_kernels.build import load

    lib = load()
    assert lib is not None
    chosen = lib.pc_bf16_fma()
    if request.param != "own":
        lib.pc_set_bf16_fma(int(request.param == "fma"))
        assert lib.pc_bf16_fma() == int(request.param == "fma")
    yield request.param
    lib.pc_set_bf16_fma(chosen)


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
