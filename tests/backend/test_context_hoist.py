"""The backend with the cross-attention context hoisted (option ``hoist_context``): the same logits
as without, one context computation per block and generation, a new prompt taken up at once,
prompts of other lengths too (a symbolic text length after Dynamo's recompile: buffers per length)."""

import pytest
import torch

from toprovar_fx.runtime.session import last_session

from .helpers import max_rel_diff, model


def _generations(options: dict) -> tuple[list[list[torch.Tensor]], int]:
    m = model("infinity-tiny")
    torch._dynamo.reset()
    fast = torch.compile(m.autoregressive_infer_cfg, backend="toprovar", options=options)
    out = []
    for prompt in ("a red cat on a mat", "a red cat on a mat", "a big dog in a box", "two blue squares",
                   "a big dog in a box", "one two three four five six seven"):
        cond = m.encode_prompts([prompt])
        _, logits = fast(cond, B=1, g_seed=7, cfg_list=3.0, return_logits=True)
        out.append(list(logits))
    return out, last_session().context_computes


@pytest.mark.parametrize("options", [{"mode": "observe"}, {"policy": "infinity-tiny"}], ids=["observe", "prune"])
def test_hoisted_context_gives_the_same_logits_and_runs_once_per_block(options):
    hoisted, computes = _generations({**options, "hoist_context": True, "context_bucket": 0})
    plain, none = _generations({**options, "hoist_context": False})
    assert none == 0
    depth = model("infinity-tiny").depth
    # each generation's text is a new tensor: once per block, not per call, whatever its length
    # (from the fourth prompt on, graphs with a symbolic text length)
    assert computes == 6 * depth
    for got, want in zip(hoisted, plain):
        assert max_rel_diff(got, want) < 1e-6
    # the third prompt differs (same length): its logits are not the first's, as a stale context would give
    assert max_rel_diff(hoisted[2], hoisted[0]) > 1e-3
    # a length seen before, after another: its own buffers, not the other length's
    assert max_rel_diff(hoisted[4], hoisted[2]) < 1e-6 and max_rel_diff(hoisted[4], hoisted[3]) > 1e-3


@pytest.mark.parametrize("options", [{"mode": "observe", "context_bucket": 4}, {"policy": "infinity-tiny"}],
                         ids=["observe-bucket-4", "prune-default"])
def test_a_context_padded_to_buckets_gives_the_same_logits(options):
    """``context_bucket``: the symbolic-length graphs read the text context padded to a multiple of
    its tokens (masked keys), one slot per block and bucket; the logits are those without hoisting.
    The default (16) pads these prompts' texts of 3-7 tokens to one bucket."""
    plain, _ = _generations({**options, "hoist_context": False, "context_bucket": 0})
    padded, computes = _generations(options)
    assert computes == 6 * model("infinity-tiny").depth
    padded_lengths = {shapes[i][pad[0]] for memo in last_session().context_memos.values() if memo.pads
                      for _, shapes in memo.slots for i, pad in enumerate(memo.pads) if pad is not None}
    assert padded_lengths == ({4, 8} if options.get("context_bucket") == 4 else {16})
    for got, want in zip(padded, plain):
        assert max_rel_diff(got, want) < 1e-5


def test_a_failed_cut_keeps_the_context_and_nothing_runs_dense(monkeypatch):
    import toprovar_fx.backend as backend

    def broken(gm, example_inputs):
        raise RuntimeError("cut failed")

    monkeypatch.setattr(backend, "split_context", broken)
    m = model("infinity-tiny")
    cond = m.encode_prompts(["a red cat on a mat"])
    torch._dynamo.reset()
    fast = torch.compile(m.autoregressive_infer_cfg, backend="toprovar", options={"mode": "observe"})
    _, logits = fast(cond, B=1, g_seed=7, cfg_list=3.0, return_logits=True)
    session = last_session()
    assert session.context_computes == 0
    assert not any("runs dense" in f for f in session.session_fallbacks + session.gen.fallbacks)
    assert session.report().attention_rewrites > 0
    _, want = m.autoregressive_infer_cfg(cond, B=1, g_seed=7, cfg_list=3.0, return_logits=True)
    assert max_rel_diff(list(logits), list(want)) < 1e-5
