import pytest
import torch

from toprovar_fx.settings import parse_options


def test_unknown_option_lists_valid_ones():
    with pytest.raises(ValueError, match="unknown option.*'polcy'.*valid options are.*policy"):
        parse_options({"polcy": "x"})


@pytest.mark.parametrize(
    "options, message",
    [
        ({"mode": "fast"}, "mode' must be one of"),
        ({"mode": "prune"}, "needs option 'policy'"),
        ({"inductor": "yes"}, "'inductor' must be a bool"),
        ({"strict": 1}, "'strict' must be a bool"),
        ({"recompile_limit": 4}, "recompile_limit' must be an int >= 16"),
        ({"policy": 3.5}, "'policy' must be a policy name"),
        ({"cuda_graph_pool": "per-graph"}, "'cuda_graph_pool' must be one of"),
        ({"cuda_graph_max_mib": 0}, "'cuda_graph_max_mib' must be a number > 0"),
        ({"cuda_graph_private_max_mib": -1}, "'cuda_graph_private_max_mib' must be a number >= 0"),
        ({"cuda_graph_private_max_mib": "8G"}, "'cuda_graph_private_max_mib' must be a number >= 0"),
        ({"cuda_graph_min_free_mib": -5}, "'cuda_graph_min_free_mib' must be a number >= 0"),
        ({"context_bucket": -16}, "'context_bucket' must be an int >= 0"),
        ({"context_bucket": 16.0}, "'context_bucket' must be an int >= 0"),
        ({"inductor_options": ["coordinate_descent_tuning"]}, "'inductor_options' must be a dict"),
        ({"inductor_options": {"coordinate_descent_tunning": True}}, "'coordinate_descent_tunning', which is not a"),
        ({"inductor_options": {"triton.cudagraphs": True}}, "captures its own CUDA graphs; use option 'cuda_graphs'"),
        ({"inductor_options": {"combo_kernels": [True]}}, "'combo_kernels' to list"),
    ],
)
def test_bad_option_values(options, message):
    with pytest.raises(ValueError, match=message):
        parse_options(options)


def test_defaults_and_mode_resolution():
    s = parse_options(None)
    assert s.resolved_mode == "observe" and not s.strict and s.inductor is None
    assert parse_options({"policy": "var-tiny"}).resolved_mode == "prune"
    assert parse_options({"policy": "var-tiny", "mode": "observe"}).resolved_mode == "observe"
    assert s.planned_blocks and s.cuda_graph_pool == "shared"
    assert parse_options({"cuda_graph_pool": "private", "planned_blocks": False}).cuda_graph_pool == "private"
    assert s.cuda_graph_private_max_mib is None  # 1/16 of the GPU, resolved at the first capture
    assert parse_options({"cuda_graph_private_max_mib": 0}).cuda_graph_private_max_mib == 0.0
    # text-length buckets: on when pruning, off in observe mode (dense's output), as given otherwise
    assert s.resolved_context_bucket == 0
    assert parse_options({"policy": "var-tiny"}).resolved_context_bucket == 16
    assert parse_options({"policy": "var-tiny", "context_bucket": 0}).resolved_context_bucket == 0
    assert parse_options({"context_bucket": 8}).resolved_context_bucket == 8
    assert s.inductor_options is None
    given = {"coordinate_descent_tuning": True, "triton.max_tiles": 2}
    assert parse_options({"inductor_options": given}).inductor_options == given


def test_backend_is_found_by_name_through_the_entry_point():
    fn = torch.compile(lambda x: x * 2, backend="toprovar", options={"mode": "observe"})
    assert torch.equal(fn(torch.ones(3)), torch.full((3,), 2.0))


def test_unknown_option_fails_the_compile():
    fn = torch.compile(lambda x: x + 1, backend="toprovar", options={"bogus": True})
    with pytest.raises(Exception, match="unknown option"):
        fn(torch.ones(2))


def test_the_private_pool_budget_reaches_the_sessions_graph_pool():
    from toprovar_fx.runtime.session import Session

    pool = Session(parse_options({"cuda_graph_private_max_mib": 512}), None).graph_pool()
    assert pool.private_budget == 512 * 2**20
    assert Session(parse_options(None), None).graph_pool().private_budget is None  # resolved from the device
    assert Session(parse_options({"cuda_graph_min_free_mib": 1024}), None).graph_pool().min_free == 1 << 30
    assert Session(parse_options(None), None).graph_pool().min_free is None  # 1/32 of the device, resolved there
