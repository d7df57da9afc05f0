"""``benchmarks/block_call_cost.py`` on the CPU: the block's real arguments, host times per row."""

from __future__ import annotations

import pytest
import torch

from .scripts import load_benchmark


def test_block_arguments_are_those_of_the_asked_scale_and_the_rows_time_the_calls(tmp_path) -> None:
    bc = load_benchmark("block_call_cost")
    assert bc.main(["--device", "cpu", "--model", "infinity-tiny", "--scale", "3", "--calls", "30",
                    "--out", str(tmp_path)]) == 0
    text = (tmp_path / "block_call_cost.md").read_text()
    rows = {line.split("|")[1].strip(): line.split("|") for line in text.splitlines() if line.startswith("| ")}
    eager, dynamo = float(rows["eager"][3]), float(rows["dynamo"][3])
    assert eager > dynamo > 0  # the no-work frame skips every kernel of the block
    assert "n/a: no CUDA" in rows["replay"][7] and "n/a: no CUDA" in rows["dynamo_replay"][7]
    assert "(16 tokens, 2 rows" in text  # scale 3 of the schedule is 4x4, CFG doubles the rows


def test_block_arguments_name_a_scale_past_the_last() -> None:
    bc = load_benchmark("block_call_cost")
    from toprovar_fx import zoo

    torch.manual_seed(0)
    model = zoo.build("infinity-tiny", device="cpu", dtype=torch.float32)
    block = [m for m in model.modules() if type(m).__name__ == "CrossAttnBlock"][1]
    with pytest.raises(ValueError, match="past the last"):
        bc.block_arguments(model, block, 40, "cpu")
