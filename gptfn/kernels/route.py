"""The caller's fast route for weight formats: a graph rewrite onto ``gptfn::rowmul``.

The core multiplies by a weight in a format in plain aten (``gptfn.functional.linear``):
widen the weight to the activations' dtype, multiply, scale per output, add the bias. That
runs anywhere, but it widens every weight on every call. A caller that wants gptfn's kernel
compiles its function with one of the backends below, once: the graph torch.compile
captures is rewritten so that each such product — ``linear(x, w.to(dtype).t())``, then
``* scale`` and ``+ bias`` where present (``linear(x, w.to(dtype))`` for the tied head) — is
one ``rowmul(x, w, scale, bias, transposed)``, which reads the weight in its own format;
an int4 product, ``linear(x, unpack_int4(w, scale).t())`` (+ bias), likewise becomes
``rowmul(x, w, scale, bias, False)``, its unpacking erased with it.
``rowmul_eager`` then runs the rewritten graph as it is, ``rowmul_inductor`` hands it to
inductor. Plain fp32 products on the CPU (``linear(x, w.t(), bias)``, ``linear(x, wte)``)
become ``rowmul`` too: for a few rows it streams the weight faster than BLAS's one-row
route; past ``kMaxRows`` rows it calls BLAS itself. A decode step's attention over its cache
(``scaled_dot_product_attention`` with a boolean mask, at most 8 new tokens, fp32 on the
CPU) becomes ``cached_attention``, which reads only the slots the mask allows.

``rewrite`` reads both graphs torch builds of the core: the one torch.compile captures
(torch functions and tensor methods) and the ATen graph of ``torch.export`` (so that an
exported decode step, and the AOTInductor package made from it, runs the same kernels).
"""

from __future__ import annotations

import operator
from typing import List, Optional

import torch
from torch import fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from gptfn.formats import GROUP

_aten = torch.ops.aten
# each op as torch.compile's graph calls it, then as torch.export's ATen graph does
_LINEAR = (torch._C._nn.linear, torch.nn.functional.linear, _aten.linear.default)
_MUL = (operator.mul, _aten.mul.Tensor)
_ADD = (operator.add, _aten.add.Tensor)
_METHODS = {"t": (_aten.t.default,), "to": (_aten.to.dtype,)}  # tensor methods' ATen ops
_FORMATS = (torch.bfloat16, torch.float16, torch.int8)


def _value(node) -> Optional[torch.Tensor]:
    """The example (fake) tensor recorded for a node, if any: ``example_value`` in
    torch.compile's graph, ``val`` in torch.export's."""
    meta = node.meta if isinstance(node, fx.Node) else {}
    value = meta.get("example_value", meta.get("val"))
    return value if isinstance(value, torch.Tensor) else None


def _method(node, name: str) -> bool:
    """Whether ``node`` is ``tensor.name(...)``, used once."""
    if not isinstance(node, fx.Node) or len(node.users) != 1:
        return False
    if node.op == "call_method":
        return node.target == name
    return node.op == "call_function" and node.target in _METHODS[name]


def _only_user(node: fx.Node, targets) -> Optional[fx.Node]:
    """``node``'s one user if it calls one of ``targets``."""
    if len(node.users) != 1:
        return None
    user = next(iter(node.users))
    return user if user.op == "call_function" and user.target in targets else None


def _per_output(user: fx.Node, node: fx.Node, n_out: int) -> Optional[fx.Node]:
    """The other operand of a binary ``user`` of ``node``, if it is one fp32 value per output."""
    if len(user.args) != 2 or user.kwargs:
        return None
    other = user.args[1] if user.args[0] is node else user.args[0]
    value = _value(other)
    if value is None or other is node or value.shape != (n_out,) or value.dtype != torch.float32:
        return None
    return other


def _plain(node: fx.Node) -> Optional[tuple]:
    """``(x, weight, bias, transposed)`` of a plain fp32 product on the CPU:
    ``linear(x, w.t(), bias)`` over a Conv1D weight ``[in, out]``, or ``linear(x, w)`` over
    a ``[out, in]`` table (the tied head); None for anything else."""
    if node.kwargs or len(node.args) not in (2, 3):
        return None
    x, weight = node.args[:2]
    bias = node.args[2] if len(node.args) == 3 else None
    transposed = not _method(weight, "t")
    weight = weight if transposed else weight.args[0]
    if not isinstance(weight, fx.Node) or weight.op not in ("placeholder", "get_attr"):
        return None  # a weight computed in the graph (a format's widened copy) is not plain
    xv, wv = _value(x), _value(weight)
    bv = _value(bias) if bias is not None else None
    if (xv is None or wv is None or xv.dtype != torch.float32 or wv.dtype != torch.float32
            or xv.device.type != "cpu" or wv.dim() != 2 or (bias is not None and bv is None)):
        return None
    n_out = wv.shape[0] if transposed else wv.shape[1]
    if bv is not None and (tuple(bv.shape) != (n_out,) or bv.dtype != torch.float32):
        return None  # a broadcast bias: torch's product keeps it
    return x, weight, bias, transposed


