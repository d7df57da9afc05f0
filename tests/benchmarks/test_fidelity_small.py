"""The machinery of ``benchmarks/fidelity.py`` on the trained ``var-ref``, at a tiny scale.

Not a claim about which method wins (that is ``benchmarks/results/fidelity.md``): keep-all
reproduces dense exactly, and a stronger pruning budget prunes more FLOPs and does not raise mean
fidelity by more than a noise margin.
"""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

from toprovar_fx.policies import load_policy

from .scripts import load_benchmark

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "fidelity.py"
NOISE = 0.05  # SSIM margin: 3 samples, each image's SSIM varies by ~0.1 between budgets


@pytest.fixture(scope="module")
def fid() -> ModuleType:
    return load_benchmark("fidelity")


@pytest.fixture(scope="module")
def result(fid: ModuleType) -> dict[str, Any]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = fid.load_model()
        calibrated = load_policy(fid.CALIBRATED)
        methods = fid.build_methods(model, calibrated, ["keepall", "toprovar"], ["gentle", "max"])
        return fid.run_fidelity(model, methods, samples=3, batch=1, seed=0)
    finally:
        torch.set_num_threads(threads)
        torch._dynamo.reset()


def test_keepall_reproduces_dense(result: dict[str, Any]) -> None:
    run = result["runs"]["keepall:-"]
    assert run.fallbacks == []
    assert run.ssim == [1.0] * 3
    assert all(math.isinf(p) for p in run.psnr)
    assert run.agreement == [1.0] * 3
    assert run.flop_ratio == 1.0


def test_more_pruning_does_not_raise_fidelity(result: dict[str, Any]) -> None:
    weak, strong = result["runs"]["toprovar:gentle"], result["runs"]["toprovar:max"]
    assert weak.fallbacks == [] and strong.fallbacks == []
    assert strong.flop_ratio < weak.flop_ratio < 1.0  # both budgets prune, the strong one more
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    assert mean(strong.ssim) <= mean(weak.ssim) + NOISE
    assert max(weak.ssim) < 1.0  # pruning changed the images: the comparison is not vacuous


def test_summary_rows(result: dict[str, Any]) -> None:
    rows = {r["label"]: r for r in result["summary"]}
    assert list(rows) == ["dense", "keepall:-", "toprovar:gentle", "toprovar:max"]
    assert rows["keepall:-"]["identical_images"] == 3
    assert 0.0 < rows["toprovar:max"]["flop_ratio"] < 1.0


def test_sample_plan(fid: ModuleType) -> None:
    plan = fid.sample_plan(32, 8, 5, 16)
    assert [s for _, s in plan] == [5, 6, 7, 8]
    labels = torch.cat([lab for lab, _ in plan]).tolist()
    assert all(labels.count(c) == 2 for c in range(16))
    with pytest.raises(ValueError, match="multiple"):
        fid.sample_plan(10, 4, 0, 16)


def test_help() -> None:
    out = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, check=True)
    assert "--samples" in out.stdout and "--pooled-batch" in out.stdout
