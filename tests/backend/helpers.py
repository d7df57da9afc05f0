"""Shared pieces of the backend tests: zoo samplers with fixed arguments, logit comparison."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from toprovar_fx import zoo

_MODELS: dict[str, torch.nn.Module] = {}


def model(name: str) -> torch.nn.Module:
    if name not in _MODELS:
        _MODELS[name] = zoo.build(name, seed=0)
    return _MODELS[name]


def sampler_call(name: str, batch: int = 1, **extra) -> Callable[[Callable], tuple]:
    """A function that calls a sampler of zoo model ``name`` with fixed arguments (CFG on)."""
    m = model(name)
    if name.startswith("infinity"):
        prompts = (["a red cat on a mat", "two blue squares"] * batch)[:batch]
        cond = m.encode_prompts(prompts)
        return lambda fn: fn(cond, B=batch, g_seed=7, cfg_list=3.0, return_logits=True, **extra)
    labels = torch.arange(batch) + 3
    return lambda fn: fn(B=batch, label_B=labels, g_seed=7, cfg=1.5, return_logits=True, **extra)


def generate_twice(family: str, options: dict, on_warm: Callable[[], None] | None = None,
                   **compile_kwargs) -> tuple[list[torch.Tensor], int]:
    """Compile zoo model ``family``'s sampler with toprovar (Dynamo reset first) and generate twice
    (batch 1, CFG): the second generation's per-scale logits, and the session's planned calls after
    the first (which compiles and warms up; ``on_warm`` runs after it)."""
    from toprovar_fx.runtime.session import last_session

    torch._dynamo.reset()
    fast = torch.compile(model(family).autoregressive_infer_cfg, backend="toprovar", options=options,
                         **compile_kwargs)
    call = sampler_call(family, 1)
    call(fast)
    planned_before = last_session().planned_calls
    if on_warm is not None:
        on_warm()
    _, logits = call(fast)
    return list(logits), planned_before


def max_rel_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    """Largest per-scale ``max|a - b| / max|b|``."""
    assert len(a) == len(b)
    return max(float((x - y).abs().max() / y.abs().max().clamp_min(1e-12)) for x, y in zip(a, b))


def uniform_sdpa(q, k, v, *args, **kwargs):
    """Attention that ignores q and k: every query averages v uniformly."""
    return v.mean(dim=-2, keepdim=True).expand(*q.shape[:-1], v.shape[-1])


__all__ = ["F", "generate_twice", "max_rel_diff", "model", "sampler_call", "uniform_sdpa"]
