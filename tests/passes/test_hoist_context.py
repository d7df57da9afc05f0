"""The cross-attention context cut out of a block graph (``passes/hoist_context.py``) and its memo
(``runtime/context_memo.py``): the same values as the whole graph, computed once per block and text."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from toprovar_fx.passes.graph_utils import is_static_input
from toprovar_fx.passes.hoist_context import CONTEXT_META, split_context
from toprovar_fx.runtime.context_memo import ContextMemo, ContextRunner


class CrossBlock(nn.Module):
    """Self-attention then cross-attention to a packed text, as a text-conditioned VAR block."""

    def __init__(self, c=32, heads=4, ctx_dim=16, in_place=False):
        super().__init__()
        self.heads, self.in_place = heads, in_place
        self.qkv, self.proj = nn.Linear(c, 3 * c), nn.Linear(c, c)
        self.mat_q, self.mat_kv, self.proj_ca = nn.Linear(c, c), nn.Linear(ctx_dim, 2 * c), nn.Linear(c, c)

    def forward(self, x, text, lens):
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        x = x + self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c))
        kv = self.mat_kv(text)  # [b, L_text, 2c]
        if self.in_place:
            kv.mul_(2.0)
        kt, vt = kv.view(b, -1, 2, self.heads, c // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        valid = torch.arange(text.shape[1])[None, :] < lens[:, None]
        qc = self.mat_q(x).view(b, n, self.heads, -1).transpose(1, 2)
        o = F.scaled_dot_product_attention(qc, kt, vt, attn_mask=valid[:, None, None, :])
        return x + self.proj_ca(o.transpose(1, 2).reshape(b, n, c))


def _capture(block):
    graphs = []

    def recorder(gm, example_inputs, **kw):
        graphs.append((gm, list(example_inputs)))
        return gm.forward

    fn = torch.compile(block, backend=recorder)
    args = (torch.randn(2, 5, 32), torch.randn(2, 6, 16), torch.tensor([6, 3]))
    fn(*args)
    return graphs[-1]


def _context_positions(gm, positions):
    placeholders = list(gm.graph.find_nodes(op="placeholder"))
    return [placeholders[i].name for i in positions]


def test_split_context_cuts_the_text_kv_and_computes_the_same_values():
    torch.manual_seed(0)
    gm, example = _capture(CrossBlock())
    split = split_context(gm, example)
    assert split is not None and split.n_gemms == 1
    # the text, its lengths and the K/V weight go to pre; the stream and the query weights do not
    names = _context_positions(gm, split.pre_inputs)
    assert any("text" in n for n in names) and any("lens" in n for n in names)
    assert any("mat_kv" in n for n in names) and not any(n == "l_x_" or "mat_q" in n for n in names)
    # K, V and the mask cross the cut; main no longer projects the text
    assert len(split.example_values) == 3
    main_linears = [n for n in split.main.graph.nodes if n.op == "call_function" and n.target is torch._C._nn.linear]
    assert len(main_linears) == len([n for n in gm.graph.nodes if n.op == "call_function"
                                     and n.target is torch._C._nn.linear]) - 1
    added = [n for n in split.main.graph.find_nodes(op="placeholder") if n.meta.get(CONTEXT_META)]
    assert len(added) == 3 and all(is_static_input(n) for n in added)
    # main(args, pre(args)) == gm(args), and on new inputs too
    want = gm(*example)
    values = split.pre(*[example[i] for i in split.pre_inputs])
    got = split.main(*example, *values)
    torch.testing.assert_close(got, want)


def test_split_context_finds_nothing_without_cross_attention():
    class SelfOnly(CrossBlock):
        def forward(self, x, text, lens):
            b, n, c = x.shape
            q, k, v = self.qkv(x).view(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
            return x + self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c))

    gm, example = _capture(SelfOnly())
    assert split_context(gm, example) is None


def test_split_context_refuses_an_in_place_context():
    gm, example = _capture(CrossBlock(in_place=True))
    assert split_context(gm, example) is None


def _memo_for(block):
    gm, example = _capture(block)
    split = split_context(gm, example)
    static = [is_static_input(p) for p in split.pre.graph.find_nodes(op="placeholder")]
    calls = []

    def pre(*inputs):
        calls.append(1)
        return split.pre(*inputs)

    memo = ContextMemo(pre, static)
    return gm, example, split, ContextRunner(split.main.forward, memo, split.pre_inputs), calls


def test_memo_computes_once_per_text_and_again_when_it_changes():
    torch.manual_seed(0)
    gm, example, split, runner, calls = _memo_for(CrossBlock())
    text_pos = next(i for i in split.pre_inputs if example[i].dim() == 3)
    torch.testing.assert_close(runner(*example), gm(*example))
    first = [v.data_ptr() for v in runner.memo.entries[next(iter(runner.memo.entries))].values]
    runner(*example)
    assert len(calls) == 1  # same text object, same version: nothing computed
    # a new text object: computed again, into the same buffers (CUDA graphs read them in place)
    new = list(example)
    new[text_pos] = torch.randn_like(example[text_pos])
    torch.testing.assert_close(runner(*new), gm(*new))
    assert len(calls) == 2
    assert [v.data_ptr() for v in runner.memo.entries[next(iter(runner.memo.entries))].values] == first
    # the same object written in place: its version moved, so computed again
    with torch.no_grad():
        new[text_pos].mul_(-1.0)
    torch.testing.assert_close(runner(*new), gm(*new))
    assert len(calls) == 3


def test_memo_keys_entries_by_the_block_weights_and_recomputes_inference_tensors():
    torch.manual_seed(0)
    gm, example, split, runner, calls = _memo_for(CrossBlock())
    runner(*example)
    # other weights (another block calling the same graph): an entry of its own
    weights = list(example)
    for i in split.pre_inputs:
        if isinstance(example[i], nn.Parameter):
            weights[i] = nn.Parameter(torch.randn_like(example[i]))
    torch.testing.assert_close(runner(*weights), gm(*weights))
    assert len(runner.memo.entries) == 2 and len(calls) == 2
    runner(*example)
    assert len(calls) == 2
    with torch.inference_mode():
        text_pos = next(i for i in split.pre_inputs if example[i].dim() == 3)
        inf = list(example)
        inf[text_pos] = example[text_pos].clone()
        runner(*inf)
        runner(*inf)
    assert len(calls) == 4  # no version counter: never trusted


def test_context_runner_checks_its_positions():
    with pytest.raises(ValueError, match="positions"):
        ContextRunner(lambda *a: a, ContextMemo(lambda *a: a, [True, False]), [0])


def test_a_sized_memo_keeps_buffers_per_text_length():
    """Symbolic text length: an entry per block and length (tensor sizes, integer lengths), each
    filled again in place; an unsized memo would fill one length's buffers with another's values."""
    weight = torch.randn(4, 3)
    calls = []

    def pre(w, text, n):
        calls.append(n)
        return (text[:n] @ w.T,)

    memo = ContextMemo(pre, [True, False, False], sized=True)
    short, long_ = torch.randn(2, 3), torch.randn(5, 3)
    (a,) = memo([weight, short, 2])
    (b,) = memo([weight, long_, 5])
    assert a.shape == (2, 4) and b.shape == (5, 4) and len(memo.entries) == 2
    (b2,) = memo([weight, long_, 3])  # the same text tensor, another integer length: another entry
    assert b2.shape == (3, 4) and len(memo.entries) == 3
    again = torch.randn(2, 3)
    (a2,) = memo([weight, again, 2])  # a new text of a length seen before: its buffers, refilled
    assert a2.data_ptr() == a.data_ptr()
    torch.testing.assert_close(a2, again @ weight.T)
    assert calls == [2, 5, 3, 2]
