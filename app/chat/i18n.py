"""The app's own texts in English and Simplified Chinese, picked by the browser's language.

They live in Chainlit's translation files (.chainlit/translations/<lang>.json, key "pagechat"),
next to the UI's texts, so one file per language holds everything a translator touches.
"""

from __future__ import annotations

import json
import os
from functools import cache
from pathlib import Path
from typing import Any

DEFAULT_LANGUAGE = "en-US"
LANGUAGES = ("en-US", "zh-CN")


def app_root() -> Path:
    """Where chainlit.md, .chainlit/ and public/ live (CHAINLIT_APP_ROOT, else the repo root)."""
    return Path(os.environ.get("CHAINLIT_APP_ROOT") or Path(__file__).resolve().parents[2])


def pick_language(language: str | None) -> str:
    """zh, zh-CN, zh-TW, zh-Hans... -> zh-CN; everything else -> en-US."""
    if language and language.lower().startswith("zh"):
        return "zh-CN"
    return DEFAULT_LANGUAGE


@cache
def _texts(language: str) -> dict[str, str]:
    path = app_root() / ".chainlit" / "translations" / f"{language}.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    return data["pagechat"]


def t(key: str, language: str | None = None, **params: Any) -> str:
    """The text `key` in the user's language, formatted with `params`."""
    lang = pick_language(language)
    texts = _texts(lang)
    template = texts.get(key) or _texts(DEFAULT_LANGUAGE)[key]
    return template.format(**params) if params else template
