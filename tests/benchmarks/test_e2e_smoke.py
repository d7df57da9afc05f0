"""``benchmarks/e2e.py`` end to end on CPU (infinity-tiny), plus its trace and policy helpers.

The CPU run checks the pipeline, not speed: every phase runs, the outputs have one row per
variant and one per-scale row per scale, and a variant that fails is reported, not raised. The
GPU-only parts of the trace summary (launches, kernel busy time) are checked on a synthetic trace.
"""

from __future__ import annotations

import json
from types import ModuleType, SimpleNamespace
from typing import Any

import pytest
import torch

from toprovar_fx import zoo
from toprovar_fx.policies import Policy, load_policy

from .scripts import load_benchmark

VARIANTS = ["eager", "observe", "toprovar", "skipvar"]


@pytest.fixture(scope="module")
def e2e() -> ModuleType:
    return load_benchmark("e2e")


@pytest.fixture(scope="module")
def result(e2e: ModuleType, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("e2e")
    broken = e2e.Variant("broken", "broken policy", "toprovar", "an unknown policy, strict",
                         options={"policy": "no-such-policy", "strict": True}, prunes=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        e2e.main(["--device", "cpu", "--models", "infinity-tiny", "--variants", ",".join(VARIANTS),
                  "--rounds", "5", "--warmup", "1", "--budget-s", "300", "--out", str(out)],
                 extra_variants=[broken])
    finally:
        torch.set_num_threads(threads)
        torch._dynamo.reset()
    return {"json": json.loads((out / "e2e.json").read_text()), "md": (out / "e2e.md").read_text(),
            "files": sorted(p.name for p in out.iterdir())}


def _section(md: str, title_start: str) -> list[str]:
    """Table rows (not header / rule) of the first section whose title starts with ``title_start``."""
    lines = md.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("### " + title_start))
    rows = []
    for line in lines[start + 1:]:
        if line.startswith("#"):
            break
        if line.startswith("|") and not line.startswith("|---"):
            rows.append(line)
    return rows[1:]


def test_outputs_and_rows(result: dict[str, Any]) -> None:
    assert result["files"] == ["e2e.json", "e2e.md"]
    model = result["json"]["models"]["infinity-tiny"]
    keys = [v["key"] for v in model["variants"]]
    assert sorted(keys) == sorted(VARIANTS + ["broken"])
    latency = _section(result["md"], "Latency")
    assert sorted(row.split("|")[1].strip() for row in latency) == sorted(keys)
    num_scales = len(zoo.build("infinity-tiny", device="meta").resolve_schedule(None))
    assert len(model["schedule"]) == num_scales == len(model["per_scale"])
    wall = _section(result["md"], "Per-scale wall ms")
    assert [row.split("|")[1].strip() for row in wall] == [str(i + 1) for i in range(num_scales)] + ["decode"]


def test_every_variant_measured(result: dict[str, Any]) -> None:
    model = result["json"]["models"]["infinity-tiny"]
    k = len(model["schedule"])
    for v in model["variants"]:
        if v["key"] == "broken":
            continue
        assert v["status"] == "ok", v
        assert len(v["times_ms"]) == 5 and v["first_call_ms"] > 0
        assert v["mark_counts"] == [k] * 5  # the scale-end wrapper ran once per scale in every variant
        assert len(v["segment_medians_ms"]) == k + 1
        assert v["profile"]["marks"] == k and v["profile"]["top_host_ops"]
        assert v["kv_bytes_b1"] > 0
        assert isinstance(v["dynamo_frames_timed"], int)
    reports = {v["key"]: v["report"] for v in model["variants"]}
    assert reports["eager"] is None and reports["toprovar"]["policy"] == "infinity-tiny"
    assert len(reports["toprovar"]["scales"]) == k
    # SkipVAR's CFG shortcut needs torch.compile(dynamic=True): without it the backend falls back
    # and both CFG halves run; with it the scale before the two skipped ones runs on half the rows
    skip = reports["skipvar"]
    assert skip["fallbacks"] == []
    assert [(s["skipped"], s["flops_executed"] / s["flops_dense"]) for s in skip["scales"][-3:]] == [
        (False, 0.5), (True, 0.0), (True, 0.0)]
    assert model["rows"]["eager"]["vs_eager"] == pytest.approx(1.0)
    assert {t["target"].split(" ")[0] for t in model["targets"]} >= {"toprovar", "observe", "zero", "pruned"}
    last2 = next(t for t in model["targets"] if "last two scales" in t["target"])
    assert last2["status"] == "n/a: no compiled dense baseline in this run"  # no Inductor row: not against eager
    assert last2["value"].endswith("against eager")


def test_failing_variant_is_reported(result: dict[str, Any]) -> None:
    model = result["json"]["models"]["infinity-tiny"]
    broken = next(v for v in model["variants"] if v["key"] == "broken")
    assert broken["status"] == "failed" and "no-such-policy" in broken["error"]
    assert "\n" not in broken["error"] and broken["times_ms"] == []
    row = next(r for r in _section(result["md"], "Latency") if r.startswith("| broken "))
    assert "failed: compile" in row


def test_stage_policies(e2e: ModuleType) -> None:
    base = load_policy("infinity-2b")
    scale = Policy.from_dict(e2e.stage_policy("infinity-2b", "scale"))
    assert scale.scale.mode == "skip_after_D" and set(scale.layer.actions.values()) == {"keep"}
    assert scale.scale.tau == base.scale.tau and scale.scale.min_start_scale == base.scale.min_start_scale
    layer = Policy.from_dict(e2e.stage_policy("infinity-2b", "scale_layer"))
    assert dict(layer.layer.actions) == {"global": "keep", "detail": "skip"}
    assert layer.layer.mode == base.layer.mode and layer.scale == base.scale
    with pytest.raises(ValueError, match="stage"):
        e2e.stage_policy("infinity-2b", "token")
    # the frozen operating point's stages are valid policies too (its layer.frozen must go with mode off)
    frozen = Policy.from_dict(e2e.stage_policy("infinity-2b-frozen", "scale"))
    assert frozen.layer.mode == "off" and frozen.scale.criterion == "fixed"
    assert Policy.from_dict(e2e.stage_policy("infinity-2b-frozen", "scale_layer")).layer.mode == "frozen"


def test_variant_by_key_finds_a_variant_or_names_the_known_ones(e2e: ModuleType) -> None:
    v = e2e.variant_by_key("infinity-tiny", "toprovar")
    assert v.key == "toprovar" and v.options.get("policy")
    with pytest.raises(ValueError, match="no variant 'tprovar'.*known: .*toprovar"):
        e2e.variant_by_key("infinity-tiny", "tprovar")


def test_scale_marks_once_per_scale_and_restored(e2e: ModuleType) -> None:
    model = zoo.build("infinity-tiny")
    k = len(model.resolve_schedule(None))
    marks = e2e.ScaleMarks(model, k, "cpu")
    marks.install()
    try:
        gen = e2e.run_generation(model.autoregressive_infer_cfg, e2e.sampler_call(model, 1, "cpu"), marks, "cpu",
                                 capture_kv=True)
    finally:
        marks.restore()
    assert gen.marks == k and len(gen.segments_ms) == k + 1 and gen.kv_bytes > 0
    assert "get_logits" not in model.__dict__
    assert e2e.kv_cache_bytes(model) == 0  # the sampler cleared its caches


def _event(name: str, cat: str, ts: float, dur: float, corr: int | None = None) -> dict[str, Any]:
    ev = {"ph": "X", "name": name, "cat": cat, "ts": ts, "dur": dur, "pid": 1, "tid": 1}
    if corr is not None:
        ev["args"] = {"correlation": corr}
    return ev


def test_summarize_trace_segments(e2e: ModuleType) -> None:
    events = [
        _event(e2e.GEN_RANGE, "user_annotation", 0, 1000),
        _event("aten::mm", "cpu_op", 10, 50),
        _event("aten::add", "cpu_op", 20, 10),  # nested in mm: mm's self time is 40
        _event("cudaLaunchKernel", "cuda_runtime", 12, 2, corr=1),
        _event("cuLaunchKernel", "cuda_driver", 30, 2, corr=2),
        _event(e2e.MARK_RANGE, "user_annotation", 100, 1),  # end of scale 1
        _event("cudaGraphLaunch", "cuda_runtime", 150, 5, corr=3),
        _event(e2e.MARK_RANGE, "user_annotation", 300, 1),  # end of scale 2
        _event("cudaLaunchKernel", "cuda_runtime", 400, 2, corr=4),  # decode
        _event("toprovar.decide", "user_annotation", 160, 20),
        _event("gemm", "kernel", 40, 100, corr=1),  # runs past the mark: still scale 1 (its launch)
        _event("add", "kernel", 120, 30, corr=2),  # overlaps gemm: union 40..150
        _event("g1", "kernel", 310, 10, corr=3),
        _event("g2", "kernel", 320, 10, corr=3),
        _event("dec", "kernel", 500, 5, corr=4),
    ]
    s = e2e.summarize_trace(events, 2, gpu=True)
    assert s["marks"] == 2
    assert s["launches"] == [2, 1, 1] and s["launches_total"] == 4
    assert s["busy_ms"] == pytest.approx([0.110, 0.020, 0.005])
    assert s["busy_ms_total"] == pytest.approx(0.135)
    assert s["top_kernels"][0] == {"name": "gemm", "ms": 0.1, "calls": 1}
    host = {h["name"]: h["ms"] for h in s["top_host_ops"]}
    assert host == pytest.approx({"aten::mm": 0.040, "aten::add": 0.010})
    assert s["toprovar_ranges"] == {"toprovar.decide": {"ms": 0.02, "count": 1}}
    cpu = e2e.summarize_trace(events, 2, gpu=False)
    assert cpu["launches"] is None and cpu["busy_ms"] is None
    assert e2e.summarize_trace(events, 3, gpu=True)["launches"] is None  # marks != scales: no per-scale split


@pytest.mark.parametrize(("name", "cls"), [
    ("_fae_fwd_tma_kernel", "attention"),
    ("_fae_fwd_kernel", "attention"),
    ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_7_64x128x128_4x1x1_cga1x1", "attention"),
    ("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<128, 128, 64, 4, cutlass::half_t> >",
     "attention"),
    ("void at::native::_scatter_gather_elementwise_kernel<128, 8, at::native::_cuda_scatter_gather_internal_kernel"
     "<true, float>::operator()<at::native::ReduceAdd>(...)::{lambda(int)#1}>(int, ...)", "gather/scatter"),
    ("void at::native::(anonymous namespace)::indexSelectLargeIndex<float, long, unsigned int, 2, 2, -2, true>",
     "gather/scatter"),
    ("nvjet_sm90_tst_256x128_64x4_1x2_h_bz_coopA_bias_TNT", "gemm"),
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1_execute_segment_k_off_kernel",
     "gemm"),
    ("triton_poi_fused_add_cat_clamp_min_div_expand_linalg_vector_norm_mul_permute_select_stack_0", "triton fused"),
    ("triton_red_fused__to_copy_add_mean_mul_pow_rsqrt_0", "triton fused"),  # a fused cast, not a copy
    ("void at::native::elementwise_kernel<128, 4, at::native::direct_copy_kernel_cuda(at::TensorIteratorBase&)"
     "::{lambda()#3}::operator()() const::{lambda()#7}::operator()() const::{lambda(float)#1}>(int, ...)", "copy"),
    ("void at::native::(anonymous namespace)::CatArrayBatchedCopy<at::native::(anonymous namespace)::OpaqueType<2u>, "
     "unsigned int, 4, 64, 64>(...)", "copy"),
    ("Memcpy DtoD (Device -> Device)", "copy"),
    ("Memset (Device)", "copy"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<float>, ...>", "other"),
])
def test_kernel_class(e2e: ModuleType, name: str, cls: str) -> None:
    assert e2e.kernel_class(name) == cls


def _class_trace(e2e: ModuleType) -> list[dict[str, Any]]:
    """Two scales and a decode tail; kernels of several classes, one launched in scale 1 but run after its mark.
    Times in ms (the trace's are us)."""
    fae, gemm, copy = "_fae_fwd_tma_kernel", "nvjet_sm90_tst_256x128_64x4_1x2_h_bz_coopA_bias_TNT", "Memcpy DtoD"
    gather = "void at::native::_scatter_gather_elementwise_kernel<128, 8>"
    fused = "triton_poi_fused_add_mul_0"
    events = [
        _event(e2e.GEN_RANGE, "user_annotation", 0, 1000),
        _event("cudaLaunchKernel", "cuda_runtime", 10, 2, corr=1),
        _event("cudaLaunchKernel", "cuda_runtime", 20, 2, corr=2),
        _event("cudaLaunchKernel", "cuda_runtime", 30, 2, corr=3),
        _event("cudaLaunchKernel", "cuda_runtime", 40, 2, corr=4),
        _event(e2e.MARK_RANGE, "user_annotation", 100, 1),  # end of scale 1
        _event("cudaLaunchKernel", "cuda_runtime", 110, 2, corr=5),
        _event("cudaLaunchKernel", "cuda_runtime", 120, 2, corr=6),
        _event("cudaGraphLaunch", "cuda_runtime", 130, 2, corr=7),
        _event(e2e.MARK_RANGE, "user_annotation", 300, 1),  # end of scale 2
        _event("cudaLaunchKernel", "cuda_runtime", 400, 2, corr=8),  # decode
        _event(gemm, "kernel", 15, 30, corr=1),
        _event(fae, "kernel", 45, 20, corr=2),
        _event(gemm, "kernel", 65, 10, corr=3),
        _event(fae, "kernel", 105, 40, corr=4),  # launched in scale 1, runs after its mark: scale 1
        _event(gather, "kernel", 150, 6, corr=5),
        _event(copy, "kernel", 156, 4, corr=6),
        _event(fused, "kernel", 160, 3, corr=7),  # a graph's kernels share the launch's correlation
        _event(gemm, "kernel", 163, 12, corr=7),
        _event(fae, "kernel", 170, 8, corr=7),  # overlaps the gemm: counted in full (sum, not union)
        _event("some_other_kernel", "kernel", 500, 5, corr=8),
    ]
    return [{**e, "ts": e["ts"] * 1e3, "dur": e["dur"] * 1e3} for e in events]


def test_summarize_trace_kernel_classes(e2e: ModuleType) -> None:
    s = e2e.summarize_trace(_class_trace(e2e), 2, gpu=True)
    zero = dict.fromkeys(e2e.KERNEL_CLASSES, 0.0)
    assert s["class_ms"] == [
        pytest.approx({**zero, "attention": 60.0, "gemm": 40.0}),
        pytest.approx({**zero, "attention": 8.0, "gemm": 12.0, "gather/scatter": 6.0, "copy": 4.0,
                       "triton fused": 3.0}),
        pytest.approx({**zero, "other": 5.0}),
    ]
    nothing = dict.fromkeys(e2e.KERNEL_CLASSES, 0)
    assert s["class_calls"] == [
        {**nothing, "attention": 2, "gemm": 2},
        {**nothing, "attention": 1, "gemm": 1, "gather/scatter": 1, "copy": 1, "triton fused": 1},
        {**nothing, "other": 1},
    ]
    # the class sums count the overlap twice, the busy time once
    assert s["busy_ms"][1] == pytest.approx(28.0) and sum(s["class_ms"][1].values()) == pytest.approx(33.0)
    # by name, the index/copy/other kernels of the last two scales (here scales 1-2), not the decode's
    assert s["last_two_added"] == [
        {"name": "gather/scatter: void at::native::_scatter_gather_elementwise_kernel<128, 8>", "ms": pytest.approx(6.0),
         "calls": 1},
        {"name": "copy: Memcpy DtoD", "ms": pytest.approx(4.0), "calls": 1}]
    cpu = e2e.summarize_trace(_class_trace(e2e), 2, gpu=False)
    assert cpu["class_ms"] is None and cpu["class_calls"] is None and cpu["last_two_added"] is None
    assert e2e.summarize_trace(_class_trace(e2e), 3, gpu=True)["class_ms"] is None  # no per-scale split


def test_scale_class_rows(e2e: ModuleType) -> None:
    prof = e2e.summarize_trace(_class_trace(e2e), 2, gpu=True)
    runs = [e2e.VariantRun(v) for v in e2e.model_variants("infinity-2b") if v.key in ("eager", "toprovar")]
    runs[1].profile = prof  # toprovar; eager has no profile: no row
    rows = e2e.scale_class_rows(runs, range(0, 2))
    # scales 1 and 2 of 2: kernel ms 100 + 33; busy 100 (15..75 and 105..145) + 28
    assert rows == [["toprovar", "68.00 (3)", "6.00 (1)", "4.00 (1)", "52.00 (3)", "3.00 (1)", "0.00 (0)",
                     "133.00", "128.00"]]


def test_markdown_has_kernel_class_section(result: dict[str, Any]) -> None:
    """The CPU run has no kernels: the section is there, without rows."""
    md = result["md"]
    for title in ("### The first 5 scales: GPU ms by kernel class (profiled generation)",
                  "### The last two scales: GPU ms by kernel class (profiled generation)"):
        assert title in md
        after_busy = md.index("### Per-scale GPU-busy ms") < md.index(title) < md.index("### Per-scale executed")
        assert after_busy and "`kernel_class`" in md.split(title)[1].split("###")[0]


def test_later_toprovar_variants_are_estimated_from_the_first(e2e: ModuleType) -> None:
    """The first toprovar variant pays the shared compile: later ones get a fraction of its time,
    other kinds keep their own estimates (measured for the class, else the prior)."""
    runs = {v.key: e2e.VariantRun(v) for v in e2e.model_variants("infinity-2b")}
    b = e2e.Bench(name="infinity-2b", model=None, device="cuda", schedule=[], marks=None, call_b1=None,
                  runs=list(runs.values()), budget=None, args=None)
    prior = e2e.COMPILE_PRIOR_S["cuda"]
    assert b.compile_estimate(runs["fastvar"]) == prior["toprovar_fx"]
    assert b.compile_estimate(runs["observe"]) == prior["toprovar_inductor"]
    runs["toprovar"].first_call_ms = 136_000.0
    b.estimates["toprovar_fx"] = 1.1 * 136.0
    b.estimates["inductor"] = 1.1 * 116.0
    later = e2e.LATER_TOPROVAR_FRACTION * 1.1 * 136.0
    assert b.compile_estimate(runs["fastvar"]) == pytest.approx(later)
    assert b.compile_estimate(runs["observe"]) == pytest.approx(later)
    assert b.compile_estimate(runs["inductor"]) == pytest.approx(1.1 * 116.0)
    assert b.compile_estimate(runs["eager"]) == prior["eager"]


def test_guard_filter_variant_generates_what_toprovar_does(e2e: ModuleType) -> None:
    """``toprovar_guardfilter`` passes Dynamo a guard filter through ``torch.compile``'s options (not to the
    backend, which would reject the key) and generates the same images as ``toprovar``."""
    variants = {v.key: v for v in e2e.model_variants("infinity-tiny")}
    filtered, plain = variants["toprovar_guardfilter"], variants["toprovar"]
    assert filtered.kind == "toprovar" and callable(filtered.options["guard_filter_fn"])
    model, _ = e2e.build_model("infinity-tiny", "cpu", torch.float32)
    call = e2e.sampler_call(model, 1, "cpu")
    images = []
    try:
        for variant in (plain, filtered):
            torch._dynamo.reset()
            fn = variant.build(model)
            call(fn)
            out = call(fn)
            images.append(out[0] if isinstance(out, (tuple, list)) else out)
    finally:
        torch._dynamo.reset()
    assert "guard_filter_fn" in filtered.options  # build copied the options; torch popped from the copy
    torch.testing.assert_close(images[1], images[0])


def test_a_variant_is_skipped_when_it_would_not_fit_in_memory(e2e: ModuleType) -> None:
    gib = 2**30
    assert e2e.memory_shortfall([], 0) is None  # the first variant: nothing to estimate from
    assert e2e.memory_shortfall([10 * gib, 20 * gib], 26 * gib) is None
    why = e2e.memory_shortfall([10 * gib, 20 * gib], 24 * gib)
    assert why is not None and "25.0 GiB needed" in why and "24.0 GiB free" in why and "--variants" in why


def test_allocated_memory_is_split_by_pool_with_its_most_frequent_block_sizes(e2e: ModuleType) -> None:
    """What outlived a failed batch call, from a memory snapshot: default pool against CUDA-graph
    pools, free blocks not counted, the most frequent allocated sizes first."""
    mib = 2**20
    segments = [
        {"segment_pool_id": (0, 0), "blocks": [{"state": "active_allocated", "size": 512 * mib},
                                               {"state": "active_allocated", "size": 512 * mib},
                                               {"state": "inactive", "size": 4096 * mib}]},
        {"segment_pool_id": (1, 3), "blocks": [{"state": "active_allocated", "size": 256 * mib},
                                               {"state": "active_allocated", "size": 768 * mib}]},
    ]
    text = e2e.allocated_breakdown(segments, top=1)
    assert text.startswith("allocated 1.0 GiB in the default pool (2 x 512 MiB)")
    assert "1.0 GiB in graph pools (1 x 256 MiB)" in text
    assert "0.0 GiB in graph pools (none)" in e2e.allocated_breakdown(segments[:1])


def test_a_batch_memory_call_is_skipped_when_its_estimate_does_not_fit(e2e: ModuleType) -> None:
    gib = 2**30
    assert e2e.batch_shortfall(5 * gib, 8, 40 * gib, alive=2) is None
    why = e2e.batch_shortfall(5 * gib, 8, 39 * gib, alive=7)
    assert why is not None and "about 40 GiB estimated" in why and "39 GiB free with 7 variants" in why


def test_graph_pool_bytes_counts_segments_outside_the_default_pool(e2e: ModuleType, monkeypatch) -> None:
    segments = [{"total_size": 10, "segment_pool_id": (0, 0)}, {"total_size": 7, "segment_pool_id": (1, 3)},
                {"total_size": 5, "segment_pool_id": (0, 2)}]
    monkeypatch.setattr(e2e.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(e2e.torch.cuda, "memory_snapshot", lambda: segments)
    assert e2e.graph_pool_bytes() == 12
    monkeypatch.setattr(e2e.torch.cuda, "memory_snapshot", lambda: (_ for _ in ()).throw(RuntimeError("no CUDA")))
    assert e2e.graph_pool_bytes() is None


def test_launch_targets_compare_pruned_scales_with_each_dense_variant(e2e: ModuleType) -> None:
    """A pruned scale launching more than a dense variant misses that variant's target, named with
    the scale and counts; dense variants with CUDA graphs (observe, cudagraphs) are references
    only when measured."""
    runs = [e2e.VariantRun(v) for v in e2e.model_variants("infinity-2b") if v.key == "toprovar"]
    runs[0].profile = {"launches": [35, 84, 26]}
    runs[0].report = {"scales": [{"index": 0, "flops_executed": 1.0, "flops_dense": 1.0},
                                 {"index": 1, "flops_executed": 0.4, "flops_dense": 1.0}]}
    per_scale = [{"launches": {"inductor": 789, "eager": 1899, "cudagraphs": 36, "toprovar": 35}},
                 {"launches": {"inductor": 864, "eager": 1959, "cudagraphs": 63, "toprovar": 84}}]
    b = SimpleNamespace(runs=runs)
    ok = e2e.launch_target(b, per_scale, "inductor")
    assert ok["status"] == "met" and ok["value"] == "1/1 pruned scales ok"
    strict = e2e.launch_target(b, per_scale, "cudagraphs")
    assert strict["status"] == "missed by 1 scale(s)" and "toprovar@2: 84 > 63" in strict["value"]
    assert e2e.launch_target(b, per_scale, "observe")["status"].startswith("n/a")


def test_a_generation_is_estimated_from_the_fastest_warm_up(e2e: ModuleType) -> None:
    """A warm-up that still records CUDA graphs must not set the time reserved for the rounds."""
    (run,) = [e2e.VariantRun(v) for v in e2e.model_variants("infinity-2b") if v.key == "toprovar"]
    run.first_call_ms, run.warmup_ms = 90_000.0, [20_072.0, 365.0]
    assert run.warm_s() == pytest.approx(0.365)
    run.times_ms = [150.0, 140.0, 160.0]
    assert run.warm_s() == pytest.approx(0.150)


def test_every_variant_takes_the_prompts_in_the_same_turn(e2e: ModuleType) -> None:
    model = zoo.build("infinity-tiny", device="cpu")
    call = e2e.SamplerCall(model, 1, "cpu", ["a cat", "two blue squares on a red mat"])
    seen: dict[str, list[int]] = {"a": [], "b": []}

    def variant(key: str):
        return lambda cond, **kw: seen[key].append(int(cond[0].shape[0]))  # the packed text's length

    a, b = variant("a"), variant("b")
    for fn in (a, a, b, a, b, b):
        call(fn)
    lengths = [int(c[0].shape[0]) for c in call.conds]
    assert lengths[0] != lengths[1]
    assert seen["a"] == seen["b"] == [lengths[0], lengths[1], lengths[0]]


def test_prompts_of_other_lengths_compile_before_the_timed_rounds(e2e: ModuleType, tmp_path) -> None:
    """Texts of several lengths: the warm-ups are raised to take each once, so the timed rounds
    compile nothing (Dynamo's recompile for a symbolic text length happens in the warm-ups)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        e2e.main(["--device", "cpu", "--models", "infinity-tiny", "--variants", "eager,toprovar", "--rounds", "2",
                  "--warmup", "1", "--no-profile", "--budget-s", "200", "--out", str(tmp_path),
                  "--prompt", "a cat", "--prompt", "two blue squares on a red mat", "--prompt", "a red cat on a mat"])
    finally:
        torch.set_num_threads(threads)
        torch._dynamo.reset()
    doc = json.loads((tmp_path / "e2e.json").read_text())
    assert doc["settings"]["prompts"] == ["a cat", "two blue squares on a red mat", "a red cat on a mat"]
    assert doc["settings"]["warmup"] == 2 and any("--warmup raised from 1 to 2" in n for n in doc["notes"])
    for v in doc["models"]["infinity-tiny"]["variants"]:
        assert v["status"] == "ok" and len(v["times_ms"]) == 2, v["key"]
        assert v["dynamo_frames_timed"] == 0 and v["toprovar_compiles_timed"] in (0, None), v["key"]
    assert "3 prompts taken in turn" in (tmp_path / "e2e.md").read_text()


def test_warm_up_goes_on_in_prompt_cycles_until_no_graph_is_captured(e2e: ModuleType, monkeypatch) -> None:
    """``settle``: whole cycles of the prompts (every variant's k-th call stays on one prompt)
    until the last cycle captured nothing and every graph call replayed; never for a variant
    without CUDA graphs, and a note when the cycles run out."""
    (run,) = [e2e.VariantRun(v) for v in e2e.model_variants("infinity-2b") if v.key == "toprovar"]
    # (captures, busy) after each call: lending captures everything again, each length once, then nothing
    sequence = iter([(130, 0), (160, 0), (190, 0), (190, 0), (190, 0), (190, 0)])
    monkeypatch.setattr(e2e, "graph_activity", lambda: next(sequence))
    bench = SimpleNamespace(args=SimpleNamespace(prompt=["a", "b", "c"]), notes=[],
                            gen=lambda r: SimpleNamespace(wall_ms=float(len(r.settle_ms))))
    activity = [(60, 0), (100, 0)]  # the first call and a warm-up
    e2e.settle(bench, run, activity)
    assert run.settle_ms == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0] and activity[-1] == activity[-4] and not bench.notes

    run.settle_ms = []
    e2e.settle(bench, run, [None])  # no graph pool
    e2e.settle(bench, run, [(0, 0), (0, 0)])  # no graph captured: CPU, or CUDA graphs off
    assert run.settle_ms == []

    monkeypatch.setattr(e2e, "graph_activity", ((i, 0) for i in range(3, 100)).__next__)  # captures every call
    e2e.settle(bench, run, [(1, 0), (2, 0)])
    assert len(run.settle_ms) == 3 * e2e.SETTLE_MAX_CYCLES and "still captured" in bench.notes[0]
