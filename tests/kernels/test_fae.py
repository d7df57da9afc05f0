"""Tests of Flash-Attention-Entropy (``toprovar_fx.kernels.fae``), all on the CPU.

* The Triton kernel itself runs under ``TRITON_INTERPRET=1`` in a subprocess (the variable must be
  set before triton is first imported, and other test files import it earlier): this file,
  run as a script with ``--triton-cases``, computes every case and prints JSON metrics, which
  the parametrised tests below check one case at a time.
* The chunked PyTorch path (what ``fae`` runs on CPU) is checked in-process on the same cases.
* Accuracy rule (CONVENTIONS.md, practice 8): the output's relative error against a float64
  reference is at most twice that of torch SDPA at the same precision on the same inputs; the
  entropy's absolute error is < 1e-3 (fp32) or < 2e-2 (fp16/bf16) nats.
* Properties: 0 <= H <= log(Lk); equal keys give H = log(Lk); one dominant key gives H ~ 0.
* The op: error messages, ``torch.library.opcheck``, Dynamo tracing with dynamic shapes.

Inputs are fresh random normals for every case (never zeros), from per-case seeds.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from toprovar_fx.kernels import FAE_OP, fae, fae_torch, reference_attention_entropy

# the package attribute ``fae`` is the function; the module is reached through importlib
fae_module = importlib.import_module("toprovar_fx.kernels.fae")

REPO_ROOT = Path(__file__).resolve().parents[2]
# Entropy tolerance (nats, absolute) paired with the input dtype.
ENTROPY_ATOL = {torch.float64: 1e-6, torch.float32: 1e-3, torch.float16: 2e-2, torch.bfloat16: 2e-2}
# Output error may be at most this multiple of SDPA's error at the same precision ...
SDPA_ERROR_FACTOR = 2.0
# ... plus this floor, for cases where SDPA is (nearly) exact.
OUT_REL_FLOOR = {torch.float64: 1e-12, torch.float32: 1e-6, torch.float16: 1e-4, torch.bfloat16: 1e-3}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "fp64": torch.float64}
TRITON_TIMEOUT_S = 240


@dataclass(frozen=True)
class Case:
    """One attention problem: q [B, Hq, Lq, D], k/v [B, Hkv, Lk, D]; ``blhd`` builds each tensor
    as [B, L, H, D] and views it as [B, H, L, D] (non-contiguous, flash-attn layout)."""

    name: str
    batch: int
    heads_q: int
    heads_kv: int
    len_q: int
    len_k: int
    head_dim: int
    dtype: str
    layout: str = "bhld"
    seed: int = 0
    kind: str = "random"  # random | equal_keys | dominant_key

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed)
        dtype = DTYPES[self.dtype]

        def make(heads: int, length: int) -> torch.Tensor:
            if self.layout == "blhd":
                return torch.randn(self.batch, length, heads, self.head_dim, generator=g).to(dtype).transpose(1, 2)
            return torch.randn(self.batch, heads, length, self.head_dim, generator=g).to(dtype)

        q = make(self.heads_q, self.len_q)
        k = make(self.heads_kv, self.len_k)
        v = make(self.heads_kv, self.len_k)
        if self.kind == "equal_keys":
            k = k[:, :, :1].expand_as(k).contiguous()
        elif self.kind == "dominant_key":
            # key 0 is aligned with every query and far larger than the others: softmax ~ one-hot
            q = q.abs() + 1.0
            k = (0.01 * k).contiguous()
            k[:, :, 0] = 4.0 * math.sqrt(self.head_dim)
        return q, k, v


def _var_cases() -> list[Case]:
    cases = []
    # VAR-style per-scale token counts (1, 4, 9, 16, ...) attending to the growing prefix.
    for i, side in enumerate((1, 2, 3, 5, 8)):
        lq = side * side
        lk = sum(s * s for s in (1, 2, 3, 5, 8)[: i + 1])
        cases.append(Case(f"var_scale{side}x{side}", 2, 4, 4, lq, lk, 64, "fp32", seed=10 + i))
    return cases


def _cases() -> list[Case]:
    cases = [
        Case("odd_5_123_123", 1, 2, 2, 5, 123, 123, "fp32", seed=1),
        Case("lq123_lk5", 1, 2, 2, 123, 5, 32, "fp32", seed=2),
        Case("d80_gqa_blhd_bf16", 2, 4, 2, 37, 123, 80, "bf16", "blhd", seed=3),
        Case("d96_gqa_fp16", 1, 6, 2, 19, 70, 96, "fp16", seed=4),
        Case("d128_bf16", 1, 2, 1, 33, 100, 128, "bf16", seed=5),
        Case("d64_blhd_fp32", 2, 2, 2, 40, 77, 64, "fp32", "blhd", seed=6),
        Case("d16_fp32", 1, 2, 2, 9, 48, 16, "fp32", seed=7),
        Case("d32_bf16_gqa4", 1, 4, 1, 16, 64, 32, "bf16", seed=8),
        Case("d256_fp16", 1, 1, 1, 7, 40, 256, "fp16", seed=9),
        Case("d48_odd_dim_fp32", 1, 2, 2, 11, 29, 48, "fp32", seed=20),
        Case("d8_tiny_dim_bf16", 1, 2, 1, 4, 9, 8, "bf16", seed=21),
        Case("lk1", 1, 2, 2, 3, 1, 64, "fp32", seed=22),
        Case("equal_keys_fp32", 1, 2, 2, 8, 50, 64, "fp32", kind="equal_keys", seed=23),
        Case("equal_keys_bf16", 1, 2, 2, 8, 50, 64, "bf16", kind="equal_keys", seed=24),
        Case("dominant_key_fp32", 1, 2, 2, 8, 70, 64, "fp32", kind="dominant_key", seed=25),
        Case("dominant_key_bf16", 1, 2, 2, 8, 70, 64, "bf16", kind="dominant_key", seed=26),
    ]
    return cases + _var_cases()


CASES = _cases()
# The same kernel with the other load path / rescaling variants, a few cases each.
TRITON_VARIANTS = {
    "table": None,
    "tma": {"use_tma": True},
    "lazy": {"lazy_rescale": True},
    "tma_lazy_64x32": {"use_tma": True, "lazy_rescale": True, "block_m": 64},
}
VARIANT_CASES = ("d80_gqa_blhd_bf16", "d96_gqa_fp16", "lq123_lk5", "dominant_key_fp32", "d8_tiny_dim_bf16")


def _metrics(case: Case, out: torch.Tensor, ent: torch.Tensor, q, k, v) -> dict:
    """Errors of (out, ent) against the float64 reference and SDPA's error on the same inputs."""
    ref_out, ref_ent = reference_attention_entropy(q, k, v)
    group = q.shape[1] // k.shape[1]
    sdpa = F.scaled_dot_product_attention(q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1))
    ref_norm = ref_out.norm()
    return {
        "shape_ok": tuple(out.shape) == tuple(q.shape) and tuple(ent.shape) == tuple(q.shape[:3]),
        "dtype_ok": out.dtype == q.dtype and ent.dtype == torch.float32,
        "nonfinite": int((~torch.isfinite(out)).sum() + (~torch.isfinite(ent)).sum()),
        "out_rel": float((out.double() - ref_out).norm() / ref_norm),
        "sdpa_rel": float((sdpa.double() - ref_out).norm() / ref_norm),
        "ent_err": float((ent.double() - ref_ent).abs().max()),
        "ent_min": float(ent.min()),
        "ent_max": float(ent.max()),
        "log_lk": math.log(case.len_k),
    }


