"""The checkpoint's tokenizer and chat template, without transformers at run time.

Text <-> ids go through the `tokenizers` library reading the checkpoint's tokenizer.json (the
same Rust backend transformers uses); the chat template is rendered with jinja2 in an immutable
sandbox configured the way transformers configures it (trim_blocks, lstrip_blocks,
loopcontrols, a `tojson` that does not HTML-escape, `raise_exception`, `strftime_now`), so the
prompt ids are the ones `AutoTokenizer.apply_chat_template` would give.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as Backend

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # jinja2's own tojson HTML-escapes '<', '>', '&' and "'": chat templates must not.
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def compile_chat_template(source: str) -> jinja2.Template:
    """A chat template compiled in a sandbox (templates come from the Hub: untrusted code)."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(source)


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return data


def _token_content(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _pick_chat_template(path: Path, config: dict[str, Any]) -> str | None:
    # Recent transformers versions save the template beside the config as chat_template.jinja.
    jinja_file = path / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None


class Tokenizer:
    """Encode, decode and chat-template a checkpoint's text; eos ids for stopping."""

    def __init__(
        self,
        backend: Backend,
        chat_template: str | None = None,
        eos_token_ids: Sequence[int] = (),
        special_tokens: dict[str, str] | None = None,
    ) -> None:
        self.backend = backend
        self.chat_template = chat_template
        self.eos_token_ids: list[int] = list(dict.fromkeys(eos_token_ids))
        # bos_token, eos_token, ... as strings: transformers hands these to the template too.
        self.special_tokens: dict[str, str] = dict(special_tokens or {})
        self.vocab_size: int = backend.get_vocab_size(with_added_tokens=True)
        # The checkpoint directory it was read from (from_dir): a worker process reloads it
        # from there instead of receiving the whole serialized tokenizer.
        self.source_dir: Path | None = None
        self.im_start_id: int = self._require_id(IM_START)
        self.im_end_id: int = self._require_id(IM_END)

    @classmethod
    def from_dir(cls, path: str | Path, checkpoint_eos_ids: Sequence[int] = ()) -> Tokenizer:
        """Load tokenizer.json and tokenizer_config.json (+ chat_template.jinja).

        `checkpoint_eos_ids` are the checkpoint's end-of-generation ids as `ModelConfig` read
        them (generation_config.json, else config.json); tokenizer_config.json's eos_token is
        added to them. generation_config.json is read in one place only: `ModelConfig`.
        """
        path = Path(path)
        tokenizer_file = path / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise FileNotFoundError(
                f"{tokenizer_file} not found: the checkpoint needs the fast-tokenizer file "
                "tokenizer.json (every Qwen3 checkpoint on the Hugging Face hub has one)"
            )
        backend = Backend.from_file(str(tokenizer_file))
        config = _read_json(path / "tokenizer_config.json")

        special = {
            key: content
            for key in ("bos_token", "eos_token", "pad_token", "unk_token")
            if (content := _token_content(config.get(key))) is not None
        }
        eos_ids = list(checkpoint_eos_ids)
        if (
            "eos_token" in special
            and (eos_id := backend.token_to_id(special["eos_token"])) is not None
        ):
            eos_ids.append(eos_id)
        tokenizer = cls(backend, _pick_chat_template(path, config), eos_ids, special)
        tokenizer.source_dir = path
        return tokenizer

    @classmethod
    def from_checkpoint(cls, path: str | Path) -> Tokenizer:
        """`from_dir` with the EOS ids `ModelConfig` reads from the checkpoint, for callers
        that hold no ModelConfig (benchmarks, tools, tests)."""
        # Imported here: ModelConfig needs torch, which a tokenizer worker process never loads.
        from engine.model_config import ModelConfig

        return cls.from_dir(path, ModelConfig.from_dir(path).eos_token_ids)

    def _require_id(self, token: str) -> int:
        token_id = self.backend.token_to_id(token)
        if token_id is None:
            raise ValueError(f"the tokenizer has no {token} token: not a ChatML (Qwen) tokenizer")
        return token_id

    # ---- text <-> ids ------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        """Ids of `text`. Special tokens written in the text (e.g. "<|im_start|>") are recognized,
        as transformers does; nothing (no BOS) is added around it, so pieces concatenate."""
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """encode() of many texts at once (the backend spreads them over threads)."""
        return [e.ids for e in self.backend.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """Text of `ids`; bytes that do not form complete UTF-8 characters decode to U+FFFD."""
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(token_id)

    # ---- chat template -----------------------------------------------------------------------

    @cached_property
    def _template(self) -> jinja2.Template:
        if not self.chat_template:
            raise ValueError(
                "this checkpoint has no chat template (tokenizer_config.json 'chat_template' or "
                "chat_template.jinja): send prompts as text or token ids instead of messages"
            )
        return compile_chat_template(self.chat_template)

    def render_chat_template(
        self,
        messages: Sequence[dict[str, Any]],
        add_generation_prompt: bool = True,
        tools: Sequence[dict[str, Any]] | None = None,
        **kwargs: Any,
    ) -> str:
        """The conversation as prompt text, e.g. '<|im_start|>user\\nHi<|im_end|>\\n...'.

        Keys whose value is None are dropped from messages first (as transformers does), so
        OpenAI-style `{"content": None, "tool_calls": [...]}` messages render correctly.
        """
        if not messages:
            raise ValueError("a chat needs at least one message")
        cleaned = []
        for message in messages:
            if not isinstance(message, dict):
                raise TypeError(f"chat messages must be dicts, got {type(message).__name__}")
            cleaned.append({k: v for k, v in message.items() if v is not None})
        context = {**self.special_tokens, **kwargs}
        return self._template.render(
            messages=cleaned,
            tools=list(tools) if tools is not None else None,
            documents=None,
            add_generation_prompt=add_generation_prompt,
            **context,
        )

    @cached_property
    def control_tokens(self) -> tuple[str, ...]:
        """The special added tokens (`<|im_start|>`, `<|im_end|>`, `<|endoftext|>`, ...)."""
        added = self.backend.get_added_tokens_decoder().values()
        return tuple(sorted((t.content for t in added if t.special), key=len, reverse=True))

    def encode_chat(
        self,
        messages: Sequence[dict[str, Any]],
        add_generation_prompt: bool = True,
        tools: Sequence[dict[str, Any]] | None = None,
        continue_final_message: bool = False,
        **kwargs: Any,
    ) -> list[int]:
        """Prompt ids of a conversation whose messages are untrusted text.

        Control tokens written in the messages' strings (content, tool-call arguments, names)
        stay plain text, as in the chat UI (app.chat.token_history.ChatCodec.text): each is
        split after its "<", so it never encodes to the control token. Messages without them
        give exactly `apply_chat_template`'s ids. `continue_final_message` renders the last
        (assistant) message open, without its end of turn, as transformers does.
        """
        mark = f"\ue000{uuid.uuid4().hex}\ue000"
        controls = self.control_tokens

        def neutralize(value: Any) -> Any:
            if isinstance(value, str):
                for token in controls:
                    if token in value:
                        value = value.replace(token, token[0] + mark + token[1:])
                return value
            if isinstance(value, dict):
                return {k: neutralize(v) for k, v in value.items()}
            if isinstance(value, list):
                return [neutralize(v) for v in value]
            return value

        marked = [
            {k: (v if k == "role" else neutralize(v)) for k, v in m.items()} for m in messages
        ]
        text = self.render_chat_template(marked, add_generation_prompt, tools=tools, **kwargs)
        if continue_final_message:
            final = marked[-1].get("content") or ""
            if not isinstance(final, str) or not final.strip() or final.strip() not in text:
                raise ValueError(
                    "continue_final_message needs a final message whose text content the "
                    "template renders"
                )
            end = final if final in text else final.strip()
            text = text[: text.rindex(end) + len(end)]
        ids: list[int] = []
        for piece in text.split(mark):
            if piece:
                ids += self.encode(piece)
        return ids

    def apply_chat_template(
        self,
        messages: Sequence[dict[str, Any]],
        add_generation_prompt: bool = True,
        tools: Sequence[dict[str, Any]] | None = None,
        **kwargs: Any,
    ) -> list[int]:
        """Prompt ids of a conversation (the rendered template, encoded)."""
        return self.encode(
            self.render_chat_template(messages, add_generation_prompt, tools=tools, **kwargs)
        )
