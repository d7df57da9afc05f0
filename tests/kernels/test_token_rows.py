"""Tests of the row gather/scatter kernels (``toprovar_fx.kernels.token_rows``), all on the CPU.

The Triton kernels run under ``TRITON_INTERPRET=1`` in a subprocess (the variable must be set
before triton is first imported): this file, run as a script with ``--triton-cases``, compares
every case with the ATen op it replaces and prints the results as JSON; with ``--runtime-case``
it runs a planned generation of the tiny Infinity model whose token ops take the kernel
(``TOPROVAR_TOKEN_ROWS_IMPL=triton``), compared with the ATen route in-process. The eligibility
rules and the ATen route the CPU takes are checked in-process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[2]

# name: (rows, source batch, N, rest dims, k, dtype)
CASES = {
    "cfg-rows-bf16": (2, 2, 37, (40,), 11, torch.bfloat16),
    "broadcast-source": (2, 1, 23, (16,), 7, torch.float32),
    "channels-over-one-block": (2, 2, 9, (1100,), 4, torch.float32),  # two programs per token, masked tail
    "rest-2d-fp16": (3, 3, 12, (3, 5), 6, torch.float16),
    "all-tokens-kept": (1, 1, 8, (32,), 8, torch.bfloat16),
}


def _case(name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    rows, batch, n, rest, k, dtype = CASES[name]
    gen = torch.Generator().manual_seed(sum(map(ord, name)))
    t = torch.randn(batch, n, *rest, generator=gen).to(dtype)
    full = torch.randn(rows, n, *rest, generator=gen).to(dtype)
    idx = torch.stack([torch.randperm(n, generator=gen)[:k].sort().values for _ in range(rows)])
    src = torch.randn(rows, k, *rest, generator=gen).to(dtype)
    return t, full, idx, src


def _aten(t: torch.Tensor, full: torch.Tensor, idx: torch.Tensor, src: torch.Tensor) -> dict[str, torch.Tensor]:
    rows, k = idx.shape
    gidx = idx.view(rows, k, *[1] * (t.dim() - 2)).expand(rows, k, *t.shape[2:])
    return {
        "gather": torch.gather(t.expand(rows, *t.shape[1:]), 1, gidx),
        "scatter": full.scatter(1, gidx, src),
        "scatter_add": full.scatter_add(1, gidx, src),
    }


def _run_triton_cases() -> dict[str, dict[str, bool]]:
    """Runs inside the subprocess (TRITON_INTERPRET=1 set before any triton import)."""
    from toprovar_fx.kernels import token_rows

    results = {}
    for name in CASES:
        t, full, idx, src = _case(name)
        want = _aten(t, full, idx, src)
        assert token_rows.rows_eligible(t, idx, 1, interpret=True), name
        assert token_rows.scatter_eligible(full, idx, src, interpret=True), name
        got = {
            "gather": token_rows.gather_rows(t, idx),
            "scatter": token_rows.scatter_rows(full, idx, src, add=False),
            "scatter_add": token_rows.scatter_rows(full, idx, src, add=True),
        }
        results[name] = {op: bool(got[op].shape == want[op].shape and torch.equal(got[op], want[op])) for op in want}
        results[name]["base_untouched"] = bool(torch.equal(full, _case(name)[1]))
    return results


@pytest.fixture(scope="module")
def triton_results() -> dict:
    env = dict(os.environ)
    env["TRITON_INTERPRET"] = "1"
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--triton-cases"], env=env,
                          capture_output=True, text=True, timeout=600, cwd=REPO_ROOT)
    assert proc.returncode == 0, f"interpreter run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", list(CASES))
def test_kernels_equal_the_aten_ops_they_replace(triton_results: dict, name: str) -> None:
    assert triton_results[name] == {"gather": True, "scatter": True, "scatter_add": True, "base_untouched": True}


def test_the_route_can_be_forced_and_a_bad_value_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    from toprovar_fx.kernels.token_rows import rows_eligible

    t, idx = torch.randn(2, 10, 8), torch.tensor([[1, 4, 7], [0, 2, 9]])
    monkeypatch.setenv("TOPROVAR_TOKEN_ROWS_IMPL", "aten")
    assert not rows_eligible(t, idx, 1, interpret=True)
    monkeypatch.setenv("TOPROVAR_TOKEN_ROWS_IMPL", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert rows_eligible(t, idx, 1)  # CPU tensors, interpreted
    monkeypatch.setenv("TOPROVAR_TOKEN_ROWS_IMPL", "cuda")
    with pytest.raises(ValueError, match="TOPROVAR_TOKEN_ROWS_IMPL must be one of"):
        rows_eligible(t, idx, 1)


def test_eligibility_keeps_everything_else_on_aten() -> None:
    from toprovar_fx.kernels.token_rows import rows_eligible, scatter_eligible

    t = torch.randn(2, 10, 8)
    idx = torch.tensor([[1, 4, 7], [0, 2, 9]])
    src = torch.randn(2, 3, 8)
    assert rows_eligible(t, idx, 1, interpret=True)
    assert scatter_eligible(t, idx, src, interpret=True)
    assert not scatter_eligible(t, idx, src.half(), interpret=True)  # another dtype
    assert not scatter_eligible(t[:1], idx, src, interpret=True)  # a broadcast base has no rows to write
    assert not scatter_eligible(t, idx, torch.randn(2, 3, 4), interpret=True)  # other channels
    assert not scatter_eligible(t, idx, src, interpret=False)  # the CPU
    assert not rows_eligible(t, idx, 1)  # a CPU tensor outside the interpreter
    assert not rows_eligible(t, idx, 2, interpret=True)  # tokens on another dim (the RoPE rows)
    assert not rows_eligible(t.transpose(1, 2).contiguous().transpose(1, 2), idx, 1, interpret=True)  # strided channels
    assert not rows_eligible(t, idx.int(), 1, interpret=True)
    assert not rows_eligible(t, idx.t().contiguous().t(), 1, interpret=True)  # non-contiguous indices
    assert not rows_eligible(torch.randn(3, 10, 8), idx, 1, interpret=True)  # 3 source rows for 2 index rows
    assert not rows_eligible(t.double(), idx, 1, interpret=True)
    assert not rows_eligible(torch.nn.Parameter(t), idx, 1, interpret=True)  # a subclass keeps to ATen
    with torch._subclasses.fake_tensor.FakeTensorMode() as mode:  # as a tracer would see them
        assert not rows_eligible(mode.from_tensor(t), mode.from_tensor(idx), 1, interpret=True)


def test_token_ops_take_the_aten_route_on_cpu() -> None:
    """On the CPU ``gather_tokens`` and the restores give the ATen results (the kernel is GPU-only)."""
    from toprovar_fx.runtime.token_ops import gather_tokens, restore_identity, restore_kept

    t, full, idx, src = _case("cfg-rows-bf16")
    want = _aten(t, full, idx, src)
    assert torch.equal(gather_tokens(t, idx, 1), want["gather"])
    assert torch.equal(restore_kept(full, idx, src), want["scatter"])
    assert torch.equal(restore_identity(full, idx, src), want["scatter_add"])


def _generate(out_path: str | None = None) -> tuple[list[torch.Tensor], int, int]:
    """A planned infinity-tiny generation (the second call of a compiled sampler): its per-scale
    logits, how many row kernels it launched and how many blocks ran planned."""
    from tests.backend.helpers import generate_twice
    from toprovar_fx.kernels import token_rows
    from toprovar_fx.runtime.session import last_session

    launches = []
    launch = token_rows._launch

    def counted(*args, **kwargs):
        launches.append(1)
        return launch(*args, **kwargs)

    token_rows._launch = counted
    try:
        logits, planned_before = generate_twice("infinity-tiny", {"policy": "infinity-tiny"}, on_warm=launches.clear)
        return logits, len(launches), last_session().planned_calls - planned_before
    finally:
        token_rows._launch = launch


def test_planned_blocks_through_the_kernel_give_the_aten_logits(tmp_path: Path) -> None:
    """The runtime's gathers and write-backs through the kernel (interpreted on the CPU, forced with
    ``TOPROVAR_TOKEN_ROWS_IMPL=triton``) give the logits of the ATen route, in planned blocks."""
    from safetensors.torch import load_file

    from tests.backend.helpers import max_rel_diff

    out = tmp_path / "logits.safetensors"
    env = dict(os.environ, TRITON_INTERPRET="1", TOPROVAR_TOKEN_ROWS_IMPL="triton")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--runtime-case", str(out)], env=env,
                          capture_output=True, text=True, timeout=900, cwd=REPO_ROOT)
    assert proc.returncode == 0, f"interpreter run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    saved = load_file(str(out))
    kernel_logits = [saved[f"scale{i}"] for i in range(len(saved))]
    aten_logits, aten_launches, aten_planned = _generate()
    assert aten_launches == 0 and info["launches"] > 0  # the CPU route, and the forced kernel
    assert info["planned"] == aten_planned > 0
    assert max_rel_diff(kernel_logits, aten_logits) <= 1e-6


if __name__ == "__main__" and "--triton-cases" in sys.argv:
    print(json.dumps(_run_triton_cases()))
elif __name__ == "__main__" and "--runtime-case" in sys.argv:
    from safetensors.torch import save_file

    _logits, _launches, _planned = _generate()
    save_file({f"scale{i}": t.contiguous() for i, t in enumerate(_logits)}, sys.argv[-1])
    print(json.dumps({"launches": _launches, "planned": _planned}))
