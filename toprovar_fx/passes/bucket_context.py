"""Pad a hoisted text context to bucket lengths, so texts of several lengths share block graphs.

Why: every text length Dynamo sees after the first runs the same symbolic-length block graphs,
but their CUDA graphs are captured per shape: each new length captured every block graph again,
3.0-4.6 s per generation that captures and about 13 GiB of graph pools per length on
Infinity-2B (H200, ``benchmarks/results/e2e-2026-11-30-prompts.md``). Padded to a multiple of
``context_bucket`` tokens, the lengths of one bucket share the captures and their memory.

Why it is exact, and when it applies: a cross-attention's keys beyond a text's length are masked
out. Where every hoisted value carrying the symbolic text length feeds only
``scaled_dot_product_attention``, as a key or value padded along the key dimension (zeros) next
to a boolean mask padded along its last dimension (``False``), the padded keys get probability 0
and the output is that of the unpadded text. The main graph must read no other input carrying
the length (the packed text and its lengths are the context's inputs only); those inputs are
dropped from it, so the CUDA-graph key sees the bucket, not the length.

Expects: a symbolic ``ContextSplit`` (``passes/hoist_context.py``). Guarantees: ``bucket_plan``
returns None (with the reason logged once at INFO) and leaves the split as it was, or a
``BucketPlan`` after removing from ``split.main`` every original placeholder it does not read;
``main(*(args[i] for i in plan.keep), *padded context)`` then equals ``gm(*args)``, where the
padded context is what ``runtime/context_memo.py`` builds from ``plan.pads``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

from .find_attention import _SDPA_TARGETS, _arg
from .graph_utils import example_value
from .hoist_context import CONTEXT_META, ContextSplit

log = logging.getLogger("toprovar")


@dataclass(frozen=True)
class BucketPlan:
    """``pads[j]``: for context value ``j``, (dimension of the text length, value padded with), or
    None for a value without it; ``keep``: the original inputs the main graph still reads."""

    pads: tuple[tuple[int, Any] | None, ...]
    keep: tuple[int, ...]


def _symbols(value: Any) -> set[Any]:
    """The free symbols of a SymInt or of a tensor's sizes (none for anything else)."""
    if isinstance(value, torch.SymInt):
        return set(value.node.expr.free_symbols)
    if isinstance(value, torch.Tensor):
        return set().union(*(_symbols(s) for s in value.shape))
    return set()


def _sdpa_role(user: fx.Node, ph: fx.Node) -> str | None:
    """``ph``'s role in ``user``: "kv" (key or value), "mask", or None (anything else)."""
    if user.op != "call_function" or user.target not in _SDPA_TARGETS:
        return None
    if _arg(user, 5, "is_causal", False) or ph is _arg(user, 0, "query"):
        return None
    if ph is _arg(user, 1, "key") or ph is _arg(user, 2, "value"):
        return "kv"
    if ph is _arg(user, 3, "attn_mask"):
        return "mask"
    return None


def _why_not(split: ContextSplit) -> tuple[str | None, tuple[tuple[int, Any] | None, ...]]:
    """(None, the pads) where the split can be padded, else (the reason, ())."""
    placeholders = list(split.main.graph.find_nodes(op="placeholder"))
    context = [p for p in placeholders if p.meta.get(CONTEXT_META)]
    pads: list[tuple[int, Any] | None] = []
    symbols: set[Any] = set()
    masks: set[fx.Node] = set()
    for ph in context:
        value = example_value(ph)
        dims = [d for d, s in enumerate(value.shape) if isinstance(s, torch.SymInt)]
        if not dims:
            pads.append(None)
            continue
        if len(dims) > 1 or not value.shape[dims[0]].node.expr.is_Symbol:
            return f"context value {ph.name} has sizes {tuple(value.shape)}, not one text length", ()
        symbols |= _symbols(value.shape[dims[0]])
        roles = {_sdpa_role(u, ph) for u in ph.users}
        if roles == {"kv"} and dims[0] == value.dim() - 2:
            pads.append((dims[0], 0))
        elif roles == {"mask"} and dims[0] == value.dim() - 1 and value.dtype == torch.bool:
            pads.append((dims[0], False))
            masks.add(ph)
        else:
            return f"context value {ph.name} is used otherwise than as a key, value or boolean mask", ()
    if len(symbols) != 1:
        return "the context carries no single text length", ()
    for ph, pad in zip(context, pads):
        if pad is not None and pad[1] == 0:
            for u in ph.users:  # zero keys count unless masked: each attention needs its padded mask
                if _arg(u, 3, "attn_mask") not in masks:
                    return f"the attention reading {ph.name} has no padded mask", ()
    for ph in placeholders:
        if not ph.meta.get(CONTEXT_META) and ph.users and _symbols(example_value(ph)) & symbols:
            return f"the main graph reads input {ph.name}, which carries the text length", ()
    return None, tuple(pads)


def bucket_plan(split: ContextSplit) -> BucketPlan | None:
    """The padding plan of a symbolic ``split`` (module docstring), dropping the main graph's
    unread original inputs; None, with the split unchanged, where padding would not be exact."""
    if not split.symbolic:
        return None
    reason, pads = _why_not(split)
    if reason is not None:
        log.info("toprovar: the text context is not padded to buckets (%s); each text length captures its "
                 "own graphs", reason)
        return None
    graph = split.main.graph
    keep = []
    originals = [p for p in graph.find_nodes(op="placeholder") if not p.meta.get(CONTEXT_META)]
    for i, ph in enumerate(originals):  # in the original graph's order (``split_context``)
        if ph.users:
            keep.append(i)
        else:
            graph.erase_node(ph)
    graph.lint()
    split.main.recompile()
    return BucketPlan(pads, tuple(keep))
