"""Chat history as OpenAI messages, for PAGECHAT_ENGINE_URL mode.

With a remote engine there is no local tokenizer, so the history cannot be token ids: each
turn is kept as text and the whole conversation travels as messages (the upstream's own prefix
cache then does the reuse). Lengths are estimated from characters, conservatively, so the
oldest turns are dropped before the upstream would refuse the request.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# Qwen's tokenizer averages ~4 characters per token on English and ~1.5 on Chinese; 2 keeps
# the estimate on the safe side for mixed text.
CHARS_PER_TOKEN = 2
MESSAGE_OVERHEAD_TOKENS = 8  # <|im_start|>role\n ... <|im_end|>\n


def estimate_tokens(text: str) -> int:
    return len(text) // CHARS_PER_TOKEN + MESSAGE_OVERHEAD_TOKENS


def user_content(question: str, documents: list[tuple[str, str]]) -> str:
    """A user turn carrying its documents first, so follow-ups share the document prefix."""
    parts = [f'<document name="{name}">\n{text}\n</document>' for name, text in documents]
    parts.append(question)
    return "\n\n".join(parts)


@dataclass
class Transcript:
    system_prompt: str = ""
    turns: list[dict] = field(default_factory=list)  # {"user": str, "assistant": str}

    def messages(self, content: str, max_model_len: int | None, max_tokens: int) -> tuple[list[dict], int]:
        """Messages for a new user turn, dropping the oldest turns that do not fit; (messages, dropped)."""
        head = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        tail = [{"role": "user", "content": content}]
        turns = list(self.turns)
        dropped = 0
        if max_model_len:
            budget = max_model_len - max_tokens
            used = sum(estimate_tokens(m["content"]) for m in head + tail)
            cost = [estimate_tokens(t["user"]) + estimate_tokens(t["assistant"]) for t in turns]
            while turns and used + sum(cost) > budget:
                turns.pop(0)
                cost.pop(0)
                dropped += 1
        middle = []
        for turn in turns:
            middle += [
                {"role": "user", "content": turn["user"]},
                {"role": "assistant", "content": turn["assistant"]},
            ]
        return head + middle + tail, dropped

    def commit(self, content: str, answer: str) -> None:
        self.turns.append({"user": content, "assistant": answer})

    def to_dict(self) -> dict:
        return {"system_prompt": self.system_prompt, "turns": list(self.turns)}

    @classmethod
    def from_dict(cls, data: dict) -> Transcript:
        return cls(str(data.get("system_prompt", "")), [dict(t) for t in data.get("turns", [])])
