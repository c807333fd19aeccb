"""The ``gptfn`` command (also ``python -m gptfn``).

Errors a user can cause (a bad path, a bad argument, a broken checkpoint) print one line
``gptfn: error: ...`` and exit 2, with no traceback.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from typing import List, Optional

from gptfn.config import MODEL_NAMES, PRESETS


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _seed(text: str) -> int:
    """A seed torch and numpy both take: an integer in [0, 2**63)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer seed, got {text!r}") from None
    if not 0 <= value < 2**63:
        raise argparse.ArgumentTypeError(f"a seed must be in [0, 2**63), got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gptfn", description="GPT-2 as a pure function of a flat parameter dict."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    names = ", ".join(MODEL_NAMES)
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
    demo.add_argument("--seed", type=_seed, default=0, help="weights and input ids (default 0)")
    demo.add_argument("--threads", type=_positive_int, default=None, help="torch threads")
    demo.add_argument("--new-tokens", type=int, default=64,
                      help="greedy tokens to generate per row, 0 to skip (default 64)")
    demo.add_argument("--no-script", action="store_true", help="skip TorchScript")
    demo.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    demo.set_defaults(func=_cmd_demo)

    gen = sub.add_parser(
        "generate",
        help="generate text from a prompt",
        description="Generate text with a KV cache: greedy by default, or sampled with "
        "--temperature / --top-k / --top-p. --model is a checkpoint path or a model name "
        "(its pretrained weights from gptfn's cache, downloaded there when missing unless "
        "GPTFN_OFFLINE=1).",
    )
    gen.add_argument("--model", default="gpt2", help=f"preset ({names}) or checkpoint path")
    gen.add_argument("--prompt", default="Hello, I'm a language model,", help="the prompt text")
    gen.add_argument("--max-new-tokens", type=_positive_int, default=50, help="default 50")
    gen.add_argument("--temperature", type=float, default=None,
                     help="0 = greedy (the default, unless --top-k or --top-p is given: then 1)")
    gen.add_argument("--top-k", type=int, default=None,
                     help="sample from the k most likely tokens")
    gen.add_argument("--top-p", type=float, default=None,
                     help="sample from the smallest set of tokens holding this probability mass")
    gen.add_argument("--seed", type=_seed, default=0, help="sampling (and --random-init) seed")
    gen.add_argument("--compile", action="store_true", help="compile the decode step")
    gen.add_argument("--device", default="auto", help="cpu, cuda, cuda:N (default: auto)")
    gen.add_argument("--dtype", default=None, help="float32 (default), float16, bfloat16")
    gen.add_argument("--stream", action="store_true", help="print tokens as they come")
    gen.add_argument("--random-init", action="store_true",
                     help="use random weights for a preset (no pretrained weights needed)")
    gen.set_defaults(func=_cmd_generate)

    dl = sub.add_parser(
        "download",
        help="download GPT-2 weights into gptfn's cache (resumable)",
        description="Download a GPT-2 model's files into gptfn's cache: the hub's "
        "model.safetensors + config.json (--source hf), or OpenAI's TF release (--source "
        "openai). Interrupted transfers resume; files already cached are not fetched again.",
    )
    dl.add_argument("name", metavar="NAME", help=names)
    dl.add_argument("--source", default="hf", choices=["hf", "openai"], help="default hf")
    dl.add_argument("--base-url", default=None,
                    help="server to fetch from (default: the hub, or $HF_ENDPOINT; OpenAI's "
                    "storage, or $GPTFN_OPENAI_BASE_URL)")
    dl.add_argument("--cache-dir", default=None,
                    help="cache directory (default $GPTFN_CACHE_DIR or ~/.cache/gptfn)")
    dl.add_argument("--no-progress", action="store_true", help="no progress bars")
    dl.set_defaults(func=_cmd_download)

    conv = sub.add_parser(
        "convert",
        help="convert an OpenAI TF checkpoint to model.safetensors + config.json",
        description="Read an OpenAI GPT-2 release directory (hparams.json + model.ckpt.*, "
        "needs gptfn[tf]) and write the canonical layout that GPTModel.from_pretrained and HF "
        "transformers read.",
    )
    conv.add_argument("checkpoint", metavar="TF_CHECKPOINT_DIR")
    conv.add_argument("--out", required=True, help="output directory (created if missing)")
    conv.set_defaults(func=_cmd_convert)

    qz = sub.add_parser(
        "quantize",
        help="write a model in a weight format (bf16, fp16, int8, int4) that gptfn runs",
        description="Read a model (a checkpoint path or a model name) and write it with "
        "its matrices (wte and each block's four) in a weight format: bf16 or fp16, int8 "
        "with one scale per output channel, or int4 with one scale per 32 inputs (as llama.cpp's "
        "q4_0). Compute stays fp32. The result is model.safetensors "
        "+ config.json (recording the format under \"quantization\"), which gptfn generate, "
        "gptfn eval and GPTModel.from_pretrained read.",
    )
    qz.add_argument("--model", required=True, help="checkpoint path or model name")
    qz.add_argument("--out", required=True, help="output directory (created if missing)")
    qz.add_argument("--scheme", required=True, choices=["bf16", "fp16", "int8", "int4"])
    qz.set_defaults(func=_cmd_quantize)

    tr = sub.add_parser(
        "train",
        help="train or fine-tune a model",
        description="Train from scratch (--init random) or fine-tune (--init gpt2 or a "
        "checkpoint path). RUN_DIR receives model.safetensors + config.json, metrics.jsonl, "
        "losses.png and a resumable checkpoint. Under torchrun, trains with "
        "DistributedDataParallel (gloo on CPU, nccl on GPU).",
    )
    tr.add_argument("--data", required=True, help="text file or `gptfn prepare` directory")
    tr.add_argument("--config", default=None,
                    help="preset name or JSON file (with --init random; default gpt2)")
    tr.add_argument("--out", required=True,
                    help="run directory: gptfn writes only inside it, and refuses one that holds "
                    "another run unless --resume or --overwrite is given")
    tr.add_argument("--init", default="random", help="random (default), a model name, or a path")
    tr.add_argument("--max-steps", type=_positive_int, default=1000, help="default 1000")
    tr.add_argument("--batch-size", type=_positive_int, default=8, help="per process (default 8)")
    tr.add_argument("--grad-accum", type=_positive_int, default=1, help="default 1")
    tr.add_argument("--context-length", type=_positive_int, default=None,
                    help="window length (default: the model's context_length)")
    tr.add_argument("--lr", type=float, default=6e-4, help="peak learning rate (default 6e-4)")
    tr.add_argument("--warmup-steps", type=int, default=None,
                    help="default: 10%% of --max-steps, at most 100")
    tr.add_argument("--eval-interval", type=_positive_int, default=100,
                    help="steps between evaluations (default 100)")
    tr.add_argument("--checkpoint-interval", type=_positive_int, default=None,
                    help="steps between checkpoints (default: --eval-interval); Ctrl-C and "
                    "SIGTERM also save one")
    tr.add_argument("--eval-batches", type=_positive_int, default=10,
                    help="batches per evaluation (default 10)")
    tr.add_argument("--seed", type=_seed, default=0, help="weights, data order, dropout")
    tr.add_argument("--device", default="auto", help="cpu, cuda (default: auto)")
    tr.add_argument("--resume", action="store_true", help="continue from RUN_DIR's checkpoint")
    tr.add_argument("--overwrite", action="store_true",
                    help="delete the run already in RUN_DIR (its checkpoints, metrics, plot and "
                    "model) and start again")
    tr.add_argument("--no-progress", action="store_true", help="no progress bar")
    tr.set_defaults(func=_cmd_train)

    sub.add_parser(
        "export", add_help=False,
        help="export a model: torchscript, pt2, aoti, gguf (llama.cpp) or onnx (ONNX Runtime)",
        description="The export suite (python -m export); see gptfn export --help.",
    )

    ev = sub.add_parser("eval", help="loss and perplexity of a model on a text or corpus",
                        description="Mean next-token loss and perplexity over windows of DATA.")
    ev.add_argument("--model", required=True,
                    help=f"checkpoint path, or a model name ({names})")
    ev.add_argument("--data", required=True, help="text file or `gptfn prepare` directory")
    ev.add_argument("--context-length", type=_positive_int, default=None,
                    help="window length (default: the model's context_length)")
    ev.add_argument("--batch-size", type=_positive_int, default=8,
                    help="windows per batch (default 8)")
    ev.add_argument("--max-batches", type=_positive_int, default=None,
                    help="evaluate only the first N batches (default: all)")
    ev.add_argument("--device", default="auto", help="cpu, cuda, cuda:N (default: auto)")
    ev.add_argument("--no-progress", action="store_true", help="no progress bar")
    ev.set_defaults(func=_cmd_eval)

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


def _cmd_generate(args: argparse.Namespace) -> int:
    import time

    import torch

    from gptfn.cli_args import load_model, parse_device, parse_dtype
    from gptfn.generation import check_sampling, stream
    from gptfn.tokenizer import BPETokenizer

    if args.temperature is None:
        args.temperature = 1.0 if (args.top_k is not None or args.top_p is not None) else 0.0
    elif args.temperature == 0 and (args.top_k is not None or args.top_p is not None):
        print("gptfn: warning: --temperature 0 is greedy decoding, which ignores --top-k and "
              "--top-p", file=sys.stderr)
    check_sampling(args.temperature, args.top_k, args.top_p)
    device, dtype = parse_device(args.device), parse_dtype(args.dtype)
    tokenizer = BPETokenizer()
    ids = tokenizer.encode(args.prompt)
    if not ids:
        raise ValueError("the prompt is empty: give --prompt some text")
    model = load_model(args.model, args.random_init, args.seed, dtype, device)
    if device.type == "cpu":  # decoding streams the weights: from 2 MB pages (gptfn.hugepages)
        from gptfn.hugepages import huge_pages

        model = huge_pages(model)
    if model.config.vocab_size < tokenizer.n_vocab:
        raise ValueError(
            f"model vocab_size {model.config.vocab_size} is smaller than GPT-2's tokenizer "
            f"({tokenizer.n_vocab} ids)"
        )
    generator = torch.Generator(device=device).manual_seed(args.seed)
    idx = torch.tensor([ids], device=device)
    if args.stream:
        sys.stdout.write(args.prompt)
        sys.stdout.flush()
    pieces, stamps = [], [time.perf_counter()]
    for piece in stream(
        model, idx, args.max_new_tokens, tokenizer=tokenizer, temperature=args.temperature,
        top_k=args.top_k, top_p=args.top_p, eos_id=tokenizer.eot_token, generator=generator,
        compile=args.compile,
    ):
        if piece.ids:
            stamps.append(time.perf_counter())
            if piece.ids[0] == tokenizer.eot_token:
                break
        pieces.append(piece.texts[0])
        if args.stream:
            sys.stdout.write(piece.texts[0])
            sys.stdout.flush()
    print(("" if args.stream else args.prompt + "".join(pieces)))
    new = len(stamps) - 1
    report = (f"{new} new tokens; first token after {(stamps[1] - stamps[0]) * 1e3:.0f} ms"
              if new else "no new tokens")
    if new >= 3:
        first_step = stamps[2] - stamps[1]
        rate = (new - 2) / (stamps[-1] - stamps[2]) if stamps[-1] > stamps[2] else float("inf")
        report += (f"; first decode step {first_step:.2f} s"
                   f"{' (includes compiling)' if args.compile else ''}; then {rate:.1f} tokens/s")
    print(f"[{report}; model {args.model}, {device}, {dtype or torch.float32}]", file=sys.stderr)
    return 0


def _cmd_download(args: argparse.Namespace) -> int:
    from gptfn.weights.download import download

    path = download(args.name, source=args.source, base_url=args.base_url,
                    cache_dir=args.cache_dir, progress=not args.no_progress)
    print(path)
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    from gptfn.weights import save_params
    from gptfn.weights.openai_tf import load_tf_checkpoint

    config, params = load_tf_checkpoint(args.checkpoint)
    out = save_params(params, args.out, config)
    print(f"wrote {out / 'model.safetensors'} and {out / 'config.json'} "
          f"({sum(t.numel() for t in params.values()):,} parameters)")
    return 0


def _cmd_quantize(args: argparse.Namespace) -> int:
    from pathlib import Path

    from gptfn.cli_args import load_model
    from gptfn.quantization import quantize

    source = Path(args.model).expanduser()
    out = Path(args.out).expanduser()
    source_dir = source if source.is_dir() else source.parent
    if source.exists() and out.exists() and out.resolve() == source_dir.resolve():
        raise ValueError(f"--out {out} is the directory the model is read from: "
                         "choose another, so that the original stays")
    model = load_model(args.model, random_hint="")
    quantized = quantize(model, args.scheme)
    path = quantized.save_pretrained(out)
    size = sum(t.numel() * t.element_size() for t in quantized.state_dict().values())
    print(f"wrote {path / 'model.safetensors'} and {path / 'config.json'} "
          f"({args.scheme}, {size / 1e6:.1f} MB)")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from gptfn.cli_args import load_model, parse_device
    from gptfn.data import check_vocabulary, load_training_data
    from gptfn.distributed import process_group
    from gptfn.modules import GPTModel
    from gptfn.tokenizer import BPETokenizer
    from gptfn.train import TrainSettings, train

    with process_group(parse_device(args.device)) as proc:  # torchrun's processes, or this one
        if args.resume and args.overwrite:
            raise ValueError("--resume continues the run in --out and --overwrite deletes it: "
                             "give one of them")
        if args.init == "random":
            config = _config_arg(args.config or "gpt2")
            model = GPTModel(config, seed=args.seed)
        else:
            if args.config is not None:
                raise ValueError("--config goes with --init random; a pretrained model brings "
                                 "its own")
            model = load_model(args.init, random_hint=", or pass --init random (with "
                               "--config) to train from random weights")
        context = args.context_length or model.config.context_length
        if context > model.config.context_length:
            raise ValueError(f"--context-length {context} exceeds the model's context_length "
                             f"{model.config.context_length}")
        tokenizer = BPETokenizer()
        check_vocabulary(args.data, model.config.vocab_size)
        train_set, val_set = load_training_data(args.data, context, tokenizer)
        warmup = (args.warmup_steps if args.warmup_steps is not None
                  else min(100, args.max_steps // 10))
        settings = TrainSettings(
            max_steps=args.max_steps, batch_size=args.batch_size, grad_accum=args.grad_accum,
            lr=args.lr, warmup_steps=warmup, eval_interval=args.eval_interval,
            eval_batches=args.eval_batches, seed=args.seed,
            checkpoint_interval=args.checkpoint_interval,
        )
        log = lambda message: print(message, file=sys.stderr)  # noqa: E731
        result = train(model, train_set, val_set, settings, args.out, tokenizer=tokenizer,
                       resume=args.resume, overwrite=args.overwrite, device=proc.device,
                       rank=proc.rank, world_size=proc.world_size,
                       progress=not args.no_progress, log=log)
        if proc.rank == 0 and result["metrics"]:
            last = result["metrics"][-1]
            print(f"trained {result['steps']} steps ({result['tokens']:,} tokens); final train "
                  f"loss {last['train_loss']:.3f}, val loss {last['val_loss']:.3f}; "
                  f"model in {args.out}")
    return 0


def _config_arg(spec: str):
    """``--config``: a preset name, or a JSON file (a path, or any name ending in .json)."""
    from pathlib import Path

    from gptfn.config import GPTConfig

    path = Path(spec).expanduser()
    if path.is_file():
        return GPTConfig.from_json(path)
    if path.suffix == ".json" or "/" in spec or path.exists():
        raise FileNotFoundError(f"--config {spec}: no such file (nor a preset name: "
                                f"{', '.join(PRESETS)})")
    return GPTConfig.from_preset(spec)


def _cmd_eval(args: argparse.Namespace) -> int:
    import math

    from gptfn.cli_args import load_model, parse_device
    from gptfn.data import check_vocabulary, load_windows
    from gptfn.train import evaluate, fixed_batches

    device = parse_device(args.device)
    model = load_model(args.model, device=device, random_hint="")
    context = args.context_length or model.config.context_length
    if context > model.config.context_length:
        raise ValueError(f"--context-length {context} exceeds the model's context_length "
                         f"{model.config.context_length}")
    check_vocabulary(args.data, model.config.vocab_size)
    data = load_windows(args.data, context)
    batches = -(-len(data) // args.batch_size)
    count = min(batches, args.max_batches or batches)
    result = evaluate(model, _progress(fixed_batches(data, args.batch_size, count),
                                       not args.no_progress), device)
    print(f"loss {result['loss']:.4f}  perplexity {result['perplexity']:.2f}  "
          f"({count} batches of up to {args.batch_size} x {context} tokens)")
    return 0 if math.isfinite(result["loss"]) else 1


def _progress(batches: list, enabled: bool):
    from tqdm import tqdm

    return tqdm(batches, desc="eval", unit="batch", disable=not enabled, mininterval=0.5,
                file=sys.stderr)


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
    from gptfn.demo import format_generation, format_table, run_demo
    from pathlib import Path

    if not Path(args.model).exists():
        GPTConfig.from_preset(args.model)  # an unknown name fails here, before any work
    if args.threads:
        torch.set_num_threads(args.threads)
    stages, gen_stages = run_demo(
        model=args.model,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        repeats=args.repeats,
        do_script=not args.no_script,
        do_compile=not args.no_compile,
        seed=args.seed,
        new_tokens=args.new_tokens,
    )
    print()
    print(format_table(stages, args.batch_size * args.seq_len))
    if gen_stages:
        print()
        print(format_generation(gen_stages))
    return 0 if all(s.same_tokens for s in gen_stages) else 1


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"gptfn: warning: {message}", file=sys.stderr)


def _cmd_export(argv: List[str]) -> int:
    """``gptfn export ...`` is ``python -m export ...``: the same arguments, checks and exit
    status."""
    try:
        from export.__main__ import main as export_main
    except ImportError:
        print("gptfn: error: the export suite is not importable: install gptfn from its "
              "source tree (pip install -e .)", file=sys.stderr)
        return 2
    return export_main(argv, prog="gptfn export")


def main(argv: Optional[List[str]] = None) -> int:
    from gptfn.errors import TrainingDiverged, TrainingInterrupted

    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["export"]:  # its own parser, so that --help and errors are the suite's
        return _cmd_export(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        with warnings.catch_warnings():  # restores showwarning for a caller of main()
            warnings.showwarning = _one_line_warning
            return args.func(args)
    except (ValueError, OSError, ImportError) as e:
        print(f"gptfn: error: {e}", file=sys.stderr)
        return 2
    except TrainingDiverged as e:
        print(f"gptfn: error: training diverged: {e}", file=sys.stderr)
        return 1
    except TrainingInterrupted as e:
        print(f"gptfn: interrupted: {e}", file=sys.stderr)
        return 130
    except RuntimeError as e:  # torch refusing what was asked of it (a config too large, ...)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"gptfn: error: {first}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("gptfn: interrupted", file=sys.stderr)
        return 130
