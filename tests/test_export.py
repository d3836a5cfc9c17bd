"""Exports as their users' own tools read them: diffusers' from_pretrained, from_single_file and
load_lora_weights; and a Hub upload against a local stand-in for the Hub API (no network)."""
from __future__ import annotations

import base64
import copy
import json
import logging
import re
import tempfile
import threading
import traceback
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load as safetensors_load, load_file

from conftest import subject_photo
from test_train import quick_config

from dreamnb import __version__
from dreamnb.attempts import attempt_pipeline
from dreamnb.export import ExportError, export_attempt, model_card, push_to_hub
from dreamnb.session import create_session
from dreamnb.train import train

RANK = 4


@pytest.fixture(scope="module")
def trained(tmp_path_factory, base_sd1):
    """One session with a full attempt and a LoRA attempt, both training the text encoder too (trained once)."""
    session = create_session(tmp_path_factory.mktemp("export") / "session", base_model=base_sd1.info.source)
    for i in range(4):
        subject_photo(i).save(session.instance_dir / f"photo-{i}.png")
    # a few steps are enough: the tests compare exports with the attempt, not with a good model
    full = train(session, quick_config(unet_steps=2, text_encoder_steps=1), base_sd1, progress=False).attempt
    # alpha == rank: the attempt's own LoRA file stores no alpha, so its loader assumes alpha == rank;
    # a high learning rate so that a few steps move the zero-initialised up weights visibly
    lora = train(session, quick_config(method="lora", unet_steps=3, text_encoder_steps=2, unet_lr=1e-2, text_encoder_lr=1e-2,
                                       lora_rank=RANK, lora_alpha=RANK), base_sd1, progress=False).attempt
    return session, full, lora


def plain_state(model) -> dict[str, torch.Tensor]:
    """A model's weights under the base model's key names: a fused peft layer's base_layer holds the merged weight."""
    return {k.replace(".base_layer.", "."): v for k, v in model.state_dict().items() if "lora_" not in k}


def assert_same_weights(actual: dict, expected: dict, *, round_to=None) -> None:
    assert actual.keys() == expected.keys()
    for key, value in expected.items():
        value = value.to(round_to).float() if round_to is not None else value
        assert torch.equal(actual[key].float(), value.float()), key


def generate(pipe):
    """Latents after two denoising steps: the text encoder and UNet at work, without the (unchanged) VAE's cost."""
    return pipe("photo of zwx thing", num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="latent").images


# ------------------------------------------------------------------------- diffusers folder

def test_diffusers_folder_loads_with_from_pretrained_with_the_attempts_weights(trained, base_sd1, tmp_path):
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    session, full, _ = trained
    out = export_attempt(session, base_sd1, full, "diffusers", tmp_path / "model")
    assert out == tmp_path / "model"
    assert not list(out.rglob("*.bin")) and list(out.rglob("*.safetensors"))
    pipe = StableDiffusionPipeline.from_pretrained(out, local_files_only=True)
    final = session.attempt_dir(full) / "final"
    assert_same_weights(pipe.unet.state_dict(), UNet2DConditionModel.from_pretrained(final / "unet").state_dict())
    assert_same_weights(pipe.text_encoder.state_dict(), CLIPTextModel.from_pretrained(final / "text_encoder").state_dict())
    assert_same_weights(pipe.vae.state_dict(), base_sd1.vae.state_dict())
    # ...and those are trained weights, not the base model's
    assert not torch.equal(pipe.unet.conv_in.weight, base_sd1.unet.conv_in.weight)
    assert not torch.equal(pipe.text_encoder.get_input_embeddings().weight, base_sd1.text_encoder.get_input_embeddings().weight)


