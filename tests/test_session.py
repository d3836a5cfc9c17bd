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
