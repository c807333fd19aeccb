"""``python -m benchmarks [WORKLOAD...] [--quick] [--out DIR] [--rounds N]``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from benchmarks.harness import write_report

WORKLOADS = ("decode", "prefill", "training", "loading", "compile", "artifacts", "memory",
             "tokenize", "prepare")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("workloads", nargs="*", metavar="WORKLOAD",
                        help=f"any of {', '.join(WORKLOADS)} (default: all)")
    parser.add_argument("--quick", action="store_true", help="small inputs, for CI (seconds)")
    parser.add_argument("--out", default="runs/benchmarks", help="report directory")
    parser.add_argument("--model", default="gpt2", help="preset for model workloads (gpt2)")
    parser.add_argument("--device", default="cpu", help="device for model workloads (cpu)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's own choice)")
    parser.add_argument("--rounds", type=int, default=None,
                        help="interleaved rounds (default 7, 3 with --quick)")
    args = parser.parse_args(argv)
    unknown = [w for w in args.workloads if w not in WORKLOADS]
    if unknown:
        parser.error(f"unknown workload(s) {', '.join(unknown)}; known: {', '.join(WORKLOADS)}")
    rounds = args.rounds or (3 if args.quick else 7)
    if rounds < 1:
        parser.error("--rounds must be at least 1")
    out = Path(args.out)
    import torch

    from benchmarks import (artifacts, compile_time, decode, loading, memory, prefill, tokenizer,
                            training)
    from benchmarks.plot import plot_result

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    for name in args.workloads or WORKLOADS:
        if name == "decode":
            result = decode.bench_decode(args.quick, rounds, preset=args.model)
            _report(out, result, plot_result)
            result = decode.bench_decode(args.quick, rounds, preset=args.model,
                                         batch_size=4 if args.quick else 8)
        elif name == "prefill":
            result = prefill.bench_prefill(args.quick, rounds, preset=args.model)
        elif name == "loading":
            result = loading.bench_loading(args.quick, rounds, preset=args.model)
        elif name == "compile":
            result = compile_time.bench_compile(args.quick, preset=args.model)
        elif name == "memory":
            result = memory.bench_memory(args.quick, preset=args.model)
        elif name == "artifacts":
            result = artifacts.bench_artifacts(args.quick, rounds, preset=args.model)
        elif name == "training":
            result = training.bench_training(args.quick, rounds, device=args.device)
        elif name == "tokenize":
            result = tokenizer.bench_tokenize(args.quick, rounds)
        else:
            result = tokenizer.bench_prepare(args.quick)
        _report(out, result, plot_result)
    return 0


def _report(out: Path, result: dict, plot_result) -> None:
    name = result["workload"]
    write_report(out, name, result, result["table"])
    plotted = plot_result(result, out / f"{name}.png")
    print(result["table"])
    print(f"(reports: {out / name}.json, {out / name}.md"
          f"{f', {out / name}.png' if plotted else ''})\n")


if __name__ == "__main__":
    sys.exit(main())
