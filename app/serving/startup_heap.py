"""Freeze the start-up heap once the model is loaded, so garbage collection does not pause streams.

The server's heap after start-up holds hundreds of thousands of objects that live as long as
the process (torch, transformers, the model's modules, Chainlit, FastAPI). Python's full
collection walks all of them: 0.1-0.3 s with the GIL held, on the engine's thread or the event
loop, whenever enough new objects survived; a stream stalls that long. `gc.freeze()` moves them
out of the collector's sight (vLLM's engine does the same after start-up); collections then
walk only what serving allocates.
"""

from __future__ import annotations

import gc
import logging
import time

logger = logging.getLogger("pagechat")


def freeze_startup_heap() -> int:
    """Collect the start-up garbage, then freeze what is left; returns the frozen count."""
    start = time.perf_counter()
    gc.collect()
    gc.freeze()
    frozen = gc.get_freeze_count()
    logger.info(
        "froze the start-up heap (%d objects) in %.2f s: full collections skip it",
        frozen,
        time.perf_counter() - start,
    )
    return frozen
