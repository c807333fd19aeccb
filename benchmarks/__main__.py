"""``python -m benchmarks [WORKLOAD...] [--quick] [--out DIR] [--model PRESET] [--device D]
[--dtype fp32|bf16|fp16] [--rounds N]``.

Every workload runs on the CPU in fp32 by default. ``--device cuda --dtype bf16`` runs the
model workloads on a GPU (CUDA-event timing, the datasheet's bandwidth and FLOP/s as the
rooflines, HF's static cache + torch.compile as a second peer in decode).
"""

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
    parser.add_argument("--model", default="gpt2",
                        help="preset for model workloads: gpt2 (default), gpt2-medium, "
                             "gpt2-large, gpt2-xl")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")
    parser.add_argument("--dtype", default="fp32", help="fp32 (default), bf16, fp16 (CUDA)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="rows of the batched decode (8) and of the training step (8)")
    parser.add_argument("--hf-compiled", action="store_true",
                        help="add HF's static cache + torch.compile to decode on the CPU "
                             "(always there on CUDA)")
    parser.add_argument("--peak-gbps", type=float, default=None,
                        help="device memory bandwidth in GB/s, for GPUs not in the spec table")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="device peak TFLOP/s at --dtype, for GPUs not in the spec table")
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
    if args.batch_size is not None and args.batch_size < 1:
        parser.error("--batch-size must be at least 1")
    from gptfn import GPTConfig

    try:
        GPTConfig.from_preset(args.model)
    except ValueError as exc:
        parser.error(f"--model: {exc}")
    out = Path(args.out)
    import torch

    from benchmarks import (artifacts, compile_time, decode, loading, memory, prefill, tokenizer,
                            training)
    from benchmarks.device import Target
    from benchmarks.plot import plot_result

    try:
        target = Target.parse(args.device, args.dtype, args.peak_gbps, args.peak_tflops)
    except ValueError as exc:
        parser.error(str(exc))
    if target.is_cuda and target.device.index is not None:
        torch.cuda.set_device(target.device)  # events and streams on the device measured
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    for name in args.workloads or WORKLOADS:
        if name == "decode":
            result = decode.bench_decode(args.quick, rounds, preset=args.model, target=target,
                                         hf_compiled=args.hf_compiled or None)
            _report(out, result, plot_result)
            result = decode.bench_decode(args.quick, rounds, preset=args.model,
                                         batch_size=args.batch_size or (4 if args.quick else 8),
                                         target=target, hf_compiled=args.hf_compiled or None)
        elif name == "prefill":
            result = prefill.bench_prefill(args.quick, rounds, preset=args.model, target=target)
        elif name == "loading":
            result = loading.bench_loading(args.quick, rounds, preset=args.model, target=target)
        elif name == "compile":
            result = compile_time.bench_compile(args.quick, preset=args.model, target=target)
        elif name == "memory":
            result = memory.bench_memory(args.quick, preset=args.model, target=target)
        elif name == "artifacts":
            result = artifacts.bench_artifacts(args.quick, rounds, preset=args.model,
                                               target=target)
        elif name == "training":
            result = training.bench_training(args.quick, rounds, preset=args.model,
                                             target=target, batch_size=args.batch_size)
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
