"""Outline each residual branch and route it through the runtime: the layer-skip branch and
the token gather/scatter are inserted here.

Why: whether a branch runs on all tokens, on the kept tokens only, or not at all (its layer
skipped) is decided at run time from entropy, once per scale. The graph therefore calls
``toprovar_fx.runtime.dispatch.dispatch_branch`` in place of the branch; the dispatcher
gathers the kept tokens of ``x`` and of every position-dependent input, runs the outlined
branch, and scatters (restores) the result, or returns ``x`` unchanged for a skipped layer.

Expects: ``ctx.branches`` from ``find_residual_branches``; rewritten attention with entropy
nodes in ``ctx.site_ids``. Guarantees: every prunable branch's region (not its residual add)
is moved into a submodule ``toprovar_branch_<i>`` returning ``(delta, *escapes, *entropies)``;
the add and the region are replaced by one ``dispatch_branch`` call returning
``(x_new, *escapes)``; uses are rewired; the entropy nodes moved inside are removed from
``ctx.rewritten`` so they are not hoisted. The submodule holds plain tensor code (Inductor
can compile it); non-prunable branches are left in place. A branch whose hidden input is the
previous dispatch call's ``x_new`` and nothing else's has ``BranchSpec.hidden_from_previous``.
"""

from __future__ import annotations

import dataclasses
import operator
from typing import Any

import torch.fx as fx

from ..runtime.dispatch import BranchSpec, dispatch_branch
from .context import PassContext, PassResult
from .find_residual_branches import ResidualBranch
from .graph_utils import finalize, is_static_input


def _outline(gm: fx.GraphModule, br: ResidualBranch, name: str, entropies: list[fx.Node]) -> fx.GraphModule:
    sub = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for inp in br.inputs:
        ph = sub.placeholder(inp.name)
        ph.meta = dict(inp.meta)
        env[inp] = ph
    for n in br.region:
        env[n] = sub.node_copy(n, lambda a: env[a])
    sub.output((env[br.delta], *[env[e] for e in br.escapes], *[env[e] for e in entropies]))
    sub_gm = fx.GraphModule(gm, sub, class_name=name)
    return sub_gm


def insert_branch_dispatch(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    """Pass entry point (prune mode)."""
    graph = gm.graph
    done = 0
    session = ctx.session
    replaced: dict[fx.Node, fx.Node] = {}  # nodes of earlier branches -> their dispatcher outputs
    for i, br in enumerate(ctx.branches):
        if not br.prunable:
            continue
        br.inputs = [replaced.get(n, n) for n in br.inputs]
        br.x = replaced.get(br.x, br.x)
        br.positional = [(replaced.get(n, n), d) for n, d in br.positional]
        br.token_sizes = [replaced.get(n, n) for n in br.token_sizes]
        br.batch_sizes = [replaced.get(n, n) for n in br.batch_sizes]
        br.escape_skip = [replaced.get(n, n) for n in br.escape_skip]
        region = set(br.region)
        inside = [ent for _, ent in ctx.rewritten if ent in region]
        name = f"toprovar_branch_{ctx.graph_id}_{i}"
        sub = _outline(gm, br, name, inside)
        gm.add_submodule(name, sub)
        spec = BranchSpec(
            kind=br.kind,
            hidden=br.inputs.index(br.x),
            positional=tuple((br.inputs.index(n), d) for n, d in br.positional),
            token_sizes=tuple(br.inputs.index(n) for n in br.token_sizes),
            batch_inputs=tuple(i for i, n in enumerate(br.inputs) if not is_static_input(n)),
            batch_static=br.batch_static,
            batch_sizes=tuple(br.inputs.index(n) for n in br.batch_sizes),
            n_escapes=len(br.escapes),
            escape_skip=tuple(br.inputs.index(s) for s in br.escape_skip),
            site_ids=tuple(ctx.site_ids[e] for e in inside),
            linear_flops_per_token=br.linear_flops_per_token,
            attention_pair_flops=br.attention_pair_flops,
        )
        spec_id = session.add_branch(spec)
        ctx.spec_ids.append(spec_id)
        with graph.inserting_before(br.add):
            mod = graph.get_attr(name)
            call = graph.call_function(dispatch_branch, (session.id, spec_id, mod, *br.inputs))
            x_new = graph.call_function(operator.getitem, (call, 0))
            outs = [graph.call_function(operator.getitem, (call, j + 1)) for j in range(len(br.escapes))]
        x_new.meta = dict(br.add.meta)
        br.add.replace_all_uses_with(x_new)
        replaced[br.add] = x_new
        for esc, new in zip(br.escapes, outs):
            new.meta = dict(esc.meta)
            esc.replace_all_uses_with(new, delete_user_cb=lambda u, r=region: u not in r)
            replaced[esc] = new
        graph.erase_node(br.add)
        for n in reversed(br.region):
            if not n.users:
                graph.erase_node(n)
        ctx.rewritten = [(s, e) for s, e in ctx.rewritten if e not in region]
        done += 1
    chained = _mark_chains(gm, session) if done else 0
    if done:
        finalize(gm)
    return PassResult(gm, bool(done), f"{done} branch(es) routed through the runtime dispatcher, "
                                      f"{chained} taking the previous one's output alone")


def _mark_chains(gm: fx.GraphModule, session: Any) -> int:
    """Set ``BranchSpec.hidden_from_previous`` on every dispatch call whose hidden input is the
    ``x_new`` of the dispatch call just before it, used by nothing else (not even another input
    of the same call). Then a planned block may pass that branch the kept tokens themselves
    (``runtime.token_ops.KeptTokens``), which no other graph code can see. Returns the count."""
    marked = 0
    prev = None
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target is not dispatch_branch:
            continue
        spec_id = node.args[1]
        spec = session.branches[spec_id]
        inputs = node.args[3:]
        h = inputs[spec.hidden]
        if (prev is not None and isinstance(h, fx.Node) and h.op == "call_function" and h.target is operator.getitem
                and h.args == (prev, 0) and len(h.users) == 1 and inputs.count(h) == 1):
            session.branches[spec_id] = dataclasses.replace(spec, hidden_from_previous=True)
            marked += 1
        prev = node
    return marked
