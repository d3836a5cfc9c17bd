#!/usr/bin/env bash
# The GPU acceptance suite in lanes side by side on one machine, to fit the device's 10-minute calls:
#   bash tests/gpu/lanes.sh OUTDIR "PYTEST ARGS OF LANE 1" "PYTEST ARGS OF LANE 2" ...
# Each lane is one pytest process (its log: OUTDIR/lane-N.log); every test's figures go to OUTDIR/report.jsonl
# (gpu_util.record) and every lane's outcome to OUTDIR/lanes.json. Timings taken this way include the other lanes' load.
set -u
out=$1; shift
xml=$(mktemp -d)  # junit files stay here: what comes back from the device is limited to a few files
mkdir -p "$out"
export DREAMNB_GPU_REPORT="$out/report.jsonl" PYTHONUNBUFFERED=1
pids=()
n=0
for lane in "$@"; do
  n=$((n + 1))
  # shellcheck disable=SC2086
  python3 -m pytest -q -p no:cacheprovider --junitxml="$xml/lane-$n.xml" $lane >"$out/lane-$n.log" 2>&1 &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=1; done
python3 - "$out" "$xml" "$@" <<'PY'
import json, sys, xml.etree.ElementTree as ET
from pathlib import Path
out, xml, lanes = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:]
summary = []
for n, args in enumerate(lanes, 1):
    root = ET.parse(xml / f"lane-{n}.xml").getroot()
    cases = [{"test": c.get("classname", "") + "::" + c.get("name", ""), "seconds": float(c.get("time", 0)),
              "outcome": "failed" if c.find("failure") is not None or c.find("error") is not None
              else "skipped" if c.find("skipped") is not None else "passed"} for c in root.iter("testcase")]
    summary.append({"lane": n, "args": args, "cases": cases})
    print(f"lane {n}: " + ", ".join(f"{sum(c['outcome'] == o for c in cases)} {o}" for o in ("passed", "failed", "skipped")))
(out / "lanes.json").write_text(json.dumps(summary, indent=1))
PY
exit $status
