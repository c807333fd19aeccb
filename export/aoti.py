"""AOTInductor packages: one ``.pt2`` holding two programs over one copy of the weights.

- ``forward``: ``(idx (B, T), keys, values) -> logits (B, T, V)``, batch and length dynamic;
  it writes the tokens' keys and values into cache slots 0..T-1 (``CachedForward``), so it
  is both the model's forward (with a fresh cache) and the prefill of generation.
- ``decode``: ``(token (1, 1), keys, values, input_pos (1,)) -> logits (1, V)``, one step
  at batch 1 (``DecodeStep``).

A cache is one tensor per layer, (B, nh, max_seq_len, hs) in the model's compute dtype,
written in place. On the CPU both programs are rewritten onto gptfn's kernels before
AOTInductor compiles them (``gptfn.kernels.route.rewrite``, the route a compiled decode step
takes), so a package decodes at the compiled step's speed; the process that loads it needs
the kernels' library loaded first (``load`` does it; a C++ program dlopens it). The weights
are stored once, outside the programs' shared libraries (AOTInductor's ``pickle_weights``
layout: ``data/weights/`` plus a ``weights_config.json`` per program), and both programs are
given the same tensors at load. The package's metadata (``gptfn.*`` keys) records what a
runner needs to build a cache.
"""

from __future__ import annotations

import io
import json
import warnings
import zipfile
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Tuple

import torch
from torch import Tensor

from export.artifact import CachedForward, DecodeStep
from export.build import _TREESPEC_DEPRECATED, write_streamed
from gptfn.checks import is_int
from gptfn.config import GPTConfig

PROGRAMS = ("forward", "decode")
MAX_BATCH = 1024  # the forward program's batch dimension ranges over 1..MAX_BATCH


def _layer_caches(layers: int, shape: Tuple[int, ...], dtype, device) -> List[Tensor]:
    """One zeroed keys (or values) tensor of ``shape`` per layer."""
    return [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]


def _cache(config: GPTConfig, batch: int, max_seq_len: int, dtype, device) -> List[Tensor]:
    shape = (batch, config.num_heads, max_seq_len, config.head_dim)
    return _layer_caches(config.num_layers, shape, dtype, device)


def export_programs(config: GPTConfig, params: Dict[str, Tensor], max_seq_len: int,
                    device, names=PROGRAMS) -> Dict[str, torch.export.ExportedProgram]:
    """torch.export of the package's programs ``names`` (see the module docstring)."""
    from torch.export import Dim

    dtype = params["wpe.weight"].dtype  # the compute dtype (a weight format keeps wpe)
    params = _own_storages(params)
    batch, seq = Dim("batch", min=1, max=MAX_BATCH), Dim("seq", min=1, max=max_seq_len)
    every_layer = [{0: batch}] * config.num_layers
    idx = torch.zeros(2, min(8, max_seq_len), dtype=torch.long, device=device)
    token = torch.zeros(1, 1, dtype=torch.long, device=device)
    pos = torch.zeros(1, dtype=torch.long, device=device)

    def cache(b: int) -> List[Tensor]:
        return _cache(config, b, max_seq_len, dtype, device)

    programs = {}
    with torch.no_grad():
        if "forward" in names:
            programs["forward"] = torch.export.export(
                CachedForward(config, params).eval(), (idx, cache(2), cache(2)),
                dynamic_shapes={"idx": {0: batch, 1: seq}, "keys": every_layer,
                                "values": every_layer})
        if "decode" in names:
            programs["decode"] = torch.export.export(DecodeStep(config, params).eval(),
                                                     (token, cache(1), cache(1), pos))
    return programs


def _own_storages(params: Dict[str, Tensor]) -> Dict[str, Tensor]:
    """``params`` with a storage of its own for each weight, the same tensors in both
    programs: the package stores each storage whole, once (loaded weights are often views of
    one file's map). A weight that already is its whole storage is kept, not copied: a copy
    is one more set of weights in memory while the package is built."""
    out, seen = {}, set()
    for k, v in params.items():
        v, storage = v.detach(), v.untyped_storage()
        whole = (v.is_contiguous() and v.storage_offset() == 0
                 and storage.nbytes() == v.numel() * v.element_size())
        if not whole or storage.data_ptr() in seen:
            v = v.clone(memory_format=torch.contiguous_format)
        seen.add(v.untyped_storage().data_ptr())
        out[k] = v
    return out


