"""Make the entropy of every rewritten attention an extra output of the graph.

Why: the runtime records entropy after the graph has run instead of through Python calls
inside it, so the graph stays pure tensor code that Inductor can compile whole, and
recording costs no host synchronisation.

Expects: ``(site, entropy_node)`` pairs from ``rewrite_attention``; a graph whose single
``output`` node returns a tuple or list. Guarantees: the output tuple is the original
outputs followed by the entropy nodes of the self-attention sites and of the sites whose kind
is unknown, in the given order (cross-attention entropy is never recorded, so it stays inside);
returns the number of original outputs so that the caller can split them off again.
"""

from __future__ import annotations

import torch.fx as fx

from .context import PassContext, PassResult
from .graph_utils import finalize


def append_outputs(gm: fx.GraphModule, entropies: list[fx.Node]) -> tuple[int, bool]:
    """Append ``entropies`` to ``gm``'s outputs.

    Returns ``(n, was_sequence)``: the number of original outputs and whether the graph
    returned a tuple/list (else a single value, now wrapped in a tuple).
    """
    (output,) = gm.graph.find_nodes(op="output")
    orig = output.args[0]
    was_sequence = isinstance(orig, (tuple, list))
    items = tuple(orig) if was_sequence else (orig,)
    if entropies:
        output.args = (items + tuple(entropies),)
    return len(items), was_sequence


def hoist_entropy_outputs(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    """Pass entry point: hoist every entropy node not consumed inside the graph already, except
    those of sites known to be cross-attention: the runtime records self-attention entropy only,
    and each hoisted output costs a graph output and a record call per graph call (host time at the
    launch-bound early scales)."""
    pending = [(site, ent, ctx.site_ids[ent]) for site, ent in ctx.rewritten
               if ent in ctx.site_ids and ent.graph is gm.graph and site.kind != "cross"]
    outputs = []
    ctx.hoisted = []
    for site, ent, sid in pending:
        outputs.append(ent)
        with_len = site.kind == "unknown"
        if with_len:
            # the runtime tells self- from cross-attention by the key length
            fae = ent.args[0]
            with gm.graph.inserting_after(ent):
                lk = gm.graph.call_method("size", (fae.args[1], 2))
            outputs.append(lk)
        ctx.hoisted.append((sid, with_len))
    ctx.n_outputs, ctx.outputs_sequence = append_outputs(gm, outputs)
    if pending:
        finalize(gm)
    return PassResult(gm, bool(pending), f"{len(pending)} entropy output(s) hoisted")
