"""Which weights to use: an attempt (or the untrained base model) and a step of it, the end of training or
one of its checkpoints. The playground, compare, export and train sections all pick weights with this one
helper; what it gives the core is a reference the core reads: 'base', 'attempt-1' or 'attempt-1@500'.
"""
from __future__ import annotations

from typing import Any, Callable

import ipywidgets as W

from ..errors import UserError
from ..session import Attempt, Session, checkpoint_steps, describe_attempt, split_ref

BASE = "base"
FINAL = "final"


def ref_of(name: str, step: int | str) -> str:
    """How the core names weights: 'base', 'attempt-1' (its final weights) or 'attempt-1@500' (a checkpoint)."""
    return name if name == BASE or step == FINAL else f"{name}@{step}"


def step_options(session: Session, name: str | None) -> list[tuple[str, int | str]]:
    """The step dropdown's options for an attempt: 'final' when it finished, then its checkpoints, newest first;
    none when it has no weights to use yet."""
    if name is None:
        return []
    if name == BASE:
        return [("—", FINAL)]
    final = [(FINAL, FINAL)] if session.attempt(name).status == "finished" else []
    return final + [(f"step {n}", n) for n in reversed(checkpoint_steps(session, name))]


class AttemptPicker:
    """An attempt dropdown ('base' first when offered) and a step dropdown ('final' or a checkpoint).

    `ref` is the pick as the core takes it. The reference given when the picker is made is picked on the first
    listing (a sentence saying what the session has when it has no such weights); after that the dropdowns
    decide. Without one, the first listing picks the newest finished attempt (`pick_newest`) or the base model.
    Listeners run when the pick changes, through `act` (a view's `_act`: a failure becomes its error line).
    """

    def __init__(self, ref: str | None = None, *, with_base: bool = True, base_label: str = BASE,
                 pick_newest: bool = True, argument: str = "attempt",
                 act: Callable[[Callable[[], Any]], Any] = lambda action: action(), width: str = "320px") -> None:
        name, step = split_ref(ref or None)
        self._wanted = (name, FINAL if step is None else step)
        self._base = [(base_label, BASE)] if with_base else []
        self._pick_newest, self._argument, self._act = pick_newest, argument, act
        self._session: Session | None = None
        self._listed = self._filling = False
        self._listeners: list[Callable[[], None]] = []
        self.attempt = W.Dropdown(options=self._base, value=BASE if with_base else None, layout=W.Layout(width=width))
        self.step = W.Dropdown(options=[("—", FINAL)], value=FINAL, disabled=True, layout=W.Layout(width="140px"))
        self.widget = W.HBox([self.attempt, self.step])
        self._notified = self.ref
        self.attempt.observe(lambda _: self._picked(attempt=True), names="value")
        self.step.observe(lambda _: self._picked(attempt=False), names="value")

    # --- what the user chose --------------------------------------------------------------------
    @property
    def choice(self) -> tuple[str | None, int | str]:
        """(attempt name or 'base', 'final' or a checkpoint step); the name is None when there is nothing to pick."""
        return self.attempt.value, self.step.value

    @property
    def ref(self) -> str | None:
        """'base', 'attempt-1' or 'attempt-1@500'; None when the session has no weights to pick."""
        name, step = self.choice
        return None if name is None else ref_of(name, step)

    def on_change(self, listener: Callable[[], None]) -> None:
        """Call `listener()` whenever the pick changes."""
        self._listeners.append(listener)

    # --- listing ----------------------------------------------------------------------------------
    def refresh(self, session: Session) -> None:
        """List the attempts that have weights to use, and the picked attempt's steps."""
        self._session = session
        usable = [a for a in session.attempts if step_options(session, a.name)]
        names = [value for _, value in self._base] + [a.name for a in usable]
        wanted, wanted_step = self._wanted if not self._listed else (None, FINAL)
        self._check_wanted(session, wanted, wanted_step, names)
        kept = self.attempt.value if self._listed and self.attempt.value in names else None
        self._filling = True
        try:
            self.attempt.options = self._base + [(describe_attempt(a), a.name) for a in usable]
            self.attempt.value = wanted or kept or self._default(usable)
            self._fill_steps(wanted_step if wanted else self.step.value)
        finally:
            self._filling = False
        self._listed = True
        self._notify()

    def _check_wanted(self, session: Session, wanted: str | None, step: int | str, names: list[str]) -> None:
        if wanted is not None and wanted not in names:
            have = ", ".join(n for n in names if n != BASE) or "none yet"
            raise UserError(f"This session has no attempt {wanted!r} with weights to use (it has: {have}); "
                            f"fix {self._argument}= in this cell.")
        steps = checkpoint_steps(session, wanted) if wanted not in (None, BASE) else []
        if isinstance(step, int) and step not in steps:
            raise UserError(f"Attempt {wanted!r} has no checkpoint at step {step} (it has: "
                            f"{', '.join(map(str, steps)) or 'none'}); fix {self._argument}= in this cell.")

    def _default(self, usable: list[Attempt]) -> str | None:
        """The newest finished attempt or the base model, in the order `pick_newest` says; else the newest attempt."""
        newest_finished = [a.name for a in usable if a.status == "finished"][-1:]
        base = [value for _, value in self._base]
        order = newest_finished + base if self._pick_newest else base + newest_finished
        return (order + [a.name for a in usable][-1:] + [None])[0]

    def _fill_steps(self, preferred: int | str) -> None:
        """The picked attempt's steps; `preferred` stays picked when the attempt has it, else the first."""
        options = step_options(self._session, self.attempt.value) if self._session else []
        values = [value for _, value in options]
        self.step.options = options
        self.step.value = preferred if preferred in values else (values[0] if values else None)
        self.step.disabled = self.attempt.value in (BASE, None)

    # --- changes ----------------------------------------------------------------------------------
    def _picked(self, *, attempt: bool) -> None:
        if self._filling:
            return

        def follow() -> None:
            if attempt:  # another attempt: its final weights (or its newest checkpoint)
                self._filling = True
                try:
                    self._fill_steps(FINAL)
                finally:
                    self._filling = False
            self._notify()

        self._act(follow)

    def _notify(self) -> None:
        if self.ref != self._notified:
            self._notified = self.ref
            for listener in self._listeners:
                listener()
