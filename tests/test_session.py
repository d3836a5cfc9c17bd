import json

import pytest

from dreamnb import session as sessions
from dreamnb.session import SessionError


def test_create_open_list_delete(tmp_path):
    created = sessions.create_session(tmp_path / "me", base_model="some/model")
    for sub in ("instance", "class", "cache", "exports", "attempts"):
        assert (tmp_path / "me" / sub).is_dir()
    opened = sessions.open_session(tmp_path / "me")
    assert (opened.name, opened.base_model) == ("me", "some/model")
    sessions.create_session(tmp_path / "dog")
    (tmp_path / "not-a-session").mkdir()
    assert [s.name for s in sessions.list_sessions(tmp_path)] == ["dog", "me"]
    sessions.delete_session(tmp_path / "dog")
    assert not (tmp_path / "dog").exists()
    with pytest.raises(SessionError, match="not a dreamnb session; nothing was deleted"):
        sessions.delete_session(tmp_path / "not-a-session")
    assert (tmp_path / "not-a-session").is_dir()
    assert created.path == opened.path


def test_attempts_are_recorded_and_named(tmp_path):
    s = sessions.create_session(tmp_path / "me")
    assert sessions.add_attempt(s).name == "attempt-1"
    assert sessions.add_attempt(s, "sharper").name == "sharper"
    assert sessions.add_attempt(s).name == "attempt-3"
    with pytest.raises(SessionError, match="already has an attempt 'sharper'"):
        sessions.add_attempt(s, "sharper")
    sessions.update_attempt(s, "sharper", status="finished", steps_done=10)
    reopened = sessions.open_session(s.path)
    assert [(a.name, a.status, a.steps_done) for a in reopened.attempts] == [
        ("attempt-1", "new", 0), ("sharper", "finished", 10), ("attempt-3", "new", 0)]
    assert reopened.attempt().name == "attempt-3"
    with pytest.raises(SessionError, match="no attempt 'nope'; its attempts are: attempt-1, sharper, attempt-3"):
        reopened.attempt("nope")
    sessions.delete_attempt(reopened, "attempt-1")
    assert not reopened.attempt_dir("attempt-1").exists()


def test_session_from_an_older_version_opens_and_keeps_unknown_keys(tmp_path):
    folder = tmp_path / "old"
    folder.mkdir()
    # an early format: no "format" key, attempts without status, plus a key a newer version may add
    (folder / "session.json").write_text(json.dumps({
        "name": "old", "base_model": "runwayml/stable-diffusion-v1-5",
        "attempts": [{"name": "first", "legacy_field": 1}], "future_key": {"x": 1},
    }))
    s = sessions.open_session(folder)
    assert s.attempts[0].name == "first" and s.attempts[0].status == "new"
    sessions.add_attempt(s, "second")
    data = json.loads((folder / "session.json").read_text())
    assert data["future_key"] == {"x": 1} and data["format"] == sessions.FORMAT_VERSION
    assert [a["name"] for a in data["attempts"]] == ["first", "second"]


def test_session_json_is_replaced_atomically(tmp_path, monkeypatch):
    s = sessions.create_session(tmp_path / "me")
    before = (s.path / "session.json").read_text()

    def crash(*args, **kwargs):
        raise OSError("disk vanished")

    monkeypatch.setattr("dreamnb.fileio.os.replace", crash)
    with pytest.raises(OSError):
        sessions.add_attempt(s, "doomed")
    assert (s.path / "session.json").read_text() == before  # the old file is intact
    assert not [p for p in s.path.iterdir() if p.name.endswith(".tmp")]  # no temp file left behind


@pytest.mark.parametrize("name", ["", "../escape", "a/b", "-dash", "x" * 80])
def test_bad_names_are_refused(name):
    with pytest.raises(SessionError, match="not usable"):
        sessions.check_name(name)


def test_existing_folder_with_files_is_not_taken_over(tmp_path):
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "me.jpg").write_bytes(b"x")
    with pytest.raises(SessionError, match="not an empty folder"):
        sessions.create_session(tmp_path / "photos")


# --- damaged files ------------------------------------------------------------------------------------

DAMAGED = {
    "a list": "[]",
    "attempt not an object": '{"attempts": [1]}',
    "attempt without a name": '{"attempts": [{"status": "finished"}]}',
    "plain text": "this is not json",
    "name not text": '{"name": 5}',
    "cut short": '{"name": "me", "attempts": [{"name": "attempt-1"',
    "empty": "",
}


