"""Chat workloads as token ids, built exactly the way the app builds a chat's history.

The prompt of turn n+1 is the prompt of turn n, plus the ids the model generated (closed by
`<|im_end|>`), plus the new user turn `\\n<|im_start|>user\\n...<|im_end|>\\n<|im_start|>assistant\\n`
(app.chat.token_history.ChatCodec and build_prompt). Old turns are never re-tokenized, so a peer with a
prefix cache can reuse everything but the new turn. Message contents are random token ids
below 10,000 (ordinary BPE tokens), so lengths are exact and no text is needed.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from app.chat.token_history import ChatCodec


@dataclass
class Conversation:
    """One chat: a system prompt, its user turns (chat format included) and answer lengths."""

    system_ids: list[int]
    user_turns: list[list[int]]
    answer_lens: list[int]

    @property
    def num_turns(self) -> int:
        return len(self.user_turns)

    def first_prompt(self) -> list[int]:
        return self.system_ids + self.user_turns[0]


def load_codec(model_dir: str | Path) -> ChatCodec:
    from engine.tokenizer import Tokenizer

    return ChatCodec(Tokenizer.from_checkpoint(model_dir))


def next_prompt(codec: ChatCodec, prompt: Sequence[int], generated: Sequence[int],
                user_turn: Sequence[int]) -> list[int]:
    """The app's next prompt: previous prompt + the closed answer + the new user turn."""
    return list(prompt) + codec.close_answer(generated) + list(user_turn)


def _words(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(10_000) for _ in range(n)]


def _user_turn(codec: ChatCodec, content: list[int], first: bool) -> list[int]:
    lead = [] if first else codec.newline
    return lead + codec.user_prefix + content + codec.turn_suffix


def _system(codec: ChatCodec, content: list[int]) -> list[int]:
    return codec.system_prefix + content + codec.system_suffix if content else []


def multi_turn_conversations(
    codec: ChatCodec,
    num_conversations: int,
    num_turns: int,
    system_len: int,
    user_len: tuple[int, int],
    answer_len: tuple[int, int],
    seed: int = 0,
) -> list[Conversation]:
    """Conversations with one shared system prompt, user turns and answers of random lengths."""
    rng = random.Random(seed)
    system = _system(codec, _words(rng, system_len))
    conversations = []
    for _ in range(num_conversations):
        turns = [
            _user_turn(codec, _words(rng, rng.randint(*user_len)), first=(i == 0))
            for i in range(num_turns)
        ]
        answers = [rng.randint(*answer_len) for _ in range(num_turns)]
        conversations.append(Conversation(system, turns, answers))
    return conversations


def document_conversation(
    codec: ChatCodec,
    doc_len: int,
    num_follow_ups: int,
    question_len: tuple[int, int],
    answer_len: int,
    system_len: int,
    seed: int = 0,
) -> Conversation:
    """A document of `doc_len` tokens and a first question in one user turn, then follow-ups.

    As in the app, the document sits inside the first user turn, before the question, and
    every follow-up extends the same chat, so all of them share the document's prefix.
    """
    rng = random.Random(seed)
    system = _system(codec, _words(rng, system_len))
    document = _words(rng, doc_len) + codec.newline + codec.newline
    turns = [_user_turn(codec, document + _words(rng, rng.randint(*question_len)), first=True)]
    turns += [
        _user_turn(codec, _words(rng, rng.randint(*question_len)), first=False)
        for _ in range(num_follow_ups)
    ]
    return Conversation(system, turns, [answer_len] * len(turns))


def max_history_tokens(conversation: Conversation) -> int:
    """The last turn's prompt plus its answer: the most KV one conversation ever holds."""
    return (
        len(conversation.system_ids)
        + sum(len(t) for t in conversation.user_turns)
        + sum(n + 1 for n in conversation.answer_lens)
    )