def _check(case: Case, m: dict) -> None:
    dtype = DTYPES[case.dtype]
    assert m["shape_ok"] and m["dtype_ok"], m
    assert m["nonfinite"] == 0, m
    assert m["out_rel"] <= SDPA_ERROR_FACTOR * m["sdpa_rel"] + OUT_REL_FLOOR[dtype], m
    assert m["ent_err"] < ENTROPY_ATOL[dtype], m
    assert m["ent_min"] >= 0.0, m
    assert m["ent_max"] <= m["log_lk"] + 1e-6, m
    if case.kind == "equal_keys":
        assert m["ent_min"] >= m["log_lk"] - 1e-4, m
    if case.kind == "dominant_key":
        assert m["ent_max"] < 1e-3, m


# --------------------------------------------------------------------------------------------
# Triton kernel under the interpreter (subprocess)


def _run_triton_cases() -> dict:
    """Runs inside the subprocess (TRITON_INTERPRET=1 set before any triton import)."""
    from dataclasses import replace

    from toprovar_fx.kernels import fae_triton

    results = {}
    for case in CASES:
        for variant, overrides in TRITON_VARIANTS.items():
            if overrides is not None and case.name not in VARIANT_CASES:
                continue
            q, k, v = case.tensors()
            config = None
            if overrides is not None:
                config = replace(fae_triton.select_config(q, k, v), **overrides)
            out, ent = fae_triton.fae_triton(q, k, v, 1.0 / math.sqrt(case.head_dim), config)
            results[f"{case.name}/{variant}"] = _metrics(case, out, ent, q, k, v)
    return results


