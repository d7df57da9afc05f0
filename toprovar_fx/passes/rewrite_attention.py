"""Replace eligible attention with the Flash-Attention-Entropy op ``toprovar::fae``.

Why: FAE returns the attention output *and* the per-query entropy in one streaming pass, so
entropy statistics cost no extra attention pass.

Expects: sites from ``find_attention`` (same graph). Guarantees: every eligible site's output
node is replaced by ``getitem(fae(q, k, v, scale=..., head_mean=True), 0)`` (with transposes
for the flash-attn ``[B, L, H, D]`` layout), uses are rewired, and the nodes of an explicit
softmax pattern that nothing else uses are erased. The head-mean entropy ``[B, Lq]`` node of
each rewritten site is returned in graph order with the site, for the runtime. Ineligible
sites are untouched.
"""

from __future__ import annotations

import operator

import torch.fx as fx

from ..kernels import FAE_OP
from .context import PassContext, PassResult
from .find_attention import AttentionSite
from .graph_utils import copy_meta, example_value, finalize, linear_flops


def _transpose(graph: fx.Graph, node: fx.Node) -> fx.Node:
    return graph.call_method("transpose", (node, 1, 2))


def replace_with_fae(gm: fx.GraphModule, sites: list[AttentionSite]) -> list[tuple[AttentionSite, fx.Node]]:
    """Rewrite eligible ``sites`` in place; return ``(site, entropy_node)`` pairs in graph order."""
    graph = gm.graph
    rewritten = []
    for site in sites:
        if not site.eligible:
            continue
        node = site.node
        with graph.inserting_before(node):
            q, k, v = site.q, site.k, site.v
            if site.layout == "blhd":
                q, k, v = (_transpose(graph, t) for t in (q, k, v))
            fae = graph.call_function(FAE_OP, (q, k, v), {"scale": site.scale, "head_mean": True})
            out = graph.call_function(operator.getitem, (fae, 0))
            ent = graph.call_function(operator.getitem, (fae, 1))
            if site.layout == "blhd":
                out = _transpose(graph, out)
        for n in (fae, out, ent):
            copy_meta(n, node)
        val = example_value(node)
        if val is not None:
            out.meta["example_value"] = val
        node.replace_all_uses_with(out)
        for dead in [node, *site.removable[1:]]:
            if not dead.users and dead.graph is graph:
                graph.erase_node(dead)
        rewritten.append((site, ent))
    return rewritten


def rewrite_attention(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    """Pass entry point: rewrite ``ctx.sites`` and register each rewritten site in the session."""
    ctx.rewritten = replace_with_fae(gm, ctx.sites)
    # Observe-mode FLOP accounting: the graph's linear layers are shared among its
    # self-attentions (one block per graph in the common case).
    n_self = sum(site.kind == "self" for site, _ in ctx.rewritten)
    per_site = sum(linear_flops(n) for n in gm.graph.nodes) / max(n_self, 1)
    reuse = ctx.reuse_site_ids
    if reuse is not None and len(reuse) != len(ctx.rewritten):
        raise RuntimeError(f"dense variant rewrote {len(ctx.rewritten)} attention(s), the pruned one {len(reuse)}")
    for j, (site, ent) in enumerate(ctx.rewritten):
        if reuse is not None:
            sid = reuse[j]
        else:
            sid = ctx.session.add_site(pattern=site.pattern, kind=site.kind, heads=site.heads,
                                       head_dim=site.head_dim, graph_id=ctx.graph_id,
                                       linear_flops_per_token=per_site if site.kind == "self" else 0.0).site_id
        ctx.site_ids[ent] = sid
        ctx.registered_site_ids.append(sid)
    if ctx.rewritten:
        finalize(gm)
    kinds = ", ".join(f"{s.pattern}/{s.kind}" for s, _ in ctx.rewritten)
    return PassResult(gm, bool(ctx.rewritten), f"rewrote {len(ctx.rewritten)} attention(s) to toprovar::fae [{kinds}]")
