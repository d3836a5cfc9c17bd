"""A form generated from `TrainConfig`'s fields: one widget per setting, its one-line help beside it.

Defaults, ranges, choices and explanations all come from the dataclass (one source of truth), so a new
setting in `config.py` shows up here by itself. Changing the preset or method refills the values that
presets set, for the base model's family (`family`: SDXL has its own, see `config.preset_values`); every change is
validated with `config.validate`, whose sentence is shown beside the form.
"""
from __future__ import annotations

import dataclasses
import html
import typing
from typing import Any, Callable

import ipywidgets as W

from .. import families
from ..config import METHODS, PRESETS, ConfigError, TrainConfig, preset_values, validate
from .base import ERROR_STYLE, OK_STYLE, row

# Shown up front, in this order; every other field goes under "More settings".
MAIN_FIELDS = (
    "token", "class_word", "preset", "method",
    "unet_steps", "unet_lr", "text_encoder_steps", "text_encoder_lr",
    "with_prior_preservation", "num_class_images", "resolution",
    "lora_rank", "checkpoint_every", "sample_every", "sample_prompts",
)
LORA_FIELDS = ("lora_rank", "lora_alpha")
# Set by the train section's "Start from" choice (`continue_config`), not typed: kept in the form, never shown.
NOT_SHOWN = ("parent", "parent_trained_text_encoder")
# Fields the user owns: changing the preset never overwrites them (a typed class word survives too).
KEPT_ON_PRESET_CHANGE = ("token", "seed")
LABELS = {
    "unet_lr": "UNet learning rate", "text_encoder_lr": "Text encoder learning rate", "unet_steps": "UNet steps",
    "text_encoder_steps": "Text encoder steps", "with_prior_preservation": "Prior preservation",
    "lora_rank": "LoRA rank", "lora_alpha": "LoRA alpha", "lr_scheduler": "LR schedule", "lr_warmup_steps": "LR warm-up steps",
    "min_snr_gamma": "Min-SNR gamma", "cuda_graphs": "CUDA graphs",
}


def label_for(name: str) -> str:
    return LABELS.get(name, name.replace("_", " ").capitalize())


def _preset_keys(family: str | None = None) -> set[str]:
    """Every field some preset (or method) sets for this model family: what a preset change refills."""
    return {key for p in PRESETS for m in METHODS for key in preset_values(p, m, family)}


def family_keys() -> set[str]:
    """Every field some preset sets for some model family: what a change of base model family refills."""
    return set().union(*(_preset_keys(f) for f in families.FAMILIES))


def widget_for(field: dataclasses.Field, kind: type, value: Any) -> W.Widget:
    """The input widget for one field, from its type and its metadata (choices, min, max, step)."""
    meta = field.metadata
    if "choices" in meta:
        return W.Dropdown(options=list(meta["choices"]), value=value, layout=W.Layout(width="160px"))
    if kind is bool:
        return W.Checkbox(value=value, indent=False, layout=W.Layout(width="160px"))
    if kind is int:
        if {"min", "max", "step"} <= set(meta):
            return W.IntSlider(value=value, min=meta["min"], max=meta["max"], step=meta["step"],
                               continuous_update=False, layout=W.Layout(width="260px"))
        return W.BoundedIntText(value=value, min=meta.get("min", -(2**31)), max=meta.get("max", 2**31 - 1),
                                step=meta.get("step", 1), layout=W.Layout(width="160px"))
    if kind is float:  # no step: learning rates like 2e-6 must not be rounded by the browser
        return W.FloatText(value=value, step=None, layout=W.Layout(width="160px"))
    return W.Text(value=str(value), layout=W.Layout(width="260px"))


