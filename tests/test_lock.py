"""The session lock under contention: processes racing for a stale lock, threads of one notebook (the training thread and
the views), and several writers of one session.json in one process."""
from __future__ import annotations

import json
import multiprocessing
import os
import threading
import time

import pytest

from dreamnb import session as sessions

ROUNDS, CONTENDERS, HOLD_S = 50, 4, 0.02


def _contender(index: int, path: str, barrier, results) -> None:
    """One process of the race: every round, wait for the others, try to take the lock; inside it, create an O_EXCL
    marker that a second holder would collide with, hold a moment, leave."""
    _slow_file_system()
    inside = os.path.join(path, "inside")
    for round_ in range(ROUNDS):
        barrier.wait(timeout=120)
        outcome = None
        try:
            with sessions.session_lock(path, f"contender {index}"):
                try:
                    os.close(os.open(inside, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
                    collided = False
                except FileExistsError:
                    collided = True
                entered = time.monotonic()  # CLOCK_MONOTONIC: one clock for every process of the machine
                time.sleep(HOLD_S)
                left = time.monotonic()
                if not collided:
                    os.unlink(inside)
                outcome = (entered, left, collided)
        except sessions.SessionLockedError:
            pass
        results.put((round_, index, outcome))
        barrier.wait(timeout=120)


def _slow_file_system() -> None:
    """Every look at or removal of a file takes up to 2 ms, as on Drive's FUSE mount, where each is a round trip: that
    is what widens the window between judging a lock stale and replacing it."""
    import random

    def slow(call):
        def slowed(*args, **kwargs):
            time.sleep(random.uniform(0, 0.002))
            return call(*args, **kwargs)
        return slowed

    for name in ("open", "stat", "fstat", "unlink", "rename", "replace"):
        setattr(os, name, slow(getattr(os, name)))


def _stale_lock(lock, round_: int) -> None:
    """A lock left by a runtime that is gone: its heartbeat stopped long ago."""
    lock.write_text(json.dumps({"host": "a-dead-colab-runtime", "pid": 4242, "what": f"training (round {round_})",
                                "since": "2026-11-29T10:00:00+00:00"}))
    old = time.time() - sessions.STALE_AFTER_S - 60
    os.utime(lock, (old, old))


def test_processes_racing_for_a_stale_lock_never_hold_it_together(tmp_path):
    """Each round a stale lock, then several processes released at once by a barrier: one takes it over; none may be
    inside while another is (the O_EXCL marker, and the enter/leave times), and every round someone gets it."""
    s = sessions.create_session(tmp_path / "me")
    lock = s.path / sessions.LOCK_FILE
    context = multiprocessing.get_context("spawn")
    barrier, results = context.Barrier(CONTENDERS + 1), context.Queue()
    workers = [context.Process(target=_contender, args=(i, str(s.path), barrier, results), daemon=True)
               for i in range(CONTENDERS)]
    for worker in workers:
        worker.start()
    overlapping, taken = [], 0
    try:
        for round_ in range(ROUNDS):
            lock.unlink(missing_ok=True)
            (s.path / "inside").unlink(missing_ok=True)
            _stale_lock(lock, round_)
            barrier.wait(timeout=120)  # go
            barrier.wait(timeout=120)  # every contender is done
            held = sorted(outcome for _, _, outcome in (results.get(timeout=60) for _ in range(CONTENDERS)) if outcome)
            taken += bool(held)
            together = any(h[2] for h in held) or any(later[0] < earlier[1] for earlier, later in zip(held, held[1:]))
            if together:
                overlapping.append(round_)
    finally:
        for worker in workers:
            worker.join(timeout=30)
            if worker.is_alive():
                worker.kill()
    assert not overlapping, f"two processes held the lock at once in {len(overlapping)} of {ROUNDS} rounds: {overlapping}"
    assert taken == ROUNDS, f"the stale lock was taken over in only {taken} of {ROUNDS} rounds"
    assert not lock.exists() and not list(s.path.glob(".lock*")), list(s.path.glob(".lock*"))


# --- several writers of one session.json in one process ---------------------------------------------------------------

def test_two_session_objects_of_one_folder_keep_each_others_changes(tmp_path):
    """The notebook's Session and the trainer's are two objects of one folder: each writes only its own change."""
    s = sessions.create_session(tmp_path / "me")
    for name in ("a1", "a2"):
        sessions.add_attempt(s, name)
    view, trainer = sessions.open_session(s.path), sessions.open_session(s.path)
    sessions.update_attempt(trainer, "a1", status="training", steps_done=3)
    sessions.update_attempt(view, "a2", status="finished", steps_done=10)
    sessions.add_attempt(trainer, "a3")
    sessions.update_session(view, base_model="some/model")
    saved = sessions.open_session(s.path)
    assert {a.name: (a.status, a.steps_done) for a in saved.attempts} == {"a1": ("training", 3), "a2": ("finished", 10),
                                                                          "a3": ("new", 0)}
    assert saved.base_model == "some/model"
    # each object now holds the other's changes too, in the Attempt objects it already had
    a1 = view.attempt("a1")
    sessions.update_attempt(trainer, "a1", status="finished")
    sessions.add_attempt(view)
    assert a1.status == "finished" and view.attempt("a1") is a1 and [a.name for a in view.attempts][-1] == "attempt-4"


def test_writers_in_two_threads_lose_no_update(tmp_path):
    s = sessions.create_session(tmp_path / "me")
    for name in ("a1", "a2"):
        sessions.add_attempt(s, name)

    def write(name):
        mine = sessions.open_session(s.path)
        for step in range(1, 51):
            sessions.update_attempt(mine, name, steps_done=step)

    threads = [threading.Thread(target=write, args=(name,)) for name in ("a1", "a2")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [a.steps_done for a in sessions.open_session(s.path).attempts] == [50, 50]


# --- threads of one process: the notebook's training thread and its views ------------------------------------------------

def _hold_in_a_thread(hold):
    """Run `hold(held, release)` in a thread, which sets `held` once it holds something and keeps it until `release` is
    set; returns (thread, release) once it holds."""
    held, release = threading.Event(), threading.Event()

    def run():
        hold(held, release)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert held.wait(10)
    return thread, release


def test_the_lock_belongs_to_the_thread_that_took_it(tmp_path):
    s = sessions.create_session(tmp_path / "me")
    sessions.add_attempt(s, "attempt-1")

    def train(held, release):
        with sessions.session_lock(s.path, "training"):
            sessions.describe_lock(s.path, "training attempt-1")
            with sessions.session_lock(s.path, "saving a checkpoint"):  # the holding thread may take it again
                held.set()
                release.wait(10)

    thread, release = _hold_in_a_thread(train)
    try:
        assert sessions.busy_in_this_process(s.path) == "training attempt-1"
        sentence = ("Training attempt-1 is under way in this notebook (session 'me'); stop it or wait until it ends before "
                    "deleting attempt-1.")
        with pytest.raises(sessions.SessionLockedError) as refused:
            sessions.delete_attempt(s, "attempt-1")
        assert str(refused.value) == sentence
        with pytest.raises(sessions.SessionLockedError, match="before deleting attempt-1"):
            sessions.refuse_while_busy(s.path, "deleting attempt-1")
        assert s.attempt_dir("attempt-1").is_dir() and [a.name for a in sessions.open_session(s.path).attempts] == ["attempt-1"]
        assert (s.path / sessions.LOCK_FILE).exists()
    finally:
        release.set()
        thread.join(10)
    assert sessions.busy_in_this_process(s.path) is None and not (s.path / sessions.LOCK_FILE).exists()
    assert sessions.delete_attempt(s, "attempt-1") >= 0 and not s.attempt_dir("attempt-1").exists()


def test_a_lock_taken_over_meanwhile_is_not_removed_by_its_old_holder(tmp_path, caplog):
    """A runtime frozen past STALE_AFTER_S has lost its lock to another writer; when it wakes and ends, the lock it
    removes must not be the other writer's."""
    s = sessions.create_session(tmp_path / "me")
    lock = s.path / sessions.LOCK_FILE
    theirs = json.dumps({"host": "another-runtime", "pid": 7, "what": "training", "since": "now", "token": "theirs"})
    with sessions.session_lock(s.path, "training"):
        lock.unlink()
        lock.write_text(theirs)
    assert lock.read_text() == theirs and "taken over by another writer" in caplog.text


def _tiny_base_model():
    from types import SimpleNamespace

    import torch

    from dreamnb.models import BaseModel

    part = SimpleNamespace(device=torch.device("cpu"), dtype=torch.float32)
    return BaseModel(info=SimpleNamespace(source="tiny/model", family="sd1"), pipeline=SimpleNamespace(unet=part, text_encoder=part))


def test_the_base_model_is_not_used_by_another_thread_while_training_parks_it():
    base = _tiny_base_model()

    def train(held, release):
        with base.in_use("training attempt-1"), base.parked():
            held.set()
            release.wait(10)

    thread, release = _hold_in_a_thread(train)
    _refused_until_released(base, release, thread)


def test_parking_waits_until_another_threads_use_of_the_base_model_ends():
    base = _tiny_base_model()
    parked = threading.Event()

    def park():
        with base.parked():
            parked.set()

    with base.in_use("making a grid"):
        thread = threading.Thread(target=park, daemon=True)
        thread.start()
        assert not parked.wait(0.3)  # the grid is being made with the model: it must not move under it
    assert parked.wait(10)
    thread.join(10)


def test_train_called_in_a_thread_holds_the_base_model_from_its_class_images_on(tmp_path, tiny_sd1):
    """`train` itself owns the base model while it runs, not only the train view: called from any thread, it makes its
    class images with the model, and another thread that wants it meanwhile gets the sentence."""
    from conftest import subject_photo
    from dreamnb.models import load_base_model
    from dreamnb.train import train
    from test_train import quick_config

    base = load_base_model(tiny_sd1.folder)
    session = sessions.create_session(tmp_path / "session")
    for i in range(2):
        subject_photo(i).save(session.instance_dir / f"photo-{i}.png")
    making_class_images, release, results = threading.Event(), threading.Event(), []

    def on_event(event):
        if event.kind == "info" and "class images" in (event.message or ""):
            making_class_images.set()
            release.wait(30)

    config = quick_config(unet_steps=2, with_prior_preservation=True, num_class_images=1)
    thread = threading.Thread(target=lambda: results.append(train(session, config, base, callback=on_event, progress=False)),
                              daemon=True)
    thread.start()
    assert making_class_images.wait(120)
    _refused_until_released(base, release, thread)
    assert results and results[0].status == "finished"


def _refused_until_released(base, release: threading.Event, thread: threading.Thread) -> None:
    """While `thread` trains with `base` (until `release`), a view's use of it is refused in one sentence; after, it works."""
    from dreamnb.models import ModelBusyError
    from dreamnb.ui.base import using_model

    try:
        with pytest.raises(ModelBusyError, match=r"^The base model is in use by training attempt-1 in this notebook"):
            with using_model(base, "making a grid"):
                pass
    finally:
        release.set()
        thread.join(120)
    with using_model(base, "making a grid") as used:
        assert used is base