@pytest.fixture(scope="module")
def triton_results() -> dict:
    env = dict(os.environ)
    env["TRITON_INTERPRET"] = "1"
    env.pop("TOPROVAR_FAE_IMPL", None)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--triton-cases"],
        env=env,
        capture_output=True,
        text=True,
        timeout=TRITON_TIMEOUT_S,
        cwd=REPO_ROOT,
    )
    assert proc.returncode == 0, f"interpreter run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


TRITON_IDS = [
    f"{c.name}/{v}"
    for c in CASES
    for v, o in TRITON_VARIANTS.items()
    if o is None or c.name in VARIANT_CASES
]


@pytest.mark.parametrize("case_id", TRITON_IDS)
def test_triton_kernel_matches_reference(triton_results: dict, case_id: str) -> None:
    case = next(c for c in CASES if c.name == case_id.split("/")[0])
    _check(case, triton_results[case_id])


# --------------------------------------------------------------------------------------------
# CPU path (in-process)


@pytest.mark.parametrize("case", CASES + [Case("fp64", 1, 2, 1, 13, 31, 40, "fp64", seed=30)], ids=lambda c: c.name)
def test_cpu_path_matches_reference(case: Case) -> None:
    q, k, v = case.tensors()
    out, ent = fae(q, k, v)
    _check(case, _metrics(case, out, ent, q, k, v))


def test_cpu_path_chunks_queries(monkeypatch: pytest.MonkeyPatch) -> None:
    case = Case("chunked", 2, 4, 2, 57, 91, 64, "fp32", seed=31)
    q, k, v = case.tensors()
    whole_out, whole_ent = fae_torch(q, k, v, 0.125)
    # a budget below one query row's scores forces one query per chunk
    monkeypatch.setattr(fae_module, "_TORCH_SCORE_BUDGET", 7)
    out, ent = fae_torch(q, k, v, 0.125)
    torch.testing.assert_close(out, whole_out, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ent, whole_ent, rtol=1e-6, atol=1e-6)


def test_head_mean_and_explicit_scale() -> None:
    q, k, v = Case("hm", 2, 4, 2, 10, 30, 32, "fp32", seed=32).tensors()
    out, ent = fae(q, k, v, 0.3)
    out_m, ent_m = fae(q, k, v, 0.3, head_mean=True)
    ref_out, ref_ent = reference_attention_entropy(q, k, v, 0.3)
    assert ent_m.shape == (2, 10) and ent_m.dtype == torch.float32
    torch.testing.assert_close(ent_m, ent.mean(1))
    torch.testing.assert_close(out_m, out)
    torch.testing.assert_close(out.double(), ref_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent.double(), ref_ent, rtol=1e-5, atol=1e-5)


def test_outputs_are_fresh_and_contiguous() -> None:
    q, k, v = Case("fresh", 1, 2, 2, 6, 6, 16, "fp32", "blhd", seed=33).tensors()
    out, ent = fae(q, k, v)
    assert out.is_contiguous() and ent.is_contiguous()
    assert out.data_ptr() not in (q.data_ptr(), k.data_ptr(), v.data_ptr())


def test_empty_queries() -> None:
    q = torch.randn(1, 2, 0, 16)
    k = torch.randn(1, 2, 5, 16)
    out, ent = fae(q, k, k.clone())
    assert out.shape == (1, 2, 0, 16) and ent.shape == (1, 2, 0)


# --------------------------------------------------------------------------------------------
# Input validation


def _good() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return torch.randn(2, 4, 5, 16), torch.randn(2, 2, 7, 16), torch.randn(2, 2, 7, 16)


