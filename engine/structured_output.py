"""Structured output: a request's grammar, compiled once, masking that request's logits each step.

The pieces, following vLLM's xgrammar backend (vllm/v1/structured_output/backend_xgrammar.py):

- `StructuredOutputParams` (on `SamplingParams.structured_output`): what the output must match
  (a JSON schema, any JSON object, a regex, one of some strings, an EBNF/Lark grammar, or an
  xgrammar structural tag, which is how tool calls are forced).
- `StructuredOutputManager` (one per engine): builds xgrammar's `TokenizerInfo` from the
  engine's tokenizer on first use (a request without a grammar never pays for it), with
  `vocab_size` = the model's padded vocabulary, so ids past the tokenizer's are always masked;
  compiles grammars and keeps them in an LRU cache. `AsyncLLM.generate` compiles in a worker
  thread before the request reaches the engine thread, so neither the event loop nor the
  engine's steps wait on a compile; an invalid grammar raises ValueError there (a 400).
- `GrammarState` (on `Sequence.grammar`): the request's matcher. The sampler asks every
  constrained row of a batch for its next-token bitmask, copies the bitmask to the logits'
  device once and applies it to those rows only (`apply_grammar_bitmasks`); the scheduler
  advances the matcher with the sampled token and finishes the request when its grammar has
  terminated. A preempted request keeps its matcher (its tokens are kept and only recomputed).
"""

from __future__ import annotations

import json
import logging
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    import xgrammar

    from engine.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

# Compiled grammars kept per engine (xgrammar's compiler keeps its own cache too).
GRAMMAR_CACHE_SIZE = 256
KINDS = ("json", "json_object", "regex", "choice", "grammar", "structural_tag")


@dataclass(frozen=True)
class StructuredOutputParams:
    """What a request's output must match: exactly one field is set (vLLM's names).

    `json` is a JSON schema (a dict or its JSON text; kept as text so the params hash);
    `choice` a list of strings, one of which is the whole output; `grammar` EBNF (xgrammar's
    GBNF dialect, `root ::= ...`) or Lark; `structural_tag` an xgrammar structural tag (JSON).
    """

    json: str | dict[str, Any] | None = None
    json_object: bool = False
    regex: str | None = None
    choice: tuple[str, ...] | list[str] | None = None
    grammar: str | None = None
    structural_tag: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.json, dict):
            object.__setattr__(self, "json", json.dumps(self.json, ensure_ascii=False))
        if self.choice is not None:
            choice = tuple(self.choice)
            if not choice or not all(isinstance(c, str) for c in choice):
                raise ValueError("structured output choice must be a non-empty list of strings")
            object.__setattr__(self, "choice", choice)
        set_fields = [k for k in KINDS if getattr(self, k) not in (None, False)]
        if len(set_fields) != 1:
            raise ValueError(
                "structured output takes exactly one of json, json_object, regex, choice, "
                f"grammar, structural_tag; got {set_fields or 'none'}"
            )

    @property
    def kind(self) -> str:
        return next(k for k in KINDS if getattr(self, k) not in (None, False))


def choice_grammar(choices: Sequence[str]) -> str:
    """EBNF whose only sentences are the given strings (vLLM's choice_as_grammar)."""
    return "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)


