"""The publisher benchmark runs and reports every encoding (its figures belong to the README,
not to assertions)."""

import orjson

from freshrec.cli import main


def test_bench_publisher_quick(stack, capsys):
    assert main(["bench", "publisher", "--quick", "--redis-url", stack.redis_url]) == 0
    report = orjson.loads(capsys.readouterr().out.strip().splitlines()[-1])
    cells = {(r["encoding"], r["compression"]) for r in report["results"]}
    assert {("fp32", "none"), ("fp16", "none"), ("int8", "none"), ("torch.save", "none")} <= cells
    fp32 = next(r for r in report["results"] if (r["encoding"], r["compression"]) == ("fp32", "none"))
    assert fp32["vs_raw"] <= 1.05  # the format's overhead over key + values (a size, not a time)
    assert set(report["score_change"]) == {"fp16", "int8"}
