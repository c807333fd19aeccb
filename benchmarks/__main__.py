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

# each module registers its workloads (benchmarks.harness.WORKLOADS); the order of these
# imports is the order in which a run without WORKLOAD arguments runs them
from benchmarks import decode, prefill, training, loading, compile_time  # noqa: F401
from benchmarks import artifacts, memory, tokenizer  # noqa: F401
from benchmarks.harness import WORKLOADS, write_report
from benchmarks.peers import PEERS, PRECISIONS, PeerFiles, parse_peers


def _number(kind, ok, why: str):
    """An argparse type: ``kind(text)``, refused (never replaced) unless ``ok(value)``."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"{why}, got {text if kind is float else value}")
        return value
    return parse


positive_int = _number(int, lambda v: v >= 1, "must be at least 1")
positive_float = _number(float, lambda v: math.isfinite(v) and v > 0, "must be a finite number > 0")


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
    add = parser.add_argument
    add("workloads", nargs="*", metavar="WORKLOAD",
        help=f"any of {', '.join(WORKLOADS)} (default: all)")
    add("--quick", action="store_true", help="small inputs, for CI (seconds)")
    add("--out", default="runs/benchmarks", help="report directory")
    add("--model", default="gpt2",
        help="preset for model workloads: gpt2 (default), gpt2-medium, gpt2-large, gpt2-xl")
    add("--device", default="cpu", help="cpu (default) or cuda[:N]")
    add("--dtype", default="fp32", help="fp32 (default), bf16, fp16 (CUDA)")
    add("--batch-size", type=positive_int, default=None,
        help="rows of the batched decode (8) and of the training step (8)")
    add("--hf-compiled", action="store_true",
        help="add HF's static cache + torch.compile to decode on the CPU (always there on CUDA)")
    add("--peak-gbps", type=positive_float, default=None,
        help="device memory bandwidth in GB/s, for GPUs not in the spec table")
    add("--peak-tflops", type=positive_float, default=None,
        help="device peak TFLOP/s at --dtype, for GPUs not in the spec table")
    add("--threads", type=positive_int, default=None,
        help="torch threads (default: torch's own choice)")
    add("--rounds", type=positive_int, default=None,
        help="interleaved rounds (default 7, 3 with --quick)")
    add("--precisions", default=",".join(PRECISIONS),
        help=f"gptfn's precisions in decode, beside eager fp32 and HF: a comma list of "
             f"{', '.join(PRECISIONS)} (default: all; fewer need less memory, as GPT-2 XL does)")
    add("--peers", default="all",
        help="engines beside gptfn in decode and prefill: all (default: those installed), "
             f"none, or a comma list of {', '.join(PEERS)} (llama.cpp / onnxruntime: all of "
             "that engine's)")
    args = parser.parse_args(argv)
    unknown = [w for w in args.workloads if w not in WORKLOADS]
    if unknown:
        parser.error(f"unknown workload(s) {', '.join(unknown)}; known: {', '.join(WORKLOADS)}")
    if args.rounds is None:
        args.rounds = 3 if args.quick else 7
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

    try:
        args.target = Target.parse(args.device, args.dtype, args.peak_gbps, args.peak_tflops)
    except ValueError as exc:
        parser.error(str(exc))
    if args.target.is_cuda and args.target.device.index is not None:
        torch.cuda.set_device(args.target.device)  # events and streams on the device measured
    problem = check_out_dir(out)  # before minutes of work, not after
    if problem:
        print(f"python -m benchmarks: error: --out {out}: {problem}", file=sys.stderr)
        return 2
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    try:
        with PeerFiles() as args.peer_files:  # the peers' model files, shared by the workloads
            for name in args.workloads or WORKLOADS:
                _run(WORKLOADS[name], args, out)
    except OSError as e:  # a report that cannot be written (a full disk), a missing file
        print(f"python -m benchmarks: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("python -m benchmarks: interrupted", file=sys.stderr)
        return 130
    return 0


def _run(workload, args, out: Path) -> None:
    """Run one workload and report each of its results as it comes."""
    import torch

    from benchmarks.plot import plot_result

    # each run starts from an empty torch.compile cache, as in a process of its own: its
    # compile times are cold, and no capture of an earlier run's shapes (made symbolic by
    # them) serves its models
    torch._dynamo.reset()
    results = workload(args)
    for result in [results] if isinstance(results, dict) else results:
        name = result["workload"]
        write_report(out, result)
        plotted = plot_result(result, out / f"{name}.png")
        print(result["table"])
        print(f"(reports: {out / name}.json, {out / name}.md"
              f"{f', {out / name}.png' if plotted else ''})\n")


if __name__ == "__main__":
    sys.exit(main())
