"""Hoist a cross-attention's context out of a block graph: computed once per text, not per call.

Why: a text-conditioned VAR block (Infinity) projects the text into its cross-attention K/V in
every call: per block and scale, a GEMM that reads the K/V weights for a handful of text tokens,
plus the small kernels that pad the packed text into ``[rows, H, L_text, d]`` and build its mask.
The text does not change during a generation, so a 13-scale sampler computes the same K/V 13
times. On Infinity-8B at batch 1 that GEMM alone is ~7 ms of GPU per generation (H200 profile,
``benchmarks/results/e2e-8b-2026-11-30-fifteenth.md``: 443 calls of a 16-row GEMM).

Expects: a Dynamo graph whose nodes carry ``example_value`` meta, and its example inputs.
Finds each cross-attention (``find_attention_sites``: keys that share no non-parameter input
with the queries) and, for its K, V and mask, the nodes computed from graph inputs that feed
nothing on the query side (not the residual stream, not the token count): the context.
Guarantees: ``split_context`` returns None (nothing worth hoisting: no GEMM in the context, a
random op in it or an in-place write into it, a non-tensor or graph output at the cut, inference
tensors) or a ``ContextSplit`` where ``main(*args, *pre(*(args[i] for i in pre_inputs)))`` equals
``gm(*args)``. ``main`` is ``gm`` without the context nodes and with one placeholder per cut
value appended after its inputs (``meta["toprovar_context"]``: module state for
``is_static_input``, so CUDA graphs read it in place); ``gm`` itself is not changed.
``runtime/context_memo.py`` runs ``pre`` only when one of its inputs changed. Where Dynamo made
the text length symbolic (prompts of several lengths), the new placeholders keep the cut values'
symbolic sizes (``ContextSplit.symbolic``), and the memo keeps buffers per length.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

from ..runtime.context_memo import context_buffer
from .find_attention import _arg, find_attention_sites
from .graph_utils import LINEAR_FUNCS, ancestors, example_value, op_name, writes_into

log = logging.getLogger("toprovar")

CONTEXT_META = "toprovar_context"
_GEMMS = LINEAR_FUNCS | {torch.matmul, torch.mm, torch.bmm, torch.addmm, torch.einsum, torch.functional.einsum}
_GEMM_METHODS = ("matmul", "mm", "bmm", "addmm", "__matmul__")
_RANDOM = ("rand", "randn", "randint", "randperm", "bernoulli", "dropout", "normal", "multinomial", "uniform")


@dataclass
class ContextSplit:
    """A graph cut in two: ``pre`` computes the context from inputs ``pre_inputs`` of the original
    graph; ``main`` takes the original inputs followed by ``pre``'s outputs."""

    pre: fx.GraphModule
    main: fx.GraphModule
    pre_inputs: tuple[int, ...]  # positions in the original graph's inputs
    # pre's outputs on the example inputs, laid out as the memo's (``symbolic``: fake tensors with
    # the graph's symbolic sizes, the main graph's example inputs for Inductor)
    example_values: list[torch.Tensor]
    n_gemms: int
    # the same for two graphs that compute the same context from inputs laid out alike (Dynamo
    # names nodes per graph, so not ``pre.code``); None where ``pre`` reads module attributes
    signature: tuple[Any, ...] | None
    symbolic: bool = False  # the text length is symbolic: the memo keeps buffers per length


def _signature(graph: fx.Graph, args: list[Any], symbolic: bool = False) -> tuple[Any, ...] | None:
    """``graph``'s structure (ops, targets, constants; nodes as their positions) and its inputs' layouts
    (``symbolic``: the text length varies, so only ranks and dtypes)."""
    index: dict[fx.Node, int] = {}
    ops: list[Any] = []
    for i, n in enumerate(graph.nodes):
        if n.op in ("get_attr", "call_module"):
            return None
        index[n] = i
        norm = fx.map_arg((n.args, n.kwargs), lambda a: ("node", index[a]))
        ops.append((n.op, n.target if n.op != "placeholder" else None, repr(norm)))
    if symbolic:
        layouts = tuple((a.dim(), a.dtype, a.device) if isinstance(a, torch.Tensor) else ("int",) for a in args)
        return tuple(ops), layouts, "symbolic"
    layouts = tuple((tuple(a.shape), a.stride(), a.dtype, a.device) if isinstance(a, torch.Tensor) else ("value", a)
                    for a in args)
    return tuple(ops), layouts


def _is_gemm(node: fx.Node) -> bool:
    return (node.op == "call_function" and node.target in _GEMMS) or (
        node.op == "call_method" and node.target in _GEMM_METHODS)


def _impure(node: fx.Node) -> bool:
    """A random op: the same inputs give other values (in-place writes: ``writes_into``)."""
    return any(r in op_name(node) for r in _RANDOM)


def _fed_by(graph: fx.Graph, roots: set[fx.Node]) -> set[fx.Node]:
    """``roots`` and every node computed from one of them (one pass in graph order)."""
    fed = set(roots)
    for n in graph.nodes:
        if n not in fed and any(i in fed for i in n.all_input_nodes):
            fed.add(n)
    return fed


