"""Once the model is loaded the server freezes its start-up heap (app/serving/startup_heap.py):
full garbage collections then skip the hundreds of thousands of long-lived objects (torch, the
model, Chainlit) that made each of them pause streams for 0.1-0.3 s."""

from __future__ import annotations

import asyncio
import gc

from app.serving.runtime import Runtime, set_runtime
from app.settings import AppSettings
from engine import EngineConfig


async def test_the_loaded_engine_is_out_of_the_collectors_sight(tiny_checkpoint, tmp_path):
    from app.serving.server import _load_engine

    runtime = Runtime(settings=AppSettings(data_dir=tmp_path), model_name="tiny",
                      engine_config=EngineConfig(model=str(tiny_checkpoint), num_kv_blocks=64))
    runtime.bind_loop(asyncio.get_running_loop())
    set_runtime(runtime)
    gc.unfreeze()
    try:
        await _load_engine(runtime)  # what the lifespan runs in the background
        engine = runtime.engine
        assert engine is not None
        assert gc.get_freeze_count() > 10_000  # the model's modules, torch, the app
        # gc.get_objects() lists what full collections walk: the engine and its model are not
        # there any more; what serving allocates from now on is.
        tracked = {id(o) for o in gc.get_objects()}
        model = engine.engine.runner.model  # type: ignore[attr-defined]
        assert id(engine) not in tracked and id(model) not in tracked
        fresh = [object(), {"a": []}]
        assert any(o is fresh[1] for o in gc.get_objects())
        await engine.aclose()
    finally:
        gc.unfreeze()
