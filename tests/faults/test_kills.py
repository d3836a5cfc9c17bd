"""Faults at any moment, seeded: a training run killed with SIGKILL at a point of some stage (class images, latent
cache, each phase, a checkpoint write, the final save, a session.json write), or interrupted with SIGINT at some line of
a step; then what a user does next (resume, or start again when there is nothing to resume). Every time the session
opens and the run ends with exactly the weights of an uninterrupted run (fp32, CPU). DREAMNB_FAULT_SEEDS sets how many
seeds (the README's test command: 7, every kill point once; the full run: 20)."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from conftest import subject_photo
from dreamnb.config import ConfigError, TrainConfig
from dreamnb.session import create_session, open_session
from test_train import _weights

SEEDS = range(int(os.environ.get("DREAMNB_FAULT_SEEDS", "7")))  # 7: every kill point once
# where a SIGKILL lands: a stage, and what in it (the rename that would complete a write, or a training step)
KILL_POINTS = ["class image", "latent cache", "text-encoder step", "unet step", "checkpoint", "final save", "session.json"]


def config_dict() -> dict:
    return TrainConfig.from_preset(
        "face", token="zwx", class_word="thing", resolution=64, seed=0, with_prior_preservation=True, num_class_images=3,
        text_encoder_steps=4, text_encoder_lr=1e-4, unet_steps=6, unet_lr=1e-3, checkpoint_every=2, keep_checkpoints=2,
        log_every=1, lr_scheduler="linear").to_dict()


def new_session(path):
    session = create_session(path)
    for i in range(4):
        subject_photo(i).save(session.instance_dir / f"photo-{i}.png")
    return session


@pytest.fixture(scope="module")
def straight(tmp_path_factory, tiny_sd1):
    """The uninterrupted run every faulted one must match."""
    from dreamnb.train import train

    session = new_session(tmp_path_factory.mktemp("straight") / "session")
    assert train(session, TrainConfig.from_dict(config_dict()), str(tiny_sd1.folder), progress=False).status == "finished"
    return _weights(session, "attempt-1")


CHILD = textwrap.dedent("""
    import os, random, signal, sys
    from dreamnb import fileio, train as t
    from dreamnb.config import TrainConfig
    from dreamnb.session import open_session
    import json

    session_path, model, point, seed, config = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), json.loads(sys.argv[5])
    rng = random.Random(seed)
    nth = rng.randint(1, 3)
    seen = []

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    real_replace = os.replace
    def replace(src, dst, *a, **k):  # dies just before the rename that would complete a write
        name = os.path.basename(str(dst))
        if ((point == "class image" and name.startswith("class-")) or (point == "latent cache" and name.startswith("latents-"))
                or (point == "checkpoint" and name.startswith("step-")) or (point == "final save" and name == "final")
                or (point == "session.json" and name == "session.json")):
            seen.append(name)
            if len(seen) == nth:
                die()
        return real_replace(src, dst, *a, **k)
    os.replace = replace

    def on_event(event):
        phase = {"text-encoder step": "text_encoder", "unet step": "unet"}.get(point)
        if event.kind == "step" and event.phase == phase and rng.random() < 0.4:
            die()
    t.train(open_session(session_path), TrainConfig.from_dict(config), model, progress=False, callback=on_event)
