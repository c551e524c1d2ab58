"""The CPU allocator tuning takes effect: large tensors then come from reused memory."""

from __future__ import annotations

import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import resource, sys, torch
    from engine.cpu_malloc import keep_freed_memory

    if sys.argv[1] == "tuned":
        assert keep_freed_memory() and keep_freed_memory()  # applied, and idempotent
    for _ in range(3):
        torch.empty(64 << 20, dtype=torch.uint8).fill_(1)  # 64 MB, touched, freed
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        torch.empty(64 << 20, dtype=torch.uint8).fill_(1)
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    """
)


def page_faults(mode: str) -> int:
    # A fresh interpreter each: the tuning is process-wide and other tests apply it.
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, check=True, timeout=120
    )
    return int(out.stdout)


def test_keep_freed_memory_stops_page_faults_on_reallocation():
    untuned, tuned = page_faults("default"), page_faults("tuned")
    # 5 x 64 MB in 4 KiB pages is ~80,000 faults when every tensor gets fresh pages.
    assert untuned > 40_000, untuned
    # Tuned, at most one of the five lands on fresh pages (the heap's top moves now and then).
    assert tuned <= untuned // 4, (untuned, tuned)
