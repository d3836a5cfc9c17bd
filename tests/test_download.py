"""Base models from a link, against a local HTTP server: complete, cut and continued, damaged, web pages, refusals."""
import hashlib
import json
import logging
import random
import re
import socket
import threading
from types import SimpleNamespace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

import pytest
import torch

from dreamnb import download
from dreamnb.download import PART, VALIDATOR, direct_url, download_model, drive_confirm_url, shown_url
from dreamnb.fileio import describe_size
from dreamnb.models import ModelError, load_base_model, source_kind

PAYLOAD = random.Random(0).randbytes(3 * 2**20 + 123)  # more than one 1 MB chunk
SECRET = "civitai-secret-0123456789"


class _Handler(BaseHTTPRequestHandler):
    """Serves `server.routes[path]`: body, status, headers, an ETag, and a few ways to misbehave. A Range request is
    answered 206 unless its If-Range names another version of the file (then 200 and the whole file, as RFC 9110 says)."""

    def do_GET(self):
        self.server.seen.append((self.path, dict(self.headers)))
        route = self.server.routes.get(urlsplit(self.path).path)
        if route is None:
            self.send_error(404)
            return
        body, status, start = route.get("body", b""), route.get("status", 200), 0
        headers = {**route.get("headers", {}), **({"ETag": route["etag"]} if "etag" in route else {})}
        asked = re.match(r"bytes=(\d+)-", self.headers.get("Range", ""))
        same = self.headers.get("If-Range") in (None, headers.get("ETag"), headers.get("Last-Modified"))
        if status == 200 and asked and same and not route.get("ignore_range"):
            status, start = 206, int(asked.group(1))
        self.server.statuses.append(status)
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        if not route.get("no_length"):  # else HTTP/1.0: the body ends when the connection closes
            self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        cut = route.pop("cut_at", None)  # only the first time: then the connection closes early
        self.wfile.write(body[start:] if cut is None else body[start:start + cut])

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.routes, httpd.seen, httpd.statuses = {}, [], []
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(autouse=True)
def clean_env(monkeypatch, tmp_path):
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "CIVITAI_TOKEN", "CIVITAI_API_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("DREAMNB_MODEL_CACHE", str(tmp_path / "cache"))


def link(server, path):
    return f"http://127.0.0.1:{server.server_port}{path}"


def cached_files(tmp_path):
    return sorted(p.name for p in (tmp_path / "cache").rglob("*") if p.is_file())


def as_civitai(monkeypatch, server):
    """Treat the local server as civitai (its token and its hash API), so the civitai paths run offline."""
    monkeypatch.setattr(download, "CIVITAI_HOSTS", ("127.0.0.1",))
    monkeypatch.setattr(download, "CIVITAI_API", link(server, "/api/v1"))


def test_complete_download_has_the_right_bytes(server, tmp_path):
    server.routes["/files/model.safetensors"] = {"body": PAYLOAD}
    path = download_model(link(server, "/files/model.safetensors"), progress=False)
    assert path.name == "model.safetensors" and path.read_bytes() == PAYLOAD
    assert cached_files(tmp_path) == ["model.safetensors"]  # no .part or temporary file left


@pytest.mark.parametrize("validator, sent", [
    ({"etag": '"v1"'}, '"v1"'),
    ({"headers": {"ETag": 'W/"weak"', "Last-Modified": "Tue, 01 Dec 2026 10:00:00 GMT"}}, "Tue, 01 Dec 2026 10:00:00 GMT"),
])
def test_a_cut_download_is_continued_by_the_next_call_when_the_server_confirms_the_same_file(server, tmp_path, validator, sent):
    digest = hashlib.sha256(PAYLOAD).hexdigest()
    half = len(PAYLOAD) // 2
    server.routes["/m.safetensors"] = {"body": PAYLOAD, "cut_at": half, **validator}
    server.routes["/m.safetensors"].setdefault("headers", {})["X-Linked-Etag"] = f'"{digest}"'
    with pytest.raises(ModelError, match=r"was cut off after 1\.6 MB of 3\.1 MB; run the same command again to continue where it stopped\.$"):
        download_model(link(server, "/m.safetensors"), retries=0, progress=False)
    assert cached_files(tmp_path) == [VALIDATOR, PART]  # the part, and the validator (a weak ETag is not one) to continue it
    kept = next((tmp_path / "cache").rglob(PART)).stat().st_size
    assert half - 2**16 < kept <= half  # all but the chunk being read when the connection broke

    path = download_model(link(server, "/m.safetensors"), retries=0, progress=False)
    assert server.seen[-1][1].get("Range") == f"bytes={kept}-" and server.seen[-1][1].get("If-Range") == sent
    assert server.statuses[-1] == 206
    assert path.read_bytes() == PAYLOAD  # and the SHA-256 over both halves matched the one announced
    assert cached_files(tmp_path) == ["m.safetensors"]  # the validator went with the part