""")


@pytest.mark.parametrize("seed", SEEDS)
def test_a_run_killed_at_any_stage_ends_with_the_weights_of_an_uninterrupted_one(tmp_path, tiny_sd1, straight, seed):
    from dreamnb.train import train

    point = KILL_POINTS[seed % len(KILL_POINTS)]
    session = new_session(tmp_path / "session")
    child = subprocess.run([sys.executable, "-c", CHILD, str(session.path), str(tiny_sd1.folder), point, str(seed), json.dumps(config_dict())],
                           capture_output=True, text=True, timeout=300)
    assert child.returncode in (-signal.SIGKILL, 0), child.stderr[-2000:]

    session = open_session(session.path)  # it opens, whatever the moment was
    result = None
    if session.attempts and session.attempts[-1].status != "finished":
        try:
            result = train(session, None, str(tiny_sd1.folder), attempt=session.attempts[-1].name, resume=True, progress=False)
        except ConfigError as err:  # killed before its first checkpoint: a user starts it again
            assert "no checkpoint to resume from" in str(err)
    if result is None and not (session.attempts and session.attempts[-1].status == "finished"):
        result = train(session, TrainConfig.from_dict(config_dict()), str(tiny_sd1.folder), progress=False)
    name = result.attempt if result is not None else session.attempts[-1].name
    assert open_session(session.path).attempt(name).status == "finished"
    for part, (expected, got) in zip(("unet", "text encoder"), zip(straight, _weights(session, name))):
        assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected), (point, part)
    leftovers = [p for p in session.path.rglob("*") if p.name.endswith((".tmp", ".old"))]
    assert not leftovers, leftovers


SIGINT_POINTS = ["loss", "optimizer step", "schedule step"]


@pytest.mark.parametrize("seed", SEEDS)
def test_ctrl_c_at_any_line_of_a_step_leaves_a_consistent_checkpoint_that_resumes_exactly(tmp_path, tiny_sd1, straight, seed, monkeypatch):
    from dreamnb import train as train_module

    rng = random.Random(seed)
    point, when = SIGINT_POINTS[seed % len(SIGINT_POINTS)], rng.randint(2, 9)
    calls = []

    def interrupting(real):
        def call(*args, **kwargs):
            calls.append(1)
            if len(calls) == when:
                os.kill(os.getpid(), signal.SIGINT)
            return real(*args, **kwargs)
        return call

    if point == "loss":
        monkeypatch.setattr(train_module, "diffusion_loss", interrupting(train_module.diffusion_loss))
    else:
        cls = torch.optim.AdamW if point == "optimizer step" else torch.optim.lr_scheduler.LambdaLR
        monkeypatch.setattr(cls, "step", interrupting(cls.step))
    session = new_session(tmp_path / "session")
    first = train_module.train(session, TrainConfig.from_dict(config_dict()), str(tiny_sd1.folder), progress=False)
    assert first.status == "interrupted", (point, when)
    monkeypatch.undo()
    checkpoint = train_module.latest_checkpoint(session.attempt_dir(first.attempt))
    assert json.loads((checkpoint / "state.json").read_text())["global_step"] == first.steps_done
    resumed = train_module.train(open_session(session.path), None, str(tiny_sd1.folder), attempt=first.attempt, resume=True, progress=False)
    assert resumed.status == "finished"
    for expected, got in zip(straight, _weights(session, first.attempt)):
        assert all(torch.equal(expected[k], got[k]) for k in expected), (point, when)


EXPORT_CHILD = textwrap.dedent("""
    import os, random, signal, sys, threading
    from dreamnb.cli import main

    session, attempt, fmt, out, seed = sys.argv[1:6]
    rng = random.Random(int(seed))
    die = lambda: os.kill(os.getpid(), signal.SIGKILL)
    if rng.random() < 0.5:  # just before the rename that would complete the export
        real_replace = os.replace
        def replace(src, dst, *a, **k):
            if os.path.basename(str(dst)) == os.path.basename(out):
                die()
            return real_replace(src, dst, *a, **k)
        os.replace = replace
    else:  # at any moment: loading, converting, writing
        threading.Timer(rng.uniform(0.5, 6.0), die).start()
    main(["export", "--session", session, "--attempt", attempt, "--format", fmt, "--out", out, "--force"])
""")
EXPORTS = [("full", "safetensors", "me.safetensors"), ("full", "diffusers", "me-diffusers"), ("lora", "lora", "me-lora.safetensors")]


def contents(path) -> dict:
    """What an export holds, file by file: a .safetensors file as its metadata and tensors (its header's key order
    is not fixed), anything else as bytes."""
    from safetensors import safe_open

    def content(file):
        if file.suffix != ".safetensors":
            return file.read_bytes()
        with safe_open(str(file), framework="pt") as f:
            return f.metadata(), {k: f.get_tensor(k).reshape(-1).view(torch.uint8).numpy().tobytes() for k in f.keys()}

    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(p.relative_to(path)): content(p) for p in files}


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_sd1):
    """A session with a full and a LoRA attempt, and each export as an uninterrupted run writes it."""
    from dreamnb.cli import main
    from dreamnb.train import train
    from test_train import quick_config

    work = tmp_path_factory.mktemp("exports")
    session = new_session(work / "session")
    train(session, quick_config(unet_steps=4, text_encoder_steps=2), str(tiny_sd1.folder), attempt="full", progress=False)
    train(session, quick_config(method="lora", unet_steps=4), str(tiny_sd1.folder), attempt="lora", progress=False)
    reference = {}
    for attempt, fmt, name in EXPORTS:
        assert main(["export", "--session", str(session.path), "--attempt", attempt, "--format", fmt, "--out", str(work / name)]) == 0
        reference[fmt] = contents(work / name)
    return session, reference


@pytest.mark.parametrize("seed", SEEDS)
def test_an_export_killed_at_any_moment_leaves_the_old_export_or_none_and_runs_again(tmp_path, exported, seed):
    from dreamnb.cli import main

    session, reference = exported
    attempt, fmt, name = EXPORTS[seed % len(EXPORTS)]
    out = tmp_path / name  # outside the session, where a user's --out points
    if seed % 2:  # an earlier export is there, which a kill must never leave half replaced
        assert main(["export", "--session", str(session.path), "--attempt", attempt, "--format", fmt, "--out", str(out)]) == 0
    child = subprocess.run([sys.executable, "-c", EXPORT_CHILD, str(session.path), attempt, fmt, str(out), str(seed)],
                           capture_output=True, text=True, timeout=300)
    assert child.returncode in (-signal.SIGKILL, 0), child.stderr[-2000:]
    assert not out.exists() or contents(out) == reference[fmt]  # nothing, or a whole export
    assert open_session(session.path).attempt(attempt).status == "finished"
    assert main(["export", "--session", str(session.path), "--attempt", attempt, "--format", fmt, "--out", str(out), "--force"]) == 0
    assert contents(out) == reference[fmt]
    leftovers = [p for p in [*tmp_path.rglob(".*"), *session.path.rglob("*")] if p.name.endswith((".tmp", ".old"))]
    assert not leftovers, leftovers
