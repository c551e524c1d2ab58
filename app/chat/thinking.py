"""What a checkpoint's chat template does about thinking, read once from the template itself.

Qwen3 checkpoints differ only in what the generation prompt adds after
`<|im_start|>assistant\\n` (engine/chat_templates.py): nothing (instruct, and hybrid with
thinking on: the model writes `<think>` itself), `<think>\\n\\n</think>\\n\\n` (hybrid with
`enable_thinking=false`) or `<think>\\n` (thinking-only). The chat builds its prompts as token
ids (app/chat/token_history.py), not through the template, so it asks the template for that
opening once and appends it; a template whose opening depends on `enable_thinking` gets the
settings switch.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from app.api.reasoning import ThinkingMode

logger = logging.getLogger("pagechat.chat")

ASSISTANT_HEAD = "<|im_start|>assistant\n"
THINK_START = "<think>"
THINK_END = "</think>"


@dataclass(frozen=True)
class ThinkingTemplate:
    """The generation prompt's opening with thinking on and off."""

    opening_on: str = ""
    opening_off: str = ""

    @property
    def switchable(self) -> bool:
        """Whether `enable_thinking` changes the prompt (a hybrid model): show the switch."""
        return self.opening_on != self.opening_off

    def opening(self, enable_thinking: bool) -> str:
        return self.opening_on if enable_thinking else self.opening_off


def thinking_template(tokenizer: Any) -> ThinkingTemplate:
    """Read the openings from `tokenizer`'s chat template (none without one, or when it fails
    to render a one-message chat: the chat then builds ChatML prompts as before)."""
    render = getattr(tokenizer, "render_chat_template", None)
    if render is None or not getattr(tokenizer, "chat_template", None):
        return ThinkingTemplate()
    openings = []
    for enabled in (True, False):
        try:
            text = render([{"role": "user", "content": "x"}], True, enable_thinking=enabled)
        except Exception:  # a template that wants something else: no thinking facts from it
            logger.warning("the chat template did not render a one-message chat", exc_info=True)
            return ThinkingTemplate()
        head = text.rfind(ASSISTANT_HEAD)
        openings.append(text[head + len(ASSISTANT_HEAD) :] if head >= 0 else "")
    return ThinkingTemplate(openings[0], openings[1])


def opening_mode(opening: str) -> ThinkingMode:
    """How an answer after this generation-prompt opening splits (app.api.reasoning)."""
    tail = opening.rstrip()
    if tail.endswith(THINK_END):
        return ThinkingMode.OFF
    if tail.endswith(THINK_START):
        return ThinkingMode.OPEN
    return ThinkingMode.AUTO
