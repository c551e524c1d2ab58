"""Per-request sampling settings, validated at construction so bad values never reach a step."""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.structured_output import StructuredOutputParams


@dataclass
class SamplingParams:
    """What to sample and when to stop. temperature 0 means greedy."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    max_tokens: int | None = 256
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] | None = None  # stop too; EOS still stops unless ignore_eos (vLLM)
    ignore_eos: bool = False
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    # The grammar the output must follow (JSON schema, regex, choice, ...): engine.structured_output.
    structured_output: StructuredOutputParams | None = None
    logprobs: int | None = None  # top-k log-probabilities of each sampled position (0..20)
    # Not a sampling setting: the request's prefix-cache namespace (vLLM's request field of the
    # same name). It roots the block-key chain (engine.kv_keys.chain_root), so a request reuses
    # cached KV only from requests with the same salt; None is the default namespace. The app
    # sets it per tenant (app.serving.tenancy).
    cache_salt: str | None = None
    # Top-k log-probabilities of each prompt token given the tokens before it (0..20; the first
    # prompt token gets None). A request asking for them computes its whole prompt: no prefix
    # cache hits, since the logits of cached positions were never computed.
    prompt_logprobs: int | None = None
    # EOS and stop_token_ids cannot be sampled before this many tokens (vLLM's min_tokens).
    min_tokens: int = 0
    # Added to the logits of these token ids before sampling (OpenAI: values in [-100, 100]).
    logit_bias: dict[int, float] | None = None
    # Keep a matched stop string (or the stop token's text) at the end of the text.
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True  # in the text; the token ids always hold them

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        checks = [
            ("temperature", self.temperature >= 0.0, "must be >= 0"),
            ("top_p", 0.0 < self.top_p <= 1.0, "must be in (0, 1]"),
            ("top_k", self.top_k == -1 or self.top_k >= 1, "must be -1 (off) or >= 1"),
            ("min_p", 0.0 <= self.min_p <= 1.0, "must be in [0, 1]"),
            ("max_tokens", self.max_tokens is None or self.max_tokens >= 1, "must be >= 1"),
            ("presence_penalty", -2.0 <= self.presence_penalty <= 2.0, "must be in [-2, 2]"),
            ("frequency_penalty", -2.0 <= self.frequency_penalty <= 2.0, "must be in [-2, 2]"),
            ("repetition_penalty", self.repetition_penalty > 0.0, "must be > 0"),
            ("logprobs", self.logprobs is None or 0 <= self.logprobs <= 20, "must be in [0, 20]"),
            (
                "prompt_logprobs",
                self.prompt_logprobs is None or 0 <= self.prompt_logprobs <= 20,
                "must be in [0, 20]",
            ),
            ("min_tokens", self.min_tokens >= 0, "must be >= 0"),
            (
                "min_tokens",
                self.max_tokens is None or self.min_tokens <= self.max_tokens,
                f"must be <= max_tokens ({self.max_tokens})",
            ),
            (
                "logit_bias",
                self.logit_bias is None
                or all(
                    isinstance(t, int) and t >= 0 and -100.0 <= float(b) <= 100.0
                    for t, b in self.logit_bias.items()
                ),
                "must map non-negative token ids to values in [-100, 100]",
            ),
            ("stop", all(isinstance(s, str) and s for s in self.stop), "must be non-empty strings"),
            (
                "cache_salt",
                self.cache_salt is None or (isinstance(self.cache_salt, str) and self.cache_salt),
                "must be a non-empty string or None",
            ),
            (
                "stop_token_ids",
                self.stop_token_ids is None
                or all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids),
                "must be non-negative integers",
            ),
        ]
        for name, ok, why in checks:
            if not ok:
                raise ValueError(f"SamplingParams.{name} {why}, got {getattr(self, name)!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0
