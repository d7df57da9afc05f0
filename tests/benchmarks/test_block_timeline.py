"""``benchmarks/block_timeline.py``: per-scale inside/gap/between times from recorded calls."""

from __future__ import annotations

import math

from .scripts import load_benchmark


def test_per_scale_splits_calls_into_inside_gaps_and_between_scales() -> None:
    bt = load_benchmark("block_timeline")
    us = 1000  # ns
    calls = [(1, 0, 100 * us), (1, 130 * us, 250 * us), (1, 290 * us, 400 * us),  # scale 1: gaps 30, 40
             (2, 1400 * us, 1500 * us)]  # scale 2 starts 1 ms after scale 1's last return
    table = bt.per_scale(calls[2:3] + calls[:2] + calls[3:])  # order of the list does not matter
    one, two = table[1], table[2]
    assert one["calls"] == 3 and one["inside_us"] == 110 and one["gap_us"] == 35
    assert one["span_ms"] == 0.4 and one["between_ms"] == 1.0
    assert two["calls"] == 1 and math.isnan(two["gap_us"]) and math.isnan(two["between_ms"])


def test_a_cpu_run_records_every_block_call_of_the_dense_scales(tmp_path) -> None:
    bt = load_benchmark("block_timeline")
    assert bt.main(["--device", "cpu", "--model", "infinity-tiny", "--warmup", "2", "--gens", "1",
                    "--out", str(tmp_path)]) == 0
    rows = [line.split("|") for line in (tmp_path / "block_timeline.md").read_text().splitlines()
            if line.startswith("| ") and line.split("|")[1].strip().isdigit()]
    assert len(rows) >= 5
    assert all(int(r[2]) == 4 for r in rows)  # infinity-tiny has 4 blocks: one runner call each
    assert all(float(r[3]) > 0 and float(r[4]) > 0 for r in rows)


def test_stand_in_graphs_time_our_runner_over_replays_that_do_nothing() -> None:
    import pytest

    from toprovar_fx import backend
    from toprovar_fx.runtime.session import last_session

    bt = load_benchmark("block_timeline")
    made = backend.CudaGraphCache
    table = bt.run("infinity-tiny", "cpu", 2, 1, stand_in=True)
    pool = last_session().graph_pool()
    assert pool is not None and pool.replays > 0  # the block graphs were "captured" and replayed
    assert all(r["calls"] == 4 and r["inside_us"] > 0 for r in table.values())
    assert backend.CudaGraphCache is made  # the stand-in is gone once the run is over
    with pytest.raises(ValueError, match="--device cpu"):
        bt.run("infinity-tiny", "cuda", 1, 1, stand_in=True)
