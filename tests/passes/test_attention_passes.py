"""Tier (a): attention discovery and rewrite on hand-built FX graphs, with negative cases."""

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

from toprovar_fx.kernels import FAE_OP
from toprovar_fx.passes.find_attention import SkipReason, find_attention_sites
from toprovar_fx.passes.rewrite_attention import replace_with_fae


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False):
    """Stand-in with flash-attn's name and [B, L, H, D] layout (flash-attn is not installed here)."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         scale=softmax_scale, is_causal=causal)
    return out.transpose(1, 2)


torch.fx.wrap("flash_attn_func")


def _traced(fn, *inputs) -> fx.GraphModule:
    gm = fx.symbolic_trace(fn)
    FakeTensorProp(gm).propagate(*inputs)
    return gm


def _qkv(b=2, h=4, lq=9, lk=14, d=16, layout="bhld"):
    q, k, v = torch.randn(b, h, lq, d), torch.randn(b, h, lk, d), torch.randn(b, h, lk, d)
    if layout == "blhd":
        q, k, v = (t.transpose(1, 2).contiguous() for t in (q, k, v))
    return q, k, v


def _check_rewrite(fn, inputs, pattern):
    want = fn(*inputs)
    gm = _traced(fn, *inputs)
    sites = find_attention_sites(gm)
    assert [s.pattern for s in sites] == [pattern] and sites[0].eligible
    done = replace_with_fae(gm, sites)
    gm.recompile()
    assert len(done) == 1
    assert any(n.target is FAE_OP for n in gm.graph.nodes)
    got = gm(*inputs)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    return gm


def test_sdpa_is_rewritten():
    def fn(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, scale=0.3) * 2

    gm = _check_rewrite(fn, _qkv(), "sdpa")
    assert "scaled_dot_product_attention" not in gm.code


def test_explicit_softmax_pattern_is_rewritten_and_removed():
    def fn(q, k, v):
        return (q * 0.25 @ k.transpose(-2, -1)).softmax(dim=-1) @ v

    gm = _check_rewrite(fn, _qkv(), "explicit_softmax")
    assert "softmax" not in gm.code and "matmul" not in gm.code


def test_explicit_pattern_with_scale_on_scores():
    def fn(q, k, v):
        return torch.softmax(torch.matmul(q, k.transpose(-1, -2)) / 4.0, dim=-1) @ v

    _check_rewrite(fn, _qkv(), "explicit_softmax")


def test_flash_attn_layout_is_rewritten():
    def fn(q, k, v):
        return flash_attn_func(q, k, v, softmax_scale=0.2)

    _check_rewrite(fn, _qkv(layout="blhd"), "flash_attn")


def test_gqa_sdpa_is_rewritten():
    def fn(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)

    q = torch.randn(1, 8, 5, 32)
    k, v = torch.randn(1, 2, 7, 32), torch.randn(1, 2, 7, 32)
    _check_rewrite(fn, (q, k, v), "sdpa")


@pytest.mark.parametrize(
    "fn, reason",
    [
        (lambda q, k, v, m: F.scaled_dot_product_attention(q, k, v, attn_mask=m), SkipReason.MASKED),
        (lambda q, k, v, m: F.scaled_dot_product_attention(q, k, v, is_causal=True), SkipReason.CAUSAL),
        (lambda q, k, v, m: F.scaled_dot_product_attention(q, k, v, dropout_p=0.1), SkipReason.DROPOUT),
    ],
)
def test_ineligible_sdpa_is_left_alone_with_a_reason(fn, reason):
    q, k, v = _qkv(lq=6, lk=6)
    mask = torch.zeros(6, 6, dtype=torch.bool)
    gm = _traced(fn, q, k, v, mask)
    sites = find_attention_sites(gm)
    assert len(sites) == 1 and not sites[0].eligible and sites[0].reason is reason
    assert replace_with_fae(gm, sites) == []
    assert not any(n.target is FAE_OP for n in gm.graph.nodes)


def test_explicit_pattern_whose_probabilities_escape_is_refused():
    def fn(q, k, v):
        p = (q @ k.transpose(-2, -1)).softmax(-1)
        return p @ v, p.sum()

    gm = _traced(fn, *_qkv())
    (site,) = find_attention_sites(gm)
    assert not site.eligible and site.reason is SkipReason.PROBS_USED


def test_integer_inputs_are_refused():
    def fn(q, k, v):
        return F.scaled_dot_product_attention(q, k, v)

    q = torch.randn(1, 2, 3, 8).double()
    gm = _traced(fn, q, q, q)
    (site,) = find_attention_sites(gm)
    assert not site.eligible and site.reason is SkipReason.DTYPE


def test_self_vs_cross_attention():
    def fn(x, text, wq, wk):
        q = (x @ wq).view(1, -1, 2, 8).transpose(1, 2)
        k_self = (x @ wk).view(1, -1, 2, 8).transpose(1, 2)
        k_text = (text @ wk).view(1, -1, 2, 8).transpose(1, 2)
        return F.scaled_dot_product_attention(q, k_self, k_self) + F.scaled_dot_product_attention(q, k_text, k_text)

    gm = _traced(fn, torch.randn(1, 5, 16), torch.randn(1, 3, 16), torch.randn(16, 16), torch.randn(16, 16))
    assert [s.kind for s in find_attention_sites(gm)] == ["self", "cross"]


def test_attention_on_graph_inputs_is_left_to_the_runtime():
    gm = _traced(lambda q, k, v: F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v), *_qkv(layout="blhd")[:2], torch.randn(2, 4, 14, 16))
    assert [s.kind for s in find_attention_sites(gm)] == ["unknown"]


def test_cached_keys_concatenated_from_graph_inputs_are_left_to_the_runtime():
    def fn(q, cache, k_new, v):
        return F.scaled_dot_product_attention(q, torch.cat((cache, k_new), dim=2), v)

    q = torch.randn(1, 2, 4, 8)
    gm = _traced(fn, q, torch.randn(1, 2, 5, 8), torch.randn(1, 2, 4, 8), torch.randn(1, 2, 9, 8))
    assert [s.kind for s in find_attention_sites(gm)] == ["unknown"]