def test_diffusers_folder_of_a_lora_attempt_holds_the_fused_weights_and_no_lora_layers(trained, base_sd1, tmp_path):
    from diffusers import StableDiffusionPipeline

    session, _, lora = trained
    pipe = StableDiffusionPipeline.from_pretrained(export_attempt(session, base_sd1, lora, "diffusers", tmp_path / "m"))
    unet = pipe.unet.state_dict()
    assert unet.keys() == base_sd1.unet.state_dict().keys()  # no lora_A / base_layer keys
    # merged by hand from the attempt's own LoRA file: W + (alpha / rank) * up @ down, with alpha == rank
    adapters = load_file(str(session.attempt_dir(lora) / "final" / "pytorch_lora_weights.safetensors"))
    module = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    merged = base_sd1.unet.state_dict()[f"{module}.weight"] + adapters[f"unet.{module}.lora.up.weight"] @ adapters[f"unet.{module}.lora.down.weight"]
    assert not torch.equal(merged, base_sd1.unet.state_dict()[f"{module}.weight"])
    torch.testing.assert_close(unet[f"{module}.weight"], merged, rtol=0, atol=1e-6)
    assert_same_weights(unet, plain_state(attempt_pipeline(base_sd1, session, lora).unet))
    assert_same_weights(pipe.text_encoder.state_dict(), plain_state(attempt_pipeline(base_sd1, session, lora).text_encoder))


# ------------------------------------------------------------------------- single file

def load_single_file(path, tiny_sd1):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_single_file(str(path), config=str(tiny_sd1.folder), local_files_only=True)


def test_single_file_fp32_of_a_lora_attempt_loads_back_to_exactly_its_fused_weights(trained, base_sd1, tiny_sd1, tmp_path):
    session, _, lora = trained
    out = export_attempt(session, base_sd1, lora, "safetensors", tmp_path / "lora-fused.safetensors", fp16=False)
    with safe_open(str(out), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys() if "position_ids" not in k} == {"F32"}
        assert any(k.startswith("model.diffusion_model.") for k in f.keys())
        assert not any("lora" in k for k in f.keys())
    loaded = load_single_file(out, tiny_sd1)
    expected = attempt_pipeline(base_sd1, session, lora)
    assert_same_weights(loaded.unet.state_dict(), plain_state(expected.unet))
    assert_same_weights(loaded.text_encoder.state_dict(), plain_state(expected.text_encoder))


def test_single_file_is_fp16_by_default_and_names_its_origin(trained, base_sd1, tiny_sd1, tmp_path):
    session, full, _ = trained
    out = export_attempt(session, base_sd1, full, "safetensors", tmp_path / "full.safetensors")
    with safe_open(str(out), "pt") as f:
        metadata = f.metadata()
        assert {f.get_slice(k).get_dtype() for k in f.keys() if f.get_slice(k).get_dtype().startswith("F")} == {"F16"}
    assert Path(base_sd1.info.source).name in metadata["base_model"]
    assert (metadata["token"], metadata["class_word"], metadata["dreamnb_version"]) == ("zwx", "thing", __version__)
    loaded = load_single_file(out, tiny_sd1)
    expected = attempt_pipeline(base_sd1, session, full)
    assert_same_weights(loaded.unet.state_dict(), expected.unet.state_dict(), round_to=torch.float16)
    assert_same_weights(loaded.text_encoder.state_dict(), expected.text_encoder.state_dict(), round_to=torch.float16)


# ------------------------------------------------------------------------- LoRA (kohya)

