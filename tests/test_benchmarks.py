"""The benchmark suite runs (--quick) so it never rots; its figures are not asserted here."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks.device import Clock, Target, gpu_spec
from benchmarks.harness import Samples, interleaved, markdown

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
    calls = iter(range(100))
    samples = interleaved({"n": lambda: next(calls)}, rounds=3, warmup=2, keep=True)
    assert samples.values["n"] == [2, 3, 4]  # the timed rounds' returns, none of the warm-up's


def test_markdown_aligns_text_left_and_figures_right():
    rows = [{"T": 32, "variant": "eager", "ms": 1.5, "ratio": None}]
    columns = [("T", "{T}"), ("variant", "{variant}"), ("ms", "{ms:.2f}"), ("vs", "{ratio:.2f}x")]
    assert markdown(columns, rows) == ["| T | variant | ms | vs |", "|---:|---|---:|---:|",
                                       "| 32 | eager | 1.50 | - |"]


def test_workloads_are_registered_in_the_run_order():
    from benchmarks.__main__ import WORKLOADS

    assert list(WORKLOADS) == ["decode", "prefill", "training", "loading", "compile",
                               "artifacts", "memory", "tokenize", "prepare"]


class _FakeEvent:
    """A CUDA event on a fake device whose clock only the fake work advances (ms)."""

    device_ms = 0.0

    def __init__(self, enable_timing: bool = False):
        assert enable_timing
        self.at = None

    def record(self):
        self.at = _FakeEvent.device_ms

    def synchronize(self):
        pass

    def elapsed_time(self, end):
        return end.at - self.at


def test_interleaved_times_on_the_device_clock():
    def work(ms):
        def run():
            _FakeEvent.device_ms += ms
        return run

    samples = interleaved({"a": work(5.0), "b": work(20.0)}, rounds=3, warmup=1,
                          clock=Clock("cpu", event=_FakeEvent))
    # device time between the events, not the host's few microseconds per call
    assert samples.times == {"a": [0.005] * 3, "b": [0.02] * 3}
    assert samples.ratio("a", "b") == 4.0


def test_gpu_spec_prefers_the_specific_name():
    sxm, pcie, h200 = (gpu_spec(f"NVIDIA {n}") for n in ("H100 80GB HBM3", "H100 PCIe", "H200"))
    assert sxm[0] > pcie[0] and h200[0] > sxm[0]
    assert pcie[1]["bf16"] < sxm[1]["bf16"]
    assert gpu_spec("NVIDIA A100-SXM4-80GB")[0] > gpu_spec("NVIDIA A100-PCIE-40GB")[0]
    assert gpu_spec("Some Future GPU") is None


def test_target_rejects_bad_arguments():
    assert Target.parse("cpu", "bf16").dtype == torch.bfloat16
    assert Target.parse("cpu", peak_gbps=100).spec() == (100e9, None)
    for kwargs, match in [({"dtype": "int8"}, "--dtype"), ({"dtype": "fp16"}, "fp16 is for CUDA"),
                          ({"device": "tpu"}, "--device"), ({"device": "meta"}, "cpu or cuda"),
                          ({"peak_tflops": 0}, "--peak-tflops")]:
        with pytest.raises(ValueError, match=match):
            Target.parse(**kwargs)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA"):
            Target.parse("cuda")


def test_prefill_flops_match_a_flop_counter():
    from torch.utils.flop_counter import FlopCounterMode

    from benchmarks.prefill import prefill_flops
    from gptfn import GPTConfig, GPTModel, KVCache
    from gptfn.generation import model_parts
    from gptfn.kv_cache import prefill

    cfg = GPTConfig(vocab_size=512, context_length=64, embed_dim=128, num_layers=2, num_heads=4)
    _, params = model_parts(GPTModel(cfg, seed=0))
    for t in (16, 64):
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            prefill(params, torch.zeros(1, t, dtype=torch.long), KVCache.create(cfg, 1, t), cfg)
        # the counter sees the matrix products (not the attention kernel, nor the biases and
        # norms that nanoGPT's 2N also counts): within the biases' 1% once attention is added
        attention = 4 * cfg.num_layers * t * t * cfg.embed_dim
        assert prefill_flops(cfg, t) == pytest.approx(counter.get_total_flops() + attention,
                                                      rel=0.01)


def test_quick_suite_writes_reports(tmp_path):
    r = subprocess.run([sys.executable, "-m", "benchmarks", "--quick", "--out", str(tmp_path)],
                       capture_output=True, text=True, cwd=ROOT, timeout=900)
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
    artifacts = {r["variant"]: r for r in
                 json.loads((tmp_path / "artifacts.json").read_text())["rows"]}
    # every cached decoder timed per step against the compiled step of its own model, the
    # int8 package and the C++ runner included
    decoders = {"eager", "compiled", "torchscript", "aoti", "compiled int8", "aoti int8"}
    if shutil.which(os.environ.get("CXX", "g++")):  # the C++ runner is built where it can be
        decoders.add("aoti (C++ runner)")
    assert {n for n, r in artifacts.items() if r["decode_ms"] is not None} == decoders
    assert all(artifacts[n]["decode_ms"] > 0 < artifacts[n]["decode_vs_compiled"]
               for n in decoders)
    compiled = json.loads((tmp_path / "compile.json").read_text())
    assert compiled["cold"]["graphs_after_warmup"] == compiled["warm"]["graphs_after_warmup"] == 0
    # the peers run where their engines are installed (make test installs them), and say
    # why where not
    from benchmarks.peers import PEERS, missing

    running = set(PEERS) - set(missing(list(PEERS)))
    decode = json.loads((tmp_path / "decode.json").read_text())
    formats = {f"{mode}_{scheme}" for mode in ("eager", "compiled")
               for scheme in ("bf16", "int8", "int4")}
    assert {r["variant"] for r in decode["rows"]} == ({"hf", "eager", "compiled", "aoti_int8"}
                                                      | formats | running)
    assert all(r["mb_per_token"] > 0 for r in decode["rows"])
    mb = {r["variant"]: r["mb_per_token"] for r in decode["rows"]}
    # each format reads its own bytes
    assert mb["eager_int4"] < mb["eager_int8"] < mb["eager_bf16"] < mb["eager"]
    assert set(decode["peers_left_out"]) == set(PEERS) - running
    assert decode["agreement"]["tokens_equal_to_hf"].keys() >= running
    # each precision where llama.cpp ran is matched with gptfn's faster path at it
    against = {a["precision"]: a for a in decode["against_llama_cpp"]}
    want = {"fp32": "llama.cpp-f32", "bf16": "llama.cpp-f16", "int8": "llama.cpp-q8_0",
            "int4": "llama.cpp-q4_0"}
    assert {p: a["peer"] for p, a in against.items()} == {
        p: peer for p, peer in want.items() if peer in running}
    for precision, a in against.items():
        suffix = "" if precision == "fp32" else f"_{precision}"
        assert a["gptfn"] in (f"eager{suffix}", f"compiled{suffix}", f"aoti{suffix}")
        assert a["ratio"] > 0
    # batched (4 rows in --quick), llama.cpp decodes the rows as sequences of one batch
    batched = json.loads((tmp_path / "decode_b4.json").read_text())
    llama = {n for n in running if n.startswith("llama.cpp")}
    assert {r["variant"] for r in batched["rows"]} >= llama | {"hf", "eager", "compiled"}
    assert set(batched["peers_left_out"]) == set(PEERS) - llama
    assert batched["agreement"]["tokens_equal_to_hf"].keys() >= llama
    prefill = json.loads((tmp_path / "prefill.json").read_text())
    assert {r["variant"] for r in prefill["rows"]} == {"hf", "eager", "eager_bf16",
                                                       "eager_int8", "eager_int4"} | running
    # 4-bit weights are 16 times coarser than 8-bit ones: their bound is 0.4, still well
    # below the error of a wrong model (1 or more)
    for key, error in prefill["peer_errors"].items():  # each peer computed the same model
        assert error < (0.4 if "q4_0" in key else 0.1 if "int8" in key or "q8_0" in key
                        else 2e-3), key
    errors = prefill["format_errors"]  # each format the fp32 model, within its rounding
    assert set(errors) == {f"eager_{s}@{t}" for s in ("bf16", "int8", "int4") for t in (32, 128)}
    assert all(0 < e < (0.4 if "int4" in k else 5e-2) for k, e in errors.items()), errors


def test_quick_bf16_with_hf_compiled_peer(tmp_path):
    r = subprocess.run([sys.executable, "-m", "benchmarks", "decode", "prefill", "--quick",
                        "--dtype", "bf16", "--hf-compiled", "--rounds", "2", "--peers", "none",
                        "--out", str(tmp_path)], capture_output=True, text=True, cwd=ROOT,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    decode = json.loads((tmp_path / "decode.json").read_text())
    assert decode["dtype"] == "bf16"
    assert [r["variant"] for r in decode["rows"]] == ["hf", "hf_compiled", "eager", "compiled"]
    assert decode["agreement"]["logits_relative_error"] < 3e-2
    assert 0 <= 32 * 2**20 - decode["gemv_bytes"] < 2 * 768  # 32 MiB of bf16 rows of 768
    prefill = json.loads((tmp_path / "prefill.json").read_text())
    assert all(0 < row["mfu"] for row in prefill["rows"])


def test_decode_at_chosen_precisions_only(tmp_path):
    # what GPT-2 XL needs to fit in memory: one precision a run, and no batched run
    r = subprocess.run([sys.executable, "-m", "benchmarks", "decode", "--quick", "--rounds", "1",
                        "--precisions", "bf16", "--batch-size", "1", "--peers", "none",
                        "--out", str(tmp_path)], capture_output=True, text=True, cwd=ROOT,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    decode = json.loads((tmp_path / "decode.json").read_text())
    assert [r["variant"] for r in decode["rows"]] == ["hf", "eager", "eager_bf16",
                                                      "compiled_bf16"]
    assert r.stdout.count("decode: tiny on") == 1, r.stdout  # one decode run, not two
    r = subprocess.run([sys.executable, "-m", "benchmarks", "decode", "--precisions", "fp16"],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and "--precisions: expected a comma list of fp32, bf16, int8, " \
        "int4" in r.stderr


def test_hf_peer_can_share_the_weights():
    from benchmarks.harness import hf_peer, quick_config
    from gptfn import GPTModel

    cfg = quick_config()
    model = GPTModel(cfg, seed=0).eval()
    hf = hf_peer(cfg, model, Target.parse(), share=True)
    wte = model.state_dict()["wte.weight"]
    assert hf.lm_head.weight.data_ptr() == hf.transformer.wte.weight.data_ptr() == \
        wte.data_ptr()  # one copy, the head tied to it
    idx = torch.randint(0, cfg.vocab_size, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, model(idx), rtol=1e-4, atol=1e-4)


def test_a_package_is_left_out_where_memory_is_short():
    from benchmarks.decode import _no_room_for_package

    assert _no_room_for_package(1) is None
    why = _no_room_for_package(10**15)  # a petabyte of weights
    assert why.startswith("building it needs about 2000000 GB of memory")


def test_peers_are_named_or_refused():
    from benchmarks.peers import PEERS, parse_peers

    assert parse_peers("all") == list(PEERS) and parse_peers("none") == []
    assert parse_peers("onnxruntime,llama.cpp-q8_0") == [
        "onnxruntime-fp32", "onnxruntime-int8", "llama.cpp-q8_0"]
    r = subprocess.run([sys.executable, "-m", "benchmarks", "decode", "--peers", "llama"],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and "--peers: unknown peer 'llama'" in r.stderr


def test_unknown_workload():
    r = subprocess.run([sys.executable, "-m", "benchmarks", "nope"], capture_output=True,
                       text=True, cwd=ROOT)
    assert r.returncode == 2 and "unknown workload" in r.stderr



@pytest.mark.parametrize("args, message", [
    (["--rounds", "0"], "argument --rounds: must be at least 1, got 0"),
    (["--rounds", "-3"], "argument --rounds: must be at least 1, got -3"),
    (["--threads", "0"], "argument --threads: must be at least 1, got 0"),
    (["--threads", "-1"], "argument --threads: must be at least 1, got -1"),
    (["--batch-size", "0"], "argument --batch-size: must be at least 1, got 0"),
    (["--rounds", "two"], "argument --rounds: 'two' is not an integer"),
    (["--peak-gbps", "0"], "argument --peak-gbps: must be a finite number > 0, got 0"),
    (["--peak-tflops", "inf"], "argument --peak-tflops: must be a finite number > 0, got inf"),
    (["--peak-tflops", "nan"], "argument --peak-tflops: must be a finite number > 0, got nan"),
])
def test_numeric_options_are_refused_not_replaced(tmp_path, capsys, monkeypatch, args, message):
    from benchmarks.__main__ import main
    from benchmarks.harness import WORKLOADS

    monkeypatch.setitem(WORKLOADS, "tokenize", _must_not_run)
    with pytest.raises(SystemExit) as exc:
        main(["tokenize", "--quick", "--out", str(tmp_path / "runs"), *args])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "runs").exists()  # refused before anything ran or was written


def _must_not_run(*args, **kwargs):
    raise AssertionError("a benchmark ran")


def test_an_unwritable_out_is_one_line_before_any_work(tmp_path, capsys, monkeypatch):
    import os

    from benchmarks.__main__ import main
    from benchmarks.harness import WORKLOADS

    monkeypatch.setitem(WORKLOADS, "prepare", _must_not_run)
    a_file = tmp_path / "reports.json"
    a_file.write_text("{}")
    cases = [(a_file, "exists and is not a directory"), (a_file / "sub", "Not a directory"),
             (Path("/proc/gptfn-benchmarks"), "cannot write there")]
    if os.geteuid() != 0:  # root writes through a directory's mode bits
        read_only = tmp_path / "read-only"
        read_only.mkdir(mode=0o555)
        cases.append((read_only / "runs", "Permission denied"))
    for out, reason in cases:
        assert main(["prepare", "--out", str(out)]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"python -m benchmarks: error: --out {out}")
        assert reason in lines[0]
    assert a_file.read_text() == "{}"


def test_out_with_a_tilde_is_the_home_directory(tmp_path, monkeypatch):
    """``--out '~/bench'`` writes under HOME, not into a directory named ``~`` here."""
    from benchmarks.__main__ import main
    from benchmarks.harness import WORKLOADS

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    home, here = tmp_path / "home", tmp_path / "here"
    home.mkdir()
    here.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(here)
    monkeypatch.setitem(WORKLOADS, "prepare", interrupt)
    assert main(["prepare", "--out", "~/bench"]) == 130  # after the --out check made it
    assert (home / "bench").is_dir()
    assert not list(here.iterdir())