def routed_forward(config: GPTConfig, params: Dict[str, Tensor], max_seq_len: int):
    """``idx (B, T) -> logits`` through the package's forward program as it is before
    AOTInductor compiles it (on the CPU: rewritten onto gptfn's kernels), run op by op."""
    from gptfn.kernels import load
    from gptfn.kernels.route import rewrite

    device = params["wpe.weight"].device
    program = export_programs(config, params, max_seq_len, device, names=("forward",))["forward"]
    if device.type == "cpu":
        load()
        rewrite(program.graph_module)
    module, dtype = program.module(), params["wpe.weight"].dtype

    def forward(idx: Tensor) -> Tensor:
        keys, values = (_cache(config, idx.size(0), max_seq_len, dtype, device) for _ in "kv")
        return module(idx, keys, values)

    return forward


def package(config: GPTConfig, params: Dict[str, Tensor], max_seq_len: int, path: Path,
            say: Callable[[str], None] = lambda message: None) -> None:
    """Write the package to ``path``: both programs exported, routed onto the kernels (CPU),
    compiled by AOTInductor and archived with one copy of the weights."""
    try:
        _package(config, params, max_seq_len, path, say)
    finally:
        # torch.export keeps its last trace's nodes in a module-level map (for its leak
        # checks), and through them the traced module with its weights: the build's copies
        # of any views among the weights would outlive it
        from torch.fx.experimental import proxy_tensor

        proxy_tensor._FAKE_TENSOR_ID_TO_PROXY_MAP_FOR_EXPORT.clear()


def _package(config: GPTConfig, params: Dict[str, Tensor], max_seq_len: int, path: Path,
             say: Callable[[str], None]) -> None:
    from torch._inductor.package import package_aoti

    device = params["wpe.weight"].device
    say("exporting the forward pass and the decode step (torch.export)")
    programs = export_programs(config, params, max_seq_len, device)
    routed = 0
    if device.type == "cpu":
        from gptfn.kernels import load
        from gptfn.kernels.route import rewrite

        load()
        routed = sum(rewrite(p.graph_module) for p in programs.values())
    metadata = {"gptfn.num_layers": config.num_layers, "gptfn.num_heads": config.num_heads,
                "gptfn.head_dim": config.head_dim, "gptfn.vocab_size": config.vocab_size,
                "gptfn.max_seq_len": max_seq_len, "gptfn.kernels": int(routed > 0),
                "gptfn.dtype": str(params["wpe.weight"].dtype).replace("torch.", "")}
    options = {"aot_inductor.package": True, "aot_inductor.package_constants_in_so": False,
               "aot_inductor.package_constants_on_disk_format": "pickle_weights",
               "aot_inductor.metadata": {k: str(v) for k, v in metadata.items()}}
    files = {}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_TREESPEC_DEPRECATED, category=FutureWarning)
        for name, program in programs.items():
            say(f"compiling the {name} program with AOTInductor (the slow step: a minute or "
                "more for GPT-2 124M)")
            args, kwargs = program.example_inputs
            files[name] = torch._inductor.aot_compile(program.module(check_guards=False), args,
                                                      kwargs, options=dict(options))
        say("writing the package (the programs and one copy of the weights)")
        write_streamed(path, lambda f: package_aoti(f, files))


