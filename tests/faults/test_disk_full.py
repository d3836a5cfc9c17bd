"""A real full disk (a small tmpfs, where this machine lets a test mount one): the disk fills up after the first
checkpoint; the next checkpoint write fails as it would on a full Google Drive. One sentence, the earlier checkpoint
intact, no partial files, and once there is space again the run resumes and ends exactly where an uninterrupted one does."""
from __future__ import annotations

import os
import subprocess

import pytest
import torch

from dreamnb.session import open_session
from dreamnb.train import train
from test_train import _weights, quick_config


@pytest.fixture
def small_disk(tmp_path):
    mount = tmp_path / "small-disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=96m", "tmpfs", str(mount)], capture_output=True, text=True)
    if done.returncode:
        pytest.skip(f"cannot mount a small filesystem here ({done.stderr.strip()[:80]}); the injected ENOSPC tests still run")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def fill(folder, leave: int) -> None:
    """Fills the filesystem of `folder` up to `leave` bytes."""
    stat = os.statvfs(folder)
    with open(folder / "ballast", "wb") as f:
        f.write(b"\0" * max(0, stat.f_bavail * stat.f_frsize - leave))


def test_a_full_disk_at_a_checkpoint_is_one_sentence_and_the_run_resumes_exactly(small_disk, tmp_path, tiny_sd1, fault):
    from conftest import subject_photo
    from dreamnb.session import create_session

    config = quick_config(unet_steps=6, text_encoder_steps=2, checkpoint_every=3, log_every=1)
    straight_session = create_session(tmp_path / "straight")
    sessions = [straight_session, create_session(small_disk / "session")]
    for session in sessions:
        for i in range(4):
            subject_photo(i).save(session.instance_dir / f"photo-{i}.png")
    assert train(straight_session, config, str(tiny_sd1.folder), progress=False).status == "finished"

    session = sessions[1]
    on_event = lambda e: fill(small_disk, 256 * 1024) if e.kind == "checkpoint" and e.step == 3 else None
    result = train(session, config, str(tiny_sd1.folder), progress=False, callback=on_event)
    fault("a real full disk", "checkpoint", result.message.startswith("The disk is full"), f"the checkpoint after step {result.steps_done}")
    assert result.status == "failed" and result.steps_done == 6
    assert result.message.startswith("The disk is full") and "\n" not in result.message, result.message
    checkpoints = sorted(p.name for p in (session.attempt_dir("attempt-1") / "checkpoints").iterdir())
    assert checkpoints == ["step-000003"]

    (small_disk / "ballast").unlink()
    resumed = train(open_session(session.path), None, str(tiny_sd1.folder), resume=True, progress=False)
    assert resumed.status == "finished"
    for expected, got in zip(_weights(straight_session, "attempt-1"), _weights(session, "attempt-1")):
        assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)
    leftovers = [p for p in session.path.rglob("*") if p.name.endswith((".tmp", ".old"))]
    assert not leftovers, leftovers


def test_an_export_to_a_full_disk_is_one_sentence_and_leaves_no_partial_file(small_disk, photo_session, tiny_sd1, capsys, fault):
    from dreamnb.cli import main

    train(photo_session, quick_config(unet_steps=2), str(tiny_sd1.folder), progress=False)
    fill(small_disk, 256 * 1024)
    code = main(["export", "--session", str(photo_session.path), "--format", "safetensors", "--out", str(small_disk / "me.safetensors")])
    err = capsys.readouterr().err
    fault("a real full disk", "export", "The disk is full" in err, "writing me.safetensors")
    assert code == 2 and "The disk is full" in err and "Traceback" not in err, err
    assert sorted(p.name for p in small_disk.iterdir()) == ["ballast"]  # no partial export, no temporary file
