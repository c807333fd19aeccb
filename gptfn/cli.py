"""The ``gptfn`` command (also ``python -m gptfn``).

Errors a user can cause (a bad path, a bad argument, a broken checkpoint) print one line
``gptfn: error: ...`` and exit 2, with no traceback.
"""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from gptfn.config import PRESET_ALIASES, PRESETS


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gptfn", description="GPT-2 as a pure function of a flat parameter dict."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    names = ", ".join(list(PRESETS) + list(PRESET_ALIASES))
    demo = sub.add_parser(
        "demo",
        help="build a model and time eager, TorchScript and compiled forward passes",
        description="Build a model (a preset with seeded random weights, or a checkpoint), "
        "count its parameters, run a forward pass, script it, compile it, and time each "
        "against eager after checking its logits.",
    )
    demo.add_argument(
        "--model", default="gpt2", help=f"preset ({names}) or checkpoint path (default gpt2)"
    )
    demo.add_argument("--batch-size", type=_positive_int, default=1, help="default 1")
    demo.add_argument("--seq-len", type=_positive_int, default=128, help="default 128")
    demo.add_argument("--repeats", type=_positive_int, default=5, help="timed calls (default 5)")
    demo.add_argument("--seed", type=int, default=0, help="weights and input ids (default 0)")
    demo.add_argument("--threads", type=_positive_int, default=None, help="torch threads")
    demo.add_argument("--no-script", action="store_true", help="skip TorchScript")
    demo.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    demo.set_defaults(func=_cmd_demo)

    prep = sub.add_parser(
        "prepare",
        help="tokenize text files into one uint16 token file + meta.json",
        description="Tokenize text files (and directories, recursively) into OUT/tokens.bin "
        "(uint16 ids, each file followed by <|endoftext|>) and OUT/meta.json (token count, "
        "tokenizer, sha256, inputs, train/val split), streaming with bounded memory.",
    )
    prep.add_argument("inputs", nargs="+", metavar="INPUT", help="text file or directory")
    prep.add_argument("--out", required=True, help="output directory (created if missing)")
    prep.add_argument("--glob", default="*.txt", help="files to take from directories (*.txt)")
    prep.add_argument("--encoding", default="gpt2", help="gpt2 (default), r50k_base, p50k_base")
    prep.add_argument("--val-fraction", type=float, default=0.05,
                      help="last fraction of tokens held out for validation (default 0.05)")
    prep.add_argument("--errors", default="strict", choices=["strict", "replace", "ignore"],
                      help="what to do with bytes that are not UTF-8 (default: stop with an error)")
    prep.add_argument("--no-progress", action="store_true", help="no progress bar")
    prep.set_defaults(func=_cmd_prepare)
    return parser


def _cmd_prepare(args: argparse.Namespace) -> int:
    from gptfn.prepare import describe, prepare

    result = prepare(
        args.inputs, args.out, tokenizer=args.encoding, val_fraction=args.val_fraction,
        glob=args.glob, errors=args.errors, progress=not args.no_progress,
    )
    print(describe(result))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    import torch

    from gptfn.config import GPTConfig
    from gptfn.demo import format_table, run_demo
    from pathlib import Path

    if not Path(args.model).exists():
        GPTConfig.from_preset(args.model)  # an unknown name fails here, before any work
    if args.threads:
        torch.set_num_threads(args.threads)
    stages = run_demo(
        model=args.model,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        repeats=args.repeats,
        do_script=not args.no_script,
        do_compile=not args.no_compile,
        seed=args.seed,
    )
    print()
    print(format_table(stages, args.batch_size * args.seq_len))
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, OSError) as e:
        print(f"gptfn: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("gptfn: interrupted", file=sys.stderr)
        return 130
