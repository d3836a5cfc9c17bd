"""The fault suite's record: every fault test says what it tried, whether it fired and where; the session ends with
a table of the counts (the one tests/README.md quotes) and, with DREAMNB_FAULT_REPORT=path.json, writes them there."""
from __future__ import annotations

import os
import platform
import time

import pytest

RECORDS = pytest.StashKey[list]()
STARTED = time.time()  # this file is imported as the suite is collected


@pytest.fixture
def fault(request):
    """record(family, point, fired, where): one fault a test tried. Call it before asserting that it fired, so a fault
    that did not fire is counted too."""
    records = request.config.stash.setdefault(RECORDS, [])

    def record(family: str, point: str, fired: bool, where: str) -> None:
        records.append({"test": request.node.nodeid, "family": family, "point": point, "fired": bool(fired), "where": where})
    return record


def counts(records: list[dict]) -> list[dict]:
    """The records as one row per (family, point), in the order the suite first tried them."""
    rows: dict[tuple[str, str], dict] = {}
    for r in records:
        row = rows.setdefault((r["family"], r["point"]), {"family": r["family"], "point": r["point"], "tried": 0, "fired": 0, "where": []})
        row["tried"] += 1
        row["fired"] += r["fired"]
        row["where"].append(r["where"] if r["fired"] else f"NOT FIRED: {r['where']}")
    return list(rows.values())


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    records = config.stash.get(RECORDS, [])
    if not records:
        return
    rows = counts(records)
    terminalreporter.section("faults tried (tried / fired)")
    for row in rows:
        terminalreporter.write_line(f"{row['family']} | {row['point']} | {row['tried']} / {row['fired']} | {'; '.join(row['where'])}")
    path = os.environ.get("DREAMNB_FAULT_REPORT")
    if path:
        from dreamnb import fileio

        stats = terminalreporter.stats
        fileio.write_json(path, {
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores",
            "seeds": int(os.environ.get("DREAMNB_FAULT_SEEDS", "7")),
            "args": config.invocation_params.args,
            "passed": len(stats.get("passed", [])), "failed": len(stats.get("failed", [])),
            "skipped": len(stats.get("skipped", [])), "errors": len(stats.get("error", [])),
            "duration_s": round(time.time() - STARTED),
            "faults": rows,
        })
        terminalreporter.write_line(f"fault counts written to {path}")