def test_lora_file_is_kohya_layout_and_load_lora_weights_matches_dreamnbs_own_sampling(trained, base_sd1, tmp_path):
    from diffusers import StableDiffusionPipeline

    session, _, lora = trained
    out = export_attempt(session, base_sd1, lora, "lora", tmp_path / "subject.safetensors")
    weights = load_file(str(out))
    assert all(k.startswith(("lora_unet_", "lora_te_")) for k in weights)
    assert all(k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha")) for k in weights)
    names = {k.split(".")[0] for k in weights}
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0" in names
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj" in names  # the names A1111 matches
    assert all(f"{n}.alpha" in weights and f"{n}.lora_up.weight" in weights for n in names)
    assert weights["lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight"].shape[0] == RANK

    components = dict(base_sd1.pipeline.components)
    components["unet"], components["text_encoder"] = copy.deepcopy(base_sd1.unet), copy.deepcopy(base_sd1.text_encoder)
    fresh = StableDiffusionPipeline(**components)
    fresh.set_progress_bar_config(disable=True)
    fresh.load_lora_weights(str(out))
    ours = attempt_pipeline(base_sd1, session, lora)
    ours.set_progress_bar_config(disable=True)
    images, expected = generate(fresh), generate(ours)
    assert (expected - generate(base_sd1.pipeline)).abs().max() > 1e-2  # the LoRA changes the result...
    assert (images - expected).abs().max() < 1e-4  # ...and the exported file changes it the same way


def test_lora_export_of_a_full_attempt_is_refused_with_what_to_do(trained, base_sd1, tmp_path):
    session, full, _ = trained
    with pytest.raises(ExportError, match="the 'lora' method"):
        export_attempt(session, base_sd1, full, "lora", tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()


@pytest.mark.parametrize("format, name, message", [
    ("ckpt", "x.ckpt", "Unknown export format"),
    ("safetensors", "model.ckpt", r"\.safetensors"),
    ("lora", "folder", r"\.safetensors"),
])
def test_bad_requests_fail_before_any_work(trained, base_sd1, tmp_path, format, name, message):
    session, _, lora = trained
    with pytest.raises(ExportError, match=message):
        export_attempt(session, base_sd1, lora, format, tmp_path / name)
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------- overwriting, atomicity

def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("format, name", [("lora", "subject.safetensors"), ("diffusers", "model")])
def test_overwriting_needs_force_and_nothing_is_written_outside_out(trained, base_sd1, tmp_path, format, name):
    session, _, lora = trained
    out = tmp_path / "exports" / name
    if format == "diffusers":
        out.mkdir(parents=True)  # an earlier diffusers export
        (out / "model_index.json").write_text("{}")
        (out / "old.txt").write_text("old")
    else:
        out.parent.mkdir()
        out.write_bytes(b"old")
    (tmp_path / "exports" / "neighbour.txt").write_text("keep me")
    before_session, before_exports = snapshot(session.path), snapshot(tmp_path / "exports")

    with pytest.raises(ExportError, match="exists; replace it"):
        export_attempt(session, base_sd1, lora, format, out)
    assert snapshot(tmp_path / "exports") == before_exports

    export_attempt(session, base_sd1, lora, format, out, force=True)
    after = snapshot(tmp_path / "exports")
    assert after["neighbour.txt"] == b"keep me"
    outside = {k for k in after if not (k == name or k.startswith(name + "/"))}
    assert outside == {"neighbour.txt"}  # no temporary or backup files left beside the export
    assert "old.txt" not in {Path(k).name for k in after} and after.get(name) != b"old"
    assert snapshot(session.path) == before_session


# ------------------------------------------------------------------------- model card

def front_matter(card: str) -> dict:
    import yaml

    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def test_model_card_has_front_matter_subject_settings_usage_and_grid(trained):
    session, _, lora = trained
    config = json.loads((session.attempt_dir(lora) / "config.json").read_text())
    card = model_card(session, lora, config, "stable-diffusion-v1-5/stable-diffusion-v1-5", "grid.png")
    meta, body = front_matter(card), card.split("---\n", 2)[2]
    assert meta["base_model"] == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert {"dreambooth", "stable-diffusion", "dreamnb"} <= set(meta["tags"])
    assert "`zwx`" in body and "`thing`" in body and "photo of zwx thing" in body
    assert f"| lora_rank | {RANK} |" in body and "| unet_steps | 3 |" in body
    assert "prior_loss_weight" not in body  # trained without prior preservation: its knobs are noise
    assert "from_pretrained(" in body and re.search(r"!\[[^\]]*\]\(grid\.png\)", body)


# ------------------------------------------------------------------------- Hub (local stand-in)

GOOD_TOKEN = "hf_GoodSecretToken1234567890abcdefXYZ"
BAD_TOKEN = "hf_RefusedSecretToken0987654321zyxwvQRS"


class FakeHub:
    """Just the Hub endpoints HfApi.create_repo + upload_folder use; every file is answered 'regular' at
    preupload, so its bytes arrive base64-encoded inside the commit's NDJSON (no LFS/Xet)."""

    def __init__(self):
        self.repos: dict[str, dict] = {}
        self.files: dict[str, bytes] = {}
        self.unknown: list[str] = []
        self.validated: list[str] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep the test output clean
                pass

            def reply(self, status, body):
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if self.headers.get("Authorization") != f"Bearer {GOOD_TOKEN}":
                    return self.reply(401, {"error": "Invalid credentials in Authorization header"})
                path = self.path.split("?")[0]
                if path == "/api/validate-yaml":  # upload_folder checks a README's front matter first
                    hub.validated.append(json.loads(body)["content"])
                    return self.reply(200, {"errors": [], "warnings": []})
                if path == "/api/repos/create":
                    payload = json.loads(body)
                    repo_id = f"{payload['organization']}/{payload['name']}"
                    hub.repos.setdefault(repo_id, payload)  # an existing repo keeps its visibility
                    return self.reply(200, {"url": f"{hub.endpoint}/{repo_id}"})
                if "/preupload/" in path:
                    files = json.loads(body)["files"]
                    return self.reply(200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]})
                if "/commit/" in path:
                    repo_id = path.split("/api/models/")[1].split("/commit/")[0]
                    for line in body.splitlines():
                        item = json.loads(line)
                        if item["key"] == "file":
                            hub.files[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
                    return self.reply(200, {"commitUrl": f"{hub.endpoint}/{repo_id}/commit/{'a' * 40}", "commitOid": "a" * 40, "pullRequestUrl": None})
                hub.unknown.append(f"POST {path}")
                return self.reply(404, {"error": "not in the stand-in"})

            def do_GET(self):
                if self.headers.get("Authorization") != f"Bearer {GOOD_TOKEN}":
                    return self.reply(401, {"error": "Invalid credentials in Authorization header"})
                path = self.path.split("?")[0]
                repo_id = path.removeprefix("/api/models/").split("/revision/")[0]
                if path.startswith("/api/models/") and repo_id in hub.repos:  # repo_info
                    return self.reply(200, {"id": repo_id, "private": hub.repos[repo_id]["visibility"] == "private", "sha": "a" * 40})
                hub.unknown.append(f"GET {self.path}")
                return self.reply(404, {"error": "not in the stand-in"})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture
def hub(monkeypatch, tmp_path):
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))  # any temporary file lands where we can scan it
    (tmp_path / "tmp").mkdir()
    server = FakeHub()
    yield server
    server.server.shutdown()
    server.server.server_close()


