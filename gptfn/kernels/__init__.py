"""gptfn's C++ kernels: the op ``gptfn::rowmul`` (see ``rowmul.cpp``), which multiplies
a few rows of activations by a weight, plain fp32 or in a weight format (bf16, fp16; int8
or int4 with scales), and ``gptfn::cached_attention`` (``attention.cpp``), a few tokens'
attention over a static KV cache under a mask.

The core never calls them. A caller that wants them compiles its function with a backend
of ``gptfn.kernels.route`` (generation does, for its decode step on the CPU), which loads
the ops and rewrites the core's products and cached attention onto them. The library is compiled
on first ``load()``, once per machine and torch version, by torch's extension builder (a
C++ compiler and ninja are needed; about 30 s), and loaded from that build afterwards.
"""

from __future__ import annotations

import functools
import os
import re
import sys
from pathlib import Path

import torch

SOURCES = [Path(__file__).with_name(name) for name in ("rowmul.cpp", "attention.cpp")]


class KernelBuildError(RuntimeError):
    """gptfn's C++ kernels could not be compiled or loaded on this machine."""


def library_name() -> str:
    """The build's name: one per torch version, so that a torch upgrade rebuilds."""
    return "gptfn_kernels_" + re.sub(r"[^0-9A-Za-z]", "_", torch.__version__)


@functools.lru_cache(maxsize=None)
def load() -> str:
    """Build (first time) and load the kernels; return the path of the shared library.

    Raises KernelBuildError, naming what is missing, where they cannot be built.
    """
    from torch.utils import cpp_extension

    _find_ninja()
    build_dir = Path(cpp_extension._get_build_directory(library_name(), verbose=False))
    library = build_dir / f"{library_name()}.so"
    if not library.exists():
        print("gptfn: compiling its C++ kernels (once per machine, about a minute)...",
              file=sys.stderr, flush=True)
    try:
        cpp_extension.load(
            name=library_name(),
            sources=[str(p) for p in SOURCES],
            # -fopenmp: ATen's parallel_for is OpenMP pragmas in headers; without the flag
            # the loops would run on one thread. The OpenMP runtime is torch's own libgomp.
            extra_cflags=["-O3", "-fopenmp"],
            extra_ldflags=["-fopenmp"],
            is_python_module=False,
            verbose=bool(os.environ.get("GPTFN_VERBOSE_BUILD")),
        )
    except (OSError, RuntimeError, ImportError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise KernelBuildError(
            f"gptfn's C++ kernels (the CPU decode route of compiled and weight-format models) "
            f"could not be built: {first} (a C++ compiler and ninja are needed; set "
            "GPTFN_VERBOSE_BUILD=1 to see the build)"
        ) from None
    return str(library)


def _find_ninja() -> None:
    """Put the ``ninja`` package's binary on PATH when no ninja is there (a virtual
    environment run without activating it): torch's builder looks for it on PATH."""
    import shutil

    if shutil.which("ninja"):
        return
    try:
        import ninja
    except ImportError:
        return
    os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
