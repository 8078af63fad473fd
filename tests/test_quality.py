"""`freshrec bench quality --quick`: the online learner beats its frozen copy on the drifting
stream, and the table, plot and JSON line are written."""

from __future__ import annotations

import argparse
import json

from freshrec.bench import quality


def test_online_beats_frozen_on_the_drifting_stream(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    quality.add_arguments(parser)
    out = tmp_path / "quality.png"
    code = quality.run(parser.parse_args(["--quick", "--out", str(out)]))
    lines = capsys.readouterr().out.strip().splitlines()
    result = json.loads(lines[-1])
    assert code == 0 and result["pass"] and result["gap"] >= quality.MIN_GAP
    assert result["online_auc"] > result["frozen_auc"] and result["oracle_auc"] > result["online_auc"]
    assert any(line.startswith("| mean after the freeze") for line in lines)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
