"""Token check: the verdict on the trigger word, live as you type, with rare alternatives one click away."""
from __future__ import annotations

import html
import threading
from typing import Any, Callable

import ipywidgets as W

from ..tokens import TokenReport, check_token, load_tokenizer
from .base import HELP_STYLE, View, loaded_model, row

VERDICT_COLORS = {"good": "#1b5e20", "risky": "#b26a00", "generic": "#b00020"}
VERDICT_WORDS = {"good": "GOOD", "risky": "RISKY", "generic": "TOO COMMON"}


class TokenView(View):
    """Type a trigger word, see what the model's tokenizer makes of it; `.value` is the word, `.report` the check."""

    def __init__(self, model: Any = None, default: str = "", *, delay: float = 0.4,
                 checker: Callable[..., TokenReport] = check_token) -> None:
        super().__init__()
        self._model = model
        self._check = checker
        self._delay = delay
        self._timer: threading.Timer | None = None
        self._lock = threading.Lock()
        self._tokenizer = None
        self.report: TokenReport | None = None
        self.text = W.Text(value=default or "", placeholder="e.g. ohwx", continuous_update=True,
                           layout=W.Layout(width="240px"))
        self.verdict = W.HTML()
        self.suggestions = W.HBox()
        self.text.observe(lambda _: self._schedule(), names="value")
        self.widget = W.VBox([
            row(self.text, "A made-up word the model has barely seen becomes your subject's name.", "Token"),
            self.verdict, self.suggestions, self.error, self.out,
        ])
        if self.value:
            self.check()

    @property
    def value(self) -> str:
        """The token as typed (what the training form uses)."""
        return self.text.value.strip()

    def check(self) -> TokenReport | None:
        """Check the current text now (typing calls this after a short pause)."""
        def check() -> TokenReport | None:
            text = self.value
            if not text:
                self.report = None
                self.verdict.value, self.suggestions.children = "", ()
                return None
            tokenizer, text_encoder = self._tokenizer_and_encoder()
            report = self._check(text, tokenizer, text_encoder)
            if text != self.value:  # typed on while this ran: a newer check will show
                return report
            self.report = report
            self._show(report)
            return report

        with self._lock:  # typing checks from a timer thread: no Output capture there
            return self._act(check, clear=False, capture=threading.current_thread() is threading.main_thread())

    # --- internals ---------------------------------------------------------------------------
    def _schedule(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self._delay <= 0:
            self.check()
            return
        self._timer = threading.Timer(self._delay, self.check)
        self._timer.daemon = True
        self._timer.start()

    def _tokenizer_and_encoder(self):
        """The loaded model's own tokenizer and text encoder (nearest words), else the bundled CLIP tokenizer."""
        model = loaded_model(self._model)
        if model is not None:
            return model.tokenizer, model.text_encoder
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer()  # SD 1.x and 2.x share this vocabulary
        return self._tokenizer, None

    def _show(self, report: TokenReport) -> None:
        color = VERDICT_COLORS.get(report.verdict, "#333")
        pieces = " + ".join(f"<code>{html.escape(p.text)}</code> <small>({p.rarity})</small>" for p in report.pieces)
        reasons = "".join(f"<li>{html.escape(r)}</li>" for r in report.reasons)
        self.verdict.value = (
            f'<span style="color:{color};font-weight:700">{VERDICT_WORDS.get(report.verdict, report.verdict)}</span> '
            f"&nbsp;{html.escape(report.text)} → {pieces}<ul>{reasons}</ul>"
        )
        buttons = []
        for word in report.suggestions:
            button = W.Button(description=word, tooltip=f"Use {word!r} as the token", layout=W.Layout(width="auto"))
            button.on_click(lambda _, word=word: setattr(self.text, "value", word))
            buttons.append(button)
        label = W.HTML(f'<span style="{HELP_STYLE}">Rare words to use instead (click one):</span>')
        self.suggestions.children = [label, *buttons] if buttons else []
