"""Faults at any moment, seeded: a training run killed with SIGKILL at a point of some stage (class images, latent
cache, each phase, a checkpoint write, the final save, a session.json write), or interrupted with SIGINT at some line of
a step; then what a user does next (resume, or start again when there is nothing to resume). Every time the session
opens and the run ends with exactly the weights of an uninterrupted run (fp32, CPU). DREAMNB_FAULT_SEEDS sets how many
seeds (the README's test command: 7, every kill point once; the full run: 20).

Every fault fires for sure and says where: the occurrence it lands on is drawn among those an uninterrupted run makes
(counted by the module's fixtures, never written down here), the child process writes a marker just before it kills
itself, and each test records (point, fired, where) for the suite's table (conftest.py)."""
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


# The child: a training run that dies at the nth occurrence of `point` (nth 0: never, and it writes down how many
# occurrences of every point it saw). The marker is written just before the kill, so a test knows it fired and where.
CHILD = textwrap.dedent("""
    import json, os, signal, sys
    from dreamnb import train as t
    from dreamnb.config import TrainConfig
    from dreamnb.session import open_session

    session_path, model, point, nth, marker, config = sys.argv[1:7]
    nth, config = int(nth), json.loads(config)
    seen = {}

    def occurs(kind, what):
        seen.setdefault(kind, []).append(what)
        if kind == point and len(seen[kind]) == nth:
            with open(marker, "w") as f:
                json.dump({"point": point, "occurrence": nth, "at": what}, f)
            os.kill(os.getpid(), signal.SIGKILL)

    def rename_point(name):
        for kind, hit in [("class image", name.startswith("class-")), ("latent cache", name.startswith("latents-")),
                          ("checkpoint", name.startswith("step-")), ("final save", name == "final"),
                          ("session.json", name == "session.json")]:
            if hit:
                return kind

    real_replace = os.replace
    def replace(src, dst, *a, **k):  # dies just before the rename that would complete a write
        kind = rename_point(os.path.basename(str(dst)))
        if kind:
            occurs(kind, os.path.basename(str(dst)))
        return real_replace(src, dst, *a, **k)
    os.replace = replace

    def on_event(event):  # dies once the step is done, before whatever comes next
        if event.kind == "step":
            occurs({"text_encoder": "text-encoder step", "unet": "unet step"}.get(event.phase, event.phase), f"step {event.step}")

    t.train(open_session(session_path), TrainConfig.from_dict(config), model, progress=False, callback=on_event)
    with open(marker, "w") as f:
        json.dump({"seen": seen}, f)
""")


def run_child(session, model, point: str, nth: int, marker) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", CHILD, str(session.path), str(model), point, str(nth), str(marker), json.dumps(config_dict())],
                          capture_output=True, text=True, timeout=600)


def read_marker(path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


@pytest.fixture(scope="module")
def straight(tmp_path_factory, tiny_sd1):
    """The uninterrupted run every faulted one must match (run as the faulted ones are, in a child that never dies),
    and how many times each kill point occurs in it: the occurrences a kill can land on."""
    work = tmp_path_factory.mktemp("straight")
    session = new_session(work / "session")
    child = run_child(session, tiny_sd1.folder, "none", 0, work / "marker.json")
    assert child.returncode == 0, child.stderr[-2000:]
    assert open_session(session.path).attempts[-1].status == "finished"
    seen = read_marker(work / "marker.json")["seen"]
    occurrences = {point: len(seen.get(point, [])) for point in KILL_POINTS}
    assert all(occurrences.values()), occurrences  # a point that never occurs could never fire
    return _weights(session, "attempt-1"), occurrences


@pytest.mark.parametrize("seed", SEEDS)
def test_a_run_killed_at_any_stage_ends_with_the_weights_of_an_uninterrupted_one(tmp_path, tiny_sd1, straight, fault, seed):
    from dreamnb.train import train

    weights, occurrences = straight
    point = KILL_POINTS[seed % len(KILL_POINTS)]
    nth = random.Random(seed).randint(1, occurrences[point])
    session = new_session(tmp_path / "session")
    child = run_child(session, tiny_sd1.folder, point, nth, tmp_path / "marker.json")
    marker = read_marker(tmp_path / "marker.json")
    fired = child.returncode == -signal.SIGKILL and marker.get("point") == point and marker.get("occurrence") == nth
    fault("SIGKILL in training", point, fired, f"{marker.get('at')} ({nth} of {occurrences[point]})")
    assert child.returncode == -signal.SIGKILL, child.stderr[-2000:]
    assert marker.get("point") == point and marker.get("occurrence") == nth, marker

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
    for part, (expected, got) in zip(("unet", "text encoder"), zip(weights, _weights(session, name))):
        assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected), (point, part)
    leftovers = [p for p in session.path.rglob("*") if p.name.endswith((".tmp", ".old"))]
    assert not leftovers, leftovers


