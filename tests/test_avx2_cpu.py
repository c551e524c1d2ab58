"""The suite's CPU-dependent core on an AVX2-only x86 CPU, whatever CPU runs `make test`.

`.ci/avx2-cpu` runs pytest under QEMU's emulation of an AMD EPYC Rome (no AVX-512, no bf16
instructions): torch reads that CPU's CPUID, so its capability reports, and every choice the
engine makes from them, are the ones such a machine gets; the kernels are built by a compiler
that sees that CPU; an AVX-512 instruction anywhere traps. Here it runs the linear layer's tests
(the kernel choice against torch's reports, float32 and bf16 matmuls against F.linear, 16-bit
weights with float32 math), the ones a fresh clone failed on such a CPU before the choice was
made from the reports. `make test-avx2-cpu` runs the longer default list (precision against
float32 greedy decoding, the attention and elementwise kernels, the forward against HF).
"""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / ".ci" / "avx2-cpu"

needs_qemu = pytest.mark.skipif(
    shutil.which("qemu-x86_64") is None,
    reason="needs qemu-x86_64 (apt-get install qemu-user; .ci/run installs it)",
)
x86_only = pytest.mark.skipif(
    platform.machine().lower() not in ("x86_64", "amd64"),
    reason="emulates an x86 CPU for this machine's x86 interpreter",
)


def test_default_list_names_existing_test_files():
    listed = re.findall(r"^\s+(tests/\S+\.py)$", SCRIPT.read_text(), flags=re.M)
    assert len(listed) >= 5
    missing = [path for path in listed if not (ROOT / path).is_file()]
    assert not missing, missing


@x86_only
@needs_qemu
def test_linear_layer_tests_pass_on_an_emulated_avx2_only_cpu():
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    env["VENV"] = sys.prefix  # the interpreter running this suite
    result = subprocess.run(
        [str(SCRIPT), "tests/test_linear.py"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    # torch itself reports the emulated CPU: AVX2, and no bf16 in oneDNN.
    assert "emulated CPU: CPU capability AVX2, oneDNN bf16 not native" in output, output[-3000:]
    assert "linear kernels: f32 onednn, bf16 torch, bf16-weight/f32 upcast" in output
    summary = re.search(r"(\d+) passed", output)
    assert summary and int(summary.group(1)) >= 40, output[-3000:]
