"""Find attention in a Dynamo graph and decide, per site, whether FAE may replace it.

Why: only attention the FAE kernel computes exactly may be rewritten; everything else must
stay, with the reason recorded (CONVENTIONS practice 4).

Expects: a Dynamo-produced ``GraphModule`` whose nodes carry ``meta["example_value"]`` (or
``meta["val"]``) fake tensors.

Finds three patterns:

* ``F.scaled_dot_product_attention`` / ``aten.scaled_dot_product_attention`` (``sdpa``);
* ``flash_attn_func(q, k, v, ...)`` with its ``[B, L, H, D]`` layout (``flash_attn``), matched
  by the function's name since flash-attn is an optional install;
* ``softmax(q @ k^T * scale, dim=-1) @ v`` written out (``explicit_softmax``), with the scale
  on the scores or on ``q``.

Guarantees: returns one ``AttentionSite`` per match, eligible or not; the graph is not
changed. A site is eligible when it has no mask, is not causal, has no dropout, its q/k/v
are 4-D floating tensors of one dtype with head dim <= 256, and ``Hq`` is a multiple of
``Hkv``. Its ``kind`` is ``self`` when q and k share a non-parameter ancestor (the residual
stream), else ``cross``.
"""

from __future__ import annotations

import enum
import operator
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn.functional as F

from .context import PassContext, PassResult
from .graph_utils import ancestors, example_value, is_static_input, module_path

MAX_HEAD_DIM = 256
_SDPA_TARGETS = {F.scaled_dot_product_attention, torch.ops.aten.scaled_dot_product_attention.default}
_SOFTMAX_FUNCS = {F.softmax, torch.softmax, torch.ops.aten._softmax.default, torch.ops.aten.softmax.int}
_MATMULS = {operator.matmul, torch.matmul, torch.bmm, torch.ops.aten.matmul.default}


class SkipReason(str, enum.Enum):
    MASKED = "masked"
    CAUSAL = "causal"
    DROPOUT = "dropout"
    NOT_4D = "not_4d"
    DTYPE = "dtype"
    HEAD_DIM = "head_dim"
    HEADS = "heads"
    NO_META = "no_meta"
    PROBS_USED = "probs_used"


@dataclass
class AttentionSite:
    node: fx.Node  # the node whose output is the attention output
    pattern: str
    q: fx.Node
    k: fx.Node
    v: fx.Node
    scale: float | None
    layout: str = "bhld"  # bhld (SDPA) | blhd (flash-attn)
    eligible: bool = True
    reason: SkipReason | None = None
    detail: str = ""
    kind: str = "self"
    heads: int = 0
    head_dim: int = 0
    removable: list[fx.Node] = field(default_factory=list)  # nodes of an explicit pattern

    def refuse(self, reason: SkipReason, detail: str) -> None:
        self.eligible, self.reason, self.detail = False, reason, detail


def _arg(node: fx.Node, index: int, name: str, default=None):
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _match_sdpa(node: fx.Node) -> AttentionSite | None:
    if node.op != "call_function" or node.target not in _SDPA_TARGETS:
        return None
    site = AttentionSite(node, "sdpa", _arg(node, 0, "query"), _arg(node, 1, "key"), _arg(node, 2, "value"),
                         scale=_arg(node, 6, "scale"))
    mask, dropout, causal = _arg(node, 3, "attn_mask"), _arg(node, 4, "dropout_p", 0.0), _arg(node, 5, "is_causal", False)
    if mask is not None:
        site.refuse(SkipReason.MASKED, "attn_mask is given; FAE computes unmasked attention only")
    elif causal is not False:
        site.refuse(SkipReason.CAUSAL, f"is_causal={causal}")
    elif not (isinstance(dropout, (int, float)) and dropout == 0):
        site.refuse(SkipReason.DROPOUT, f"dropout_p={dropout}")
    return site


