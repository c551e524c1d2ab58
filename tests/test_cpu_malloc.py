"""The CPU allocator tuning takes effect: large tensors then come from reused memory."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import textwrap

TENSOR_PAGES = (64 << 20) // 4096  # a 64 MB tensor on fresh 4 KiB pages: 16,384 faults

SCRIPT = textwrap.dedent(
    """
    import json, resource, sys, torch
    from engine.cpu_malloc import keep_freed_memory

    if sys.argv[1] == "tuned":
        assert keep_freed_memory() and keep_freed_memory()  # applied, and idempotent
    for _ in range(3):
        torch.empty(64 << 20, dtype=torch.uint8).fill_(1)  # 64 MB, touched, freed
    faults = []
    for _ in range(9):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        torch.empty(64 << 20, dtype=torch.uint8).fill_(1)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    print(json.dumps(faults))
    """
)


def page_faults(mode: str) -> list[int]:
    """Minor page faults of each of nine 64 MB tensors, in a fresh interpreter (the tuning is
    process-wide and other tests apply it)."""
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, check=True, timeout=120
    )
    return json.loads(out.stdout)


def test_keep_freed_memory_stops_page_faults_on_reallocation():
    untuned, tuned = page_faults("default"), page_faults("tuned")
    # Untuned, glibc unmaps each tensor on free: every one lands on fresh pages.
    assert min(untuned) > TENSOR_PAGES * 0.9, untuned
    # Tuned, the freed pages are reused. Now and then the heap's top moves after the warm-up (one
    # run in ten here: the first two tensors faulted, then none), so judge the typical tensor.
    assert statistics.median(tuned) < TENSOR_PAGES // 10, (untuned, tuned)
    assert sum(tuned) < sum(untuned) // 2, (untuned, tuned)
