"""The hoisted text context padded to bucket lengths (``passes/bucket_context.py``) and the memo's
shared slots (``runtime/context_memo.py``): exact where the padded keys are masked, refused
(and the split left as it was) where they would not be."""

import logging

import torch
import torch.nn.functional as F

from toprovar_fx.passes.bucket_context import bucket_plan
from toprovar_fx.passes.hoist_context import CONTEXT_META, split_context
from toprovar_fx.runtime.context_memo import ContextMemo, write_padded

from .test_hoist_context import CrossBlock


class KeysElsewhere(CrossBlock):
    """The text keys also feed something other than the attention: zero padding would show."""

    def forward(self, x, text, lens):
        b, n, c = x.shape
        kt, vt = self.mat_kv(text).view(b, -1, 2, self.heads, c // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        valid = torch.arange(text.shape[1])[None, :] < lens[:, None]
        qc = self.mat_q(x).view(b, n, self.heads, -1).transpose(1, 2)
        o = F.scaled_dot_product_attention(qc, kt, vt, attn_mask=valid[:, None, None, :])
        return x + self.proj_ca(o.transpose(1, 2).reshape(b, n, c)) + kt.mean()


class TextElsewhere(CrossBlock):
    """The main graph reads the packed text itself: its call would still carry the length."""

    def forward(self, x, text, lens):
        return super().forward(x, text, lens) + text.mean()


class Unmasked(CrossBlock):
    """A cross-attention without a key mask: padded zero keys would get probability."""

    def forward(self, x, text, lens):
        b, n, c = x.shape
        kt, vt = self.mat_kv(text).view(b, -1, 2, self.heads, c // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        qc = self.mat_q(x).view(b, n, self.heads, -1).transpose(1, 2)
        return x + self.proj_ca(F.scaled_dot_product_attention(qc, kt, vt).transpose(1, 2).reshape(b, n, c))


def _symbolic_split(block):
    """The split of the graph Dynamo compiles for a second text length (a symbolic length), and
    real arguments for it."""
    graphs = []

    def recorder(gm, example_inputs, **kw):
        graphs.append((gm, list(example_inputs)))
        return gm.forward

    fn = torch.compile(block, backend=recorder)
    torch._dynamo.reset()
    for n in (6, 4):
        fn(torch.randn(2, 5, 32), torch.randn(2, n, 16), torch.tensor([n, 2]))
    gm, example = graphs[-1]
    split = split_context(gm, example)
    assert split is not None and split.symbolic
    return gm, example, split


def _real_args(gm, example, n):
    """``example`` with the text of length ``n`` (and every symbolic integer input set from it)."""
    torch.manual_seed(n)
    text = torch.randn(2, n, 16)
    args = []
    for p, a in zip(gm.graph.find_nodes(op="placeholder"), example):
        if isinstance(a, torch.SymInt) or not isinstance(a, torch.Tensor):
            args.append(n)
        elif p.name.endswith("text_"):
            args.append(text)
        elif p.name.endswith("lens_"):
            args.append(torch.tensor([n, 2]))
        else:
            args.append(a)
    return args


def test_a_masked_context_is_padded_exactly_and_the_main_graph_reads_no_length():
    torch.manual_seed(0)
    gm, example, split = _symbolic_split(CrossBlock())
    plan = bucket_plan(split)
    assert plan is not None
    assert sorted(p for p in plan.pads if p is not None) == [(2, 0), (2, 0), (3, False)]  # K, V and the mask
    main_inputs = [p for p in split.main.graph.find_nodes(op="placeholder") if not p.meta.get(CONTEXT_META)]
    assert len(main_inputs) == len(plan.keep) and all(p.users for p in main_inputs)
    names = [p.name for p in gm.graph.find_nodes(op="placeholder")]
    assert not any(names[i].endswith(("text_", "lens_")) for i in plan.keep)  # the text goes to pre only
    for n in (3, 5, 6):
        args = _real_args(gm, example, n)
        values = split.pre(*[args[i] for i in split.pre_inputs])
        buffers = [torch.empty([8 if pad is not None and d == pad[0] else s for d, s in enumerate(v.shape)],
                               dtype=v.dtype) for v, pad in zip(values, plan.pads)]
        write_padded(buffers, values, plan.pads)
        got = split.main(*[args[i] for i in plan.keep], *buffers)
        torch.testing.assert_close(got[0] if isinstance(got, tuple) else got, gm(*args)[0], rtol=1e-5, atol=1e-6)


def test_a_context_the_padding_would_change_is_not_padded(caplog):
    for block, reason in ((KeysElsewhere(), "used otherwise than as a key, value or boolean mask"),
                          (Unmasked(), "has no padded mask"), (TextElsewhere(), "reads input l_text_")):
        gm, example, split = _symbolic_split(block)
        before = split.main.code
        with caplog.at_level(logging.INFO, logger="toprovar"):
            assert bucket_plan(split) is None
        assert reason in caplog.text and split.main.code == before
        caplog.clear()


def test_lengths_of_one_bucket_share_a_slot_and_take_it_back_in_turn():
    weight = torch.randn(4, 3)
    calls = []

    def pre(w, text):
        calls.append(text.shape[0])
        kv = text @ w.T  # [L, 4]
        return kv, torch.ones(text.shape[0], dtype=torch.bool)

    memo = ContextMemo(pre, [True, False], sized=True, pads=[(0, 0), (0, False)], bucket=4)
    texts = {n: torch.randn(n, 3) for n in (2, 3, 5)}
    a = memo([weight, texts[2]])
    b = memo([weight, texts[3]])
    assert [v.data_ptr() for v in a] == [v.data_ptr() for v in b] and a[0].shape == (4, 4)  # one slot
    torch.testing.assert_close(b[0][:3], texts[3] @ weight.T)
    assert not b[0][3:].any() and b[1].tolist() == [True, True, True, False]
    c = memo([weight, texts[5]])  # the next bucket: a slot of its own
    assert c[0].shape == (8, 4) and c[0].data_ptr() != a[0].data_ptr()
    again = memo([weight, texts[2]])  # unchanged text, but its slot holds length 3 now: refilled
    torch.testing.assert_close(again[0][:2], texts[2] @ weight.T)
    assert again[1].tolist() == [True, True, False, False]
    memo([weight, texts[2]])  # unchanged and still in the slot: nothing computed
    assert calls == [2, 3, 5, 2] and len(memo.slots) == 2 and len(memo.entries) == 3
