"""``benchmarks/host_profile.py``: its tables from a real ``cProfile`` of known functions."""

from __future__ import annotations

import cProfile
import pstats

from .scripts import load_benchmark


def _leaf(n: int) -> int:
    return sum(range(n))


def _caller(times: int) -> int:
    return sum(_leaf(2000) for _ in range(times))


def test_rows_rank_own_and_cumulative_time_and_entry_points_sum_their_calls() -> None:
    hp = load_benchmark("host_profile")
    prof = cProfile.Profile()
    prof.enable()
    _caller(50)
    prof.disable()
    stats = pstats.Stats(prof)
    own = hp._rows(stats, 2, 50)
    cumulative = hp._rows(stats, 3, 50)
    assert [r[2] for r in own] == sorted((r[2] for r in own), reverse=True)
    assert [r[3] for r in cumulative] == sorted((r[3] for r in cumulative), reverse=True)
    leaf = next(r for r in own if "_leaf" in r[0])
    caller = next(r for r in cumulative if "_caller" in r[0])
    assert leaf[1] == 50 and caller[1] == 1 and caller[3] >= leaf[3]  # calls counted, time nests
    # the entry points are matched by file suffix and function name, summed over their definitions
    hp.ENTRY_POINTS = (("tests/benchmarks/test_host_profile.py", "_leaf"),)
    ((name, calls, tt, ct),) = hp._entry_rows(stats)
    assert "_leaf" in name and calls == 50 and ct >= tt > 0
    table = hp._table([(name, calls, tt, ct)])
    assert table[0].startswith("| function | calls") and f"| {calls} |" in table[2]


def test_arguments_default_to_the_h200_model() -> None:
    hp = load_benchmark("host_profile")
    args = hp.parse_args(["--out", "x"])
    assert (args.model, args.device, args.variants) == ("infinity-2b", "cuda", "toprovar")


def _two_callers() -> int:
    return _caller(7) + _leaf(10)


def test_caller_rows_name_who_calls_the_most_called_functions_of_the_given_files() -> None:
    hp = load_benchmark("host_profile")
    prof = cProfile.Profile()
    prof.enable()
    _two_callers()
    prof.disable()
    rows = hp._caller_rows(pstats.Stats(prof), ["tests/benchmarks/test_host_profile.py"], 2, 6)
    assert rows[0].startswith("| function | calls | caller")
    leaf = [r.split("|") for r in rows[2:] if "_leaf" in r.split("|")[1]]
    # _leaf: 8 calls, 7 from the generator in _caller, then 1 from _two_callers (callers ranked by calls)
    assert [(c[2].strip(), c[4].strip()) for c in leaf] == [("8", "7"), ("8", "1")]
    assert "<genexpr>" in leaf[0][3] and "_two_callers" in leaf[1][3]
    assert not any("_caller " in r.split("|")[1] for r in rows[2:])  # called once: not among the top two