def test_a_cut_download_is_continued_within_the_same_call(server):
    server.routes["/m.safetensors"] = {"body": PAYLOAD, "cut_at": 200_000, "etag": '"v1"'}
    path = download_model(link(server, "/m.safetensors"), progress=False)
    assert [headers.get("Range") for _, headers in server.seen] == [None, "bytes=196608-"]  # 3 whole 64 KB chunks
    assert server.seen[-1][1].get("If-Range") == '"v1"' and server.statuses == [200, 206]
    assert path.read_bytes() == PAYLOAD


def test_a_server_that_ignores_range_gives_the_whole_file_again(server):
    server.routes["/m.safetensors"] = {"body": PAYLOAD, "cut_at": 200_000, "ignore_range": True, "etag": '"v1"'}
    path = download_model(link(server, "/m.safetensors"), progress=False)
    assert server.seen[-1][1].get("Range") == "bytes=196608-"
    assert path.read_bytes() == PAYLOAD  # started again, not appended


def test_a_file_changed_on_the_server_is_downloaded_anew_not_spliced(server, tmp_path):
    new = random.Random(1).randbytes(len(PAYLOAD))
    server.routes["/m.safetensors"] = {"body": PAYLOAD, "cut_at": len(PAYLOAD) // 2, "etag": '"v1"'}
    with pytest.raises(ModelError, match="run the same command again to continue where it stopped"):
        download_model(link(server, "/m.safetensors"), retries=0, progress=False)
    server.routes["/m.safetensors"] = {"body": new, "etag": '"v2"'}  # a new version under the same link
    path = download_model(link(server, "/m.safetensors"), retries=0, progress=False)
    assert server.seen[-1][1].get("If-Range") == '"v1"' and server.statuses[-1] == 200  # the server said: not that file
    assert path.read_bytes() == new
    assert cached_files(tmp_path) == ["m.safetensors"]


def test_without_a_validator_a_cut_download_starts_over(server, tmp_path):
    server.routes["/m.safetensors"] = {"body": PAYLOAD, "cut_at": len(PAYLOAD) // 2}  # no ETag, no Last-Modified
    with pytest.raises(ModelError, match=r"run the same command again to download it anew \(this server cannot continue it\)\.$"):
        download_model(link(server, "/m.safetensors"), retries=0, progress=False)
    assert cached_files(tmp_path) == []  # a part that cannot be continued safely is not kept
    path = download_model(link(server, "/m.safetensors"), retries=0, progress=False)
    assert "Range" not in server.seen[-1][1] and path.read_bytes() == PAYLOAD


@pytest.mark.parametrize("headers, problem", [
    ({"X-Linked-Size": str(len(PAYLOAD) + 1)}, rf"{len(PAYLOAD)} bytes instead of the {len(PAYLOAD) + 1} the site lists"),
    ({"X-Linked-Etag": '"' + "0" * 64 + '"'}, "its SHA-256 is not the one the site gives"),
])
def test_a_wrong_size_or_hash_is_refused_and_the_file_removed(server, tmp_path, headers, problem):
    server.routes["/m.safetensors"] = {"body": PAYLOAD, "headers": headers}
    with pytest.raises(ModelError, match=rf"was damaged \({problem}\) and was removed; run it again to download it anew\.$"):
        download_model(link(server, "/m.safetensors"), progress=False)
    assert cached_files(tmp_path) == []


def test_a_hash_given_by_the_caller_is_checked(server, tmp_path):
    server.routes["/m.safetensors"] = {"body": PAYLOAD}
    with pytest.raises(ModelError, match="was damaged"):
        download_model(link(server, "/m.safetensors"), sha256="ab" * 32, progress=False)
    assert cached_files(tmp_path) == []
    path = download_model(link(server, "/m.safetensors"), sha256=hashlib.sha256(PAYLOAD).hexdigest().upper(), progress=False)
    assert path.read_bytes() == PAYLOAD


@pytest.mark.parametrize("content_type", ["text/html; charset=utf-8", "application/octet-stream"])
def test_a_web_page_is_refused_with_one_sentence(server, tmp_path, content_type):
    page = b"\n  <!DOCTYPE html><html><head><title>DreamShaper</title></head><body>...</body></html>"
    server.routes["/models/4384/dreamshaper"] = {"body": page, "headers": {"Content-Type": content_type}}
    with pytest.raises(ModelError) as err:
        download_model(link(server, "/models/4384/dreamshaper"), progress=False)
    assert str(err.value) == (f"{link(server, '/models/4384/dreamshaper')} is a web page, not a model file; give the file's download link "
                              "(on civitai, the link of the Download button: https://civitai.com/api/download/models/…).")
    assert cached_files(tmp_path) == []


def test_a_civitai_page_is_refused_before_any_download_and_a_version_page_converted():
    with pytest.raises(ModelError, match="is a civitai page, not a download link; on that page copy the link of the Download button"):
        download_model("https://civitai.com/models/4384/dreamshaper", progress=False)
    assert direct_url("https://civitai.com/models/4384/dreamshaper?modelVersionId=128713") == "https://civitai.com/api/download/models/128713"


def test_a_403_asks_for_a_token_without_ever_showing_it(server, monkeypatch, caplog, capsys):
    as_civitai(monkeypatch, server)
    monkeypatch.setenv("CIVITAI_TOKEN", SECRET)
    server.routes["/api/download/models/12345"] = {"status": 403, "body": b'{"error": "Unauthorized"}'}
    caplog.set_level(logging.DEBUG)
    with pytest.raises(ModelError, match=r"refused .* with your CIVITAI_TOKEN \(HTTP 403\)") as err:
        download_model(link(server, f"/api/download/models/12345?type=Model&token={SECRET}2"), progress=False)
    path, headers = server.seen[-1]
    assert headers.get("Authorization") == f"Bearer {SECRET}2"  # the link's own token, in the header only...
    assert SECRET not in path  # ...and not in the URL
    texts = [str(err.value), repr(err.value), caplog.text, *capsys.readouterr()]
    cause = err.value
    while cause is not None:
        texts.append(repr(cause))
        cause = cause.__cause__ or cause.__context__
    assert all(SECRET not in text for text in texts)
    assert "type=Model" in str(err.value)


def test_a_403_without_a_token_says_how_to_give_one(server, monkeypatch):
    as_civitai(monkeypatch, server)
    server.routes["/api/download/models/1"] = {"status": 401}
    with pytest.raises(ModelError, match=r"civitai needs an API key .* set it as CIVITAI_TOKEN \(an environment variable, or a Colab secret\)"):
        download_model(link(server, "/api/download/models/1"), progress=False)
    assert "Authorization" not in server.seen[-1][1]


def test_tokens_go_only_to_their_own_site(server, monkeypatch):
    monkeypatch.setenv("CIVITAI_TOKEN", SECRET)
    monkeypatch.setenv("HF_TOKEN", SECRET)
    server.routes["/m.safetensors"] = {"body": PAYLOAD}
    download_model(link(server, "/m.safetensors"), progress=False)
    assert "Authorization" not in server.seen[-1][1]


@pytest.mark.parametrize("right", [True, False])
def test_civitai_hash_from_its_api_is_checked(server, monkeypatch, tmp_path, right):
    as_civitai(monkeypatch, server)
    monkeypatch.setenv("CIVITAI_TOKEN", SECRET)
    sha = hashlib.sha256(PAYLOAD).hexdigest().upper() if right else "12" * 32
    files = [{"name": "other.safetensors", "hashes": {"SHA256": "34" * 32}}, {"name": "dream_8.safetensors", "hashes": {"SHA256": sha}}]
    server.routes["/api/v1/model-versions/128713"] = {"body": json.dumps({"files": files}).encode(), "headers": {"Content-Type": "application/json"}}
    server.routes["/api/download/models/128713"] = {"body": PAYLOAD, "headers": {"Content-Disposition": 'attachment; filename="dream_8.safetensors"'}}
    if right:
        assert download_model(link(server, "/api/download/models/128713"), progress=False).read_bytes() == PAYLOAD
    else:
        with pytest.raises(ModelError, match="SHA-256 is not the one the site gives"):
            download_model(link(server, "/api/download/models/128713"), progress=False)
        assert cached_files(tmp_path) == []
    assert any(path == "/api/v1/model-versions/128713" and h.get("Authorization") == f"Bearer {SECRET}" for path, h in server.seen)


@pytest.mark.parametrize("right", [True, False])
def test_a_redirect_to_a_cdn_drops_the_token_and_the_first_answers_hash_is_checked(server, monkeypatch, tmp_path, right):
    as_civitai(monkeypatch, server)  # 127.0.0.1 is "civitai"; localhost, another host name, is its CDN
    monkeypatch.setenv("CIVITAI_TOKEN", SECRET)
    sha = hashlib.sha256(PAYLOAD).hexdigest() if right else "56" * 32
    cdn = f"http://localhost:{server.server_port}/cdn/m.safetensors?X-Amz-Signature=abc"
    server.routes["/api/download/models/7"] = {"status": 302, "headers": {"Location": cdn, "X-Linked-Etag": f'"{sha}"'}}
    server.routes["/cdn/m.safetensors"] = {"body": PAYLOAD}
    if right:
        assert download_model(link(server, "/api/download/models/7"), progress=False).read_bytes() == PAYLOAD
    else:
        with pytest.raises(ModelError, match="SHA-256 is not the one the site gives"):
            download_model(link(server, "/api/download/models/7"), progress=False)
        assert cached_files(tmp_path) == []
    (first, first_headers), (second, second_headers) = server.seen[:2]
    assert first_headers.get("Authorization") == f"Bearer {SECRET}" and second.startswith("/cdn/")
    assert "Authorization" not in second_headers


@pytest.mark.parametrize("disposition, name", [
    ('attachment; filename="dreamshaper_8.safetensors"', "dreamshaper_8.safetensors"),
    ("attachment; filename*=UTF-8''r%C3%AAve.safetensors", "rêve.safetensors"),
    ('attachment; filename="../../evil.ckpt"', "evil.ckpt"),
    (None, "12345.ckpt"),  # no name anywhere: the link's last part, with a suffix guessed from the bytes
])
def test_the_file_is_named_from_content_disposition_or_the_link(server, tmp_path, disposition, name):
    headers = {"Content-Disposition": disposition} if disposition else {}
    server.routes["/api/download/models/12345"] = {"body": PAYLOAD, "headers": headers}
    path = download_model(link(server, "/api/download/models/12345"), progress=False)
    assert path.name == name and path.parent.parent == tmp_path / "cache"


def test_a_second_call_finds_the_file_in_the_cache(server):
    server.routes["/m.safetensors"] = {"body": PAYLOAD}
    first = download_model(link(server, "/m.safetensors"), progress=False)
    server.routes.clear()  # a second download would now fail with 404
    second = download_model(link(server, "/m.safetensors?token=abc"), progress=False)  # secrets are not part of the key
    assert second == first and len(server.seen) == 1


def test_drive_share_links_become_direct_downloads():
    direct = "https://drive.usercontent.google.com/download?id=1AbC-d_E&export=download&confirm=t"
    assert direct_url("https://drive.google.com/file/d/1AbC-d_E/view?usp=sharing") == direct
    assert direct_url("https://drive.google.com/open?id=1AbC-d_E") == direct
    assert direct_url("https://drive.google.com/uc?export=download&id=1AbC-d_E") == direct
    assert direct_url("https://huggingface.co/a/b/blob/main/m.safetensors") == "https://huggingface.co/a/b/resolve/main/m.safetensors"
    assert direct_url("https://example.com/m.safetensors") == "https://example.com/m.safetensors"
    with pytest.raises(ModelError, match="is a Google Drive folder; give the share link of the model file itself"):
        download_model("https://drive.google.com/drive/folders/1XyZ", progress=False)


def test_drive_virus_scan_page_gives_the_confirm_link():
    page = """<!DOCTYPE html><html><body><p>Google Drive can't scan this file for viruses.</p>
    <form id="download-form" action="https://drive.usercontent.google.com/download" method="get">
    <input type="submit" id="uc-download-link" value="Download anyway"/>
    <input type="hidden" name="id" value="1AbC-d_E"><input type="hidden" name="export" value="download">
    <input type="hidden" name="confirm" value="t"><input type="hidden" name="uuid" value="5f0e&amp;x"></form></body></html>"""
    assert drive_confirm_url(page) == "https://drive.usercontent.google.com/download?id=1AbC-d_E&export=download&confirm=t&uuid=5f0e%26x"
    assert drive_confirm_url("<html><body>Quota exceeded</body></html>") is None


def test_shown_links_hold_no_secret():
    shown = shown_url("https://user:pw@example.com/m.safetensors?token=T&X-Amz-Signature=S&api_key=K&type=Model")
    assert shown == "https://example.com/m.safetensors?type=Model"


def test_plain_http_is_refused_except_on_this_machine():
    with pytest.raises(ModelError, match="is a plain http link, which anyone on the way could change; give its https link"):
        download_model("http://example.com/m.safetensors", progress=False)


def test_404_and_no_network(server):
    with pytest.raises(ModelError, match=r"There is no file at .*/missing\.safetensors \(HTTP 404\); check the link\."):
        download_model(link(server, "/missing.safetensors"), progress=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed_port = s.getsockname()[1]  # nothing listens there once the socket is closed
    with pytest.raises(ModelError, match="Cannot connect to 127.0.0.1 to download .*; check the internet connection and try again"):
        download_model(f"http://127.0.0.1:{closed_port}/m.safetensors", progress=False)


def test_not_enough_disk_space_is_said_before_downloading(server, monkeypatch, tmp_path):
    server.routes["/m.safetensors"] = {"body": PAYLOAD}
    monkeypatch.setattr(download.shutil, "disk_usage", lambda _: SimpleNamespace(free=1000))
    needed = describe_size(len(PAYLOAD) + download._SPARE)
    with pytest.raises(ModelError, match=rf"needs {needed} of free space \(the file and 1\.0 GB to spare\) but only 1\.0 KB is free in .*; "
                                         "free some space, or set DREAMNB_MODEL_CACHE to a folder on a bigger disk\.$"):
        download_model(link(server, "/m.safetensors"), progress=False)
    assert cached_files(tmp_path) == []


def filling_disk(monkeypatch, tmp_path, after=2**20):
    """Free space that runs out (1000 bytes) once `after` bytes of the part arrived: something else filled the disk."""
    looks = []

    def disk_usage(folder):
        part = tmp_path / "cache" / folder.name / PART
        arrived = part.stat().st_size if part.exists() else 0
        looks.append(arrived)
        return SimpleNamespace(free=1000 if arrived >= after else 10**12)

    monkeypatch.setattr(download.shutil, "disk_usage", disk_usage)
    return looks


def test_a_disk_filling_up_stops_a_download_of_unknown_size_and_removes_what_cannot_be_continued(server, monkeypatch, tmp_path):
    server.routes["/m.safetensors"] = {"body": PAYLOAD, "no_length": True}
    looks = filling_disk(monkeypatch, tmp_path)
    with pytest.raises(ModelError) as err:
        download_model(link(server, "/m.safetensors"), progress=False)
    assert re.fullmatch(r"The disk of .* is almost full \(1\.0 KB free\) after 1\.[0-9] MB of http://127\.0\.0\.1:\d+/m\.safetensors, "
                        r"so the download stopped and was removed \(this server cannot continue it\); free some space, "
                        r"or set DREAMNB_MODEL_CACHE to a folder on a bigger disk, and run it again\.", str(err.value))
    assert looks[0] == 0 and looks[-1] >= 2**20  # the look before the download passed; one as the bytes came stopped it
    assert cached_files(tmp_path) == []  # the part is removed, and nothing else was written


def test_a_disk_filling_up_keeps_a_part_that_can_be_continued(server, monkeypatch, tmp_path):
    server.routes["/m.safetensors"] = {"body": PAYLOAD, "etag": '"v1"'}
    filling_disk(monkeypatch, tmp_path)
    rest = describe_size(len(PAYLOAD) - 2**20 + download._SPARE)  # the first look during the download: after 1 MiB
    with pytest.raises(ModelError, match=rf"so the download stopped and what arrived is kept; free at least {rest} "
                                         "and run the same command again to continue it\.$"):
        download_model(link(server, "/m.safetensors"), progress=False)
    assert cached_files(tmp_path) == [VALIDATOR, PART]
    monkeypatch.setattr(download.shutil, "disk_usage", lambda _: SimpleNamespace(free=10**12))  # space was freed
    path = download_model(link(server, "/m.safetensors"), progress=False)
    assert server.seen[-1][1].get("Range") == f"bytes={2**20}-" and server.statuses[-1] == 206
    assert path.read_bytes() == PAYLOAD


def test_a_file_bigger_than_the_cap_is_refused_before_downloading(server, monkeypatch, tmp_path):
    server.routes["/m.safetensors"] = {"body": PAYLOAD}
    message = (r"is 3\.1 MB, more than 1\.0 MB, the largest model file accepted; if it really is the model you want, "
               r"set DREAMNB_MAX_DOWNLOAD_GB to its size in GB \(or pass max_size= to download_model\) and run it again\.$")
    with pytest.raises(ModelError, match=message):
        download_model(link(server, "/m.safetensors"), max_size=10**6, progress=False)
    monkeypatch.setenv("DREAMNB_MAX_DOWNLOAD_GB", "0.001")
    with pytest.raises(ModelError, match=message):
        download_model(link(server, "/m.safetensors"), progress=False)
    assert cached_files(tmp_path) == []
    assert download_model(link(server, "/m.safetensors"), max_size=len(PAYLOAD), progress=False).read_bytes() == PAYLOAD


def test_a_file_of_unknown_size_is_stopped_at_the_cap(server, tmp_path):
    server.routes["/m.safetensors"] = {"body": PAYLOAD, "no_length": True, "etag": '"v1"'}
    with pytest.raises(ModelError, match=r"was stopped and removed after 2\.0 MB, the largest model file accepted; .* set DREAMNB_MAX_DOWNLOAD_GB"):
        download_model(link(server, "/m.safetensors"), max_size=2 * 10**6, progress=False)
    assert cached_files(tmp_path) == []  # never kept, though it could be continued: it is too big


HUB_LINK = "https://huggingface.co/some-org/some-model/blob/v1.0/vae/diffusion_pytorch_model.safetensors?download=true"


def fake_hub(monkeypatch, tmp_path, size=len(PAYLOAD), fail=None, blob_name=hashlib.sha256(PAYLOAD).hexdigest()):
    """hf_hub_download recorded instead of run; any other request would fail (no network here)."""
    import huggingface_hub

    calls = []

    def hf_hub_download(repo_id, filename, **kwargs):
        calls.append((repo_id, filename, kwargs))
        if fail is not None:
            raise fail
        if kwargs.get("dry_run"):
            return SimpleNamespace(will_download=True, file_size=size, is_cached=False)
        blob = tmp_path / "blobs" / blob_name  # as the Hub's cache keeps it: a link to the blob named by its ETag
        blob.parent.mkdir(exist_ok=True)
        blob.write_bytes(PAYLOAD)
        (tmp_path / "hub-file.safetensors").symlink_to(blob)
        return str(tmp_path / "hub-file.safetensors")

    def no_request(*args, **kwargs):
        raise AssertionError("a Hub link was fetched by hand")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
    monkeypatch.setattr(download.requests, "get", no_request)
    return calls


def test_a_hub_link_goes_to_hf_hub_download(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("HF_TOKEN", SECRET)
    calls = fake_hub(monkeypatch, tmp_path)
    caplog.set_level(logging.DEBUG)
    path = download_model(HUB_LINK, progress=False)
    assert path == tmp_path / "hub-file.safetensors"
    where = {"revision": "v1.0", "repo_type": None, "cache_dir": tmp_path / "cache" / "huggingface", "token": SECRET}
    assert calls == [("some-org/some-model", "vae/diffusion_pytorch_model.safetensors", {**where, "dry_run": True}),
                     ("some-org/some-model", "vae/diffusion_pytorch_model.safetensors", where)]
    assert SECRET not in caplog.text
    assert download.hub_file("https://hf.co/datasets/me/data/resolve/refs%2Fpr%2F2/m.ckpt") == download.HubFile(
        "me/data", "m.ckpt", "refs/pr/2", "dataset")
    assert download.hub_file("https://huggingface.co/some-org/some-model") is None  # a page: fetched, and refused as one


@pytest.mark.parametrize("blob_name, sha256", [("ab" * 32, None), ("0123456789abcdef0123456789abcdef01234567", "cd" * 32)])
def test_a_hub_file_with_another_sha256_is_refused_and_removed(monkeypatch, tmp_path, blob_name, sha256):
    fake_hub(monkeypatch, tmp_path, blob_name=blob_name)  # an LFS blob's name is its SHA-256; a git file's is not one
    with pytest.raises(ModelError, match=r"was damaged \(its SHA-256 is not the one the site gives\) and was removed; run it again"):
        download_model(HUB_LINK, sha256=sha256, progress=False)
    assert not (tmp_path / "hub-file.safetensors").is_symlink() and not (tmp_path / "blobs" / blob_name).exists()


def test_a_hub_file_bigger_than_the_cap_is_refused_before_downloading(monkeypatch, tmp_path):
    calls = fake_hub(monkeypatch, tmp_path, size=50 * 10**9)
    with pytest.raises(ModelError, match=r"is 50\.0 GB, more than 40\.0 GB, the largest model file accepted; .*DREAMNB_MAX_DOWNLOAD_GB"):
        download_model(HUB_LINK, progress=False)
    assert [kwargs.get("dry_run") for _, _, kwargs in calls] == [True]  # only asked, never downloaded


def test_a_hub_failure_is_one_sentence(monkeypatch, tmp_path):
    from huggingface_hub.errors import LocalEntryNotFoundError

    fake_hub(monkeypatch, tmp_path, fail=LocalEntryNotFoundError("offline"))
    with pytest.raises(ModelError) as err:
        download_model(HUB_LINK, progress=False)
    assert str(err.value) == ("Cannot connect to the Hugging Face Hub to download https://huggingface.co/some-org/some-model/resolve/v1.0/"
                              "vae/diffusion_pytorch_model.safetensors?download=true, and it is not in the cache; check the internet connection and try again.")
    assert err.value.__cause__ is None and err.value.__suppress_context__


def test_load_base_model_from_a_link(server, tiny_sd1, base_sd1):
    server.routes["/tiny.safetensors"] = {"body": tiny_sd1.single_file.read_bytes()}
    url = link(server, "/tiny.safetensors?token=abc")
    assert source_kind(url) == "url"
    model = load_base_model(url, config=tiny_sd1.folder)
    assert (model.info.source_kind, model.info.family) == ("url", "sd1")
    assert model.info.source == link(server, "/tiny.safetensors")  # what the session saves: no token
    base, loaded = base_sd1.unet.state_dict(), model.unet.state_dict()
    assert base.keys() == loaded.keys() and all(torch.equal(base[k], loaded[k].to(base[k].dtype)) for k in base)
