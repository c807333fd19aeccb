"""``python -m export torchscript|pt2|aoti --model NAME_OR_PATH [--random-init] --out PATH
[--dtype D] [--device D] [--max-seq-len N]``: build, verify against eager, keep.

The artifact and its report ``OUT.report.json`` (which names each artifact with its size and
sha256) are written as one unit (see ``export.commit``). Each stage says on stderr what it
is doing. Exit status 0 only after the artifact was verified; 1 when verification failed
(nothing is kept); 2 for bad arguments or a failed write (a full disk), with a one-line
error; 130 when interrupted.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m export", description=__doc__.split("\n\n")[0])
    parser.add_argument("kind", choices=["torchscript", "pt2", "aoti"])
    parser.add_argument("--model", default="gpt2", help="model name or checkpoint path (gpt2)")
    parser.add_argument("--random-init", action="store_true",
                        help="random weights for a preset (no pretrained weights needed)")
    parser.add_argument("--out", required=True, help="artifact path (.pt or .pt2)")
    parser.add_argument("--dtype", default="float32", help="float32 (default) or bfloat16")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--max-seq-len", type=int, default=None,
                        help="longest sequence the artifact serves, at least 17 (default: "
                             "context_length)")
    parser.add_argument("--seed", type=int, default=0, help="--random-init weights, test inputs")
    args = parser.parse_args(argv)
    try:
        import torch

        from export.build import artifact_paths, build, check_request
        from export.verify import VerificationError, format_report, verify
        from gptfn.weights.resolve import load_model, parse_device, parse_dtype

        device, dtype = parse_device(args.device), parse_dtype(args.dtype)
        out = Path(args.out).expanduser()
        if args.max_seq_len is not None:  # refused before the model is even loaded
            check_decode_length(args.max_seq_len)
        _status(f"loading {args.model}")
        model = load_model(args.model, args.random_init, args.seed, dtype, device)
        max_seq_len = args.max_seq_len or model.config.context_length
        check_request(model.config, out, max_seq_len, device, dtype)
        check_decode_length(max_seq_len)  # verify needs it: say so before any build
        with torch.no_grad():
            report = build(args.kind, model, out, max_seq_len,
                           lambda kind, paths: verify(kind, paths, model, max_seq_len, args.seed),
                           log=_status)
        print(format_report(report))
        print(f"verified and written: {', '.join(map(str, artifact_paths(args.kind, out)))}")
        return 0
    except VerificationError as e:
        print(f"export: verification failed, nothing kept: {e}", file=sys.stderr)
        return 1
    except (ValueError, OSError, ImportError) as e:
        print(f"export: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("export: interrupted", file=sys.stderr)
        return 130


def check_decode_length(max_seq_len: int) -> None:
    """The verification decodes ``MIN_DECODE_STEPS`` steps after a prompt: a shorter
    ``max_seq_len`` (or a model's context_length, its default) is refused up front, with the
    message verification would give after the whole build."""
    from export.verify import MIN_DECODE_STEPS

    if max_seq_len < MIN_DECODE_STEPS + 1:
        raise ValueError(f"max_seq_len must be at least {MIN_DECODE_STEPS + 1} to verify "
                         f"{MIN_DECODE_STEPS} decode steps, got {max_seq_len}")


def _status(message: str) -> None:
    """A long step says what it is doing (on stderr: stdout carries the report)."""
    print(f"export: {message} ...", file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
