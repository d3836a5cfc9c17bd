import dataclasses

import pytest

from dreamnb.config import ConfigError, TrainConfig, preset_values, validate


def test_every_setting_has_a_plain_explanation():
    for f in dataclasses.fields(TrainConfig):
        assert len(f.metadata.get("help", "")) > 20, f.name


def test_presets_differ_where_the_guides_say():
    face, obj, style = (TrainConfig.from_preset(p) for p in ("face", "object", "style"))
    assert face.with_prior_preservation and face.text_encoder_steps > 0 and face.class_word == "person"
    assert (face.unet_steps, face.unet_lr, face.text_encoder_steps, face.text_encoder_lr) == (1500, 2e-6, 350, 1e-6)
    assert obj.unet_steps < face.unet_steps
    assert not style.with_prior_preservation and style.class_word == ""
    lora = TrainConfig.from_preset("face", "lora")
    assert lora.method == "lora" and lora.unet_lr > 10 * face.unet_lr


def test_overrides_win_and_none_keeps_the_preset():
    c = TrainConfig.from_preset("face", token="zwx", unet_steps=10, unet_lr=None)
    assert (c.token, c.unet_steps, c.unet_lr) == ("zwx", 10, 2e-6)


def test_unknown_keys_are_errors():
    with pytest.raises(ConfigError, match="Unknown setting.*unet_stesp"):
        TrainConfig.from_dict({"unet_stesp": 5})
    with pytest.raises(ConfigError, match="Unknown preset 'portrait'"):
        preset_values("portrait")


@pytest.mark.parametrize("changes, message", [
    (dict(token=""), "token is empty"),
    (dict(resolution=500), "multiple of 8 but is 500"),
    (dict(unet_steps=0), "unet_steps is 0 but must be at least 1"),
    (dict(class_word="", with_prior_preservation=True), "Prior preservation needs a class word"),
    (dict(instance_prompt="a photo of a man"), "does not contain the token 'zwx'"),
    (dict(mixed_precision="fp8"), "mixed_precision is 'fp8'; choose one of auto, no, fp16, bf16"),
    (dict(text_encoder_lr=0.0, text_encoder_steps=100), "text-encoder learning rate is 0"),
])
def test_settings_that_cannot_work_are_refused(changes, message):
    config = dataclasses.replace(TrainConfig.from_preset("face", token="zwx"), **changes)
    with pytest.raises(ConfigError, match=message):
        validate(config)


def test_prompts_are_built_from_token_and_class():
    c = TrainConfig.from_preset("face", token="zwx")
    assert c.resolved_instance_prompt() == "photo of zwx person"
    assert c.resolved_class_prompt() == "photo of a person"
    assert TrainConfig.from_preset("style", token="zwx").resolved_instance_prompt() == "zwx style"