def _match_flash(node: fx.Node) -> AttentionSite | None:
    if node.op != "call_function" or getattr(node.target, "__name__", "") != "flash_attn_func":
        return None
    site = AttentionSite(node, "flash_attn", _arg(node, 0, "q"), _arg(node, 1, "k"), _arg(node, 2, "v"),
                         scale=_arg(node, 4, "softmax_scale"), layout="blhd")
    dropout, causal = _arg(node, 3, "dropout_p", 0.0), _arg(node, 5, "causal", False)
    window, alibi = _arg(node, 6, "window_size", (-1, -1)), _arg(node, 8, "alibi_slopes")
    if causal is not False:
        site.refuse(SkipReason.CAUSAL, f"causal={causal}")
    elif not (isinstance(dropout, (int, float)) and dropout == 0):
        site.refuse(SkipReason.DROPOUT, f"dropout_p={dropout}")
    elif tuple(window) != (-1, -1) or alibi is not None:
        site.refuse(SkipReason.MASKED, "sliding window or ALiBi bias")
    elif _arg(node, 10, "return_attn_probs", False):
        site.refuse(SkipReason.PROBS_USED, "return_attn_probs=True")
    return site


def _is_call(node, targets: set, methods: tuple[str, ...]) -> bool:
    if not isinstance(node, fx.Node):
        return False
    if node.op == "call_function" and node.target in targets:
        return True
    return node.op == "call_method" and node.target in methods


def _scalar_factor(node: fx.Node) -> tuple[fx.Node, float] | None:
    """``t * c`` / ``c * t`` / ``t / c`` with a Python number ``c`` -> (t, factor)."""
    if node.op not in ("call_function", "call_method"):
        return None
    name = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
    a = node.args[0] if node.args else None
    b = node.args[1] if len(node.args) > 1 else None
    if name in ("mul", "mul_", "__mul__"):
        if isinstance(b, (int, float)) and isinstance(a, fx.Node):
            return a, float(b)
        if isinstance(a, (int, float)) and isinstance(b, fx.Node):
            return b, float(a)
    if name in ("truediv", "div", "div_", "__truediv__") and isinstance(b, (int, float)) and isinstance(a, fx.Node):
        return a, 1.0 / float(b)
    return None


def _transposed_key(node: fx.Node) -> fx.Node | None:
    """``k.transpose(-2, -1)`` (any spelling of the last two dims) or ``k.mT`` -> ``k``."""
    if node.op == "call_method" and node.target == "transpose" or (
        node.op == "call_function" and node.target is torch.transpose
    ):
        dims = {d % 4 if isinstance(d, int) else d for d in node.args[1:3]}
        return node.args[0] if dims == {2, 3} else None
    if node.op == "call_function" and node.target is getattr and node.args[1] == "mT":
        return node.args[0]
    return None


def _match_explicit(node: fx.Node) -> AttentionSite | None:
    """``softmax(s, -1) @ v`` where ``s = (q [* c]) @ k^T [* c]``."""
    if not _is_call(node, _MATMULS, ("matmul", "__matmul__")):
        return None
    probs, v = node.args[0], node.args[1]
    if not _is_call(probs, _SOFTMAX_FUNCS, ("softmax",)):
        return None
    dim = _arg(probs, 1, "dim")
    if dim not in (-1, 3):
        return None
    scores = probs.args[0]
    scale = 1.0
    removable = [node, probs]
    factor = _scalar_factor(scores)
    if factor is not None:
        removable.append(scores)
        scores, scale = factor[0], scale * factor[1]
    if not _is_call(scores, _MATMULS, ("matmul", "__matmul__")):
        return None
    removable.append(scores)
    q, kt = scores.args[0], scores.args[1]
    k = _transposed_key(kt) if isinstance(kt, fx.Node) else None
    if k is None:
        return None
    removable.append(kt)
    factor = _scalar_factor(q)
    if factor is not None:
        removable.append(q)
        q, scale = factor[0], scale * factor[1]
    site = AttentionSite(node, "explicit_softmax", q, k, v, scale=scale, removable=removable)
    if len(probs.users) > 1:
        site.refuse(SkipReason.PROBS_USED, "the attention probabilities are used elsewhere")
    return site


