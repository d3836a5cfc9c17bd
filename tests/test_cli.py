"""The CLI as scripts use it: exit 0 / 2 (one sentence, no traceback) / 1, and the flow end to end."""
import json
import os
import subprocess
import sys
from pathlib import Path

from PIL import Image

from conftest import subject_photo
from test_export import GOOD_TOKEN, FakeHub


def dreamnb(*args, cwd=None, env=None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "2", **(env or {})}
    return subprocess.run([sys.executable, "-m", "dreamnb", *map(str, args)], capture_output=True, text=True,
                          timeout=600, env=env, cwd=cwd)


def test_usage_errors_exit_2_with_one_clear_sentence(tmp_path):
    done = dreamnb("train", "--session", tmp_path / "nope", "--model", "x/y", "--token", "zwx")
    assert done.returncode == 2 and "is not a dreamnb session" in done.stderr and "Traceback" not in done.stderr
    assert dreamnb("frobnicate").returncode == 2
    done = dreamnb("check-token", "")
    assert done.returncode == 2 and done.stderr.count("\n") == 1


def test_prepare_train_sample_and_list_from_the_command_line(tmp_path, tiny_sd1):
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(3):  # subject_photo repeats itself after 3
        subject_photo(i, size=96).save(photos / f"me-{i}.png")
    session = tmp_path / "sessions" / "me"

    done = dreamnb("prepare", photos, "--session", session, "--size", "64", "--crop", "center", "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["accepted"] == 3 and report["rejected"] == 0 and report["photos_in_set"] == 3

    # a single file with the folder of its configs: later commands load the session's model with them too
    done = dreamnb("train", "--session", session, "--model", tiny_sd1.single_file, "--model-config", tiny_sd1.folder,
                   "--token", "zwx", "--class-word", "thing",
                   "--preset", "object", "--no-prior", "--unet-steps", "12", "--te-steps", "2", "--resolution", "64",
                   "--set", "unet_lr=1e-3", "--set", "log_every=4", "--json")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["status"] == "finished" and result["steps_done"] == 14 and len(result["losses"]) >= 3

    done = dreamnb("train", "--session", session, "--token", "zwx", "--set", "unet_stesp=3")
    assert done.returncode == 2 and "unet_stesp" in done.stderr

    grid = tmp_path / "grid.png"
    done = dreamnb("compare", "--session", session, "--attempts", "base", "attempt-1", "--prompt", "photo of {token} {class}",
                   "--seed", "1", "2", "--steps", "3", "--out", grid)
    assert done.returncode == 0, done.stderr
    with Image.open(grid) as image:
        assert image.width > 4 * 64 and image.height > 64

    done = dreamnb("sessions", "--root", tmp_path / "sessions", "--json")
    listed = json.loads(done.stdout)
    assert [a["status"] for a in listed[0]["attempts"]] == ["finished"]

    done = dreamnb("export", "--session", session, "--format", "safetensors")
    assert done.returncode == 0, done.stderr
    assert Path(done.stdout.strip()).parent == session / "exports" and Path(done.stdout.strip()).stat().st_size > 100_000

    hub = FakeHub()
    try:
        done = dreamnb("export", "--session", session, "--format", "safetensors", "--push", "someone/zwx",
                       env={"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": hub.endpoint, "HF_TOKEN": GOOD_TOKEN})
    finally:
        hub.server.shutdown()
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"{hub.endpoint}/someone/zwx" and hub.repos["someone/zwx"]["visibility"] == "private"
    assert "README.md" in hub.files and any(f.endswith(".safetensors") for f in hub.files)
    assert GOOD_TOKEN not in done.stdout + done.stderr


def test_export_offers_every_format_the_core_exports():
    from dreamnb.cli import build_parser
    from dreamnb.export import FORMATS

    export = build_parser()._subparsers._group_actions[0].choices["export"]
    choices = next(a.choices for a in export._actions if a.dest == "format")
    assert tuple(choices) == FORMATS
