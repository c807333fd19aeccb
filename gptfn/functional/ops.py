"""The schema of ``gptfn::rowmul``, the product the core calls for weights in a weight-only
format (see ``gptfn.functional.linear``).

Only the declaration lives here, so that the core scripts, traces and exports wherever it
is imported; the implementation is gptfn's C++ kernels (``gptfn/kernels``), which whatever
makes or reads such weights loads (``gptfn.quantize``, the checkpoint loader). A plain
model never calls the op and never needs them.
"""

import torch

ROWMUL_SCHEMA = (
    "rowmul(Tensor x, Tensor weight, Tensor? scale, Tensor? bias, bool transposed) -> Tensor"
)

# The library handle must outlive the import: dropping it would remove the definition.
_LIBRARY = torch.library.Library("gptfn", "FRAGMENT")
if not hasattr(torch.ops.gptfn, "rowmul"):
    _LIBRARY.define(ROWMUL_SCHEMA)
