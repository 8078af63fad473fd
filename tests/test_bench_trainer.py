"""`freshrec bench trainer --quick` on the session's broker: every produced sample is learned
on the path from Kafka, and the last line is the JSON of the figures (no speed is asserted)."""

from __future__ import annotations

import argparse
import json

from freshrec.bench import trainer


def test_quick_bench_learns_everything_and_ends_with_json(kafka_config, capsys):
    parser = argparse.ArgumentParser()
    trainer.add_arguments(parser)
    args = parser.parse_args(["--quick", "--models", "dlrm,wide_deep", "--samples", "3000",
                              "--bootstrap", kafka_config.bootstrap_servers])
    assert trainer.run(args) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [m["model"] for m in result["models"]] == ["dlrm", "wide_deep"]
    for m in result["models"]:
        assert m["in_memory_per_s"] > 0
        for fmt in ("json", "binary"):
            assert m[fmt]["learned"] == [3000] and m[fmt]["dead_letters"] == 0
            assert m[fmt]["kafka_per_s"] > 0 and m[fmt]["ratio"] > 0