_INT4_CHAIN = 40  # at most this many nodes unpack an int4 weight (the core: 11, and sizes)


def _int4(node: fx.Node) -> Optional[tuple]:
    """``(x, packed, scale)`` of ``linear(x, w.t())`` where ``w`` is computed from exactly
    two graph inputs, an int4 weight (uint8 ``(in/2, out)``) and its fp16 scales ``(in/32,
    out)``, and nothing else: ``functional.layers.unpack_int4``, whose ops the two graphs
    spell differently, so the chain is recognised by what goes in and what comes out. uint8
    matrices are int4's alone in gptfn's parameters."""
    if node.kwargs or len(node.args) != 2 or not _method(node.args[1], "t"):
        return None
    x, unpacked = node.args[0], node.args[1].args[0]
    leaves, seen, todo = [], set(), [unpacked]
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.op in ("placeholder", "get_attr"):
            leaves.append(n)
        elif n.op in ("call_function", "call_method") and len(seen) <= _INT4_CHAIN:
            todo += n.all_input_nodes
        else:
            return None
    # the tensors among them (a dynamic capture also passes its symbolic sizes as inputs)
    values = {n: v for n in leaves if (v := _value(n)) is not None}
    packed = [n for n, v in values.items() if v.dtype == torch.uint8]
    scale = [n for n, v in values.items() if v.dtype == torch.float16]
    xv, wv = _value(x), _value(unpacked)
    if (len(values) != 2 or len(packed) != 1 or len(scale) != 1 or xv is None or wv is None
            or xv.dtype != torch.float32 or xv.device.type != "cpu"):
        return None
    pv, sv = values[packed[0]], values[scale[0]]
    if pv.dim() != 2 or sv.dim() != 2 or wv.dim() != 2:
        return None
    n_in, n_out = wv.shape
    sizes = ((2 * pv.shape[0], n_in), (pv.shape[1], n_out), (GROUP * sv.shape[0], n_in),
             (sv.shape[1], n_out))
    if any(_differ(a, b) for a, b in sizes):
        return None
    return x, packed[0], scale[0]


def _differ(a, b) -> bool:
    """Whether two sizes are known to differ. A capture made dynamic after a change of
    shapes (generation's eager route, one model after another in one process) has symbolic
    sizes, whose relations it may not know: those are taken, and ``rowmul`` checks the
    sizes it gets when it runs."""
    return statically_known_true(a != b)


_SDPA = (torch._C._nn.scaled_dot_product_attention,
         torch.nn.functional.scaled_dot_product_attention,
         _aten.scaled_dot_product_attention.default)
_SDPA_OPTIONS = ("attn_mask", "dropout_p", "is_causal", "scale")  # after q, k, v
_MAX_NEW_TOKENS = 8  # attention of at most this many new tokens goes to cached_attention


def _cached_attention(node: fx.Node) -> Optional[tuple]:
    """``(q, k, v, mask)`` of ``scaled_dot_product_attention(q, k, v, attn_mask=mask,
    dropout_p=0.0, is_causal=False)`` over fp32 CPU tensors with a boolean mask and a few new
    tokens (a decode step over its cache); None for anything else."""
    if not 3 <= len(node.args) <= 3 + len(_SDPA_OPTIONS):
        return None
    options = {**dict(zip(_SDPA_OPTIONS, node.args[3:])), **node.kwargs}
    if set(options) - {"attn_mask", "dropout_p", "is_causal"} or options.get("is_causal"):
        return None  # a causal call (no cache) is not a decode step's
    mask = options.get("attn_mask")
    if options.get("dropout_p", 0.0) != 0.0 or not isinstance(mask, fx.Node):
        return None
    q, k, v = (_value(a) for a in node.args[:3])
    m = _value(mask)
    if any(t is None or t.dim() != 4 or t.dtype != torch.float32 or t.device.type != "cpu"
           for t in (q, k, v)) or m is None or m.dtype != torch.bool or m.dim() != 4:
        return None
    shapes = [tuple(t.shape) for t in (q, k, v, m)]
    if not all(isinstance(d, int) for shape in shapes for d in shape):
        return None  # dynamic sizes: torch's kernel keeps them
    (b, nh, t, hs), (_, _, s, _) = shapes[0], shapes[1]
    if (t > _MAX_NEW_TOKENS or shapes[1] != (b, nh, s, hs) or shapes[2] != (b, nh, s, hs)
            or shapes[3] not in ((b, 1, t, s), (1, 1, t, s))):
        return None  # what the kernel takes: one mask for all heads, k and v like q
    return (*node.args[:3], mask)