BAD_INPUTS = {
    "q_5d": (lambda q, k, v: (q.unsqueeze(0), k, v, None), r"q must be a 4-D tensor \[B, Hq, Lq, D\]"),
    "k_3d": (lambda q, k, v: (q, k[0], v, None), r"k must be a 4-D tensor \[B, Hkv, Lk, D\]"),
    "v_5d": (lambda q, k, v: (q, k, v.unsqueeze(0), None), r"v must be a 4-D tensor"),
    "batch": (lambda q, k, v: (q, k[:1], v[:1], None), r"k must have q's batch size B=2"),
    "head_dim": (lambda q, k, v: (q, k[..., :8], v[..., :8], None), r"k must have q's head dim D=16"),
    "heads": (lambda q, k, v: (q[:, :3], k, v, None), r"Hq=3 must be a multiple of k's Hkv=2"),
    "v_shape": (lambda q, k, v: (q, k, v[:, :, :3], None), r"v must have k's shape \[B, Hkv, Lk, D\]"),
    "int_dtype": (lambda q, k, v: (q.to(torch.int32), k, v, None), r"q must have a floating dtype"),
    "bool_k": (lambda q, k, v: (q, k > 0, v, None), r"k must have a floating dtype"),
    "dtype_mismatch": (lambda q, k, v: (q, k.double(), v, None), r"share one dtype"),
    "empty_lk": (lambda q, k, v: (q, k[:, :, :0], v[:, :, :0], None), r"at least one key \(Lk >= 1\)"),
    "device": (lambda q, k, v: (q, k.to("meta"), v, None), r"one device"),
    "scale_nan": (lambda q, k, v: (q, k, v, float("nan")), r"scale must be a finite float > 0"),
    "scale_negative": (lambda q, k, v: (q, k, v, -1.0), r"scale must be a finite float > 0"),
    "not_tensor": (lambda q, k, v: (q.tolist(), k, v, None), r"q must be a torch.Tensor"),
}


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_input_raises_value_error(name: str) -> None:
    make, message = BAD_INPUTS[name]
    q, k, v, scale = make(*_good())
    with pytest.raises(ValueError, match=message):
        fae(q, k, v, scale)


def test_bad_impl_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TOPROVAR_FAE_IMPL", "cuda-please")
    with pytest.raises(ValueError, match="TOPROVAR_FAE_IMPL"):
        fae(*_good())


# --------------------------------------------------------------------------------------------
# The custom op: opcheck, fake shapes, Dynamo


@pytest.mark.parametrize("head_mean", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck(dtype: torch.dtype, head_mean: bool) -> None:
    q, k, v = Case("opcheck", 2, 4, 2, 5, 9, 16, "fp32", "blhd", seed=40).tensors()
    torch.library.opcheck(FAE_OP, (q.to(dtype), k.to(dtype), v.to(dtype)), {"scale": None, "head_mean": head_mean})
    torch.library.opcheck(FAE_OP, (q.to(dtype), k.to(dtype), v.to(dtype)), {"scale": 0.5, "head_mean": head_mean})


def test_fake_shapes() -> None:
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        q = torch.empty(2, 8, 33, 80, dtype=torch.bfloat16)
        k = torch.empty(2, 2, 50, 80, dtype=torch.bfloat16)
        out, ent = FAE_OP(q, k, k, None, False)
        _, ent_mean = FAE_OP(q, k, k, None, True)
    assert out.shape == (2, 8, 33, 80) and out.dtype == torch.bfloat16 and out.is_contiguous()
    assert ent.shape == (2, 8, 33) and ent.dtype == torch.float32
    assert ent_mean.shape == (2, 33) and ent_mean.dtype == torch.float32


def test_dynamo_traces_without_graph_break() -> None:
    def block(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out, ent = torch.ops.toprovar.fae(q, k, v, None, True)
        return out * 2.0, ent + 1.0

    compiled = torch.compile(block, backend="eager", dynamic=True, fullgraph=True)
    for lq, lk in ((4, 9), (9, 25), (16, 50)):  # VAR-like growth: one dynamic graph
        q, k, v = Case("dyn", 2, 4, 2, lq, lk, 32, "fp32", seed=41 + lq).tensors()
        got = compiled(q, k, v)
        want = block(q, k, v)
        torch.testing.assert_close(got[0], want[0])
        torch.testing.assert_close(got[1], want[1])


if __name__ == "__main__":  # the interpreter subprocess of triton_results
    if "--triton-cases" in sys.argv:
        print(json.dumps(_run_triton_cases()))
