"""Runtime units: the scale clock, self/cross decided from key lengths for split blocks, token selection."""

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


def test_same_scale_ticks_take_the_short_path_and_give_the_general_paths_ticks():
    """Ticks of the running scale's next layer skip the clock's general path (``ScaleClock.tick``)
    and the session's scale bookkeeping (``Session.tick``); the ticks are what the general path
    gives: equal-sized consecutive scales told apart by the depth, new generations, a mismatch."""
    counts = [1, 1, 1, 4, 4, 4, 4, 4, 4, 9, 9, 9] * 2 + [1, 1, 1, 5, 5, 5]
    session = Session(parse_options({"mode": "observe", "schedules": {"a": [[1, 1], [2, 2], [2, 2], [3, 3]]}}),
                      None)
    clock = ScaleClock({"a": [[1, 1], [2, 2], [2, 2], [3, 3]]})
    got = [session.tick(n, 2) for n in counts]
    want = [clock.tick(n) for n in counts]
    assert got == want
    expected = [(g, s, lay, s == 0 and lay == 0, lay == 0)
                for g, scales in ((0, 4), (1, 4), (2, 2)) for s in range(scales) for lay in range(3)]
    assert [(t.generation, t.scale, t.layer, t.new_generation, t.new_scale) for t in got] == expected
    assert session.clock.depth == clock.depth == 3 and session.clock.mismatch == clock.mismatch is not None
    assert [t.scale for t in got[3:9]] == [1, 1, 1, 2, 2, 2]  # two scales of 4 tokens, told apart by depth
    assert session.gen.index == 2 and session.gen.tokens == {0: 1, 1: 5}


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


def test_blocks_with_one_entropy_source_and_kept_count_share_one_selection():
    """``_indices`` reuses its last selection only for the same entropy tensor, k and rows."""
    from types import SimpleNamespace

    from toprovar_fx.policies import load_policy
    from toprovar_fx.runtime.decisions import Decider
    from toprovar_fx.runtime.entropy_stats import per_image

    policy = load_policy("var-tiny")  # selection entropy, latest_full, cfg shared
    decider = Decider(Session(parse_options({"policy": "var-tiny"}), policy), policy)
    decider.gen = SimpleNamespace(entropy={})
    tick = SimpleNamespace(scale=5, layer=2)
    x = torch.zeros(2, 16, 8)

    def expected(ent, k):
        return per_image(ent).topk(k, dim=-1, largest=False).indices.repeat(2, 1).sort(dim=1).values

    ent = torch.rand(2, 16)
    decider.latest_full = ent
    first = decider._indices(x, 4, tick)
    assert torch.equal(first, expected(ent, 4))
    assert decider._indices(x, 4, SimpleNamespace(scale=5, layer=3)) is first  # the next block: shared
    other_k = decider._indices(x, 8, tick)
    assert other_k.shape == (2, 8) and torch.equal(other_k, expected(ent, 8))
    new_ent = torch.rand(2, 16)  # a later full layer recorded new entropy: a new selection
    decider.latest_full = new_ent
    assert torch.equal(decider._indices(x, 8, tick), expected(new_ent, 8))
    decider.start_generation(decider.gen)  # nothing carries over to the next generation
    assert decider._selection is None