def assert_token_nowhere(token: str, tmp_path: Path, caplog, capfd, *texts: str) -> None:
    out, err = capfd.readouterr()
    assert token not in out and token not in err
    assert token not in caplog.text and all(token not in str(r.args) for r in caplog.records)
    assert all(token.encode() not in p.read_bytes() for p in tmp_path.rglob("*") if p.is_file())
    assert all(token not in text for text in texts)


def test_push_to_hub_uploads_a_private_repo_with_card_and_model(trained, base_sd1, hub, tmp_path, caplog, capfd):
    from PIL import Image

    caplog.set_level(logging.DEBUG)
    session, _, lora = trained
    url = push_to_hub(session, base_sd1, lora, "someone/zwx-thing", token=GOOD_TOKEN, format="lora",
                      grid=Image.new("RGB", (8, 8), "red"), endpoint=hub.endpoint)
    assert url == f"{hub.endpoint}/someone/zwx-thing"
    assert hub.repos["someone/zwx-thing"]["visibility"] == "private"
    weights = [f for f in hub.files if f.endswith(".safetensors")]
    assert len(weights) == 1 and set(hub.files) == {"README.md", "grid.png", weights[0]}, hub.unknown
    card = hub.files["README.md"].decode()
    assert Path(base_sd1.info.source).name in card and "`zwx`" in card and "`thing`" in card
    assert {"dreambooth", "stable-diffusion", "dreamnb"} <= set(front_matter(card)["tags"])
    assert re.search(r"!\[[^\]]*\]\(grid\.png\)", card) and f'weight_name="{weights[0]}"' in card
    uploaded = safetensors_load(hub.files[weights[0]])
    assert_same_weights(uploaded, load_file(str(export_attempt(session, base_sd1, lora, "lora", tmp_path / "same.safetensors"))))
    assert hub.files["grid.png"].startswith(b"\x89PNG")
    assert not list((tmp_path / "tmp").iterdir())  # the upload folder is gone
    assert_token_nowhere(GOOD_TOKEN, tmp_path, caplog, capfd, card)