def rewrite(gm: fx.GraphModule) -> int:
    """Put ``gptfn::rowmul`` in place of each format product in ``gm``, and of each plain
    fp32 product on the CPU, and ``gptfn::cached_attention`` in place of each masked
    attention of a few new tokens; return how many."""
    graph = gm.graph
    order = {node: i for i, node in enumerate(graph.nodes)}
    count = 0
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target in _SDPA:
            attention = _cached_attention(node)
            if attention is not None:
                with graph.inserting_before(node):
                    fused = graph.call_function(torch.ops.gptfn.cached_attention.default,
                                                attention)
                fused.meta.update(node.meta)
                node.replace_all_uses_with(fused)
                graph.erase_node(node)
                count += 1
            continue
        if node.op != "call_function" or node.target not in _LINEAR:
            continue
        plain = _plain(node)
        if plain is not None:
            x, weight, bias, transposed = plain
            view = node.args[1]  # weight.t(), or the table itself
            with graph.inserting_before(node):
                fused = graph.call_function(torch.ops.gptfn.rowmul.default,
                                            (x, weight, None, bias, transposed))
            fused.meta.update(node.meta)
            node.replace_all_uses_with(fused)
            graph.erase_node(node)
            if not transposed and not view.users:  # the .t() view, now unused
                graph.erase_node(view)
            count += 1
            continue
        int4 = _int4(node)
        if int4 is not None:
            x, packed, scale = int4
            chain = node.args[1]  # the .t() of the unpacked weight, and what made it
            end, bias = node, None
            add = _only_user(end, _ADD)
            if add is not None:
                bias = _per_output(add, end, _value(node).shape[-1])
                end = add if bias is not None else end
            with graph.inserting_before(end):
                fused = graph.call_function(torch.ops.gptfn.rowmul.default,
                                            (x, packed, scale, bias, False))
            fused.meta.update(end.meta)
            end.replace_all_uses_with(fused)
            if end is not node:
                graph.erase_node(end)
            graph.erase_node(node)
            _erase_unused(chain)
            count += 1
            continue
        if len(node.args) != 2:
            continue
        x, widened = node.args
        transposed = not _method(widened, "t")
        dropped: List[fx.Node] = [] if transposed else [widened]
        widened = widened if transposed else widened.args[0]
        if not _method(widened, "to"):
            continue
        weight, xv, out = widened.args[0], _value(x), _value(node)
        wv = _value(weight)
        if (wv is None or xv is None or out is None or wv.dtype not in _FORMATS
                or xv.dtype != torch.float32 or xv.device.type != "cpu" or wv.dim() != 2):
            continue
        dropped += [widened, node]
        end, scale, bias, n_out = node, None, None, out.shape[-1]
        mul = _only_user(end, _MUL)
        if mul is not None and (scale := _per_output(mul, end, n_out)) is not None:
            dropped.append(mul)
            end = mul
        add = _only_user(end, _ADD)
        if add is not None and (bias := _per_output(add, end, n_out)) is not None:
            dropped.append(add)
            end = add
        with graph.inserting_before(end):
            fused = graph.call_function(torch.ops.gptfn.rowmul.default,
                                        (x, weight, scale, bias, transposed))
        fused.meta.update(end.meta)
        end.replace_all_uses_with(fused)
        for old in sorted(dropped, key=order.get, reverse=True):  # users before their inputs
            graph.erase_node(old)
        count += 1
    if count:
        graph.lint()
        gm.recompile()
    return count


# torch.export's checks of a value's dtype and layout before a ``.to``: they use the value
# but compute nothing, and go with it
_METADATA_CHECKS = (_aten._assert_tensor_metadata.default,)


def _erase_unused(node: fx.Node) -> None:
    """Erase ``node`` if nothing uses it, then the same for what it used (graph inputs stay)."""
    graph, todo, erased = node.graph, [node], set()
    while todo:
        n = todo.pop()
        if n in erased or n.op not in ("call_function", "call_method"):
            continue
        for user in list(n.users):
            if user.op == "call_function" and user.target in _METADATA_CHECKS and not user.users:
                graph.erase_node(user)
        if n.users:
            continue
        inputs = n.all_input_nodes
        graph.erase_node(n)
        erased.add(n)
        todo += inputs


def rowmul_eager(gm: fx.GraphModule, example_inputs):
    """A torch.compile backend: the captured graph with ``rewrite`` applied, run as it is."""
    _rewrite_loaded(gm)
    return gm.forward


def rowmul_inductor(gm: fx.GraphModule, example_inputs):
    """A torch.compile backend: ``rewrite``, then inductor, with its C++ wrapper.

    A decode step is some 150 small calls (the kernel, attention, inductor's fused norms);
    inductor's default Python wrapper spends microseconds on each, which adds up to a
    sizeable part of a step once the products are fast, and its C++ wrapper a fraction of
    that (README, "Weight formats"). The wrapper is compiled once more per graph (seconds).
    """
    from torch._inductor.compile_fx import compile_fx

    _rewrite_loaded(gm)
    return compile_fx(gm, example_inputs, config_patches={"cpp_wrapper": True})


def _rewrite_loaded(gm: fx.GraphModule) -> None:
    from gptfn.kernels import load

    load()
    rewrite(gm)
