"""``benchmarks/kernel_origins.py``: kernels attributed to the op that launched them."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from .scripts import load_benchmark


def _event(name: str, parent: str | None, *kernels: tuple[str, float]) -> SimpleNamespace:
    return SimpleNamespace(name=name, cpu_parent=SimpleNamespace(name=parent) if parent else None,
                           kernels=[SimpleNamespace(name=k, duration=us) for k, us in kernels])


def test_origins_count_matching_kernels_per_launching_op_parent_and_name() -> None:
    ko = load_benchmark("kernel_origins")
    region = "Torch-Compiled Region: 4/5"
    events = [
        _event(region, "Torch-Compiled Region: 3/0", ("memcpy128", 7.0), ("memcpy128", 8.0), ("nvjet_gemm", 30.0)),
        _event(region, "Torch-Compiled Region: 3/0", ("memcpy32_post", 1.5)),
        _event("aten::copy_", None, ("Memcpy DtoD (Device -> Device)", 2.0)),
        _event("aten::mm", "aten::linear", ("nvjet_gemm", 40.0)),
        SimpleNamespace(name="cpu only", cpu_parent=None, kernels=[]),
    ]
    counts, ms = ko.origins(events, "memcpy|Memcpy")
    assert counts[(region, "Torch-Compiled Region: 3/0", "memcpy128")] == 2
    assert ms[(region, "Torch-Compiled Region: 3/0", "memcpy128")] == pytest.approx(0.015)
    assert counts[("aten::copy_", "-", "Memcpy DtoD (Device -> Device)")] == 1
    assert sum(counts.values()) == 4  # the GEMMs do not match
    assert ko.origins(events, "nvjet")[0][("aten::mm", "aten::linear", "nvjet_gemm")] == 1
    args = SimpleNamespace(match="memcpy|Memcpy", model="infinity-2b", warmup=4, device="cuda")
    text = ko.markdown(counts, ms, args, {"device": "test"})
    assert "4 kernels, 0.02 GPU ms in all." in text
    assert f"| 2 | 0.015 | {region} | Torch-Compiled Region: 3/0 | `memcpy128` |" in text


def test_a_cpu_run_says_that_no_device_kernel_was_launched(tmp_path) -> None:
    ko = load_benchmark("kernel_origins")
    assert ko.main(["--device", "cpu", "--model", "infinity-tiny", "--warmup", "2", "--out", str(tmp_path)]) == 0
    text = (tmp_path / "kernel_origins.md").read_text()
    assert "No device kernel matched" in text and "a CPU run launches none" in text