def _context_nodes(gm: fx.GraphModule) -> set[fx.Node]:
    """The nodes computing the cross-attentions' K, V and mask from inputs the queries never read."""
    context: set[fx.Node] = set()
    for site in find_attention_sites(gm):
        if site.kind != "cross":
            continue
        q_side = ancestors(site.q) | {site.q}
        streamed = _fed_by(gm.graph, {n for n in q_side if n.op == "placeholder"})
        mask = _arg(site.node, 3, "attn_mask") if site.pattern == "sdpa" else None
        for t in (site.k, site.v, mask):
            if isinstance(t, fx.Node):
                context |= {n for n in ancestors(t) | {t}
                            if n.op not in ("placeholder", "output") and n not in q_side and n not in streamed}
    return context


def split_context(gm: fx.GraphModule, example_inputs: list[Any]) -> ContextSplit | None:
    """Cut ``gm``'s cross-attention context out (module docstring), or None."""
    context = _context_nodes(gm)
    gemms = sum(_is_gemm(n) for n in context)
    if not gemms:
        return None
    if any(_impure(n) for n in context) or writes_into(gm.graph, context):
        log.debug("toprovar: the cross-attention context holds a random op or is written in place; not hoisted")
        return None
    cut = [n for n in gm.graph.nodes if n in context and any(u not in context for u in n.users)]
    if any(u.op == "output" for n in cut for u in n.users) or not all(
            isinstance(example_value(n), torch.Tensor) for n in cut):
        return None
    placeholders = list(gm.graph.find_nodes(op="placeholder"))
    needed = set().union(*(ancestors(n) for n in cut)) | set(cut)
    pre_ph = [p for p in placeholders if p in needed]
    pre_inputs = tuple(placeholders.index(p) for p in pre_ph)
    args = [example_inputs[i] for i in pre_inputs]
    if any(isinstance(a, torch.Tensor) and a.is_inference() for a in args):
        return None  # no version counter: the memo could never tell an unchanged text
    if not all(isinstance(a, (torch.Tensor, int, float, bool, torch.SymInt)) for a in args):
        return None
    # a text length Dynamo made symbolic (prompts of several lengths): the graph's integer inputs
    # are SymInts here, its tensors real; pre runs on their hints, the main graph keeps the symbols
    symbolic = any(not all(isinstance(d, int) for d in example_value(n).shape) for n in cut)
    args = [_hint(a) for a in args]

    pre_graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for p in pre_ph:
        env[p] = pre_graph.placeholder(p.name)
        env[p].meta = dict(p.meta)
    for n in gm.graph.nodes:
        if n in needed and n.op != "placeholder":
            env[n] = pre_graph.node_copy(n, env.__getitem__)
    pre_graph.output(tuple(env[n] for n in cut))
    pre = fx.GraphModule(gm, pre_graph)
    # run once here, not only at the first call: a cut that cannot run fails now, where the graph
    # can keep its context (``backend._split_context``), not in the middle of a generation
    with torch.no_grad():
        values = [context_buffer(v) for v in pre(*args)]

    main_graph = fx.Graph()
    copied: dict[fx.Node, fx.Node] = {}
    main_graph.output(main_graph.graph_copy(gm.graph, copied))
    main = fx.GraphModule(gm, main_graph)
    # The fake mode Inductor will use: the tracing context's while Dynamo calls the backend (a mode
    # of its own since torch 2.x, sharing Dynamo's shape env), which must see these values with
    # static shapes: a symbol it made for them would have no source for Dynamo's guards (torch
    # 2.11: IndexError in produce_guards)
    fake = torch._guards.detect_fake_mode() or next(
        (v.fake_mode for p in placeholders if isinstance(v := example_value(p), torch.Tensor) and hasattr(v, "fake_mode")),
        None)
    if symbolic and fake is None:
        return None  # no fake mode to give the new placeholders symbolic sizes in
    last = list(main.graph.find_nodes(op="placeholder"))[-1]
    dead = {copied[n] for n in context}
    examples: list[torch.Tensor] = []
    for n, value in zip(cut, values):
        with main.graph.inserting_after(last):
            ph = main.graph.placeholder(f"toprovar_context_{n.name}")
        if symbolic:
            # the cut value's own sizes, whose symbols Dynamo's guards already have sources for,
            # laid out as the memo's buffers (contiguous)
            with fake:
                ph.meta["example_value"] = torch.empty(example_value(n).shape, dtype=value.dtype, device=value.device)
            examples.append(ph.meta["example_value"])
        else:
            ph.meta["example_value"] = fake.from_tensor(value, static_shapes=True) if fake is not None else value
            examples.append(value)
        ph.meta[CONTEXT_META] = True
        old = copied[n]
        for u in list(old.users):
            if u not in dead:
                u.replace_input_with(old, ph)
        last = ph
    for n in reversed(list(main.graph.nodes)):
        if n in dead and not n.users:
            main.graph.erase_node(n)
    main.graph.lint()
    main.recompile()
    return ContextSplit(pre, main, pre_inputs, examples, gemms, _signature(pre_graph, args, symbolic), symbolic)


def _hint(a: Any) -> Any:
    """A SymInt's value in the call Dynamo compiles for; anything else as is."""
    return a.node.hint if isinstance(a, torch.SymInt) else a
