#!/usr/bin/env bash
# The GPU acceptance suite in lanes side by side on one machine, to fit the device's 10-minute calls:
#   bash tests/gpu/lanes.sh OUTDIR "PYTEST ARGS OF LANE 1" "PYTEST ARGS OF LANE 2" ...     (each as a shell would read it)
# Every test's figures go to OUTDIR/report.jsonl (gpu_util.record), every lane's outcomes to OUTDIR/lanes.json and the
# lanes' output, one after another, to OUTDIR/lanes.log: three files, since what comes back from the device is limited.
# Timings taken this way include the other lanes' load. A lane still running after LANE_TIMEOUT seconds (default 560,
# inside the device's 10-minute call) is stopped, so the others' outcomes still come back.
set -u
out=$1; shift
work=$(mktemp -d)  # each lane's log and junit file, gathered into OUTDIR at the end
mkdir -p "$out"
export DREAMNB_GPU_REPORT="$out/report.jsonl" PYTHONUNBUFFERED=1
pids=()
n=0
for lane in "$@"; do
  n=$((n + 1))
  eval "timeout ${LANE_TIMEOUT:-560} python3 -m pytest -q -p no:cacheprovider --junitxml='$work/lane-$n.xml' $lane" >"$work/lane-$n.log" 2>&1 &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=1; done
for i in $(seq 1 $n); do printf '===== lane %s: %s\n' "$i" "${!i}"; cat "$work/lane-$i.log"; done >"$out/lanes.log"
python3 - "$out" "$work" "$@" <<'PY'
import json, sys, xml.etree.ElementTree as ET
from pathlib import Path
out, work, lanes = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:]
summary = []
for n, args in enumerate(lanes, 1):
    junit = work / f"lane-{n}.xml"
    root = ET.parse(junit).getroot() if junit.exists() else ET.Element("none")
    cases = [{"test": c.get("classname", "") + "::" + c.get("name", ""), "seconds": float(c.get("time", 0)),
              "outcome": "failed" if c.find("failure") is not None or c.find("error") is not None
              else "skipped" if c.find("skipped") is not None else "passed"} for c in root.iter("testcase")]
    summary.append({"lane": n, "args": args, "cases": cases})
    print(f"lane {n} ({args}): " + ", ".join(f"{sum(c['outcome'] == o for c in cases)} {o}" for o in ("passed", "failed", "skipped")))
(out / "lanes.json").write_text(json.dumps(summary, indent=1))
PY
exit $status
