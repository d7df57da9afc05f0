"""Runtime units: the scale clock, and self/cross decided from key lengths for split blocks."""

import torch

from toprovar_fx.runtime.clock import ScaleClock, guess_hw
from toprovar_fx.runtime.session import Session
from toprovar_fx.settings import parse_options


def test_clock_counts_generations_scales_layers_and_matches_schedules():
    clock = ScaleClock({"a": [[1, 1], [2, 2], [3, 3]], "b": [[1, 1], [2, 2], [4, 4]]})
    ticks = [clock.tick(n) for n in (1, 1, 4, 4, 9, 9, 1, 1)]
    assert [(t.generation, t.scale, t.layer) for t in ticks] == [
        (0, 0, 0), (0, 0, 1), (0, 1, 0), (0, 1, 1), (0, 2, 0), (0, 2, 1), (1, 0, 0), (1, 0, 1)]
    assert clock.depth == 2
    clock.tick(4)
    clock.tick(4)
    clock.tick(16)
    assert clock.candidates == ["b"] and clock.schedule == ((1, 1), (2, 2), (4, 4))
    clock.tick(1)
    clock.tick(1)
    clock.tick(5)
    assert clock.mismatch is not None and "[1, 5]" in clock.mismatch
    assert guess_hw(12) == (3, 4) and guess_hw(16) == (4, 4)


def test_unknown_attention_kind_is_decided_by_key_length():
    session = Session(parse_options({"mode": "observe"}), None)
    site = session.add_site(pattern="sdpa", kind="unknown", heads=2, head_dim=8, graph_id=0)
    text = 7
    for lq, layers in ((1, 2), (4, 2), (9, 2)):
        for _ in range(layers):
            keys = session.clock.expected_self_keys(lq)
            session.record_attention(site.site_id, torch.rand(2, lq), key_len=keys)  # self
            session.record_attention(site.site_id, torch.rand(2, lq), key_len=text)  # cross
    rep = session.report()
    assert [s.tokens for s in rep.scales] == [1, 4, 9]
    assert rep.depth == 2 and all(len(s.layers) == 2 for s in rep.scales)
