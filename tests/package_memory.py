"""How much memory building an AOTInductor package takes beyond the model's own.

``python -m tests.package_memory OUT.pt2`` builds the package of a model whose weights
(400 MB, in block matrices of at most 67 MB) dwarf what the compiler itself holds, and
prints JSON: the weights' bytes and the process's peak resident memory before and after the
build. Its own process, so that the peak is this build's alone.
"""

import json
import resource
import sys
from pathlib import Path

import torch


def _peak() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def main(out: str) -> None:
    from export.aoti import package
    from gptfn import GPTConfig, init_params

    config = GPTConfig(vocab_size=512, embed_dim=2048, num_heads=16, num_layers=2,
                       context_length=64)
    params = init_params(config, 0)
    weights = sum(t.numel() * t.element_size() for t in params.values())
    before = _peak()
    with torch.no_grad():
        package(config, params, 32, Path(out))
    print(json.dumps({"weights": weights, "before": before, "after": _peak()}))


if __name__ == "__main__":
    main(sys.argv[1])
