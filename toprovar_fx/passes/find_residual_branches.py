"""Find the residual branches ``x = x + f(x, ...)`` of transformer blocks, by dataflow.

Why: the pruning unit is the residual sublayer (self-attention, cross-attention, FFN), the
same granularity FastVAR patches by hand. Finding it from dataflow rather than module names
makes the rewrite work on models we have never seen, whether a graph holds a fragment, one
block, or the whole unrolled sampler.

Expects: a graph after ``rewrite_attention`` (FAE nodes present), nodes carrying fake-tensor
metadata. Uses networkx for reachability.

Guarantees (graph unchanged): ``ctx.branches`` lists, in graph order, one ``ResidualBranch``
per ``add(x, delta)`` where ``x`` is a 3-D ``[rows, L, C]`` tensor, ``delta`` has the same
shape and depends on ``x``, and the nodes on paths from ``x`` to ``delta`` (the *region*)
contain an attention or a linear layer. For each it records the region's inputs, the
position-dependent inputs (a non-last dimension whose size is ``x``'s token count), escaping
values (e.g. the K/V cache ``cat``) with what they equal when the branch is skipped, and
linear FLOPs per token. Branches nested in another branch's region are dropped. A branch
whose escaping values cannot be reproduced when skipped is kept with ``prunable=False``.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import networkx as nx
import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from ..kernels import FAE_OP
from .context import PassContext, PassResult
from .find_attention import _SDPA_TARGETS
from .graph_utils import example_value, is_static_input, linear_flops

_ADD_FUNCS = {operator.add, operator.iadd, torch.add}
_ADD_METHODS = ("add", "add_", "__add__", "__iadd__")
_CAT_FUNCS = {torch.cat, torch.concat}


@dataclass
class ResidualBranch:
    add: fx.Node
    x: fx.Node
    delta: fx.Node
    region: list[fx.Node]  # graph order, excludes the add
    inputs: list[fx.Node]  # region inputs in first-use order; includes x
    kind: str  # self_attn | cross_attn | ffn
    positional: list[tuple[fx.Node, int]] = field(default_factory=list)  # (input, token dim)
    token_sizes: list[fx.Node] = field(default_factory=list)  # SymInt inputs equal to the token count
    batch_sizes: list[fx.Node] = field(default_factory=list)  # SymInt inputs equal to the rows
    escapes: list[fx.Node] = field(default_factory=list)  # region nodes used outside
    escape_skip: list[fx.Node | None] = field(default_factory=list)  # value of each escape when skipped
    linear_flops_per_token: float = 0.0
    attention_pair_flops: float = 0.0  # 4 * H * D for the self-attention, per (query, key) pair
    prunable: bool = True
    why_not: str = ""
    batch_static: bool = True  # the batch (rows) dimension is a literal in this graph


def _is_add(node: fx.Node) -> bool:
    if node.op == "call_function" and node.target in _ADD_FUNCS:
        return len(node.args) >= 2 and not node.kwargs.get("alpha")
    return node.op == "call_method" and node.target in _ADD_METHODS and len(node.args) >= 2


def _shape(node) -> tuple | None:
    val = example_value(node)
    return tuple(val.shape) if isinstance(val, torch.Tensor) else None


def _to_nx(graph: fx.Graph) -> nx.DiGraph:
    g = nx.DiGraph()
    for n in graph.nodes:
        g.add_node(n)
        for a in n.all_input_nodes:
            g.add_edge(a, n)
    return g


def _same_size(a, b) -> bool:
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 - unresolvable symbolic comparison
        return False


def _branch_kind(region: list[fx.Node], x: fx.Node, desc_x: set[fx.Node]) -> tuple[str | None, float]:
    for n in region:
        if n.op == "call_function" and (n.target is FAE_OP or n.target in _SDPA_TARGETS):
            k = n.args[1]
            if k in desc_x:
                q = _shape(n.args[0])
                pair = 4.0 * q[1] * q[3] if q is not None and len(q) == 4 else 0.0
                return "self_attn", pair
            return "cross_attn", 0.0
    if any(linear_flops(n) for n in region):
        return "ffn", 0.0
    return None, 0.0


def _skip_value(escape: fx.Node, region_set: set[fx.Node]) -> fx.Node | None:
    """``cat((cache, new), dim)`` with ``cache`` outside the region -> ``cache``."""
    if escape.op == "call_function" and escape.target in _CAT_FUNCS:
        tensors = escape.args[0]
        if isinstance(tensors, (list, tuple)) and len(tensors) == 2 and tensors[0] not in region_set:
            return tensors[0]
    return None


def _free_symbols(v) -> set:
    node = getattr(v, "node", None)
    expr = getattr(node, "expr", None)
    return set(getattr(expr, "free_symbols", ()))


_ELEMENTWISE = ("mul", "add", "sub", "div", "mul_", "add_", "addcmul", "__mul__", "__add__", "__sub__")


def _combined_with_stream(node: fx.Node, stream: set[fx.Node], region: set[fx.Node]) -> bool:
    """``node`` meets a residual-stream value in an elementwise op inside the branch (a RoPE table,
    a positional embedding): only such inputs line up with the tokens. Cross-attention K/V whose
    length happens to equal the token count (Dynamo's duck sizing) do not."""
    for u in node.users:
        if u not in region:
            continue
        name = u.target if u.op == "call_method" else getattr(u.target, "__name__", "")
        if name in _ELEMENTWISE and any(a in stream for a in u.args if isinstance(a, fx.Node)):
            return True
    return False


def _derived_from_tokens(node: fx.Node, tokens) -> bool:
    shape = _shape(node)
    syms = _free_symbols(tokens)
    return bool(shape) and bool(syms) and any(_free_symbols(d) & syms for d in shape if not isinstance(d, int))


def _positional_dim(node: fx.Node, tokens) -> int | None:
    shape = _shape(node)
    if shape is None or len(shape) < 2:
        return None
    dims = [d for d in range(1, len(shape) - 1) if _same_size(shape[d], tokens)]
    return dims[0] if len(dims) == 1 else None


def analyse_branches(gm: fx.GraphModule) -> list[ResidualBranch]:
    """Residual branches of ``gm`` in graph order (see module docstring)."""
    graph = gm.graph
    g = _to_nx(graph)
    order = {n: i for i, n in enumerate(graph.nodes)}
    found: list[ResidualBranch] = []
    for node in graph.nodes:
        if not _is_add(node):
            continue
        a, b = node.args[0], node.args[1]
        if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)):
            continue
        sa, sb = _shape(a), _shape(b)
        if sa is None or sb is None or len(sa) != 3 or len(sb) != 3 or not all(map(_same_size, sa, sb)):
            continue
        if nx.has_path(g, a, b):
            x, delta = a, b
        elif nx.has_path(g, b, a):
            x, delta = b, a
        else:
            continue
        desc_x = nx.descendants(g, x)
        region_set = (desc_x & nx.ancestors(g, delta)) | {delta}
        # the entropy output of a rewritten attention belongs to its branch
        region_set |= {u for n in region_set if n.op == "call_function" and n.target is FAE_OP for u in n.users}
        region = sorted(region_set, key=order.__getitem__)
        kind, pair = _branch_kind(region, x, desc_x)
        if kind is None:
            continue
        inputs: list[fx.Node] = []
        for n in region:
            for a_in in n.all_input_nodes:
                if a_in not in region_set and a_in not in inputs:
                    inputs.append(a_in)
        br = ResidualBranch(node, x, delta, region, inputs, kind, attention_pair_flops=pair)
        br.linear_flops_per_token = sum(linear_flops(n) for n in region)
        tokens = sa[1]
        br.batch_static = isinstance(sa[0], int)
        if isinstance(tokens, int):
            br.prunable, br.why_not = False, f"the token count is static ({tokens}) in this graph"
        for inp in inputs:
            val = example_value(inp)
            if isinstance(val, torch.SymInt):
                if _same_size(val, tokens):
                    br.token_sizes.append(inp)
                elif _same_size(val, sa[0]):
                    br.batch_sizes.append(inp)
                elif _free_symbols(val) & (_free_symbols(tokens) | _free_symbols(sa[0])):
                    br.prunable, br.why_not = False, f"input {inp.name} = {val} depends on the token count or the rows"
                continue
            if inp is x or is_static_input(inp) or any(
                u.op == "call_function" and u.target in _CAT_FUNCS for u in inp.users if u in region_set
            ):
                continue
            dim = _positional_dim(inp, tokens) if _combined_with_stream(inp, desc_x | {x}, region_set) else None
            if dim is not None:
                br.positional.append((inp, dim))
            elif _derived_from_tokens(inp, tokens):
                # e.g. packed query indices built from the full token count outside the branch:
                # they cannot follow a gather, so this branch must run on all tokens
                br.prunable, br.why_not = False, f"input {inp.name} has a shape derived from the token count"
        if not isinstance(tokens, int) and statically_known_true(sa[0] == tokens):  # no guard added
            # Dynamo gives equal sizes one symbol (duck sizing): at batch 8 with CFG the 16 rows of
            # the 4x4 scale are its 16 tokens, and no input tells rows from tokens any more. The
            # graph's guards keep it to calls where the two are equal: early, dense scales in practice
            br.prunable, br.why_not = False, (f"the rows (batch x CFG) and the token count are one size ({tokens}) "
                                              "in this graph, so the two cannot be told apart; Dynamo runs it only where they are equal")

        for n in region:
            outside = [u for u in n.users if u not in region_set and u is not node]
            if n is delta:
                if outside:
                    br.prunable, br.why_not = False, "the branch output is used outside the residual add"
                continue
            if outside:
                br.escapes.append(n)
                skip = _skip_value(n, region_set)
                br.escape_skip.append(skip)
                if skip is None:
                    br.prunable, br.why_not = False, f"{n.name} leaves the branch and is not a K/V cache concat"
                if any(order[u] < order[node] for u in outside):
                    br.prunable, br.why_not = False, f"{n.name} is used before the residual add"
        found.append(br)
    # keep the outermost branches: drop one whose add lies inside another's region
    regions = [set(b.region) for b in found]
    return [b for b in found if not any(b.add in r for r in regions)]


def find_residual_branches(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    """Pass entry point: store the branches in ``ctx.branches`` (graph unchanged)."""
    ctx.branches = analyse_branches(gm)
    for b in ctx.branches:
        if b.prunable or "static" in b.why_not:
            continue
        if b.kind == "self_attn":
            ctx.session.unrouted.add(b.why_not)
        elif ctx.mode == "prune":
            ctx.session.fallback(f"a {b.kind} branch cannot be routed ({b.why_not}); it always runs on all tokens")
    kinds = ", ".join(b.kind + ("" if b.prunable else f"(fixed: {b.why_not})") for b in ctx.branches)
    return PassResult(gm, False, f"{len(ctx.branches)} residual branch(es) [{kinds}]")