def test_push_to_hub_with_a_diffusers_folder_uploads_what_from_pretrained_needs(trained, base_sd1, hub, tmp_path, caplog, capfd):
    session, full, _ = trained
    push_to_hub(session, base_sd1, full, "someone/zwx-full", token=GOOD_TOKEN, endpoint=hub.endpoint)
    assert {"README.md", "model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
            "text_encoder/model.safetensors", "vae/diffusion_pytorch_model.safetensors"} <= set(hub.files)
    assert_token_nowhere(GOOD_TOKEN, tmp_path, caplog, capfd)


def test_a_private_push_never_goes_into_an_existing_public_repo(trained, base_sd1, hub):
    session, _, lora = trained
    hub.repos["someone/public"] = {"visibility": "public"}
    with pytest.raises(ExportError, match="already exists and is public"):
        push_to_hub(session, base_sd1, lora, "someone/public", token=GOOD_TOKEN, format="lora", endpoint=hub.endpoint)
    assert hub.files == {}
    push_to_hub(session, base_sd1, lora, "someone/public", token=GOOD_TOKEN, format="lora", endpoint=hub.endpoint, private=False)
    assert any(f.endswith(".safetensors") for f in hub.files)


def test_a_refused_token_gives_one_clear_sentence_and_is_never_shown(trained, base_sd1, hub, tmp_path, caplog, capfd):
    caplog.set_level(logging.DEBUG)
    session, _, lora = trained
    with pytest.raises(ExportError) as info:
        push_to_hub(session, base_sd1, lora, "someone/zwx-thing", token=BAD_TOKEN, format="lora", endpoint=hub.endpoint)
    message = str(info.value)
    assert "refused the token" in message and "401" in message and "HF_TOKEN" in message
    assert message.count(". ") == 0 and message.endswith(".")
    assert hub.repos == {} and hub.files == {}
    shown = "".join(traceback.format_exception(info.value))
    assert_token_nowhere(BAD_TOKEN, tmp_path, caplog, capfd, message, shown)


# ------------------------------------------------------------------------- no local path leaves the machine

def test_a_local_vae_is_named_but_its_path_is_in_no_export_and_no_upload(tmp_path, tiny_sd1, photo_session, hub, caplog, capfd):
    from conftest import other_vae
    from dreamnb.models import load_base_model

    home = tmp_path / "home" / "alice-private"  # stands for the user's home: its name must not travel either
    vae_dir = other_vae(tiny_sd1.folder, home / "my-vaes" / "sd1-vae-ft")
    base = load_base_model(tiny_sd1.folder, vae=str(vae_dir))
    lora = train(photo_session, quick_config(method="lora", unet_steps=2, lora_rank=RANK, lora_alpha=RANK), base, progress=False).attempt
    assert base.info.vae == str(vae_dir)  # the session keeps the path (it stays on this machine)

    texts = {}
    for format in ("safetensors", "lora", "lora-diffusers"):
        out = export_attempt(photo_session, base, lora, format, tmp_path / "exports" / f"{format}.safetensors")
        with safe_open(str(out), "pt") as f:
            texts[format] = json.dumps(f.metadata())
            assert f.metadata()["vae"] == "sd1-vae-ft"
    push_to_hub(photo_session, base, lora, "someone/zwx-vae", token=GOOD_TOKEN, endpoint=hub.endpoint)
    card = hub.files["README.md"].decode()
    assert "- VAE: `sd1-vae-ft`, trained with" in card
    texts.update({name: data.decode("utf-8", "replace") for name, data in hub.files.items() if not name.endswith((".safetensors", ".png"))})
    assert {"README.md", "model_index.json", "vae/config.json"} <= texts.keys()
    for leak in (str(vae_dir), str(vae_dir.parent), str(home), home.name, str(tiny_sd1.folder), str(Path.home())):
        assert not [name for name, text in texts.items() if leak in text], leak
