"""The CPU linear (oneDNN) against torch's F.linear, the reference for every shape it serves."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine.layers import linear as linear_module
from engine.layers.linear import linear


@pytest.mark.parametrize("rows", [1, 3, 16, 300])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_matches_f_linear_float32(rows, bias):
    gen = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 96, generator=gen)
    w = torch.randn(200, 96, generator=gen) / 10
    b = torch.randn(200, generator=gen) if bias else None
    torch.testing.assert_close(linear(x, w, b), F.linear(x, w, b), rtol=1e-5, atol=1e-5)


def test_linear_matches_f_linear_bfloat16():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(16, 128, generator=gen).bfloat16()
    w = (torch.randn(64, 128, generator=gen) / 10).bfloat16()
    torch.testing.assert_close(linear(x, w).float(), F.linear(x, w).float(), rtol=2e-2, atol=2e-2)


def test_linear_takes_non_contiguous_input():
    x = torch.randn(64, 16).t()  # [16, 64], transposed view
    w = torch.randn(32, 64)
    torch.testing.assert_close(linear(x, w), F.linear(x, w), rtol=1e-5, atol=1e-5)


def test_linear_falls_back_for_other_dtypes_and_shapes():
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    w = torch.randn(4, 8, dtype=torch.float64)
    assert torch.equal(linear(x, w), F.linear(x, w))
    x3 = torch.randn(2, 5, 8)
    torch.testing.assert_close(linear(x3, w.float()), F.linear(x3, w.float()))


def test_onednn_path_is_taken_on_this_build():
    # The speed of the CPU engine rests on it: a torch build without oneDNN would silently
    # fall back to F.linear, twice as slow at decode batch sizes.
    assert linear_module._ONEDNN_LINEAR
