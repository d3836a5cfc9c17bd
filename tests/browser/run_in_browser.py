"""Run the notebook in JupyterLab in headless Chromium, check the widgets rendered, take screenshots.

    python tests/browser/run_in_browser.py --out assets/screenshots

Unpacks the world model (a small Stable Diffusion pretrained on shapes and creatures, as `dreamnb demo` uses) and
teaches it the demo's fish: writes the notebook with its parameters filled in (papermill style,
`auto_run=True`), starts JupyterLab on localhost, and lets `screenshots.cjs` (Playwright) run all cells,
check the page, press the playground's Generate once more, and save photos.png, training.png, compare.png and
playground.png under --out. Exit status 0 when the page check passed.

Needs: jupyterlab (pip), chromium (Debian's `apt-get install chromium`), playwright-core (npm, found
through NODE_PATH or `npm root -g`).
"""
from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from dreamnb.demo import DEMO_CLASS, DEMO_PHOTOS, DEMO_PROMPTS, DEMO_TOKEN, WORLD_MODEL

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
NOTEBOOK = REPO / "notebooks" / "fast_dreambooth.ipynb"
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")


def find_jupyter_lab() -> list[str] | None:
    """The command that starts JupyterLab: $JUPYTER_LAB, `jupyter-lab` on PATH, or this Python's module."""
    if os.environ.get("JUPYTER_LAB"):
        return [os.environ["JUPYTER_LAB"]]
    found = shutil.which("jupyter-lab")
    if found:
        return [found]
    import importlib.util

    if importlib.util.find_spec("jupyterlab") is not None:
        return [sys.executable, "-m", "jupyterlab"]
    return None


def node_path() -> str:
    """NODE_PATH with the global npm folder added, where `npm install -g playwright-core` puts it."""
    paths = [p for p in os.environ.get("NODE_PATH", "").split(os.pathsep) if p] + [str(HERE / "node_modules")]
    npm = shutil.which("npm")
    if npm:
        root = subprocess.run([npm, "root", "-g"], capture_output=True, text=True).stdout.strip()
        if root:
            paths.append(root)
    return os.pathsep.join(paths)


def have_playwright() -> bool:
    node = shutil.which("node")
    if not node:
        return False
    check = subprocess.run([node, "-e", "require.resolve('playwright-core')"], env={**os.environ, "NODE_PATH": node_path()},
                           capture_output=True)
    return check.returncode == 0


def missing_requirements() -> list[str]:
    """What is not installed, in words for a skip message."""
    missing = []
    if not (Path(CHROMIUM).exists() or shutil.which("chromium")):
        missing.append("chromium (apt-get install chromium)")
    if find_jupyter_lab() is None:
        missing.append("JupyterLab (pip install jupyterlab)")
    if not have_playwright():
        missing.append("playwright-core (npm install -g playwright-core)")
    return missing


def build_model(folder: Path) -> Path:
    from dreamnb.world_model import pack_parts, unpack_to

    unpack_to(pack_parts(WORLD_MODEL), folder)
    return folder


def write_notebook(path: Path, parameters: dict) -> None:
    import nbformat

    nb = nbformat.read(NOTEBOOK, as_version=4)
    cell = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    cell.source += "\n# filled in by tests/browser/run_in_browser.py\n" + "\n".join(f"{k} = {v!r}" for k, v in parameters.items())
    nbformat.write(nb, path)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_server(url: str, server: subprocess.Popen, log: Path, timeout: float = 90) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"JupyterLab exited with status {server.returncode}; see {log}")
        try:
            with urllib.request.urlopen(url, timeout=5):
                return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"JupyterLab did not answer at {url} within {timeout:.0f} s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "assets" / "screenshots", help="where the screenshots go")
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    parser.add_argument("--unet-steps", type=int, default=150)
    parser.add_argument("--timeout", type=int, default=900, help="seconds for the whole notebook in the browser")
    args = parser.parse_args(argv)

    missing = missing_requirements()
    if missing:
        print("missing: " + "; ".join(missing), file=sys.stderr)
        return 3
    work = args.work or Path(tempfile.mkdtemp(prefix="dreamnb-browser-"))
    work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    print(f"unpacking the world model into {work / 'model'}", file=sys.stderr)
    model = build_model(work / "model")
    write_notebook(work / "fast_dreambooth.ipynb", dict(
        base_model=str(model), session_root=str(work / "sessions"), session_name="fish", instance_images=str(DEMO_PHOTOS),
        token=DEMO_TOKEN, class_word=DEMO_CLASS, preset="object", unet_steps=args.unet_steps, unet_lr=2e-5, text_encoder_steps=30,
        text_encoder_lr=1e-5, with_prior_preservation=False, resolution=64, checkpoint_every=0, sample_every=args.unet_steps // 2,
        compare_prompts=DEMO_PROMPTS, compare_seeds=[1, 2], sample_steps=20,
        playground_prompt="a sketch of {token} {class} in a room", export_format="diffusers", auto_run=True,
    ))
    # Lab settings for this run only: render every cell (no windowing), so each output can be screenshotted.
    # No news or update pop-ups over the screenshots.
    for plugin, values in {"notebook-extension/tracker": {"windowingMode": "none"},
                           "apputils-extension/notification": {"fetchNews": "false", "checkForUpdates": False}}.items():
        file = work / "lab-settings" / "@jupyterlab" / f"{plugin}.jupyterlab-settings"
        file.parent.mkdir(parents=True, exist_ok=True)
        file.write_text(json.dumps(values))

    port, token = free_port(), secrets.token_hex(16)
    # The widgets' lab extension lives beside jupyterlab_widgets, which may be in a base env under a venv.
    data_dirs = [os.environ.get("JUPYTER_PATH", "")] + [str(Path(p) / "share" / "jupyter") for p in {sys.prefix, sys.base_prefix}]
    env = {**os.environ, "JUPYTER_PATH": os.pathsep.join(p for p in data_dirs if p)}
    server = subprocess.Popen(
        [*find_jupyter_lab(), "--no-browser", f"--port={port}", "--ip=127.0.0.1", f"--IdentityProvider.token={token}", "--allow-root",
         f"--ServerApp.root_dir={work}", "--LabApp.expose_app_in_browser=True", "--LabApp.news_url=",
         f"--LabApp.user_settings_dir={work / 'lab-settings'}", f"--LabApp.workspaces_dir={work / 'workspaces'}"],
        cwd=work, env=env, stdout=open(work / "jupyterlab.log", "wb"), stderr=subprocess.STDOUT,
    )
    try:
        wait_for_server(f"http://127.0.0.1:{port}/api/status?token={token}", server, work / "jupyterlab.log")
        url = f"http://127.0.0.1:{port}/lab/tree/fast_dreambooth.ipynb?token={token}&reset"
        result = subprocess.run(
            [shutil.which("node"), str(HERE / "screenshots.cjs"), url, str(args.out), str(args.timeout * 1000)],
            env={**os.environ, "NODE_PATH": node_path(), "CHROMIUM": CHROMIUM}, timeout=args.timeout + 120,
        )
        return result.returncode
    finally:
        server.terminate()
        try:
            server.wait(20)
        except subprocess.TimeoutExpired:
            server.kill()


if __name__ == "__main__":
    sys.exit(main())