class StructuredOutputManager:
    """Compiles and caches one engine's grammars; makes per-request grammar states."""

    def __init__(
        self, tokenizer: Tokenizer, vocab_size: int, stop_token_ids: Sequence[int], threads: int = 2
    ) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.stop_token_ids = list(stop_token_ids)
        self.threads = threads
        self._compiler: xgrammar.GrammarCompiler | None = None
        self._cache: OrderedDict[StructuredOutputParams, xgrammar.CompiledGrammar] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def compiler(self) -> xgrammar.GrammarCompiler:
        """xgrammar's compiler over the engine's vocabulary, built on first use (~2 s for Qwen3)."""
        with self._lock:
            if self._compiler is None:
                import xgrammar as xgr
                from transformers import PreTrainedTokenizerFast

                hf = PreTrainedTokenizerFast(tokenizer_object=self.tokenizer.backend)
                info = xgr.TokenizerInfo.from_huggingface(
                    hf, vocab_size=self.vocab_size, stop_token_ids=self.stop_token_ids
                )
                self._compiler = xgr.GrammarCompiler(info, max_threads=self.threads)
            return self._compiler

    def compile(self, params: StructuredOutputParams) -> xgrammar.CompiledGrammar:
        """The compiled grammar (cached); ValueError naming the problem when it is invalid.

        Thread-safe: AsyncLLM calls it from worker threads, the engine from its own thread.
        """
        with self._lock:
            hit = self._cache.get(params)
            if hit is not None:
                self._cache.move_to_end(params)
                return hit
        compiled = self._compile(params)
        with self._lock:
            self._cache[params] = compiled
            while len(self._cache) > GRAMMAR_CACHE_SIZE:
                self._cache.popitem(last=False)
        return compiled

    def _compile(self, params: StructuredOutputParams) -> xgrammar.CompiledGrammar:
        compiler = self.compiler
        kind = params.kind
        try:
            if params.json is not None:
                schema = json.loads(str(params.json))
                check_json_schema(schema)
                return compiler.compile_json_schema(schema, any_whitespace=False)
            if params.json_object:  # any object, as vLLM compiles it
                return compiler.compile_json_schema({"type": "object"}, any_whitespace=False)
            if params.regex is not None:
                return compiler.compile_regex(params.regex)
            if params.choice is not None:
                return compiler.compile_grammar(choice_grammar(params.choice))
            if params.grammar is not None:
                if "::=" in params.grammar:
                    return compiler.compile_grammar(params.grammar)
                return compiler.compile_lark(params.grammar)
            assert params.structural_tag is not None
            return compiler.compile_structural_tag(params.structural_tag)
        except ValueError:
            raise
        except Exception as exc:  # xgrammar raises RuntimeError and its own types
            raise ValueError(f"invalid {kind} for structured output: {exc}") from exc

    def new_state(self, params: StructuredOutputParams) -> GrammarState:
        import xgrammar as xgr

        return GrammarState(xgr.GrammarMatcher(self.compile(params)), self.vocab_size)


def check_json_schema(schema: Any) -> None:
    """ValueError naming what is wrong with a JSON schema (its meta-schema, then xgrammar)."""
    if not isinstance(schema, dict | bool):
        raise ValueError(f"a JSON schema must be an object, got {type(schema).__name__}")
    try:
        import jsonschema
    except ImportError:  # xgrammar still refuses what it cannot compile
        return
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as exc:
        where = "/".join(str(p) for p in exc.absolute_path) or "(root)"
        raise ValueError(f"invalid JSON schema at {where}: {exc.message}") from exc


class GrammarState:
    """One request's grammar matcher: its next-token bitmask, advanced by each sampled token."""

    def __init__(self, matcher: xgrammar.GrammarMatcher, vocab_size: int) -> None:
        self.matcher = matcher
        self.vocab_size = vocab_size
        self.terminated = False

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        self.matcher.fill_next_token_bitmask(bitmask, row)

    def advance(self, token_id: int) -> bool:
        """Accept the sampled token; True when the request must end here (grammar terminated)."""
        if self.terminated:
            return True
        if not self.matcher.accept_token(token_id):
            # Only when something after the mask forced an excluded token (e.g. min_tokens
            # banning the EOS the grammar requires): end rather than leave the grammar.
            logger.warning("grammar rejected token %d; finishing the request", token_id)
            self.terminated = True
        else:
            self.terminated = self.matcher.is_terminated()
        return self.terminated


def apply_grammar_bitmasks(
    logits: torch.Tensor, grammars: Sequence[GrammarState | None]
) -> torch.Tensor:
    """Logits [N, V] with each constrained row's disallowed tokens at -inf (a new tensor when
    any row is constrained; `logits` itself is returned untouched when none is).

    The bitmask is filled on the host for the constrained rows only, copied to the logits'
    device once, and applied there to those rows (xgrammar's kernel: CUDA on GPUs, CPU here).
    """
    rows = [i for i, g in enumerate(grammars) if g is not None and not g.terminated]
    if not rows:
        return logits
    import xgrammar as xgr

    vocab = logits.shape[1]
    bitmask = xgr.allocate_token_bitmask(len(grammars), vocab)
    for i in rows:
        state = grammars[i]
        assert state is not None
        state.fill(bitmask, i)
    logits = logits.clone()
    xgr.apply_token_bitmask_inplace(
        logits, bitmask.to(logits.device), vocab_size=vocab, indices=rows
    )
    return logits
