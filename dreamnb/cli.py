"""`python -m dreamnb …`: the same steps as the notebook, for scripts and tests.

Exit status: 0 on success, 2 on bad input (one sentence on stderr, no traceback), 1 on an
unexpected failure. `--json` prints one JSON document on stdout.
"""
from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

from . import config as config_module  # noqa: E402
from .config import TrainConfig  # noqa: E402
from .errors import UserError  # noqa: E402

log = logging.getLogger("dreamnb")


class UsageError(UserError):
    """Bad command-line input: exit 2 with the message."""


VAE_HELP = config_module.VAE_HELP + " Default: the one the attempt was trained with, else the model's own."


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dreamnb", description="Teach a text-to-image model (Stable Diffusion, SDXL, FLUX.1) a face, a pet, an object or a style (DreamBooth).")
    parser.add_argument("-v", "--verbose", action="store_true", help="show debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("prepare", help="check, crop and copy photos into a session (originals are never changed)")
    p.add_argument("images", nargs="+", metavar="IMAGES", help="photo files, folders or .zip files")
    p.add_argument("--session", required=True, help="the session folder (created if new)")
    p.add_argument("--size", type=int, default=512, help="square size of the prepared photos: the model's own (512 for SD 1.5, 768 for SD 2.x, 1024 for SDXL)")
    p.add_argument("--crop", choices=("smart", "center", "none"), default="smart", help="smart: centre on the face or the most detailed region")
    p.add_argument("--preset", choices=config_module.PRESETS, default="face", help="what the photos show, for the advice")
    p.add_argument("--json", action="store_true", help="print the report as JSON")

    p = sub.add_parser("check-token", help="is this token rare enough to learn? suggests better ones")
    p.add_argument("text", metavar="TEXT")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", help="base model whose tokenizer (and text encoder) to use")
    src.add_argument("--tokenizer", help="a folder with CLIP tokenizer files (default: the bundled SD 1.x tokenizer)")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("train", help="train one attempt on the session's photos")
    p.add_argument("--session", required=True)
    p.add_argument("--model", help="base model: Hub id, diffusers folder or .safetensors/.ckpt file (default: the session's)")
    p.add_argument("--model-config", help="for a single-file model: a diffusers folder or Hub id with its configs")
    p.add_argument("--vae", metavar="SOURCE", help=VAE_HELP)
    p.add_argument("--token", help=config_module.help_for("token"))
    p.add_argument("--class-word", help=config_module.help_for("class_word"))
    p.add_argument("--preset", choices=config_module.PRESETS, help=config_module.help_for("preset") + " (default: face)")
    p.add_argument("--attempt", help="attempt name (default attempt-N); with --resume, the one to resume (default the latest)")
    p.add_argument("--from", dest="parent", metavar="ATTEMPT[@STEP]",
                   help="continue a trained attempt (or one of its checkpoints) as a new attempt: its settings unless given here; "
                        "--unet-steps/--te-steps are steps more (the text encoder's 0 unless given)")
    p.add_argument("--unet-steps", type=int, help=config_module.help_for("unet_steps"))
    p.add_argument("--unet-lr", type=float, help=config_module.help_for("unet_lr"))
    p.add_argument("--te-steps", type=int, help=config_module.help_for("text_encoder_steps"))
    p.add_argument("--te-lr", type=float, help=config_module.help_for("text_encoder_lr"))
    p.add_argument("--resolution", type=int, help=config_module.help_for("resolution"))
    p.add_argument("--prior", dest="prior", action="store_true", default=None, help=config_module.help_for("with_prior_preservation"))
    p.add_argument("--no-prior", dest="prior", action="store_false")
    p.add_argument("--num-class-images", type=int, help=config_module.help_for("num_class_images"))
    p.add_argument("--lora", action="store_true", help=config_module.help_for("method"))
    p.add_argument("--checkpoint-every", type=int, help=config_module.help_for("checkpoint_every"))
    p.add_argument("--seed", type=int, help=config_module.help_for("seed"))
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any other TrainConfig setting, e.g. --set offset_noise=0.05")
    p.add_argument("--resume", action="store_true", help="continue an interrupted attempt from its last checkpoint")
    p.add_argument("--json", action="store_true")

    for name, helptext in (("sample", "generate images from an attempt"), ("compare", "a grid comparing attempts (and the base model)")):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("--session", required=True)
        if name == "sample":
            p.add_argument("--attempt", help="attempt name, or NAME@STEP for a checkpoint (default the latest); 'base' for the untrained model")
            p.add_argument("--checkpoint", type=int, help="use checkpoint step N instead of the final weights")
        else:
            p.add_argument("--attempts", nargs="+", required=True, help="attempt names, or NAME@STEP for a checkpoint; 'base' is the untrained model")
        p.add_argument("--prompt", nargs="+", help="prompts; {token} and {class} are filled in (default: the probe prompts)")
        p.add_argument("--negative-prompt", default="")
        p.add_argument("--seed", nargs="+", type=int, default=[1, 2])
        p.add_argument("--steps", type=int, default=25, help="inference steps")
        p.add_argument("--guidance-scale", type=float, help="how closely images follow the prompt (default: the model's own: 7.5 for Stable Diffusion, 3.5 for FLUX.1)")
        p.add_argument("--scheduler", default="dpm++", help="dpm++, euler or ddim (FLUX.1 always samples with its own flow-euler)")
        p.add_argument("--compile", action="store_true", help=config_module.COMPILE_UNET_HELP)
        p.add_argument("--model", help="base model (default: the session's)")
        p.add_argument("--model-config")
        p.add_argument("--vae", metavar="SOURCE", help=VAE_HELP)
        p.add_argument("--out", required=True, help="PNG file for the grid")

    p = sub.add_parser("export", help="save an attempt for diffusers, A1111/ComfyUI, or as a LoRA")
    p.add_argument("--session", required=True)
    p.add_argument("--attempt", help="attempt name, or NAME@STEP for a checkpoint (default the latest)")
    p.add_argument("--format", choices=("diffusers", "safetensors", "lora", "lora-diffusers"), required=True,  # export.FORMATS
                   help="diffusers: a model folder; safetensors: one file for A1111/ComfyUI; lora: kohya's LoRA file for "
                        "A1111/ComfyUI/civitai; lora-diffusers: the LoRA for diffusers' load_lora_weights")
    p.add_argument("--out", help="file or folder to write (default: the session's exports/ folder)")
    p.add_argument("--push", metavar="REPO_ID", help="upload to this Hugging Face Hub repository with a model card (token from HF_TOKEN or a saved login)")
    p.add_argument("--public", action="store_true", help="with --push: make a new repository public (it is private otherwise)")
    p.add_argument("--fp32", action="store_true", help="single file in fp32 instead of fp16")
    p.add_argument("--force", action="store_true", help="overwrite an existing export")
    p.add_argument("--model")
    p.add_argument("--model-config")
    p.add_argument("--vae", metavar="SOURCE", help=VAE_HELP)

    p = sub.add_parser("sessions", help="list sessions and their attempts")
    p.add_argument("--root", help="where sessions live (default: Drive on Colab, else ./dreamnb-sessions)")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("repair", help="rebuild a damaged session.json from its backup or from the folders on disk")
    p.add_argument("--session", required=True)

    p = sub.add_parser("demo", help="the whole flow on the CPU with a tiny model and the sample photos")
    p.add_argument("--out", default="demo-output", help="folder for the demo's model, session and grid")
    p.add_argument("--steps", type=int, default=None, help="UNet steps (default: enough to show learning in ~1 minute)")
    return parser


# --- commands -----------------------------------------------------------------------------------------

def cmd_prepare(args) -> Any:
    from .images import prepare_photos
    from .session import open_or_create, session_lock

    session = open_or_create(args.session)
    with session_lock(session.path, "preparing photos"):
        report = prepare_photos(args.images, session.instance_dir, size=args.size, crop=args.crop, preset=args.preset, progress=not args.json)
    if args.json:
        return report.to_dict()
    print(report.to_table())
    return None


def cmd_check_token(args) -> Any:
    from .tokens import check_token, load_tokenizer

    text_encoder = tokenizer_2 = None
    if args.model:
        from .models import load_base_model

        base = load_base_model(args.model)  # checked with the tokenizers its family names (SDXL's two)
        (tokenizer, *more), text_encoder = [getattr(base.pipeline, name) for name in base.family.checked_tokenizers], base.text_encoder
        tokenizer_2 = more[0] if more else None
    else:
        tokenizer = load_tokenizer(args.tokenizer)
    report = check_token(args.text, tokenizer, text_encoder, tokenizer_2=tokenizer_2)
    if args.json:
        return report.to_dict()
    pieces = " ".join(f"{p.text}({p.id}, {p.rarity})" for p in report.pieces)
    print(f"{report.text!r}: {report.verdict.upper()} — {report.n_tokens} token(s): {pieces}")
    for reason in report.reasons:
        print(f"  - {reason}")
    if report.nearest_words:
        print(f"  nearest known words: {', '.join(report.nearest_words)}")
    if report.suggestions:
        print(f"  rare alternatives: {', '.join(report.suggestions)}")
    return None


def train_config_from_args(args, session=None, model=None) -> TrainConfig:
    """The preset's settings with what the command line gives; with --from, the parent attempt's instead of the preset's.
    The preset's values are those for the base model's family (SDXL has its own) and the method asked for (--lora or
    --set method=...; else the family's default)."""
    overrides = config_overrides(args)
    if args.parent:
        from .train import continue_config

        return continue_config(session, args.parent, **overrides, preset=args.preset, method="lora" if args.lora else None)
    from .models import detect_family

    family = detect_family(model) if model else None
    method = "lora" if args.lora else overrides.get("method")
    return TrainConfig.from_preset(args.preset or "face", method, family=family, **overrides)


def config_overrides(args) -> dict[str, Any]:
    """The settings given on the command line (None: not given)."""
    overrides: dict[str, Any] = dict(
        token=args.token, class_word=args.class_word, unet_steps=args.unet_steps, unet_lr=args.unet_lr,
        text_encoder_steps=args.te_steps, text_encoder_lr=args.te_lr, resolution=args.resolution,
        with_prior_preservation=args.prior, num_class_images=args.num_class_images,
        checkpoint_every=args.checkpoint_every, seed=args.seed,
    )
    fields = {f: type(getattr(TrainConfig(), f)) for f in TrainConfig().to_dict()}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep or key not in fields:
            raise UsageError(f"--set {item!r} is not KEY=VALUE with a known setting; known settings: {', '.join(fields)}.")
        kind = fields[key]
        try:
            overrides[key] = (value.lower() in ("1", "true", "yes", "on")) if kind is bool else kind(value)
        except ValueError as err:
            raise UsageError(f"--set {key} needs a {kind.__name__}, not {value!r}.") from err
    return overrides


def cmd_train(args) -> Any:
    from .session import is_main_process, open_session
    from .train import train

    session = open_session(args.session)
    model = args.model or session.base_model
    if not model:
        raise UsageError("No base model: give --model (a Hub id, a diffusers folder or a .safetensors file).")
    if args.resume and args.parent:
        raise UsageError("--resume continues an interrupted attempt and --from a trained one as a new attempt; give one of them.")
    if not args.resume and not args.parent and not args.token:
        raise UsageError("--token is required: the rare word that will mean your subject (see `dreamnb check-token`).")
    config = train_config_from_args(args, session, model) if not args.resume else TrainConfig()
    vae = _trained_vae(args, session, [args.attempt] if args.resume else [args.parent] if args.parent else [])
    speaks = is_main_process()  # under `accelerate launch` (several GPUs) one process reports
    result = train(session, config, model, attempt=args.attempt, resume=args.resume, config_source=args.model_config, vae=vae,
                   callback=_print_train_event if speaks and not args.json else None, progress=speaks and not args.json)
    if not speaks:
        raise SystemExit(1 if result.status == "failed" else 0)
    if args.json:
        return {"attempt": result.attempt, "status": result.status, "steps_done": result.steps_done,
                "total_steps": result.total_steps, "final_dir": str(result.final_dir) if result.final_dir else None,
                "message": result.message, "losses": result.losses}
    print(result.message)
    if result.status == "failed":
        raise SystemExit(1)
    return None


def _print_train_event(event) -> None:
    if event.kind in ("info", "phase", "checkpoint", "sample"):
        saved = {"checkpoint": "saved checkpoint", "sample": f"previews at step {event.step}:"}.get(event.kind, "")
        text = event.message or (f"{saved} {event.path}" if event.path else "")
        if text:
            print(text, file=sys.stderr)


def _trained_vae(args, session, refs: list[str | None]) -> str | None:
    """--vae, else the VAE the first of these attempts (None: the latest; 'base' is none) was trained with, so an attempt
    is resumed, continued, sampled and exported with the VAE it learned on; None: the model's own."""
    if args.vae:
        return args.vae
    attempts = [session.attempt(ref) for ref in refs if ref != "base"]
    return attempts[0].vae if attempts else None


def _session_base(args, session, refs: list[str | None], placement=None):
    """The session's base model (or --model) with the VAE of the attempts `refs` (see `_trained_vae`), where
    `load_base_model` places it unless `placement` is given."""
    from .models import load_base_model

    source = args.model or session.base_model
    if not source:
        raise UsageError("The session has no base model recorded; give --model.")
    return load_base_model(source, config=args.model_config or session.base_model_config, placement=placement,
                           vae=_trained_vae(args, session, refs))


def _grid(session, base, names: list[str], args):
    from .attempts import comparison_grid

    return comparison_grid(
        session, base, names, args.prompt, args.seed, negative_prompt=args.negative_prompt,
        num_inference_steps=args.steps, guidance_scale=args.guidance_scale, scheduler=args.scheduler,
        checkpoint=getattr(args, "checkpoint", None), compile_unet=args.compile,
    ).grid


def cmd_sample(args) -> Any:
    from .fileio import save_with
    from .session import canonical_ref, open_session

    session = open_session(args.session)
    name = canonical_ref(session, args.attempt)  # a wrong name or step is reported before the model loads
    base = _session_base(args, session, [name])
    grid = _grid(session, base, [name], args)
    save_with(args.out, lambda tmp: grid.save(tmp, format="PNG"))
    print(args.out)


def cmd_compare(args) -> Any:
    from .fileio import save_with
    from .session import canonical_ref, open_session

    session = open_session(args.session)
    names = [canonical_ref(session, a) for a in args.attempts]
    base = _session_base(args, session, names)
    grid = _grid(session, base, names, args)
    save_with(args.out, lambda tmp: grid.save(tmp, format="PNG"))
    print(args.out)


def cmd_export(args) -> Any:
    import torch

    from . import export
    from .models import Placement
    from .session import open_session

    session = open_session(args.session)
    write_locally = args.out or not args.push
    if write_locally:  # a wrong attempt, format or existing file is reported before the base model loads
        export.check_export(session, args.attempt, args.format, args.out, force=args.force)
    # fp16 files are written from the base where it lives; fp32 and diffusers folders (which keep the trained
    # precision) from an fp32 copy on the CPU, so no weight passes through fp16 on its way out
    keeps_precision = args.fp32 or args.format == "diffusers"
    base = _session_base(args, session, [args.attempt], Placement(torch.device("cpu"), torch.float32) if keeps_precision else None)
    if write_locally:
        print(export.export_attempt(session, base, args.attempt, args.format, args.out, force=args.force, fp16=not args.fp32))
    if args.push:
        print(export.push_to_hub(session, base, args.attempt, args.push, private=not args.public, format=args.format))


def cmd_sessions(args) -> Any:
    from .session import default_root, describe_attempt, list_sessions

    root = Path(args.root) if args.root else default_root()
    sessions = list_sessions(root)
    if args.json:
        return [s.to_dict() | {"path": str(s.path)} for s in sessions]
    if not sessions:
        print(f"No sessions in {root}.")
    for s in sessions:
        attempts = ", ".join(describe_attempt(a) for a in s.attempts) or "no attempts"
        print(f"{s.name}  [{s.base_model or 'no model yet'}]  {attempts}")
    return None


def cmd_repair(args) -> Any:
    from .session import SESSION_FILE, SessionError, open_session, repair_session, session_lock

    path = Path(args.session)
    if not (path / "attempts").is_dir():
        raise UsageError(f"{path} is not a dreamnb session folder (it has no attempts/ folder); give the session's folder.")
    if (path / SESSION_FILE).is_file():
        try:
            open_session(path)
            print(f"{path / SESSION_FILE} is fine; nothing was changed.")
            return None
        except SessionError:
            pass
    with session_lock(path, "a repair"):
        session, how = repair_session(path)
    print(f"{path / SESSION_FILE} {how}: {', '.join(a.name for a in session.attempts) or 'no attempts'}.")
    return None


def cmd_demo(args) -> Any:
    from .demo import run_demo

    result = run_demo(args.out, unet_steps=args.steps, log=lambda text: print(text, file=sys.stderr))
    print(f"Comparison grid: {result.grid_path}")


COMMANDS = {
    "prepare": cmd_prepare, "check-token": cmd_check_token, "train": cmd_train, "sample": cmd_sample,
    "compare": cmd_compare, "export": cmd_export, "sessions": cmd_sessions, "repair": cmd_repair, "demo": cmd_demo,
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        result = COMMANDS[args.command](args)
    except UserError as err:  # ConfigError, ModelError, SessionError, UsageError, ...: the user can fix it
        print(f"dreamnb {args.command}: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("Stopped.", file=sys.stderr)
        return 130
    except OSError as err:
        if err.errno != errno.ENOSPC:
            raise
        where = f" where {Path(err.filename).parent} lives" if err.filename else ""
        print(f"dreamnb {args.command}: The disk is full{where}; free some space and run it again (what was written before "
              "is intact: every file is written whole or not at all).", file=sys.stderr)
        return 2
    if result is not None:
        print(json.dumps(result, indent=2, default=str))
    return 0
