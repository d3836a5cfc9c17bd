"""The benchmark script itself works (on the CPU with the tiny model); real figures come from a GPU."""
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "bench.py"


def test_benchmark_script_prints_a_table_on_the_tiny_model(tmp_path):
    done = subprocess.run(
        [sys.executable, str(BENCH), "--tiny", "--workdir", str(tmp_path), "--configs", "a,b,f",
         "--unet-steps", "40", "--te-steps", "20"],
        capture_output=True, text=True, timeout=1200,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    table = done.stdout[done.stdout.index("| config |"):]
    rows = {line.split("|")[1].strip(): line for line in table.splitlines() if line.startswith("| ")}
    for name in ("a", "b"):
        seconds_per_step = float(rows[name].split("|")[3].split("/")[0])
        assert 0 < seconds_per_step < 5
    assert "| 4 image(s) |" in done.stdout and "switch to another trained attempt" in done.stdout
