"""``python -m benchmarks [WORKLOAD...] [--quick] [--out DIR] [--model PRESET] [--device D]
[--dtype fp32|bf16|fp16] [--rounds N] [--peers all|none|NAME,...]``.

Every workload runs on the CPU in fp32 by default. The decode and prefill workloads run
llama.cpp and ONNX Runtime beside gptfn where they are installed (``--peers``; batched
decode: llama.cpp only). ``--device cuda --dtype bf16`` runs the model workloads on a GPU
(CUDA-event timing, the datasheet's bandwidth and FLOP/s as the rooflines, HF's static
cache + torch.compile as a second peer in decode).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
from pathlib import Path
from typing import Optional

from benchmarks.harness import write_report
from benchmarks.peers import PEERS, PRECISIONS, PeerFiles, parse_peers

WORKLOADS = ("decode", "prefill", "training", "loading", "compile", "artifacts", "memory",
             "tokenize", "prepare")


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (0 and negatives are refused, never replaced)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def check_out_dir(out: Path) -> Optional[str]:
    """Why reports cannot be written to directory ``out`` (None: they can). Creates ``out``
    (as the run would) and a probe file in it, removed at once."""
    if out.exists() and not out.is_dir():
        return "exists and is not a directory"
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-probe.", suffix=".tmp", dir=out)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        return f"cannot write there: {e.strerror or e}"
    return None


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
    parser.add_argument("--batch-size", type=positive_int, default=None,
                        help="rows of the batched decode (8) and of the training step (8)")
    parser.add_argument("--hf-compiled", action="store_true",
                        help="add HF's static cache + torch.compile to decode on the CPU "
                             "(always there on CUDA)")
    parser.add_argument("--peak-gbps", type=positive_float, default=None,
                        help="device memory bandwidth in GB/s, for GPUs not in the spec table")
    parser.add_argument("--peak-tflops", type=positive_float, default=None,
                        help="device peak TFLOP/s at --dtype, for GPUs not in the spec table")
    parser.add_argument("--threads", type=positive_int, default=None,
                        help="torch threads (default: torch's own choice)")
    parser.add_argument("--rounds", type=positive_int, default=None,
                        help="interleaved rounds (default 7, 3 with --quick)")
    parser.add_argument("--precisions", default=",".join(PRECISIONS),
                        help="gptfn's precisions in decode, beside eager fp32 and HF: a comma "
                             f"list of {', '.join(PRECISIONS)} (default: all; fewer need less "
                             "memory, as GPT-2 XL does)")
    parser.add_argument("--peers", default="all",
                        help="engines beside gptfn in decode and prefill: all (default: those "
                             "installed), none, or a comma list of " + ", ".join(PEERS)
                             + " (llama.cpp / onnxruntime: all of that engine's)")
    args = parser.parse_args(argv)
    unknown = [w for w in args.workloads if w not in WORKLOADS]
    if unknown:
        parser.error(f"unknown workload(s) {', '.join(unknown)}; known: {', '.join(WORKLOADS)}")
    rounds = args.rounds if args.rounds is not None else (3 if args.quick else 7)
    try:
        args.peers = parse_peers(args.peers)
    except ValueError as exc:
        parser.error(f"--peers: {exc}")
    args.precisions = [p.strip() for p in args.precisions.split(",")]
    if not args.precisions or any(p not in PRECISIONS for p in args.precisions):
        parser.error(f"--precisions: expected a comma list of {', '.join(PRECISIONS)}, got "
                     f"{','.join(args.precisions)!r}")
    from gptfn import GPTConfig

    try:
        GPTConfig.from_preset(args.model)
    except ValueError as exc:
        parser.error(f"--model: {exc}")
    out = Path(args.out).expanduser()
    import torch

    from benchmarks.device import Target
    from benchmarks.plot import plot_result

    try:
        target = Target.parse(args.device, args.dtype, args.peak_gbps, args.peak_tflops)
    except ValueError as exc:
        parser.error(str(exc))
    if target.is_cuda and target.device.index is not None:
        torch.cuda.set_device(target.device)  # events and streams on the device measured
    problem = check_out_dir(out)  # before minutes of work, not after
    if problem:
        print(f"python -m benchmarks: error: --out {out}: {problem}", file=sys.stderr)
        return 2
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    try:
        _run(args, rounds, target, out, plot_result)
    except OSError as e:  # a report that cannot be written (a full disk), a missing file
        print(f"python -m benchmarks: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("python -m benchmarks: interrupted", file=sys.stderr)
        return 130
    return 0


def _run(args, rounds: int, target, out: Path, plot_result) -> None:
    with PeerFiles() as peer_files:  # the peers' model files, shared by decode and prefill
        _run_workloads(args, rounds, target, out, plot_result, peer_files)


def _run_workloads(args, rounds: int, target, out: Path, plot_result, peer_files) -> None:
    import torch

    from benchmarks import (artifacts, compile_time, decode, loading, memory, prefill, tokenizer,
                            training)

    for name in args.workloads or WORKLOADS:
        # each workload starts from an empty torch.compile cache, as in a process of its own:
        # its compile times are cold, and no capture of an earlier workload's shapes (made
        # symbolic by them) serves its models
        torch._dynamo.reset()
        if name == "decode":
            result = decode.bench_decode(args.quick, rounds, preset=args.model, target=target,
                                         hf_compiled=args.hf_compiled or None,
                                         peers=args.peers, peer_files=peer_files,
                                         precisions=args.precisions)
            _report(out, result, plot_result)
            if args.batch_size == 1:  # the batched run would be this one again
                continue
            torch._dynamo.reset()
            result = decode.bench_decode(args.quick, rounds, preset=args.model,
                                         batch_size=args.batch_size or (4 if args.quick else 8),
                                         target=target, hf_compiled=args.hf_compiled or None,
                                         peers=args.peers, peer_files=peer_files,
                                         precisions=args.precisions)
        elif name == "prefill":
            result = prefill.bench_prefill(args.quick, rounds, preset=args.model, target=target,
                                           peers=args.peers, peer_files=peer_files)
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


def _report(out: Path, result: dict, plot_result) -> None:
    name = result["workload"]
    write_report(out, name, result, result["table"])
    plotted = plot_result(result, out / f"{name}.png")
    print(result["table"])
    print(f"(reports: {out / name}.json, {out / name}.md"
          f"{f', {out / name}.png' if plotted else ''})\n")


if __name__ == "__main__":
    sys.exit(main())