@pytest.mark.parametrize("content", DAMAGED.values(), ids=DAMAGED.keys())
def test_a_damaged_session_json_is_one_sentence_and_exit_2_and_changes_nothing(tmp_path, capsys, content):
    from dreamnb.cli import main

    s = sessions.create_session(tmp_path / "me")
    (s.path / "session.json").write_text(content)
    before = {p: p.read_bytes() for p in s.path.rglob("*") if p.is_file()}
    with pytest.raises(SessionError, match=r"session.json is damaged .*dreamnb repair --session"):
        sessions.open_session(s.path)
    for command in (["compare", "--attempts", "base", "--out", str(tmp_path / "g.png")], ["train", "--token", "zwx"], ["export", "--format", "lora"]):
        assert main([command[0], "--session", str(s.path), *command[1:]]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and "damaged" in err and "Traceback" not in err, err
    assert {p: p.read_bytes() for p in s.path.rglob("*") if p.is_file()} == before


def test_repair_restores_the_last_good_version_and_keeps_the_damaged_file(tmp_path, capsys):
    from dreamnb.cli import main

    s = sessions.create_session(tmp_path / "me", base_model="some/model")
    sessions.add_attempt(s)
    sessions.update_attempt(s, "attempt-1", status="finished", steps_done=40)
    good = (s.path / "session.json").read_text()
    assert (s.path / "session.json.bak").read_text() == good
    (s.path / "session.json").write_text('{"attempts": [1]}')
    assert main(["repair", "--session", str(s.path)]) == 0
    assert "restored from session.json.bak" in capsys.readouterr().out
    repaired = sessions.open_session(s.path)
    assert (repaired.base_model, [(a.name, a.status, a.steps_done) for a in repaired.attempts]) == ("some/model", [("attempt-1", "finished", 40)])
    assert (s.path / "session.json.damaged").read_text() == '{"attempts": [1]}'
    assert main(["repair", "--session", str(s.path)]) == 0 and "fine; nothing was changed" in capsys.readouterr().out


def test_repair_rebuilds_from_the_folders_when_there_is_no_backup(tmp_path):
    s = sessions.create_session(tmp_path / "me")
    for name, steps in (("attempt-1", None), ("attempt-2", 500)):
        sessions.add_attempt(s, name)
        folder = s.attempt_dir(name)
        (folder / "config.json").write_text(json.dumps({"text_encoder_steps": 350, "unet_steps": 1500}))
        if steps is None:
            (folder / "final").mkdir()
        else:
            (folder / "checkpoints" / f"step-{steps:06d}").mkdir(parents=True)
    for name in ("session.json", "session.json.bak"):
        (s.path / name).write_text("garbage")
    session, how = sessions.repair_session(s.path)
    assert "rebuilt from the folders on disk (2 attempt(s))" == how
    assert [(a.name, a.status, a.steps_done) for a in sessions.open_session(s.path).attempts] == [
        ("attempt-1", "finished", 1850), ("attempt-2", "interrupted", 500)]


# --- the writers' lock -----------------------------------------------------------------------------------

def _hold_lock_in_another_process(path, seconds=60):
    import subprocess
    import sys
    import time

    code = (f"import time; from dreamnb.session import session_lock\n"
            f"with session_lock({str(path)!r}, 'training'):\n    print('held', flush=True); time.sleep({seconds})")
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    time.sleep(0.1)
    return holder


def test_a_second_writer_is_refused_while_the_first_holds_the_lock(tmp_path, capsys):
    from dreamnb.cli import main

    s = sessions.create_session(tmp_path / "me")
    holder = _hold_lock_in_another_process(s.path)
    try:
        with pytest.raises(sessions.SessionLockedError, match=rf"being changed by training on .* \(process {holder.pid}\) since "):
            with sessions.session_lock(s.path, "an export"):
                pass
        (tmp_path / "photos").mkdir()
        assert main(["prepare", str(tmp_path / "photos"), "--session", str(s.path)]) == 2
        assert "being changed by training" in capsys.readouterr().err
        assert sessions.open_session(s.path).attempts == []  # a reader needs no lock
    finally:
        holder.kill()
        holder.wait()
    with sessions.session_lock(s.path, "an export"):  # its process is gone: the lock is taken over
        assert json.loads((s.path / ".lock").read_text())["what"] == "an export"
    assert not (s.path / ".lock").exists()


def test_a_lock_without_a_heartbeat_is_taken_over_and_one_with_a_heartbeat_is_not(tmp_path, caplog, monkeypatch):
    import os
    import time

    s = sessions.create_session(tmp_path / "me")
    lock = s.path / ".lock"
    lock.write_text(json.dumps({"host": "a-dead-colab-runtime", "pid": 123, "what": "training", "since": "2026-11-29T10:00:00+00:00"}))
    with pytest.raises(sessions.SessionLockedError, match="a-dead-colab-runtime"):
        with sessions.session_lock(s.path, "training"):
            pass
    old = time.time() - sessions.STALE_AFTER_S - 5
    os.utime(lock, (old, old))
    with sessions.session_lock(s.path, "training"):
        with sessions.session_lock(s.path, "an export"):  # the same process may write inside its own lock
            pass
        assert lock.exists()
    assert "Taking over the lock" in caplog.text and "a-dead-colab-runtime" in caplog.text
    assert not lock.exists()
    # while held, the heartbeat renews the lock
    monkeypatch.setattr(sessions, "HEARTBEAT_S", 0.05)
    with sessions.session_lock(s.path, "training"):
        os.utime(lock, (old, old))
        time.sleep(0.3)
        assert time.time() - lock.stat().st_mtime < 5


def test_a_writer_finishes_what_an_interrupted_write_left(tmp_path):
    """A kill during a checkpoint leaves a hidden .tmp folder (gigabytes on Drive), or, between the two renames of a
    folder's replacement, only the old folder under its hidden name: the next writer removes the one, restores the other."""
    s = sessions.create_session(tmp_path / "me")
    checkpoints = s.attempt_dir("attempt-1") / "checkpoints"
    (checkpoints / ".step-000004.abc123.tmp").mkdir(parents=True)
    (checkpoints / ".step-000004.abc123.tmp" / "weights.safetensors").write_bytes(b"half")
    (checkpoints / ".step-000002.old").mkdir()
    (checkpoints / ".step-000002.old" / "state.json").write_text("{}")
    (checkpoints / "step-000001").mkdir()
    (checkpoints / ".step-000001.old").mkdir()  # its replacement arrived: the old one goes
    (s.path / ".session.json.xyz.tmp").write_text("{")
    (s.path / "grids").mkdir()
    (s.path / "grids" / ".grid.png.q.tmp").write_bytes(b"")  # a reader's write in progress: not a writer's to touch
    with sessions.session_lock(s.path, "training"):
        pass
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-000001", "step-000002"]
    assert (checkpoints / "step-000002" / "state.json").is_file()
    assert not (s.path / ".session.json.xyz.tmp").exists() and (s.path / "grids" / ".grid.png.q.tmp").exists()