class AOTIPackage:
    """A loaded package: ``package(idx)`` is the forward pass, ``generate`` decodes greedily
    through the cache, ``forward_with_cache`` and ``decode`` are the two programs."""

    def __init__(self, path: str, huge_pages: bool = False):
        # the public loader (aoti_load_package) loads one program and not the weights stored
        # beside them; load_pt2 loads both programs and gives them the same weight tensors
        from torch.export.pt2_archive._package import load_pt2

        meta = _metadata(path)
        if meta.get("gptfn.kernels") == "1":
            from gptfn.kernels import load

            load()  # the ops the programs call must be registered before they load
        runners = load_pt2(path, load_weights_from_disk=not huge_pages).aoti_runners
        missing = [name for name in PROGRAMS if name not in runners]
        if missing:
            raise ValueError(f"{path} is not a gptfn AOTInductor package (no {missing[0]!r} "
                             "program)")
        # the programs use these tensors in place: they must live as long as this package
        self._weights = _load_weights_in_huge_pages(path, runners) if huge_pages else None
        self._forward, self._decode = runners["forward"], runners["decode"]
        self.num_layers = int(meta["gptfn.num_layers"])
        self.num_heads, self.head_dim = int(meta["gptfn.num_heads"]), int(meta["gptfn.head_dim"])
        self.max_seq_len = int(meta["gptfn.max_seq_len"])
        self.vocab_size = int(meta["gptfn.vocab_size"])
        self.dtype = getattr(torch, meta["gptfn.dtype"])
        self.device = torch.device(meta.get("AOTI_DEVICE_KEY", "cpu"))

    def cache_shape(self, batch: int) -> Tuple[int, int, int, int]:
        """The shape of each layer's keys (and values) for ``batch`` rows."""
        return (batch, self.num_heads, self.max_seq_len, self.head_dim)

    def new_cache(self, batch: int) -> Tuple[List[Tensor], List[Tensor]]:
        """Empty keys and values caches for ``batch`` rows."""
        shape = self.cache_shape(batch)
        return tuple(_layer_caches(self.num_layers, shape, self.dtype, self.device)
                     for _ in "kv")

    def forward_with_cache(self, idx: Tensor, keys: List[Tensor], values: List[Tensor]):
        """Shapes: idx (B, T) -> logits (B, T, V); fills cache slots 0..T-1."""
        self._check_tokens(idx, "idx", max_batch=MAX_BATCH, max_len=self.max_seq_len)
        self._check_cache(keys, values, idx.size(0))
        return self._forward(idx, keys, values)

    def decode(self, token: Tensor, keys: List[Tensor], values: List[Tensor],
               input_pos: Tensor) -> Tensor:
        """Shapes: token (1, 1), input_pos (1,) -> logits (1, V); fills slot input_pos."""
        self._check_tokens(token, "token", max_batch=1, max_len=1)
        self._check_cache(keys, values, 1)
        if (not isinstance(input_pos, Tensor) or input_pos.shape != (1,)
                or input_pos.dtype != torch.long or input_pos.device != self.device
                or not 0 <= int(input_pos) < self.max_seq_len):
            raise ValueError(f"input_pos must be a (1,) int64 tensor on {self.device} in "
                             f"[0, {self.max_seq_len}), got {_describe(input_pos)}")
        return self._decode(token, keys, values, input_pos)

    # The compiled programs do not check their inputs: a wrong shape or dtype there reads
    # or writes past a buffer. So every input is checked here, before it reaches them.
    def _check_tokens(self, idx, name: str, max_batch: int, max_len: int) -> None:
        if (not isinstance(idx, Tensor) or idx.dim() != 2 or idx.dtype != torch.long
                or idx.device != self.device):
            raise ValueError(f"{name} must be a 2-D int64 tensor of token ids on "
                             f"{self.device}, got {_describe(idx)}")
        b, t = idx.shape
        if not (1 <= b <= max_batch and 1 <= t <= max_len):
            raise ValueError(f"{name} must have 1 to {max_batch} rows of 1 to {max_len} tokens, "
                             f"got {list(idx.shape)}")
        if int(idx.min()) < 0 or int(idx.max()) >= self.vocab_size:
            raise ValueError(f"{name} holds ids outside the vocabulary [0, {self.vocab_size})")

    def _check_cache(self, keys, values, batch: int) -> None:
        shape = self.cache_shape(batch)
        for name, cache in (("keys", keys), ("values", values)):
            if (not isinstance(cache, (list, tuple)) or len(cache) != self.num_layers
                    or not all(isinstance(c, Tensor) and tuple(c.shape) == shape
                               and c.dtype == self.dtype and c.device == self.device
                               and c.is_contiguous() for c in cache)):
                raise ValueError(f"{name} must be a list of {self.num_layers} contiguous "
                                 f"{self.dtype} tensors of shape {list(shape)} on "
                                 f"{self.device} (new_cache({batch}) makes them)")

    def __call__(self, idx: Tensor) -> Tensor:
        """Shapes: idx (B, T) -> logits (B, T, V)."""
        return self.forward_with_cache(idx, *self.new_cache(idx.size(0)))

    def generate(self, prompt: Tensor, max_new_tokens: int) -> Tensor:
        """Greedy decoding of one row. Shapes: prompt (1, T) -> (1, T + max_new_tokens)."""
        return torch.cat([prompt, *self.tokens(prompt, max_new_tokens)], dim=1)

    def tokens(self, prompt: Tensor, max_new_tokens: int) -> Iterator[Tensor]:
        """``generate``'s new tokens as they come: (1, 1) tensors."""
        self._check_tokens(prompt, "prompt", max_batch=1, max_len=self.max_seq_len)
        t = prompt.size(1)
        if not is_int(max_new_tokens) or not 0 <= max_new_tokens <= self.max_seq_len - t:
            raise ValueError(f"max_new_tokens must be an int in [0, {self.max_seq_len - t}] "
                             f"(max_seq_len {self.max_seq_len} less the prompt's {t}), got "
                             f"{max_new_tokens!r}")
        return self._tokens(prompt, max_new_tokens)

    def _tokens(self, prompt: Tensor, max_new_tokens: int) -> Iterator[Tensor]:
        if max_new_tokens == 0:
            return  # no token to come: no prefill to run
        t = prompt.size(1)
        keys, values = self.new_cache(1)
        logits = self._forward(prompt, keys, values)[:, -1]  # (1, V)
        for step in range(max_new_tokens):
            token = logits.argmax(-1, keepdim=True)  # (1, 1): an id in the vocabulary
            yield token
            if step + 1 < max_new_tokens:  # slot t + step < max_seq_len, checked above
                pos = torch.tensor([t + step], device=prompt.device)
                logits = self._decode(token, keys, values, pos)