class ConfigForm:
    """Widgets for a TrainConfig. `.config` is the current TrainConfig; `.problem` the validation sentence."""

    def __init__(self, config: TrainConfig | None = None, *, main_fields: tuple[str, ...] = MAIN_FIELDS,
                 family: str | None = None) -> None:
        config = config or TrainConfig()
        self.family = family or families.DEFAULT  # the base model's (`ModelInfo.family`): which presets' values a preset change refills
        hints = typing.get_type_hints(TrainConfig)
        self.fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
        self.widgets: dict[str, W.Widget] = {}
        self.rows: dict[str, W.Widget] = {}
        for name, field in self.fields.items():
            widget = widget_for(field, hints[name], getattr(config, name))
            self.widgets[name] = widget
            self.rows[name] = row(widget, field.metadata.get("help", ""), label_for(name))
        self.message = W.HTML()
        self.problem: str | None = None
        self._filling = False
        self._listeners: list[Callable[[str | None], None]] = []
        main = [n for n in main_fields if n in self.rows]
        advanced = [n for n in self.fields if n not in main and n not in NOT_SHOWN]
        more = W.Accordion(children=[W.VBox([self.rows[n] for n in advanced])], selected_index=None)
        more.set_title(0, "More settings")
        self.widget = W.VBox([*(self.rows[n] for n in main), more, self.message])
        for name, widget in self.widgets.items():
            widget.observe(lambda change, name=name: self._changed(name), names="value")
        self._show_method_fields()
        self.check()

    # --- values -------------------------------------------------------------------------------
    @property
    def values(self) -> dict[str, Any]:
        return {name: widget.value for name, widget in self.widgets.items()}

    @property
    def config(self) -> TrainConfig:
        """The settings as a validated TrainConfig; a ConfigError (one sentence) when they cannot work."""
        config = TrainConfig.from_dict(self.values)
        validate(config)
        return config

    def set_values(self, values: dict[str, Any]) -> None:
        """Put values into the widgets (unknown names are an error, as in TrainConfig.from_dict)."""
        TrainConfig.from_dict({**self.values, **values})  # checks the names
        self._filling = True
        try:
            for name, value in values.items():
                self.widgets[name].value = value
        finally:
            self._filling = False
        self._show_method_fields()
        self.check()

    def on_check(self, listener: Callable[[str | None], None]) -> None:
        """Call `listener(problem)` after every validation (None when the settings are fine)."""
        self._listeners.append(listener)

    # --- validation on change -------------------------------------------------------------------
    def check(self) -> str | None:
        """Validate now; show the sentence beside the form. Returns it (None when valid)."""
        try:
            config = self.config
        except ConfigError as err:
            self.problem = str(err)
            self.message.value = f'<span style="{ERROR_STYLE}">⚠ {html.escape(self.problem)}</span>'
        else:
            self.problem = None
            steps = f"{config.total_steps} steps ({config.text_encoder_steps} text encoder + {config.unet_steps} UNet)"
            self.message.value = f'<span style="{OK_STYLE}">✓ Ready: {steps}, prompt “{html.escape(config.resolved_instance_prompt())}”.</span>'
        for listener in self._listeners:
            listener(self.problem)
        return self.problem

    def _changed(self, name: str) -> None:
        if self._filling:
            return
        if name in ("preset", "method"):
            self._refill(self.widgets["preset"].value, self.widgets["method"].value)
        self._show_method_fields()
        self.check()

    def _refill(self, preset: str, method: str) -> None:
        """Every field presets set goes to the new preset's value (or the default); the user's own stay."""
        fresh = TrainConfig.from_preset(preset, method, family=self.family)
        self.set_values({name: getattr(fresh, name) for name in _preset_keys(self.family) if name not in self.kept()})

    def kept(self) -> set[str]:
        """The fields a refill leaves alone: the user's own (a typed class word too)."""
        kept = set(KEPT_ON_PRESET_CHANGE)
        if self.widgets["class_word"].value.strip():
            kept.add("class_word")
        return kept

    def _show_method_fields(self) -> None:
        lora = self.widgets["method"].value == "lora"
        for name in LORA_FIELDS:
            if name in self.rows:
                self.rows[name].layout.display = "" if lora else "none"
