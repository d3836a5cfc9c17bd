"""The seam: what differs between model families is answered by `dreamnb/families/` alone. Outside it (and the
modules that build tiny or world models for tests and the demo, and convert.py, SD's and SDXL's own file layout) no
code names a family, compares a family's key, or reaches for a part only one family has."""
import re
from pathlib import Path

import pytest

from dreamnb import families
from dreamnb.families.base import Family

PACKAGE = Path(__file__).resolve().parents[1] / "dreamnb"
BUILDERS = {"tiny.py", "world_model.py", "convert.py"}
NAMES_A_FAMILY = re.compile(
    r"""["'](?:sd1|sd2|sdxl|flux1)["']"""                       # a family's key as a literal
    r"""|\b(?:StableDiffusionXL|StableDiffusion|Flux)Pipeline\b(?!`)"""  # its pipeline class (outside `quoted` prose)
    r"""|\.(?:text_encoder_2|tokenizer_2|transformer)\b"""      # a part only some families have
    r"""|[=!]=\s*["'](?:unet|transformer)["']""")               # a part named in a comparison


def code_lines(path: Path):
    """The lines of a module that are code: comments and docstrings left out."""
    in_docstring = False
    for number, line in enumerate(path.read_text().splitlines(), 1):
        stripped = line.strip()
        quotes = stripped.count('"""')
        if in_docstring or stripped.startswith('"""'):
            in_docstring = in_docstring != (quotes % 2 == 1)
            continue
        code = line.split("#", 1)[0] if "#" in line and '"' not in line.split("#", 1)[0] else line
        yield number, code


def test_no_module_outside_the_families_names_a_family():
    found = [f"{path.relative_to(PACKAGE)}:{number}: {code.strip()}"
             for path in sorted(PACKAGE.rglob("*.py")) if "families" not in path.parts and path.name not in BUILDERS
             for number, code in code_lines(path) if NAMES_A_FAMILY.search(code)]
    assert found == [], "\n".join(found)


def test_the_rule_finds_what_it_looks_for(tmp_path):
    """The check above is not blind: each kind of family-naming line is caught, prose and comments are not."""
    module = tmp_path / "m.py"
    module.write_text('"""Loads a `StableDiffusionXLPipeline` or a FluxPipeline."""\n'
                      'if family == "sdxl":  # SDXL\n'
                      '    x = pipe.text_encoder_2\n'
                      'pipe = StableDiffusionPipeline(**parts)\n'
                      'if part == "unet":\n'
                      '    pass  # the FluxPipeline\n')
    hits = [number for number, code in code_lines(module) if NAMES_A_FAMILY.search(code)]
    assert hits == [2, 3, 4, 5]


@pytest.mark.parametrize("key", sorted(families.FAMILIES))
def test_every_family_answers_what_the_trainer_asks(key):
    family = families.get(key)
    assert family.key == key and family.label and family.pipeline_class_name
    assert family.default_method in family.methods and family.samplers
    assert family.trained_parts[0] == family.denoiser and set(family.text_encoders) <= set(family.trained_parts)
    asked = ["lora_targets", "assemble", "prompt_encoder", "predict", "pipeline_prompt_kwargs", "text_inputs",
             "noise_schedule", "kohya_lora"]
    missing = [name for name in asked if getattr(type(family), name) is getattr(Family, name)]
    assert missing == [], f"{family.label} does not answer {missing}"
    assert families.from_class_name(family.pipeline_class_name, "x").pipeline_class_name == family.pipeline_class_name


def test_a_family_key_nobody_knows_gets_one_sentence():
    with pytest.raises(families.ModelError, match="'sd9' is not a model family dreamnb knows"):
        families.get("sd9")
