"""The loop users work in: continue a trained attempt (or one of its checkpoints) as a new attempt, use any
checkpoint where an attempt is named (NAME@STEP), and checkpoints that keep only what they are kept for."""
import json
import threading

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from dreamnb.cli import main
from dreamnb.config import ConfigError
from dreamnb.export import export_attempt
from dreamnb.session import LORA_FILE, SessionError, attempt_weights_dir, canonical_ref, open_session
from dreamnb.train import continue_config, train
from test_train import quick_config

LR = 1e-3


def one_step_bound(before: dict[str, torch.Tensor], lr: float = LR, weight_decay: float = 1e-2) -> float:
    """The most one AdamW step can move a weight: lr · (|m̂/√v̂| ≤ 1 on the first step + weight decay · |w|)."""
    return lr * (1 + weight_decay * max(v.abs().max().item() for v in before.values())) * 1.001


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def assert_one_step_from(after: dict[str, torch.Tensor], before: dict[str, torch.Tensor], lr: float = LR) -> None:
    """`after` is one AdamW step of a fresh optimizer from `before`: no weight moved further than one step can, and
    most moved about lr (the first step of Adam moves every weight with a gradient by lr · |g / √g²| = lr; the tiny
    UNet's 1×1 bottleneck leaves a quarter without one), so a child that trained no step, or started elsewhere, fails."""
    assert max_difference(after, before) <= one_step_bound(before, lr)
    changes = torch.cat([(after[k].float() - before[k].float()).abs().flatten() for k in before])
    assert (changes >= 0.5 * lr).float().mean() > 0.5, (changes >= 0.5 * lr).float().mean()


def kohya_name(peft_key: str) -> str:
    """A checkpoint's LoRA key (peft's: `unet.<module>.lora_A.weight`) under the name kohya's loaders (A1111, ComfyUI)
    look it up by: the module path with '.' as '_' under `lora_unet_` or `lora_te_text_model_`, A as lora_down, B as
    lora_up. Written from the layout's description, not from the exporter's code."""
    part, rest = peft_key.split(".", 1)
    module, kind, _ = rest.rsplit(".", 2)
    if part == "text_encoder":  # transformers >= 5.6 leaves `text_model.` out of CLIPTextModel's paths; kohya keeps it
        module = "text_model." + module.removeprefix("text_model.")
    prefix = {"unet": "lora_unet_", "text_encoder": "lora_te_"}[part]
    return f"{prefix}{module.replace('.', '_')}.{dict(lora_A='lora_down', lora_B='lora_up')[kind]}.weight"


def unet_weights(folder) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "unet" / "diffusion_pytorch_model.safetensors"))


def test_a_continued_attempt_starts_from_the_parents_final_weights_and_records_it(photo_session, base_sd1):
    parent = train(photo_session, quick_config(text_encoder_steps=3, unet_steps=12), base_sd1, progress=False)
    config = continue_config(photo_session, parent.attempt, unet_steps=1)
    assert (config.parent, config.text_encoder_steps, config.unet_steps, config.parent_trained_text_encoder) == ("attempt-1@15", 0, 1, True)
    assert config.unet_lr == parent_config(photo_session)["unet_lr"] == LR  # the rest is the parent's, not the preset's
    child = train(photo_session, config, base_sd1, progress=False)

    session = open_session(photo_session.path)
    assert session.attempt(child.attempt).parent == "attempt-1@15" and child.steps_done == 1
    parent_unet, child_unet = unet_weights(parent.final_dir), unet_weights(child.final_dir)
    base_unet = {k: v for k, v in base_sd1.unet.state_dict().items()}
    assert_one_step_from(child_unet, parent_unet)  # one step from the parent ...
    assert max_difference(parent_unet, base_unet) > 5 * one_step_bound(parent_unet)  # ... which is far from the base: the test can tell
    te = "text_encoder/model.safetensors"  # not trained by the child: carried on exactly as the parent left it
    assert max_difference(load_file(str(child.final_dir / te)), load_file(str(parent.final_dir / te))) == 0


def parent_config(session):
    return json.loads((session.attempt_dir("attempt-1") / "config.json").read_text())


