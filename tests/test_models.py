"""Base-model loading through every source kind, and one clear sentence for every bad source."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from dreamnb.models import ModelError, load_base_model, source_kind


def _same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k].to(sa[k].dtype)) for k in sa)


def test_diffusers_folder_sd1(tiny_sd1, base_sd1):
    info = base_sd1.info
    assert (info.source_kind, info.family, info.prediction_type, info.resolution) == ("folder", "sd1", "epsilon", 64)


def test_diffusers_folder_sd2_v_prediction(tiny_sd2):
    info = load_base_model(tiny_sd2.folder).info
    assert (info.family, info.prediction_type) == ("sd2", "v_prediction")


@pytest.mark.parametrize("kind", ["sd1", "sd2"])
def test_single_safetensors_file_loads_the_same_weights(kind, tiny_sd1, tiny_sd2):
    paths = tiny_sd1 if kind == "sd1" else tiny_sd2
    from_file = load_base_model(paths.single_file, config=paths.folder)
    from_folder = load_base_model(paths.folder)
    assert from_file.info.source_kind == "single_file" and from_file.info.family == kind
    for part in ("unet", "vae", "text_encoder"):
        assert _same_weights(getattr(from_folder, part), getattr(from_file, part)), part


def test_ckpt_file_loads_through_weights_only(tiny_sd1, tmp_path):
    from safetensors.torch import load_file

    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": load_file(str(tiny_sd1.single_file)), "global_step": 1}, ckpt)
    model = load_base_model(ckpt, config=tiny_sd1.folder)
    assert model.info.family == "sd1"
    assert _same_weights(model.unet, load_base_model(tiny_sd1.folder).unet)


class _Exploit:
    def __reduce__(self):
        return (os.system, (f"touch {_Exploit.marker}",))


def test_ckpt_with_code_in_it_is_refused_and_not_run(tmp_path):
    _Exploit.marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"x": _Exploit()}}, path)
    with pytest.raises(ModelError, match="could not be read as a model checkpoint"):
        load_base_model(path)
    assert not _Exploit.marker.exists()


def _fake_checkpoint(path, keys, shape=(2, 2)):
    save_file({k: torch.zeros(shape) for k in keys}, str(path))
    return path


UNET = "model.diffusion_model.input_blocks.0.0.weight"


@pytest.mark.parametrize("keys, message", [
    (["conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight", UNET], "Stable Diffusion XL"),
    (["model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight"], "Stable Diffusion 3"),
    (["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"], "is a LoRA"),
    ([UNET], "has no text encoder weights"),
    (["some.other.weight"], "not a Stable Diffusion checkpoint"),
])
def test_unsupported_single_files_are_named(tmp_path, keys, message):
    path = _fake_checkpoint(tmp_path / "model.safetensors", keys)
    with pytest.raises(ModelError, match=message) as err:
        load_base_model(path)
    assert "model.safetensors" in str(err.value) and "\n" not in str(err.value)


def test_inpainting_checkpoint_is_refused(tmp_path):
    path = tmp_path / "inpaint.safetensors"
    save_file({UNET: torch.zeros(32, 9, 3, 3), "cond_stage_model.transformer.x": torch.zeros(1)}, str(path))
    with pytest.raises(ModelError, match=r"inpainting .*\(9 input channels\)"):
        load_base_model(path)


def test_corrupt_file(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(os.urandom(4096))
    with pytest.raises(ModelError, match="damaged or an incomplete download, so download it again"):
        load_base_model(path)


def test_truncated_download(tiny_sd1, tmp_path):
    data = tiny_sd1.single_file.read_bytes()
    path = tmp_path / "model.safetensors"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelError, match="damaged or an incomplete download, so download it again"):
        load_base_model(path)


def test_folder_that_is_not_a_diffusers_model(tmp_path):
    (tmp_path / "photos").mkdir()
    with pytest.raises(ModelError, match="not a diffusers model .*no model_index.json"):
        load_base_model(tmp_path / "photos")


def test_an_sdxl_folder_without_its_second_text_encoder_is_refused(tiny_sd1, tmp_path):
    folder = shutil.copytree(tiny_sd1.folder, tmp_path / "xl")
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "_class_name": "StableDiffusionXLPipeline"}))
    with pytest.raises(ModelError, match="lacks the text_encoder_2, tokenizer_2 part.* of a Stable Diffusion XL model"):
        load_base_model(folder)


def test_missing_paths_and_nonsense(tmp_path):
    with pytest.raises(ModelError, match="There is no file or folder at"):
        load_base_model(tmp_path / "nope.safetensors")
    with pytest.raises(ModelError, match="neither a local file or folder nor a Hugging Face model id"):
        source_kind("just words")
    assert source_kind("stable-diffusion-v1-5/stable-diffusion-v1-5") == "hub"


# --- Hub ids: the real huggingface_hub client, offline, against a local cache --------------------------

def _hub_cache(root: Path, repo_id: str, folder: Path) -> Path:
    """Lay a model out the way huggingface_hub caches downloads (refs/main → snapshots/<commit>)."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = root / ("models--" + repo_id.replace("/", "--"))
    shutil.copytree(folder, repo / "snapshots" / commit)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    return root


def _run(code_or_args, env_extra, *, module=False):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **env_extra}
    env.pop("HF_TOKEN", None)
    args = [sys.executable, "-m", "dreamnb", *code_or_args] if module else [sys.executable, "-c", code_or_args]
    return subprocess.run(args, capture_output=True, text=True, env=env, timeout=300)


def test_hub_id_loads_from_the_cache_offline(tiny_sd1, tmp_path):
    cache = _hub_cache(tmp_path / "hub", "dreamnb-test/tiny-sd", tiny_sd1.folder)
    code = ("import json; from dreamnb.models import load_base_model; "
            "m = load_base_model('dreamnb-test/tiny-sd'); "
            "print(json.dumps([m.info.source_kind, m.info.family, m.info.resolution]))")
    done = _run(code, {"HF_HUB_CACHE": str(cache)})
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == ["hub", "sd1", 64]


def test_hub_id_not_reachable_gives_one_clear_sentence(tmp_path):
    done = _run(["check-token", "zwx", "--model", "dreamnb-test/not-cached"], {"HF_HUB_CACHE": str(tmp_path)}, module=True)
    assert done.returncode == 2
    assert "Cannot download dreamnb-test/not-cached" in done.stderr and "not in the local cache" in done.stderr
    assert "Traceback" not in done.stderr
