"""Thinking models in the OpenAI API: a Qwen3 answer's `<think>...</think>` block as
`reasoning_content`, apart from `content` (vLLM's `qwen3` reasoning parser and field name).

Qwen3 comes in three kinds, told apart by the prompt the chat template rendered:

- hybrid (Qwen3-4B): thinking on by default, the model writes `<think>` itself;
  `chat_template_kwargs: {"enable_thinking": false}` makes the template close an empty block
  (`<think>\\n\\n</think>\\n\\n`) at the end of the prompt, so the answer is all content;
- thinking-only (Qwen3-4B-Thinking-2507): the template opens `<think>` in the prompt, so the
  answer starts inside the reasoning and only `</think>` appears in it;
- instruct (Qwen3-4B-Instruct-2507): no `<think>` at all.

`thinking_mode` reads which case a prompt is in; `ReasoningSplitter` splits an answer's text,
fed piece by piece (streaming) or whole, exactly at `</think>`: what comes before is reasoning
(a leading `<think>` dropped), what follows is content, both unchanged (vLLM keeps the blank
line after `</think>` in the content too). Without `</think>`, an answer that is inside the
block (opened by the prompt or by a leading `<think>`) is all reasoning (cut off while
thinking), and any other answer is all content. The one place this differs from vLLM's
parser: an answer with no `<think>` before its `</think>` and no block opened by the prompt is
content (an instruct model's text is never taken for reasoning). Under a grammar
(response_format, guided_*, a forced tool call) a prompt-opened block does not make the answer
reasoning: the grammar shapes it from the first token, so it is reasoning only up to a
`</think>` it contains. Tool calls are parsed out of the content only, so a call after the
thinking is found (app/api/tools.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from enum import Enum
from typing import Any

from engine.tokenizer import Tokenizer

THINK_START = "<think>"
THINK_END = "</think>"
# Prompt tokens decoded to see how the template ended it (`<think>\n`, `</think>\n\n`).
_PROMPT_TAIL_TOKENS = 8


class ThinkingMode(Enum):
    OFF = "off"  # thinking switched off: the whole answer is content
    OPEN = "open"  # the prompt opened <think>: the answer starts as reasoning
    AUTO = "auto"  # reasoning only if the answer starts with <think>
    # A grammar constrains an answer the prompt opened <think> for: the grammar, not the
    # model, decides whether a block ends, so reasoning only if the answer has </think>.
    CONSTRAINED = "constrained"


def thinking_mode(
    tokenizer: Tokenizer,
    prompt_ids: Sequence[int],
    template_kwargs: dict[str, Any],
    constrained: bool = False,
) -> ThinkingMode:
    """How the answer to this prompt is split, from the end of the rendered prompt.

    `constrained`: a grammar (response_format, guided_*, a forced tool call) shapes the
    answer from its first token, so a prompt-opened block is not taken to hold the answer.
    """
    if template_kwargs.get("enable_thinking") is False:
        return ThinkingMode.OFF
    tail = tokenizer.decode(list(prompt_ids[-_PROMPT_TAIL_TOKENS:])).rstrip()
    if tail.endswith(THINK_END):
        return ThinkingMode.OFF
    if tail.endswith(THINK_START):
        return ThinkingMode.CONSTRAINED if constrained else ThinkingMode.OPEN
    return ThinkingMode.AUTO


def _held_back(text: str, marker: str) -> int:
    """Length of the longest end of `text` that could be the start of `marker`."""
    for n in range(min(len(text), len(marker) - 1), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


class ReasoningSplitter:
    """Reasoning and content of one answer, fed its text piece by piece.

    `feed` and `finish` return (reasoning delta, content delta); text that could still be the
    start of a tag is held back until the next piece (or `finish`) decides it.
    """

    def __init__(self, mode: ThinkingMode) -> None:
        self.state = {
            ThinkingMode.OFF: "content",
            ThinkingMode.OPEN: "reasoning",
            ThinkingMode.AUTO: "undecided",
            ThinkingMode.CONSTRAINED: "deferred",
        }[mode]
        self.pending = ""  # text not yet handed out
        self.saw_reasoning = mode is ThinkingMode.OPEN

    def feed(self, delta: str) -> tuple[str, str]:
        self.pending += delta
        return self._advance(final=False)

    def finish(self) -> tuple[str, str]:
        return self._advance(final=True)

    def _advance(self, final: bool) -> tuple[str, str]:
        reasoning = content = ""
        if self.state == "deferred":
            if THINK_END in self.pending:
                self.state, self.saw_reasoning = "reasoning", True
            elif not final:
                return "", ""  # held until </think> or the end decides
            else:
                self.state = "content"
        if self.state == "undecided":
            head = self.pending.lstrip()
            if head.startswith(THINK_START):
                self.state, self.saw_reasoning = "reasoning", True
                self.pending = head[len(THINK_START) :]
            elif THINK_START.startswith(head) and not final:
                return "", ""  # whitespace or a part of "<think>" so far: wait
            else:
                self.state = "content"
        if self.state == "reasoning":
            end = self.pending.find(THINK_END)
            if end < 0:
                keep = 0 if final else _held_back(self.pending, THINK_END)
                cut = len(self.pending) - keep
                reasoning, self.pending = self.pending[:cut], self.pending[cut:]
                return reasoning, ""
            reasoning = self.pending[:end]
            self.pending = self.pending[end + len(THINK_END) :]
            self.state = "content"
        content, self.pending = self.pending, ""
        return reasoning, content

    def split(self, text: str) -> tuple[str | None, str | None]:
        """A whole answer as (reasoning_content, content), as vLLM's non-streaming parser
        reports it: reasoning None when the answer has none; content None when a reasoning
        answer has nothing after `</think>`."""
        r1, c1 = self.feed(text)
        r2, c2 = self.finish()
        reasoning, content = r1 + r2, c1 + c2
        if not self.saw_reasoning:
            return None, content
        return reasoning or None, content or None
