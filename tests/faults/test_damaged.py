"""Damaged attempt files — a checkpoint cut short (a full Drive, a kill from before writes were atomic), a file edited
by hand — through the commands that read them: one sentence naming the file, exit 2, no traceback, nothing changed."""
from __future__ import annotations

import hashlib
import threading

import pytest

from dreamnb.cli import main
from dreamnb.train import train
from test_train import quick_config

DAMAGE = {
    "truncated": lambda data: data[: len(data) // 2],
    "garbage": lambda data: b"\x00not what was written\xff" * 8,
    "empty": lambda data: b"",
}


@pytest.fixture(scope="module")
def stopped_session(tmp_path_factory, tiny_sd1):
    """An attempt stopped at step 5 (checkpoints at 4 and 5) and a finished one, as a user's session would hold them."""
    from conftest import subject_photo
    from dreamnb.session import create_session

    session = create_session(tmp_path_factory.mktemp("damaged") / "session")
    for i in range(4):
        subject_photo(i).save(session.instance_dir / f"photo-{i}.png")
    stop = threading.Event()
    config = quick_config(unet_steps=8, text_encoder_steps=2, checkpoint_every=4, log_every=1)
    train(session, config, str(tiny_sd1.folder), attempt="stopped", progress=False, stop=stop,
          callback=lambda e: stop.set() if e.kind == "step" and e.step == 5 else None)
    train(session, config, str(tiny_sd1.folder), attempt="done", progress=False)
    return session


def snapshot(folder) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != ".lock"}


def one_sentence(err: str) -> str:
    """The command's message: the one line it wrote (progress bars of the loading aside), and no traceback."""
    assert "Traceback" not in err, err
    (line,) = [line for line in err.splitlines() if line.startswith("dreamnb ")]
    return line


def damaged(path, how):
    original = path.read_bytes()
    path.write_bytes(DAMAGE[how](original))
    return original


@pytest.mark.parametrize("how", sorted(DAMAGE))
@pytest.mark.parametrize("file", ["weights.safetensors", "rng.safetensors", "state.json", "optimizer.pt"])
def test_resuming_from_a_damaged_checkpoint_is_one_sentence(stopped_session, tiny_sd1, capsys, fault, file, how):
    path = stopped_session.attempt_dir("stopped") / "checkpoints" / "step-000005" / file
    original = damaged(path, how)
    try:
        fault("damaged checkpoint file, on resume", how, path.read_bytes() != original, f"step-000005/{file}")
        assert path.read_bytes() != original
        before = snapshot(stopped_session.path)
        code = main(["train", "--session", str(stopped_session.path), "--model", str(tiny_sd1.folder), "--resume", "--attempt", "stopped"])
        err = capsys.readouterr().err
        assert code == 2, err
        assert one_sentence(err) == f"dreamnb train: {path.parent} is damaged or missing" + one_sentence(err).split("missing", 1)[1]
        assert "--from NAME@STEP" in err
        assert snapshot(stopped_session.path) == before
    finally:
        path.write_bytes(original)


@pytest.mark.parametrize("command, where", [
    (["sample", "--attempt", "stopped@4"], "stopped/checkpoints/step-000004/weights.safetensors"),
    (["compare", "--attempts", "base", "done"], "done/final/unet/diffusion_pytorch_model.safetensors"),
    (["compare", "--attempts", "done"], "done/config.json"),
    (["export", "--format", "safetensors", "--attempt", "done"], "done/final/text_encoder/model.safetensors"),
])
@pytest.mark.parametrize("how", ["truncated", "garbage"])
def test_reading_a_damaged_attempt_is_one_sentence(stopped_session, tmp_path, capsys, fault, command, where, how):
    path = stopped_session.path / "attempts" / where
    original = damaged(path, how)
    try:
        fault("damaged attempt file, on reading", how, path.read_bytes() != original, f"{command[0]}: {where}")
        assert path.read_bytes() != original
        before = snapshot(stopped_session.path)
        out = ["--out", str(tmp_path / ("x.png" if command[0] != "export" else "x.safetensors"))]
        extra = ["--prompt", "x", "--seed", "1", "--steps", "2"] if command[0] != "export" else []
        code = main([command[0], "--session", str(stopped_session.path), *command[1:], *extra, *out])
        err = capsys.readouterr().err
        assert code == 2, err
        assert "is damaged or missing" in one_sentence(err)
        assert snapshot(stopped_session.path) == before and not list(tmp_path.iterdir())
    finally:
        path.write_bytes(original)
