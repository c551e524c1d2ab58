"""The chat settings panel: system prompt and sampling, with the checkpoint's defaults."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from app.chat.i18n import t
from engine.sampling_params import SamplingParams

if TYPE_CHECKING:
    from chainlit.input_widget import InputWidget

DEFAULT_MAX_TOKENS = 2048
DEMO_MAX_TOKENS = 200  # the demo's random text: long answers show nothing more


def default_options(generation_defaults: dict, max_model_len: int, demo: bool = False) -> dict[str, Any]:
    """Initial values: generation_config.json's sampling, a modest answer length."""
    top_k = int(generation_defaults.get("top_k", 0) or 0)
    return {
        "system_prompt": "",
        "temperature": float(generation_defaults.get("temperature", 0.7)),
        "top_p": float(generation_defaults.get("top_p", 0.8)),
        "top_k": max(0, top_k),
        "max_tokens": min(DEMO_MAX_TOKENS if demo else DEFAULT_MAX_TOKENS, max(16, max_model_len // 2)),
        "enable_thinking": True,  # a hybrid model thinks by default (Qwen3's template)
    }


def merged_options(saved: dict | None, defaults: dict[str, Any]) -> dict[str, Any]:
    """Saved values over defaults, ignoring unknown keys and values of the wrong type."""
    options = dict(defaults)
    for key, value in (saved or {}).items():
        if key in defaults and value is not None:
            try:
                options[key] = type(defaults[key])(value)
            except (TypeError, ValueError):
                continue
    return options


def widgets(
    options: dict[str, Any], max_model_len: int, language: str | None, thinking_switch: bool = False
) -> list[InputWidget]:
    """Chainlit input widgets showing `options`; the thinking switch only for a model whose
    template turns thinking on and off (`thinking_switch`)."""
    from chainlit.input_widget import NumberInput, Slider, Switch, TextInput

    switch: list[InputWidget] = []
    if thinking_switch:
        switch.append(Switch(id="enable_thinking", label=t("setting_thinking", language),
                             initial=bool(options["enable_thinking"]),
                             description=t("setting_thinking_help", language)))
    return switch + [
        TextInput(
            id="system_prompt",
            label=t("setting_system_prompt", language),
            initial=options["system_prompt"],
            multiline=True,
            description=t("setting_system_prompt_help", language),
        ),
        Slider(id="temperature", label=t("setting_temperature", language),
               initial=options["temperature"], min=0, max=2, step=0.05),
        Slider(id="top_p", label=t("setting_top_p", language),
               initial=options["top_p"], min=0.05, max=1, step=0.05),
        Slider(id="top_k", label=t("setting_top_k", language),
               initial=options["top_k"], min=0, max=100, step=1),
        NumberInput(id="max_tokens", label=t("setting_max_tokens", language),
                    initial=options["max_tokens"], description=f"1 - {max_model_len:,}"),
    ]


def sampling_params(options: dict[str, Any], generation_defaults: dict, max_tokens: int) -> SamplingParams:
    """SamplingParams for one answer; ValueError names a bad field."""
    top_k = int(options.get("top_k") or 0)
    return SamplingParams(
        temperature=float(options["temperature"]),
        top_p=float(options["top_p"]),
        top_k=top_k if top_k > 0 else -1,
        min_p=float(generation_defaults.get("min_p", 0.0)),
        repetition_penalty=float(generation_defaults.get("repetition_penalty", 1.0)),
        max_tokens=max_tokens,
    )


def requested_max_tokens(options: dict[str, Any], max_model_len: int) -> int:
    try:
        value = int(float(options.get("max_tokens") or DEFAULT_MAX_TOKENS))
    except (TypeError, ValueError):
        value = DEFAULT_MAX_TOKENS
    return max(1, min(value, max_model_len - 1))
