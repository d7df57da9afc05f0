"""What the ``tools/try_official_*.py`` scripts print of a toprovar generation report."""

from __future__ import annotations

from typing import Any


def summarise(rep: Any) -> dict[str, Any]:
    """A JSON-ready digest of ``toprovar_fx.last_generation()``: rewrites, fallbacks, FLOPs, decisions."""
    if rep is None:
        return {"report": None}
    d = {k: getattr(rep, k) for k in ("mode", "policy", "attention_rewrites", "attention_kinds", "attention_skipped",
                                      "rows", "depth", "start_scale", "graphs", "compiles", "recompiles",
                                      "fallbacks")}
    d["compile_seconds"] = round(rep.compile_seconds, 2)
    d["flop_ratio"] = round(rep.flop_ratio, 4)
    d["scales"] = [(s.index, s.h, s.w, s.tokens) for s in rep.scales]
    d["rho"] = [None if s.rho is None else round(s.rho, 3) for s in rep.scales]
    d["pruning_active"] = [s.index for s in rep.scales if s.pruning_active]
    d["layer_classes"] = sorted({(lr.index, lr.layer_class, None if lr.r_score is None else round(lr.r_score, 3))
                                 for s in rep.scales for lr in s.layers}, key=lambda t: t[0])
    d["actions_last_scales"] = {
        s.index: [(lr.index, lr.action, lr.kept_tokens) for lr in s.layers] for s in rep.scales[-3:]
    }
    return d
