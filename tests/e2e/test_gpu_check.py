"""The GPU check's CPU smoke mode: the same driver, subprocess and tables a lent GPU will run, on tiny shapes, so a
device call never finds a script that has not run end to end."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]


def test_cpu_smoke_writes_every_table_with_every_planned_cell(tmp_path: Path) -> None:
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable, "GPU_CHECK_SCRATCH": str(tmp_path)}
    done = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh"), "--cpu-smoke"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]

    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["groups"] == {"smoke": "ok"}
    rows = summary["rows"]
    memory = [r for r in rows if r["table"] == "memory"]
    speed = [r for r in rows if r["table"] == "speed"]
    assert {r["method"] for r in memory} == {"lora", "qlora", "full"}
    assert all(r["status"] == "ok" and r["estimate_gib"] > 0 for r in memory), memory
    assert all(r.get("allocated_gib") is None for r in memory)  # no CUDA allocator: n/a, never a made-up figure

    measured = [r for r in speed if not r["liger"]]
    assert {r["trainer"] for r in measured} == {"finetune", "plain TRL"}
    for row in measured:
        assert row["status"] == "ok", row
        assert row["tokens_per_s"] > 0 and 0 < row["mfu_pct"] < 100 and row["flops_per_token"] > 0
    assert all(r["status"].startswith("not measured") for r in speed if r["liger"])

    for name, count in (("memory", len(memory)), ("speed", len(speed))):
        table = (tmp_path / f"{name}.md").read_text().splitlines()
        header = next(i for i, line in enumerate(table) if line.startswith("| model"))
        body = [line for line in table[header + 2:] if line.startswith("|")]
        assert len(body) == count
        assert all(line.count("|") == table[header].count("|") for line in body)
        with (tmp_path / f"{name}.csv").open() as handle:
            assert len(list(csv.DictReader(handle))) == count