def _describe(value) -> str:
    if isinstance(value, Tensor):
        return f"{value.dtype} {list(value.shape)} on {value.device}"
    return type(value).__name__


def _metadata(path: str) -> Dict[str, str]:
    """The ``forward`` program's metadata, read from the package without loading it."""
    try:
        return torch._C._aoti.AOTIModelPackageLoader.load_metadata_from_package(path, "forward")
    except RuntimeError as e:
        raise ValueError(f"{path} is not a gptfn AOTInductor package: "
                         f"{str(e).splitlines()[0]}") from None


def _load_weights_in_huge_pages(path: str, runners) -> Dict[str, Tensor]:
    """What ``load_pt2(load_weights_from_disk=True)`` does, with the weights placed in 2 MB
    pages (``gptfn.hugepages``): each weight file of the archive read once, and every
    program given views of the same tensors, which it uses in place (``user_managed``)."""
    from torch.export.pt2_archive._package import PT2ArchiveReader
    from torch.export.pt2_archive.constants import AOTINDUCTOR_DIR, WEIGHTS_DIR

    from gptfn.hugepages import place_each

    with PT2ArchiveReader(path) as reader:
        names = reader.get_file_names()
        maps = {name[len(AOTINDUCTOR_DIR):].split("/")[0]: json.loads(reader.read_string(name))
                for name in names
                if name.startswith(AOTINDUCTOR_DIR) and name.endswith("weights_config.json")}
        weights = [name for name in names if name.startswith(WEIGHTS_DIR)]
        # each file read and copied into the pages before the next is read (all read first,
        # the weights would be held twice); its size in the archive bounds its storage's
        with zipfile.ZipFile(path) as archive:
            stored = {info.filename.split("/", 1)[-1]: info.file_size
                      for info in archive.infolist()}
        files = place_each({name[len(WEIGHTS_DIR):]: stored[name] for name in weights},
                           ((name[len(WEIGHTS_DIR):], _whole_storage(torch.load(io.BytesIO(
                               reader.read_bytes(name))))) for name in weights))
    for program, runner in runners.items():
        # the map's offsets count from the start of each file's storage, and each placed
        # file starts storage_offset() elements into the arena's
        runner.load_constants({key: files[file].as_strided(shape, stride,
                                                           files[file].storage_offset() + offset)
                               for key, (file, shape, stride, offset) in maps[program].items()},
                              check_full_update=True, user_managed=True)
    return files


def _whole_storage(t: Tensor) -> Tensor:
    """A 1-D tensor of ``t``'s dtype over all of ``t``'s storage."""
    return torch.empty(0, dtype=t.dtype).set_(t.untyped_storage())


def load(path, huge_pages: bool = False) -> AOTIPackage:
    """Load a package written by ``python -m export aoti``; ``huge_pages``: its weights in
    2 MB pages (``gptfn.hugepages``), for decoding."""
    return AOTIPackage(str(path), huge_pages=huge_pages)
