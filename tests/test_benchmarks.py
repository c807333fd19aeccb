"""The benchmark suite runs (--quick) so it never rots; its figures are not asserted here."""

import json
import subprocess
import sys
from pathlib import Path

from benchmarks.harness import Samples, interleaved

ROOT = Path(__file__).resolve().parents[1]


def test_interleaved_rounds_and_ratio():
    order = []
    samples = interleaved({"a": lambda: order.append("a"), "b": lambda: order.append("b")},
                          rounds=3, warmup=1)
    assert order == ["a", "b"] * 4  # warm-up round, then 3 rounds, interleaved
    assert all(len(t) == 3 for t in samples.times.values())
    s = Samples({"base": [2.0, 4.0, 6.0], "fast": [1.0, 1.0, 3.0]})
    assert s.ratio("fast", "base") == 2.0  # median of per-round ratios 2, 4, 2
    assert s.median("base") == 4.0


def test_quick_suite_writes_reports(tmp_path):
    r = subprocess.run([sys.executable, "-m", "benchmarks", "--quick", "--out", str(tmp_path)],
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr
    tokenize = json.loads((tmp_path / "tokenize.json").read_text())
    assert {row["variant"] for row in tokenize["rows"]} == {"tiktoken", "gptfn"}
    assert len(tokenize["samples_s"]["gptfn"]) == 3
    prepare = json.loads((tmp_path / "prepare.json").read_text())
    assert prepare["tokens"] > 0 and prepare["peak_rss_mb"] > 0
    assert (tmp_path / "tokenize.md").read_text().startswith("| variant |")
    for name in ("decode", "prefill", "training", "loading", "artifacts", "memory"):
        result = json.loads((tmp_path / f"{name}.json").read_text())
        assert result["rows"] and result["environment"]["cpu_count"] >= 1, name
        assert (tmp_path / f"{name}.png").read_bytes()[:4] == b"\x89PNG", name
    memory = json.loads((tmp_path / "memory.json").read_text())
    assert all(r["peak_mb"] >= r["after_build_mb"] > 0 for r in memory["rows"])
    compiled = json.loads((tmp_path / "compile.json").read_text())
    assert compiled["cold"]["graphs_after_warmup"] == compiled["warm"]["graphs_after_warmup"] == 0
    decode = json.loads((tmp_path / "decode.json").read_text())
    assert {r["variant"] for r in decode["rows"]} == {"hf", "eager", "compiled"}


def test_unknown_workload():
    r = subprocess.run([sys.executable, "-m", "benchmarks", "nope"], capture_output=True,
                       text=True, cwd=ROOT)
    assert r.returncode == 2 and "unknown workload" in r.stderr
