"""`EngineClient`: the engine as the app sees it, whichever engine that is.

Two classes implement it: `engine.AsyncLLM` (the model in this process) and
`app.serving.remote_engine.RemoteEngine` (an OpenAI-compatible server over HTTP). The app
holds one `EngineClient` (in `app.serving.runtime.Runtime`) and uses only what is declared
here, so mypy checks every call across the seam and nothing asks an engine what it is.

The one difference callers see: `tokenizer` is None for a remote engine, which applies its
own chat template; send it messages (`chat`), not token ids.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from engine.outputs import EngineStats, RequestOutput
    from engine.sampling_params import SamplingParams
    from engine.tokenizer import Tokenizer

# One chat message in OpenAI's shape: {"role": "user", "content": "Hi"}.
ChatMessage = dict[str, Any]


class EngineClient(Protocol):
    """Generation, cancellation and introspection of one engine serving one model."""

    @property
    def model_id(self) -> str | None:
        """The model's id (its name or local path); None until a remote engine has reached its
        server (`health()` looks again)."""
        ...

    @property
    def max_model_len(self) -> int:
        """The longest sequence served, prompt and generated tokens together."""
        ...

    @property
    def tokenizer(self) -> Tokenizer | None:
        """The model's tokenizer; None when the engine is remote (send it messages)."""
        ...

    @property
    def generation_defaults(self) -> dict[str, Any]:
        """The checkpoint's recommended sampling settings (temperature, top_p, ...); empty when
        the engine applies its own."""
        ...

    def generate(
        self,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        request_id: str | None = None,
    ) -> AsyncGenerator[RequestOutput, None]:
        """Stream the continuation of `prompt` (text, or token ids of the model's tokenizer):
        deltas, then one final output (`finished=True`) with the whole answer.

        `params.cache_salt` is the request's prefix-cache namespace (vLLM's `cache_salt`): it
        reuses cached KV only of requests with the same salt (engine.kv_keys); a remote engine
        sends it upstream as `cache_salt`. The app sets it per tenant (app.serving.tenancy).

        Raises ValueError before the first output when the request can never be served.
        Closing the generator (`aclose()`, or leaving `async for` by an exception or a break
        followed by closing) aborts the request.
        """
        ...

    def chat(
        self,
        messages: list[ChatMessage],
        params: SamplingParams | None = None,
        request_id: str | None = None,
    ) -> AsyncGenerator[RequestOutput, None]:
        """Stream the assistant's answer to `messages`, rendered with the model's chat template;
        otherwise as `generate`."""
        ...

    async def abort(self, request_id: str) -> None:
        """Stop a request; its stream ends with a final output (finish_reason "abort")."""
        ...

    def stats(self) -> EngineStats:
        """A snapshot of the engine's load and counters (for /metrics and the status page)."""
        ...

    async def health(self) -> bool:
        """True while the engine can serve requests (a remote one: its server answers)."""
        ...

    async def aclose(self) -> None:
        """Shut the engine down: requests in flight end and its resources (engine thread and
        model, or HTTP connections) are released. Safe to call twice."""
        ...