SIGINT_POINTS = ["loss", "optimizer step", "schedule step"]


@pytest.mark.parametrize("seed", SEEDS)
def test_ctrl_c_at_any_line_of_a_step_leaves_a_consistent_checkpoint_that_resumes_exactly(tmp_path, tiny_sd1, straight, fault, seed, monkeypatch):
    from dreamnb import train as train_module

    rng = random.Random(seed)
    point, when = SIGINT_POINTS[seed % len(SIGINT_POINTS)], rng.randint(2, 9)  # 10 steps, each calls all three
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
    fault("SIGINT in a step", point, len(calls) >= when and first.status == "interrupted",
          f"call {when}, stopped after step {first.steps_done}")
    assert len(calls) >= when and first.status == "interrupted", (point, when, len(calls), first.status)
    monkeypatch.undo()
    checkpoint = train_module.latest_checkpoint(session.attempt_dir(first.attempt))
    assert json.loads((checkpoint / "state.json").read_text())["global_step"] == first.steps_done
    resumed = train_module.train(open_session(session.path), None, str(tiny_sd1.folder), attempt=first.attempt, resume=True, progress=False)
    assert resumed.status == "finished"
    for expected, got in zip(straight[0], _weights(session, first.attempt)):
        assert all(torch.equal(expected[k], got[k]) for k in expected), (point, when)


# The export's child: "rename" dies just before the rename that would complete the export; "op" dies at the nth torch
# call of the export (loading, converting, writing: every stage calls torch many times); "none" never dies and writes
# down how many torch calls an uninterrupted export makes, the range an "op" kill is drawn from.
EXPORT_CHILD = textwrap.dedent("""
    import json, os, signal, sys, traceback
    import torch
    from torch.overrides import TorchFunctionMode
    from dreamnb.cli import main

    session, attempt, fmt, out, how, nth, marker = sys.argv[1:8]
    nth = int(nth)

    def die(at):
        with open(marker, "w") as f:
            json.dump({"how": how, "occurrence": nth, "at": at}, f)
        os.kill(os.getpid(), signal.SIGKILL)

    def ours():  # the innermost dreamnb function on the stack, and the innermost function of all
        frames = traceback.extract_stack()[:-3]
        mine = [f for f in frames if os.sep + "dreamnb" + os.sep in f.filename] or frames
        return f"{os.path.basename(mine[-1].filename)}:{mine[-1].name} > {os.path.basename(frames[-1].filename)}:{frames[-1].name}"

    class Ops(TorchFunctionMode):
        count = 0
        def __torch_function__(self, func, types, args=(), kwargs=None):
            Ops.count += 1
            if how == "op" and Ops.count == nth:
                die(f"torch call {nth}, {getattr(func, '__name__', func)} in {ours()}")
            return func(*args, **(kwargs or {}))

    if how == "rename":
        real_replace = os.replace
        def replace(src, dst, *a, **k):
            if os.path.basename(str(dst)) == os.path.basename(out):
                die(f"the rename to {os.path.basename(out)}")
            return real_replace(src, dst, *a, **k)
        os.replace = replace
    with Ops():
        code = main(["export", "--session", session, "--attempt", attempt, "--format", fmt, "--out", out, "--force"])
    with open(marker, "w") as f:
        json.dump({"code": code, "torch calls": Ops.count}, f)
""")
EXPORTS = [("full", "safetensors", "me.safetensors"), ("full", "diffusers", "me-diffusers"), ("lora", "lora", "me-lora.safetensors")]


