"""Smoke test of `freshrec bench serving --quick`: it runs end to end and its last line is
the JSON summary. No timed assertions: the figures themselves are not checked."""

from __future__ import annotations

import json
import subprocess
import sys


def test_bench_serving_quick_runs_and_ends_with_json(redis_config):
    done = subprocess.run([sys.executable, "-m", "freshrec.cli", "bench", "serving", "--quick",
                           "--redis-url", redis_config.url], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    summary = json.loads(lines[-1])
    assert summary["benchmark"] == "serving" and summary["quick"] is True
    assert summary["deltas"]["applied"] >= 1
    assert summary["peak_qps"]["freshrec"] > 0 and summary["peak_qps"]["naive"] > 0
    assert any(line.startswith("closed c=") for line in lines)
    late = summary["generator_late_max_ms_by_window"]
    assert len(late["idle"]) == 2 and len(late["deltas"]) == 1 and all(x >= 0 for x in late["idle"] + late["deltas"])
    # The worker answered requests in every window, so it used CPU; one worker thread, one core at most.
    cpu = summary["server_cpu_by_window"]
    assert len(cpu["idle"]) == 2 and len(cpu["deltas"]) == 1 and all(0 < x < 1.5 for x in cpu["idle"] + cpu["deltas"])
