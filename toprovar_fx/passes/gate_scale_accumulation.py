"""Route the sampler's residual accumulation through the runtime, so whole scales can be skipped.

Why: skipping a scale (FastVAR's released code drops the last two; SkipVAR exits early; the
paper's ``skip_after_D``) means its token map adds nothing to the image. The transformer
work of a skipped scale is removed by skipping every branch; the sampled tokens must then not
reach the image, so the add that accumulates a scale's residual into the running feature map
(VAR's ``f_hat.add_(h)``, Infinity's ``summed_codes += ...``) has to be gated.

Expects: a graph without attention. Finds ``acc + delta`` / ``acc.add_(delta)`` where ``acc`` is
a 4-D graph input (the accumulator ``[B, C, H, W]``), ``delta`` has ``acc``'s shape, depends on
another graph input and not on ``acc``.

Guarantees: each such add is replaced by ``accumulate_scale(session_id, acc, delta, inplace)``,
which returns the add's value, or ``acc`` unchanged while the runtime skips the current scale.
Where the accumulation runs outside compiled graphs (a sampler frame Dynamo skipped), nothing
is found, and the runtime refuses to skip scales (it says so once) rather than corrupt images.
"""

from __future__ import annotations

import torch.fx as fx

from ..kernels import FAE_OP
from ..runtime.dispatch import accumulate_scale
from .context import PassContext, PassResult
from .find_attention import _SDPA_TARGETS
from .find_residual_branches import _is_add, _shape
from .graph_utils import ancestors, finalize, is_static_input


def gate_scale_accumulation(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    graph = gm.graph
    if any(n.op == "call_function" and (n.target is FAE_OP or n.target in _SDPA_TARGETS) for n in graph.nodes):
        return PassResult(gm, False, "graph holds attention: no accumulation gated")
    inputs = [n for n in graph.nodes if n.op == "placeholder" and not is_static_input(n)]
    gated = 0
    for node in list(graph.nodes):
        if not _is_add(node):
            continue
        acc, delta = node.args[0], node.args[1]
        if acc not in inputs or not isinstance(delta, fx.Node):
            continue
        sa, sd = _shape(acc), _shape(delta)
        if sa is None or sd is None or len(sa) != 4 or len(sd) != 4:
            continue
        try:
            same = all(bool(a == b) for a, b in zip(sa, sd))
        except Exception:  # noqa: BLE001 - undecidable symbolic comparison
            same = False
        deps = ancestors(delta, values_only=True)
        if not same or acc in deps or not any(i in deps for i in inputs if i is not acc):
            continue
        inplace = node.op == "call_method" and node.target in ("add_", "__iadd__")
        with graph.inserting_before(node):
            new = graph.call_function(accumulate_scale, (ctx.session.id, acc, delta, inplace))
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        gated += 1
    if gated:
        ctx.session.accumulation_sites += gated
        finalize(gm)
    return PassResult(gm, bool(gated), f"{gated} scale accumulation(s) gated")