def run_export_child(session, attempt: str, fmt: str, out, how: str, nth: int, marker) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", EXPORT_CHILD, str(session.path), attempt, fmt, str(out), how, str(nth), str(marker)],
                          capture_output=True, text=True, timeout=600)


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
    """A session with a full and a LoRA attempt; each export as an uninterrupted run (a child that never dies) writes
    it, and how many torch calls that run made."""
    from dreamnb.train import train
    from test_train import quick_config

    work = tmp_path_factory.mktemp("exports")
    session = new_session(work / "session")
    train(session, quick_config(unet_steps=4, text_encoder_steps=2), str(tiny_sd1.folder), attempt="full", progress=False)
    train(session, quick_config(method="lora", unet_steps=4), str(tiny_sd1.folder), attempt="lora", progress=False)
    reference, calls = {}, {}
    for attempt, fmt, name in EXPORTS:
        child = run_export_child(session, attempt, fmt, work / name, "none", 0, work / "marker.json")
        assert child.returncode == 0, child.stderr[-2000:]
        marker = read_marker(work / "marker.json")
        assert marker["code"] == 0 and marker["torch calls"] > 0, marker
        reference[fmt], calls[fmt] = contents(work / name), marker["torch calls"]
    return session, reference, calls


@pytest.mark.parametrize("seed", SEEDS)
def test_an_export_killed_at_any_moment_leaves_the_old_export_or_none_and_runs_again(tmp_path, exported, fault, seed):
    from dreamnb.cli import main

    session, reference, calls = exported
    attempt, fmt, name = EXPORTS[seed % len(EXPORTS)]
    rng = random.Random(seed)
    how = "rename" if rng.random() < 0.5 else "op"
    nth = rng.randint(1, calls[fmt]) if how == "op" else 1
    out = tmp_path / name  # outside the session, where a user's --out points
    if seed % 2:  # an earlier export is there, which a kill must never leave half replaced
        assert main(["export", "--session", str(session.path), "--attempt", attempt, "--format", fmt, "--out", str(out)]) == 0
    child = run_export_child(session, attempt, fmt, out, how, nth, tmp_path / "marker.json")
    marker = read_marker(tmp_path / "marker.json")
    fired = child.returncode == -signal.SIGKILL and marker.get("how") == how and marker.get("occurrence") == nth
    point = f"{fmt}, {'before its rename' if how == 'rename' else 'at a torch call'}, {'over an earlier export' if seed % 2 else 'none before'}"
    fault("SIGKILL in an export", point, fired, f"{marker.get('at')}" + (f" (of {calls[fmt]})" if how == "op" else ""))
    assert child.returncode == -signal.SIGKILL, child.stderr[-2000:]
    assert marker.get("how") == how and marker.get("occurrence") == nth, marker

    # the earlier export, whole (a folder's may be set aside for the rename: the next export puts it back), or none
    left = [p for p in (out, out.with_name(f".{out.name}.old")) if p.exists()]
    assert [contents(p) == reference[fmt] for p in left] == ([True] if seed % 2 else []), left
    assert open_session(session.path).attempt(attempt).status == "finished"
    assert main(["export", "--session", str(session.path), "--attempt", attempt, "--format", fmt, "--out", str(out), "--force"]) == 0
    assert contents(out) == reference[fmt]
    leftovers = [p for p in [*tmp_path.rglob(".*"), *session.path.rglob("*")] if p.name.endswith((".tmp", ".old"))]
    assert not leftovers, leftovers