def test_continuing_from_a_checkpoint_and_naming_checkpoints_everywhere(photo_session, base_sd1, tmp_path):
    parent = train(photo_session, quick_config(unet_steps=8, checkpoint_every=4), base_sd1, progress=False)
    checkpoint = photo_session.attempt_dir(parent.attempt) / "checkpoints" / "step-000004"
    at_4 = {k[len("unet."):]: v for k, v in load_file(str(checkpoint / "weights.safetensors")).items()}
    assert canonical_ref(photo_session, "attempt-1@4") == "attempt-1@4"
    assert canonical_ref(photo_session, "attempt-1@8") == "attempt-1"  # the last step of a finished attempt is final/
    assert attempt_weights_dir(photo_session, "attempt-1@8").name == "final"
    with pytest.raises(SessionError, match=r"no checkpoint at step 5; it has: \[4\]"):
        canonical_ref(photo_session, "attempt-1@5")

    child = train(photo_session, continue_config(photo_session, "attempt-1@4", unet_steps=1), base_sd1, progress=False)
    child_unet = unet_weights(child.final_dir)
    assert_one_step_from(child_unet, at_4)
    assert max_difference(at_4, unet_weights(parent.final_dir)) > 3 * one_step_bound(at_4)  # step 4 ≠ step 8

    # export of a checkpoint holds that checkpoint's weights (fp32 file: exactly)
    out = export_attempt(photo_session, base_sd1, "attempt-1@4", "safetensors", tmp_path / "at4.safetensors", fp16=False)
    assert out.name == "at4.safetensors"
    from dreamnb.convert import unet_to_ldm

    expected = unet_to_ldm(at_4, base_sd1.unet.config)
    exported = {k: v for k, v in load_file(str(out)).items() if k in expected}
    assert max_difference(exported, expected) == 0


def test_a_lora_attempt_continues_from_its_lora_and_exports_a_checkpoint_in_kohyas_layout(photo_session, base_sd1, tmp_path):
    rank, alpha = 4, 8  # alpha ≠ rank: an export that wrote the rank (diffusers' default) as alpha would scale by 1, not 2
    parent = train(photo_session, quick_config(method="lora", unet_steps=8, text_encoder_steps=2, checkpoint_every=4,
                                               lora_rank=rank, lora_alpha=alpha), base_sd1, progress=False)
    with pytest.raises(ConfigError, match="keeps attempt-1's method"):
        continue_config(photo_session, parent.attempt, method="full")
    config = continue_config(photo_session, parent.attempt, unet_steps=1)
    assert (config.lora_rank, config.lora_alpha) == (rank, alpha)
    child = train(photo_session, config, base_sd1, progress=False)
    before, after = load_file(str(parent.final_dir / LORA_FILE)), load_file(str(child.final_dir / LORA_FILE))
    unet = [k for k in before if k.startswith("unet.")]
    assert unet and any(k.startswith("text_encoder.") for k in before)
    assert_one_step_from({k: after[k] for k in unet}, {k: before[k] for k in unet})
    te = [k for k in before if k.startswith("text_encoder.")]
    assert max_difference({k: after[k] for k in te}, {k: before[k] for k in te}) == 0
    assert max(v.abs().max().item() for k, v in before.items() if k in unet and ".up." in k) > 5 * one_step_bound(before)

    out = export_attempt(photo_session, base_sd1, "attempt-1@4", "lora", tmp_path, force=False)
    assert out.name.endswith("attempt-1-step4-lora.safetensors")
    saved = load_file(str(photo_session.attempt_dir("attempt-1") / "checkpoints" / "step-000004" / "weights.safetensors"))
    assert {k.split(".")[0] for k in saved} == {"unet", "text_encoder"}  # step 4: both phases' adapters
    expected = {kohya_name(k): v for k, v in saved.items()}
    modules = {k.rsplit(".", 2)[0] for k in expected}
    kohya = load_file(str(out))
    assert kohya.keys() == expected.keys() | {f"{m}.alpha" for m in modules}
    assert [k for k, v in expected.items() if not torch.equal(kohya[k], v)] == []  # each tensor under its own layer's name
    assert {kohya[f"{m}.alpha"].item() for m in modules} == {alpha}
    with safe_open(str(out), framework="pt") as f:
        assert (f.metadata()["ss_network_dim"], f.metadata()["ss_network_alpha"]) == (str(rank), str(alpha))


