"""The engine's C kernels build cleanly for every kind of CPU the engine meets, not only this one.

The library is compiled on the user's machine with `-march=native` (engine.cpu_kernels.build),
so a source that only builds, or only builds without warnings, on the CPU where it was written
breaks the others at start-up (the engine then falls back to torch's slower kernels). Each
target below is compiled with the engine's own flags plus `-Wall -Werror`: AVX2 (x86-64-v3),
AVX512 without bf16 (Skylake/Cascade Lake servers), AVX512-BF16 without AMX (Cooper Lake, Zen
4/5 take the same path), AMX (Sapphire Rapids), and 64-bit ARM with a cross compiler (plain
ARMv8, and ARMv8.6 with bf16 and SVE). Only the x86 builds this CPU can run are also executed,
by the kernel tests (tests/test_packed_linear.py).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from engine.cpu_kernels.build import FLAGS, SOURCES, compiler

X86_TARGETS = ["x86-64-v3", "skylake-avx512", "cooperlake", "sapphirerapids"]
ARM_TARGETS = ["armv8-a", "armv8.6-a+sve"]
ARM_COMPILER = "aarch64-linux-gnu-gcc"  # Debian's gcc-aarch64-linux-gnu (.ci/run installs it)


def _build(cc: str, march: str, out: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [cc, *FLAGS, "-Wall", "-Werror", f"-march={march}", "-o", str(out), *map(str, SOURCES)]
        + ["-lm"],
        capture_output=True,
        text=True,
        timeout=300,
    )


def _assert_builds(cc: str, march: str, tmp_path: Path) -> None:
    result = _build(cc, march, tmp_path / f"kernels-{march}.so")
    assert result.returncode == 0, f"{cc} -march={march}:\n{result.stderr[-4000:]}"
    assert (tmp_path / f"kernels-{march}.so").stat().st_size > 0


@pytest.mark.skipif(compiler() is None, reason="no C compiler on this machine")
@pytest.mark.parametrize("march", X86_TARGETS)
def test_the_kernels_build_without_warnings_for_x86(march, tmp_path):
    cc = compiler()
    assert cc is not None
    probe = subprocess.run([cc, "-dumpmachine"], capture_output=True, text=True, check=True)
    if not probe.stdout.startswith("x86_64"):
        pytest.skip(f"{cc} targets {probe.stdout.strip()}, not x86-64")
    _assert_builds(cc, march, tmp_path)


@pytest.mark.skipif(
    shutil.which(ARM_COMPILER) is None,
    reason=f"no {ARM_COMPILER} (Debian: apt-get install gcc-aarch64-linux-gnu)",
)
@pytest.mark.parametrize("march", ARM_TARGETS)
def test_the_kernels_build_without_warnings_for_arm64(march, tmp_path):
    _assert_builds(ARM_COMPILER, march, tmp_path)


def test_a_warning_fails_the_build(tmp_path):
    """The check above can fail: an unused static function is a -Wall warning, so an error."""
    cc = compiler() or shutil.which(ARM_COMPILER)
    if cc is None:
        pytest.skip("no C compiler on this machine")
    source = tmp_path / "unused.c"
    source.write_text("static int unused(void) { return 1; }\nint used(void) { return 0; }\n")
    result = subprocess.run(
        [cc, *FLAGS, "-Wall", "-Werror", "-o", str(tmp_path / "u.so"), str(source)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0 and "unused" in result.stderr
