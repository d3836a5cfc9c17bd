"""The benchmark script itself works (on the CPU with the tiny model); real figures come from a GPU."""
import re
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "bench.py"


def test_benchmark_script_prints_a_table_on_the_tiny_model(tmp_path):
    done = subprocess.run(
        [sys.executable, str(BENCH), "--tiny", "--workdir", str(tmp_path), "--configs", "a,b,f",
         "--unet-steps", "40", "--te-steps", "20", "--headline", "--json", str(tmp_path / "raw.json")],
        capture_output=True, text=True, timeout=1200,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    table = done.stdout[done.stdout.index("| config |"):]
    rows = {line.split("|")[1].strip(): line for line in table.splitlines() if line.startswith("| ")}
    for name in ("a", "b"):
        seconds_per_step = float(rows[name].split("|")[3].split("/")[0])
        assert 0 < seconds_per_step < 5
    assert "| 4 image(s) |" in done.stdout and "switch to another trained attempt" in done.stdout
    headline = re.search(r"Headline — `dreamnb train --preset face` as shipped, through the CLI on .*: ([0-9.]+) s wall for 25 steps", done.stdout)
    assert headline and 0 < float(headline.group(1)) < 600, done.stdout[:2000]
    assert len(list((tmp_path / "headline-session" / "class").glob("*/*.png"))) == 4  # prior preservation on, as shipped

    # the raw file keeps the machine's versions, and `--table` gives back the same table from it
    import json

    import torch
    raw = json.loads((tmp_path / "raw.json").read_text())
    assert raw["machine"]["torch"] == torch.__version__ and raw["headline"]["steps"] == 25
    again = subprocess.run([sys.executable, str(BENCH), "--table", str(tmp_path / "raw.json")], capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr[-2000:]
    assert again.stdout[again.stdout.index("| config |"):].strip() == table.strip()
    assert f"{raw['headline']['train_wall_s']} s wall for 25 steps" in again.stdout


def test_data_parallel_comparison_runs_two_processes_and_resumes_their_checkpoint_in_one(tmp_path):
    """`--gpus 2` on the CPU (gloo): the same script the 2-GPU machine runs, so a device call is not spent on a typo."""
    done = subprocess.run(
        [sys.executable, str(BENCH), "--tiny", "--workdir", str(tmp_path), "--gpus", "2", "--configs", "b",
         "--unet-steps", "30", "--te-steps", "0"],
        capture_output=True, text=True, timeout=1200,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [line.split("|") for line in done.stdout.splitlines() if line.startswith("| b ")]
    assert [row[2].strip() for row in rows] == ["1", "2"]
    assert all(0 < float(row[4]) < 10 for row in rows)  # s/step measured in both
    assert "efficiency" in rows[1][7]
    assert "b@2: All 2 processes ended with the same weights." in done.stdout
    assert "b: the 2-process run's checkpoint resumed in 1 process (Resuming attempt-1 from step 20.) and finished 30 steps." in done.stdout


def test_sdxl_configurations_run_on_the_tiny_sdxl_model(tmp_path):
    """xl-lora16, xl-t4 (prior preservation, the T4 projection from counted FLOPs) and xl-sample, on the tiny SDXL."""
    done = subprocess.run(
        [sys.executable, str(BENCH), "--tiny", "--workdir", str(tmp_path), "--configs", "xl-lora16,xl-t4,xl-sample",
         "--unet-steps", "30", "--te-steps", "0"],
        capture_output=True, text=True, timeout=1800,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "built the model" in done.stdout and "text_encoder_2" in done.stdout
    rows = {line.split("|")[1].strip(): line.split("|") for line in done.stdout.splitlines() if line.startswith("| xl-")}
    for name in ("xl-lora16", "xl-t4"):
        assert 0 < float(rows[name][3]) < 10, rows[name]  # s/step measured
    assert abs(float(rows["xl-t4"][4]) * float(rows["xl-t4"][3]) - 2) < 0.1  # images/s: 1 photo + 1 class image a step
    assert "xl-t4 on a T4, a projection: a UNet step at batch 2" in done.stdout  # prior preservation on, as shipped
    sampling = re.search(r"\| 1 image \| ([0-9.]+) s \| ([0-9.]+) s \|", done.stdout)
    assert sampling and float(sampling.group(1)) > 0 and float(sampling.group(2)) > 0
    difference = re.search(r"same seed\) \| ([0-9.]+) \|", done.stdout)
    assert difference and float(difference.group(1)) < 1.0  # dreamnb's generate and diffusers' pipeline paint the same image
