"""``python -m export torchscript|pt2|aoti|gguf|onnx --model NAME_OR_PATH [--random-init]
--out PATH [--dtype D] [--device D] [--max-seq-len N] [--int8]``: build, verify, keep.

- ``torchscript``, ``pt2``, ``aoti``: torch artifacts, checked against eager gptfn
  (``--dtype float32|bfloat16``, ``--device``, ``--max-seq-len``).
- ``gguf``: one file for llama.cpp (``--dtype f32|f16|q8_0|q4_0``), checked by loading it in
  llama.cpp (llama-cpp-python): logits, greedy tokens, tokenizer.
- ``onnx``: a directory in HF optimum's decoder-with-past layout (``--int8`` adds
  ``model_quantized.onnx``), checked in ONNX Runtime: logits, greedy tokens via the cache.

The artifact and its report ``OUT.report.json`` (``OUT/model.onnx.report.json`` for onnx;
it names each artifact with its size and sha256) are written as one unit (see
``export.commit``). Each stage says on stderr what it is doing. Exit status 0 only after
the artifact was verified; 1 when verification failed (nothing is kept); 2 for bad
arguments or a failed write (a full disk), with a one-line error; 130 when interrupted.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path


def main(argv=None, prog: str = "python -m export") -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    parser.add_argument("kind", choices=["torchscript", "pt2", "aoti", "gguf", "onnx"])
    parser.add_argument("--model", default="gpt2", help="model name or checkpoint path (gpt2)")
    parser.add_argument("--random-init", action="store_true",
                        help="random weights for a preset (no pretrained weights needed)")
    parser.add_argument("--out", required=True,
                        help="artifact path (.pt, .pt2, .gguf), or a directory for onnx")
    parser.add_argument("--dtype", default=None,
                        help="torch kinds: float32 (default) or bfloat16; gguf: f32 (default), "
                             "f16, q8_0 or q4_0; onnx: float32")
    parser.add_argument("--int8", action="store_true",
                        help="onnx: also write model_quantized.onnx (onnxruntime's dynamic "
                             "int8 quantization), checked by its logits error")
    parser.add_argument("--threads", type=int, default=2,
                        help="gguf/onnx: threads of the engine that checks the file (2)")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--max-seq-len", type=int, default=None,
                        help="longest sequence the artifact serves, at least 17 (default: "
                             "context_length)")
    parser.add_argument("--seed", type=int, default=0, help="--random-init weights, test inputs")
    args = parser.parse_args(argv)
    from export.engines import EngineError
    from export.errors import VerificationError
    from gptfn.kernels import KernelBuildError

    previous = _terminate_as_interrupt()
    try:
        import torch

        from export.build import artifact_paths, build, check_request
        from export.verify import format_report, verify
        from gptfn.cli_args import load_model, parse_device, parse_dtype

        out = Path(args.out).expanduser()
        if args.kind in ("gguf", "onnx"):
            return _interop(args, out)
        if args.int8:
            raise ValueError("--int8 is for onnx exports")
        device, dtype = parse_device(args.device), parse_dtype(args.dtype or "float32")
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
    except (VerificationError, EngineError) as e:
        print(f"export: verification failed, nothing kept: {e}", file=sys.stderr)
        return 1
    except (ValueError, OSError, ImportError, KernelBuildError) as e:
        print(f"export: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("export: interrupted", file=sys.stderr)
        return 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _interop(args, out: Path) -> int:
    """GGUF and ONNX: fp32 weights in, the file's precision chosen by ``--dtype``."""
    import torch

    from export.gguf_file import DTYPES
    from export.interop import build_gguf, build_onnx, check_onnx_dir
    from export.verify_interop import format_interop_report
    from gptfn.cli_args import load_model

    if args.max_seq_len is not None:
        raise ValueError(f"--max-seq-len is for torch artifacts: a {args.kind} file serves "
                         "the model's whole context")
    if args.device != "cpu":
        raise ValueError(f"--device: {args.kind} files are written from the CPU")
    from export.engines import available

    engine = "llama.cpp" if args.kind == "gguf" else "onnxruntime"
    why = available(engine)
    if why:  # said before minutes of work, not after
        raise ImportError(f"a {args.kind} export is checked in {engine}: {why}")
    most = max(64, 4 * (os.cpu_count() or 1))
    if not 1 <= args.threads <= most:
        raise ValueError(f"--threads must be in [1, {most}], got {args.threads}")
    if args.kind == "gguf":
        dtype = args.dtype or "f32"
        if dtype not in DTYPES:
            raise ValueError(f"--dtype for gguf must be one of {', '.join(DTYPES)}, got {dtype!r}")
        if args.int8:
            raise ValueError("--int8 is for onnx exports (gguf has --dtype q8_0)")
        if out.is_dir():
            raise IsADirectoryError(f"--out {out} is a directory: give the .gguf file's path")
        if not out.parent.is_dir():
            raise FileNotFoundError(f"output directory does not exist: {out.parent}")
    else:
        if (args.dtype or "float32") not in ("float32", "fp32"):
            raise ValueError("--dtype for onnx must be float32 (use --int8 for an int8 model)")
        check_onnx_dir(out)
    _status(f"loading {args.model}")
    model = load_model(args.model, args.random_init, args.seed, torch.float32,
                       torch.device("cpu"))
    if args.kind == "gguf":
        report = build_gguf(model, out, dtype, args.seed, args.threads, _status)
        written = [out, out.with_name(out.name + ".report.json")]
    else:
        report = build_onnx(model, out, args.int8, args.seed, args.threads, _status)
        written = [out / a["file"] for a in report["artifacts"]] + [out / "model.onnx.report.json"]
    print(format_interop_report(report))
    print(f"verified and written: {', '.join(map(str, written))}")
    return 0


def check_decode_length(max_seq_len: int) -> None:
    """The verification decodes ``MIN_DECODE_STEPS`` steps after a prompt: a shorter
    ``max_seq_len`` (or a model's context_length, its default) is refused up front, with the
    message verification would give after the whole build."""
    from export.verify import MIN_DECODE_STEPS

    if max_seq_len < MIN_DECODE_STEPS + 1:
        raise ValueError(f"max_seq_len must be at least {MIN_DECODE_STEPS + 1} to verify "
                         f"{MIN_DECODE_STEPS} decode steps, got {max_seq_len}")


def _terminate_as_interrupt():
    """SIGTERM ends an export as Ctrl-C does: temporaries removed, engines stopped, exit 130.
    Returns the previous handler, to be put back (None where signals cannot be set: not the
    main thread)."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt

    try:
        return signal.signal(signal.SIGTERM, interrupt)
    except ValueError:  # not the main thread
        return None


def _status(message: str) -> None:
    """A long step says what it is doing (on stderr: stdout carries the report)."""
    print(f"export: {message} ...", file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
