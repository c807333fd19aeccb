"""Weights copied into 2 MB pages (gptfn.hugepages): the same values, the same model, and,
where Linux grants transparent huge pages on advice, huge pages."""

import gc
from pathlib import Path

import pytest
import torch

import gptfn
from gptfn import GPTModel
from gptfn.hugepages import arena, place
from tests.helpers import random_idx, tiny_config

THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def _anon_huge_kb() -> int:
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
        if line.startswith("AnonHugePages:"):
            return int(line.split()[1])
    raise AssertionError("no AnonHugePages line")


def test_placed_tensors_are_equal_copies_on_page_boundaries():
    params = {"a": torch.randn(3, 5), "b": torch.arange(7, dtype=torch.int8),
              "c": torch.randn(4, 6).t(), "d": torch.randn(2).to(torch.bfloat16)}
    placed = place(params)
    assert placed.keys() == params.keys()
    for key, t in params.items():
        got = placed[key]
        assert got.dtype == t.dtype and got.shape == t.shape and got.is_contiguous()
        assert torch.equal(got, t) and got.data_ptr() != t.data_ptr()
        assert got.data_ptr() % 4096 == 0
    assert placed["a"].data_ptr() % (2 << 20) == 0  # the arena's start
    placed["a"].add_(1)  # a copy: writable, the input unchanged
    assert torch.equal(placed["a"], params["a"] + 1)


def test_the_arena_outlives_every_name_but_its_tensors():
    t = arena(3 << 20)[:10]
    gc.collect()
    t.fill_(7)  # the mapping is held by the tensor: no fault
    assert int(t.sum()) == 70


@pytest.mark.parametrize("scheme", [None, "int8"])
def test_a_placed_model_computes_what_the_model_does(scheme):
    cfg = tiny_config(vocab_size=256, context_length=64, embed_dim=64)
    model = GPTModel(cfg, seed=0).eval()
    model = gptfn.quantize(model, scheme) if scheme else model
    placed = gptfn.huge_pages(model)
    assert isinstance(placed, GPTModel) and not placed.training
    for key, t in model.state_dict().items():
        assert torch.equal(placed.state_dict()[key], t)
        assert placed.state_dict()[key].data_ptr() != t.data_ptr()
    idx = random_idx(cfg, 2, 16)
    with torch.no_grad():
        assert torch.equal(placed(idx), model(idx))
    assert torch.equal(gptfn.generate(placed, idx, 8, compile=True),
                       gptfn.generate(model, idx, 8))
    with pytest.raises(TypeError, match="GPTModel or a parameter dict"):
        gptfn.huge_pages(torch.nn.Linear(2, 2))


def test_linux_grants_huge_pages_to_the_placed_weights():
    mode = THP.read_text() if THP.exists() else ""
    if "[always]" not in mode and "[madvise]" not in mode:
        pytest.skip(f"transparent huge pages are off here ({mode.strip() or 'no THP'})")
    before = _anon_huge_kb()
    placed = place({"w": torch.ones(16 << 20)})  # 64 MB
    assert _anon_huge_kb() - before >= 32 << 10  # at least half of it in 2 MB pages
    assert float(placed["w"].sum()) == 16 << 20