def test_only_the_newest_checkpoint_keeps_the_optimizer_and_free_space_drops_a_finished_attempts(photo_session, base_sd1):
    from dreamnb.session import free_space

    stop = threading.Event()
    config = quick_config(unet_steps=12, checkpoint_every=3, keep_checkpoints=3, log_every=1)
    first = train(photo_session, config, base_sd1, progress=False, stop=stop,
                  callback=lambda e: stop.set() if e.kind == "step" and e.step == 8 else None)
    folder = photo_session.attempt_dir(first.attempt) / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == ["step-000003", "step-000006", "step-000008"]
    assert sorted(p.parent.name for p in folder.glob("*/optimizer.pt")) == ["step-000008"]
    assert free_space(open_session(photo_session.path)) == 0  # an interrupted attempt keeps what its resume needs
    assert train(photo_session, None, base_sd1, resume=True, progress=False).status == "finished"
    newest = folder / "step-000009" / "optimizer.pt"
    assert sorted(p.parent.name for p in folder.glob("*/optimizer.pt")) == ["step-000009"]
    size = newest.stat().st_size
    assert free_space(open_session(photo_session.path)) == size and not newest.exists()
    assert len(list(folder.glob("*/weights.safetensors"))) == 3  # the weights stay for comparing and continuing


def test_the_cli_continues_with_from_and_names_checkpoints(photo_session, base_sd1, tiny_sd1, tmp_path, capsys):
    train(photo_session, quick_config(unet_steps=6, checkpoint_every=3), str(tiny_sd1.folder), progress=False)
    session = ["--session", str(photo_session.path)]
    assert main(["train", *session, "--from", "attempt-1@3", "--unet-steps", "2", "--lora"]) == 2
    assert "keeps attempt-1's method" in capsys.readouterr().err
    assert main(["train", *session, "--from", "attempt-1@3", "--unet-steps", "2"]) == 0
    state = json.loads((photo_session.path / "session.json").read_text())
    assert [(a["name"], a["parent"], a["steps_done"]) for a in state["attempts"]] == [("attempt-1", None, 6), ("attempt-2", "attempt-1@3", 2)]
    assert main(["compare", *session, "--attempts", "attempt-1@7", "--prompt", "x", "--seed", "1", "--steps", "2", "--out", str(tmp_path / "g.png")]) == 2
    assert "no checkpoint at step 7; it has: [3]" in capsys.readouterr().err
    assert main(["compare", *session, "--attempts", "base", "attempt-1@3", "attempt-2", "--prompt", "x", "--seed", "1",
                 "--steps", "2", "--out", str(tmp_path / "g.png")]) == 0
    assert (tmp_path / "g.png").is_file()


def test_disk_use_matches_the_estimate_and_housekeeping_frees_what_it_says(photo_session, base_sd1):
    from dreamnb.session import delete_checkpoints, disk_usage, free_space
    from dreamnb.train import disk_estimate

    config = quick_config(unet_steps=9, text_encoder_steps=3, checkpoint_every=4, keep_checkpoints=2)
    at_most, after = disk_estimate(config, base_sd1)
    train(photo_session, config, base_sd1, progress=False)
    use = disk_usage(open_session(photo_session.path))["attempt-1"]
    assert sorted(use.checkpoints) == [4, 8] and use.optimizer > 0  # the newest checkpoint's, until "free space"
    assert after * 0.97 < use.final + sum(use.checkpoints.values()) - use.optimizer < after * 1.05
    assert at_most > after

    assert free_space(open_session(photo_session.path)) == use.optimizer
    freed = delete_checkpoints(open_session(photo_session.path), "attempt-1", [4])
    assert freed == use.checkpoints[4] and sorted(disk_usage(open_session(photo_session.path))["attempt-1"].checkpoints) == [8]
