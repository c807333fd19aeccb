"""One-row matrix products on the CPU through OpenBLAS: the op ``gptfn::gemv``.

A batch-1 decode step is a chain of matrix-vector products: it reads every weight once
and does little arithmetic on it, so its speed is the speed at which the GEMV kernel
streams the weights. torch 2.13's CPU build sends a one-row ``addmm`` to MKL's sgemv,
which runs on one thread; on this project's 2-core AMD EPYC it streams ~19 GB/s, and
so does HF transformers, which makes the same call. OpenBLAS (the copy numpy ships) runs
the same product at ~36 GB/s on one thread (``benchmarks/decode.py`` measures the
difference in the same run).

So when ``gptfn.functional.linear`` / ``lm_head`` get a single row of fp32 CPU data and
no gradient is needed, they call this op, which hands numpy views of the same memory to
OpenBLAS (no copy, the weights stay in their one layout). It is absent from TorchScript
(the functional core only calls it when not scripting). Under torch.compile the core
writes the product as slabbed reductions instead (``gptfn.functional.layers.row_product``),
which inductor vectorizes across both cores (1.34x this op's eager decode on GPT-2 124M;
level with it at GPT-2 XL's widths); the op keeps a fake implementation for tracing code that
calls it directly.

OpenBLAS is held to one thread during the call: its worker threads would otherwise
compete with torch's OpenMP threads, which spin between ops (measured: 5x slower).
threadpoolctl does the holding. Where numpy's BLAS is not OpenBLAS, the op is not
registered and the core keeps torch's path.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
from torch import Tensor


@functools.lru_cache(maxsize=None)
def _openblas():
    """threadpoolctl's handle on numpy's OpenBLAS, or None where there is none."""
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:
        return None
    np.dot(np.ones(2, np.float32), np.ones(2, np.float32))  # make sure BLAS is loaded
    controllers = ThreadpoolController().select(internal_api="openblas").lib_controllers
    return controllers[0] if controllers else None


def _gemv(x: Tensor, weight: Tensor, transposed: bool) -> Tensor:
    """``x @ weight`` (weight (in, out)) or, with ``transposed``, ``x @ weight.T`` (weight
    (out, in), the tied head), for one fp32 row on the CPU.

    Shapes: x (1, in) -> (1, out).
    """
    blas = _openblas()
    w = weight.detach().numpy()
    xs = x.detach().numpy()
    previous = blas.num_threads
    blas.set_num_threads(1)
    try:
        out = (w @ xs[0])[None] if transposed else xs @ w
    finally:
        blas.set_num_threads(previous)
    return torch.from_numpy(out)


def _gemv_shape(x: Tensor, weight: Tensor, transposed: bool) -> Tensor:
    return x.new_empty((x.size(0), weight.size(0) if transposed else weight.size(1)))


if _openblas() is not None and not hasattr(torch.ops.gptfn, "gemv"):
    gemv = torch.library.custom_op("gptfn::gemv", _gemv, mutates_args=())
    gemv.register_fake(_gemv_shape)


def available() -> bool:
    """Whether numpy's BLAS is an OpenBLAS that this module can hold to one thread (and so
    whether ``gptfn::gemv`` is registered)."""
    return _openblas() is not None