def _check_tensors(site: AttentionSite) -> None:
    if not site.eligible:
        return
    vals = [example_value(n) for n in (site.q, site.k, site.v)]
    if any(not isinstance(t, torch.Tensor) for t in vals):
        site.refuse(SkipReason.NO_META, "q/k/v carry no fake tensor metadata")
        return
    q, k, v = vals
    if not (q.dim() == k.dim() == v.dim() == 4):
        site.refuse(SkipReason.NOT_4D, f"q/k/v dims {q.dim()}/{k.dim()}/{v.dim()}")
        return
    if not (q.dtype == k.dtype == v.dtype and q.dtype in (torch.float32, torch.float16, torch.bfloat16)):
        site.refuse(SkipReason.DTYPE, f"dtypes {q.dtype}/{k.dtype}/{v.dtype}")
        return
    head_axis = 2 if site.layout == "blhd" else 1
    hq, hk, d = q.shape[head_axis], k.shape[head_axis], q.shape[-1]
    if not isinstance(d, int) or d > MAX_HEAD_DIM or v.shape[-1] != d:
        site.refuse(SkipReason.HEAD_DIM, f"head dim {d} (max {MAX_HEAD_DIM}, v must match)")
        return
    if not isinstance(hq, int) or not isinstance(hk, int) or hq % hk:
        site.refuse(SkipReason.HEADS, f"Hq={hq} is not a multiple of Hkv={hk}")
        return
    site.heads, site.head_dim = hq, d


_VIEW_METHODS = ("view", "reshape", "transpose", "permute", "contiguous", "unsqueeze", "squeeze", "to", "float",
                 "half", "bfloat16", "type_as", "flatten", "unflatten", "expand")


def _input_view(node) -> bool:
    """``node`` is a graph input seen through view-like ops only (no computation in this graph),
    or a ``torch.cat`` of such inputs (a K/V cache extended by keys computed in another graph)."""
    while isinstance(node, fx.Node):
        if node.op == "placeholder":
            return True
        if node.op == "call_function" and node.target in (torch.cat, torch.concat):
            parts = node.args[0]
            return isinstance(parts, (list, tuple)) and all(_input_view(p) for p in parts)
        is_view = (node.op == "call_method" and node.target in _VIEW_METHODS) or (
            node.op == "call_function" and node.target in (operator.getitem, torch.transpose, torch.reshape))
        if not is_view:
            return False
        node = node.args[0]
    return False


def _classify(site: AttentionSite) -> None:
    """``self`` when q and k share a non-parameter ancestor (the residual stream); ``unknown``
    when both come straight from graph inputs (a block split over several graphs: the runtime
    decides from the key length); else ``cross``."""
    common = {n for n in ancestors(site.q) & (ancestors(site.k) | {site.k}) if not is_static_input(n)}
    if common:
        site.kind = "self"
    elif _input_view(site.q) and _input_view(site.k):
        site.kind = "unknown"
    else:
        site.kind = "cross"


def find_attention_sites(gm: fx.GraphModule) -> list[AttentionSite]:
    """Every attention site of ``gm``, in graph order, eligible or not (graph unchanged)."""
    sites = []
    for node in gm.graph.nodes:
        site = _match_sdpa(node) or _match_flash(node) or _match_explicit(node)
        if site is None:
            continue
        _check_tensors(site)
        _classify(site)
        site.detail = site.detail or module_path(node)
        sites.append(site)
    return sites


def find_attention(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    """Pass entry point: store the sites in ``ctx.sites`` and record refusals in the session."""
    ctx.sites = find_attention_sites(gm)
    for site in ctx.sites:
        if not site.eligible:
            record = {"node": site.node.name, "pattern": site.pattern, "reason": site.reason.value,
                      "detail": site.detail}
            # recompiles of one code object find the same refusal again: record it once
            if record not in ctx.session.attention_skipped:
                ctx.session.attention_skipped.append(record)
    eligible = sum(s.eligible for s in ctx.sites)
    return PassResult(gm, False, f"{len(ctx.sites)} attention site(s), {eligible} eligible")
