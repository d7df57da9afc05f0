"""Tier (b): residual-branch analysis on graphs Dynamo captures from a small RoPE block."""

import torch
import torch.nn as nn
import torch.nn.functional as F

from toprovar_fx.passes.find_residual_branches import analyse_branches


class RopeBlock(nn.Module):
    def __init__(self, c=32, heads=4):
        super().__init__()
        self.heads = heads
        self.qkv, self.proj = nn.Linear(c, 3 * c), nn.Linear(c, c)
        self.fc1, self.fc2 = nn.Linear(c, 4 * c), nn.Linear(4 * c, c)
        self.cached_k = self.cached_v = None

    def forward(self, x, rope, cond):
        b, n, c = x.shape
        q, k, v = self.qkv(x * cond).view(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = q * rope, k * rope  # rope: [1, 1, n, d], a table slice lined up with the tokens
        self.cached_k = torch.cat((self.cached_k, k), dim=2)
        self.cached_v = torch.cat((self.cached_v, v), dim=2)
        o = F.scaled_dot_product_attention(q, self.cached_k, self.cached_v)
        x = x + self.proj(o.transpose(1, 2).reshape(b, n, c))
        return x + self.fc2(F.gelu(self.fc1(x)))


def _capture(dynamic: bool, rows: int = 2, tokens: tuple[int, ...] = (5, 7)):
    graphs = []

    def recorder(gm, example_inputs, **kw):
        graphs.append(gm)
        return gm.forward

    blk = RopeBlock()
    fn = torch.compile(blk, backend=recorder, dynamic=dynamic)
    for n in tokens:
        blk.cached_k = torch.randn(rows, 4, 3, 8)
        blk.cached_v = torch.randn(rows, 4, 3, 8)
        fn(torch.randn(rows, n, 32), torch.randn(1, 1, n, 8), torch.randn(rows, 1, 32))
    return graphs[-1]


def test_branches_kinds_positional_and_cache_escapes():
    gm = _capture(dynamic=True)
    branches = analyse_branches(gm)
    assert [b.kind for b in branches] == ["self_attn", "ffn"]
    sa, ffn = branches
    assert sa.prunable and ffn.prunable, (sa.why_not, ffn.why_not)
    # the RoPE slice is gathered with the tokens (token dim 2); cond [B, 1, C] is not
    assert [(n.name, d) for n, d in sa.positional] == [("l_rope_", 2)]
    assert ffn.positional == []
    # the two K/V concats leave the branch; skipping it returns the old caches
    assert len(sa.escapes) == 2 and all(e.target is torch.cat for e in sa.escapes)
    assert [s.name for s in sa.escape_skip] == [e.args[0][0].name for e in sa.escapes]
    assert sa.linear_flops_per_token == 2 * (32 * 96 + 32 * 32)
    assert ffn.linear_flops_per_token == 2 * (32 * 128 * 2)
    assert sa.attention_pair_flops == 4 * 4 * 8


def test_static_graph_is_not_prunable():
    gm = _capture(dynamic=False)
    sa = analyse_branches(gm)[0]
    assert not sa.prunable and "static" in sa.why_not


def test_rows_equal_to_the_token_count_share_a_symbol_and_are_not_routed():
    """Dynamo gives equal sizes one symbol (16 rows at batch 8 with CFG, 16 tokens at 4x4): no
    branch of such a graph can be routed, and the reason says why."""
    branches = analyse_branches(_capture(dynamic=True, rows=6, tokens=(6,)))
    assert [b.kind for b in branches] == ["self_attn", "ffn"]
    assert all(not b.prunable and "one size" in b.why_not for b in branches), [b.why_not for b in branches]
    assert analyse_branches(_capture(dynamic=True, rows=6, tokens=(5,)))[1].prunable  # sizes apart: routed
