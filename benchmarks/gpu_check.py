"""First look at the backend on a GPU: equivalence on the tiny zoo models and a rough timing at
Infinity-2B size. Not the end-to-end benchmark (benchmarks/e2e.py, issue 8): few runs, no
interleaving beyond variant order, no profiler. Writes Markdown to --out.

    PYTHONPATH=. python3 benchmarks/gpu_check.py --out gpu_check.md --budget-s 200
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import time

import torch

import toprovar_fx
from toprovar_fx import zoo
from toprovar_fx.lowering.cuda_graphs import fail_one_replay
from toprovar_fx.metrics import psnr
from toprovar_fx.policies import load_policy


def _rel(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x.float() - y.float()).abs().max() / y.float().abs().max().clamp_min(1e-12))
               for x, y in zip(a, b))


def _call(name: str, m: torch.nn.Module, device: str, batch: int = 1):
    if name.startswith("infinity"):
        cond = m.encode_prompts(["a red cat on a mat"] * batch)
        cond = tuple(c.to(device) if isinstance(c, torch.Tensor) else c for c in cond)
        return lambda fn, **kw: fn(cond, B=batch, g_seed=7, cfg_list=3.0, return_logits=True, **kw)
    labels = torch.tensor([3] * batch, device=device)
    return lambda fn, **kw: fn(B=batch, label_B=labels, g_seed=7, cfg=1.5, return_logits=True, **kw)


def _write(lines: list[str], out: str) -> None:
    with open(out, "w") as f:
        f.write("\n".join(lines) + "\n")


def frozen_policy(name: str) -> dict:
    """The model's policy with D fixed and layers 2.. Detail: every run prunes the same blocks
    (planned blocks included), whatever the random weights' entropies are."""
    pol = load_policy(name)
    frozen = {"global": [0, 1], "detail": list(range(2, pol.model.depth))}
    return pol.derive(f"{name}-frozen-check", {"scale": {"criterion": "fixed"}, "layer": {"mode": "frozen", "frozen": frozen}})


def tiny_equivalence(lines: list[str], out: str) -> None:
    lines += ["## Tiny zoo models, fp32, CUDA", "",
              "Pruning rows also compare with the plain FX path (`inductor: False, cuda_graphs: False, planned_blocks: False`) of the same "
              "policy: same decisions, so the logits must agree (2nd generation, after warm-up).", "",
              "| model | options | max rel logit diff vs eager | vs FX path | image PSNR vs eager (dB) | rewrites | "
              "fallbacks | planned blocks |", "|---|---|---|---|---|---|---|---|"]
    notes: list[str] = []
    for name in ("infinity-tiny", "var-tiny"):
        m = zoo.build(name, device="cuda")
        call = _call(name, m, "cuda")
        img_ref, ref = call(m.autoregressive_infer_cfg)
        fx_path: dict[str, list[torch.Tensor]] = {}
        # most telling first (a run cut by its time limit keeps the rows done): the default lowering
        # (Inductor, compiled branches, CUDA graphs) against the plain FX path, then the rest
        frozen = frozen_policy(name)
        for opts in ({"policy": frozen, "inductor": False, "cuda_graphs": False, "planned_blocks": False}, {"policy": frozen},
                     {"policy": frozen, "cuda_graph_pool": "private"},
                     {"policy": name, "inductor": False, "cuda_graphs": False, "planned_blocks": False}, {"policy": name},
                     {"mode": "observe"}, {"policy": f"{name}-keepall"},
                     {"policy": f"{name}-fastvar-released", "inductor": False, "cuda_graphs": False, "planned_blocks": False},
                     {"policy": f"{name}-fastvar-released"},
                     {"mode": "observe", "inductor": False, "cuda_graphs": False, "planned_blocks": False},
                     {"mode": "observe", "inductor": True, "cuda_graphs": False}):
            torch._dynamo.reset()
            fast = torch.compile(m.autoregressive_infer_cfg, backend="toprovar", options=opts)
            call(fast)
            img, got = call(fast)
            rep = toprovar_fx.last_generation()
            pol = opts.get("policy")
            pol = pol["name"] if isinstance(pol, dict) else pol
            if pol and opts.get("inductor") is False:
                fx_path[pol] = got
            vs_fx = f"{_rel(got, fx_path[pol]):.2e}" if pol in fx_path and opts.get("inductor") is not False else ""
            shown = {k: (v if k != "policy" or isinstance(v, str) else v["name"]) for k, v in opts.items()}
            lines.append(f"| {name} | `{shown}` | {_rel(got, ref):.2e} | {vs_fx} | {psnr(img, img_ref):.1f} | "
                         f"{rep.attention_rewrites} | {len(rep.fallbacks)} | {rep.planned_blocks} |")
            notes += [f"- {name} `{shown}`: {msg}" for msg in dict.fromkeys(rep.fallbacks)]
            _write(lines + [""] + notes, out)  # a run cut short by its time limit keeps the rows done
    lines += [""] + notes


def big_timing(lines: list[str], budget_s: float) -> None:
    t_start = time.perf_counter()
    m = zoo.build("infinity-2b", device="cuda", dtype=torch.bfloat16)
    call = _call("infinity-2b", m, "cuda")
    lines += ["", "## Infinity-2B size (random weights, bf16, 1024x1024 13 scales, CFG, batch 1)", "",
              "| variant | first call (s) | warm runs (ms) | median (ms) | FLOP ratio | start scale |",
              "|---|---|---|---|---|---|"]
    variants = [("dense eager", None), ("toprovar observe (FX, no Inductor)", {"mode": "observe", "inductor": False}),
                ("toprovar infinity-2b policy", {"policy": "infinity-2b"}),
                ("toprovar infinity-2b-fastvar-released", {"policy": "infinity-2b-fastvar-released"})]
    for label, opts in variants:
        if time.perf_counter() - t_start > budget_s:
            lines.append(f"| {label} | skipped: time budget | | | | |")
            continue
        torch._dynamo.reset()
        fn = m.autoregressive_infer_cfg if opts is None else torch.compile(
            m.autoregressive_infer_cfg, backend="toprovar", options=opts)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        call(fn)
        torch.cuda.synchronize()
        first = time.perf_counter() - t0
        times = []
        for _ in range(3):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            call(fn)
            torch.cuda.synchronize()
            times.append(1e3 * (time.perf_counter() - t0))
        rep = toprovar_fx.last_generation() if opts is not None else None
        ratio = f"{rep.flop_ratio:.3f}" if rep else "1"
        start = rep.start_scale if rep else "-"
        lines.append(f"| {label} | {first:.1f} | {', '.join(f'{t:.0f}' for t in times)} | "
                     f"{statistics.median(times):.0f} | {ratio} | {start} |")


PROMPTS = ("a cat", "a red cat", "a red cat on a mat", "two blue squares on a red mat today", "a red cat")


# the hoisted context's variants, each against the context computed inside the blocks ("off")
HOIST_VARIANTS = {"off": {"hoist_context": False}, "hoist": {"hoist_context": True, "context_bucket": 0},
                  "bucket": {"hoist_context": True, "context_bucket": 4}}


def prompt_lengths(lines: list[str], out: str, only: str | None = None) -> None:
    """Prompts of several text lengths (Dynamo recompiles once, with a symbolic length) with the
    context hoisted, hoisted and padded to buckets of 4 tokens (lengths 2 and 3 share one, 6 and 8
    another), and not hoisted: the same decisions, so the logits must agree; the context computed
    once per block and generation whatever the length."""
    from toprovar_fx.runtime.session import last_session

    name = "infinity-tiny"
    m = zoo.build(name, device="cuda")
    depth = m.depth
    lines += ["## Prompts of several lengths, infinity-tiny, fp32, CUDA", "",
              f"Prompts in turn: {', '.join(repr(p) for p in PROMPTS)}; `hoist_context` on (`context_bucket: 0`), and on with "
              f"`context_bucket: 4`, each against off. Context computations: the session's count after each "
              f"generation (depth {depth}); padded: context buffers padded to buckets (hoisted graphs that bucketing "
              f"applied to).", "",
              "| options | max rel logit diff, hoisted vs off, per prompt | the same, bucketed vs off | "
              "context computations (hoisted / bucketed) | padded | fallbacks |", "|---|---|---|---|---|---|"]
    variants = {"observe": {"mode": "observe"}, "prune": {"policy": frozen_policy(name)}}
    for key, opts in variants.items():
        if only not in (None, key):
            continue
        logits: dict[str, list[list[torch.Tensor]]] = {}
        computes: dict[str, list[int]] = {"hoist": [], "bucket": []}
        padded = 0
        fallbacks: list[str] = []
        for variant, extra in HOIST_VARIANTS.items():
            torch._dynamo.reset()
            fast = torch.compile(m.autoregressive_infer_cfg, backend="toprovar", options={**opts, **extra})
            logits[variant] = []
            for p in PROMPTS:
                cond = tuple(c.to("cuda") if isinstance(c, torch.Tensor) else c for c in m.encode_prompts([p]))
                logits[variant].append(list(fast(cond, B=1, g_seed=7, cfg_list=3.0, return_logits=True)[1]))
                session = last_session()
                fallbacks += session.session_fallbacks + session.gen.fallbacks
                if variant in computes:
                    computes[variant].append(session.context_computes)
                if variant == "bucket":
                    padded = sum(memo.pads is not None for memo in session.context_memos.values())
                print(f"{opts.get('mode', 'prune')} {variant} {p!r}: {session.context_computes} context computations",
                      flush=True)  # progress, for a run cut by its time limit
        diffs = {v: " / ".join(f"{_rel(a, b):.1e}" for a, b in zip(logits[v], logits["off"])) for v in computes}
        shown = {k: (v if k != "policy" else v["name"]) for k, v in opts.items()}
        lines.append(f"| `{shown}` | {diffs['hoist']} | {diffs['bucket']} | "
                     f"{', '.join(map(str, computes['hoist']))} / {', '.join(map(str, computes['bucket']))} | "
                     f"{padded} | {'; '.join(dict.fromkeys(fallbacks)) or 'none'} |")
        _write(lines, out)
    lines.append("")


def relief(lines: list[str], out: str) -> None:
    """An out-of-memory error raised by one replay in the middle of a generation, with real CUDA
    graphs (``SharedPool.relieve``): that generation must finish with the logits of the same policy
    without CUDA graphs, and the next ones must capture again (into a new pool), replay, and agree."""
    from toprovar_fx.runtime.session import last_session

    name = "infinity-tiny"
    m = zoo.build(name, device="cuda")
    call = _call(name, m, "cuda")
    frozen = frozen_policy(name)
    torch._dynamo.reset()
    plain = torch.compile(m.autoregressive_infer_cfg, backend="toprovar", options={"policy": frozen, "cuda_graphs": False})
    call(plain)
    _, ref = call(plain)
    _, ref2 = _call(name, m, "cuda", batch=2)(plain)  # before ``fast``: one backend per Dynamo cache
    torch._dynamo.reset()
    fast = torch.compile(m.autoregressive_infer_cfg, backend="toprovar", options={"policy": frozen})
    for _ in range(4):  # compile, then lending from the first generation that compiles nothing
        call(fast)
    pool = last_session().graph_pool()
    captured = sum(e is not None for cache in list(pool.caches) for e in cache.graphs.values())
    raised = fail_one_replay(list(pool.caches), "CUDA out of memory (injected by gpu_check --relief)")
    reserved = torch.cuda.memory_reserved()
    _, during = call(fast)
    after_relief = (pool.reliefs, max(pool.floors.values(), default=0), torch.cuda.memory_reserved())
    replays, diffs = [], []
    for _ in range(3):
        _, got = call(fast)
        replays.append(toprovar_fx.last_generation().graph_replays)
        diffs.append(_rel(got, ref))
    lines += ["## Out of memory inside a replay, infinity-tiny, fp32, CUDA", "",
              f"{captured} graphs captured; the injected error in `{raised[0] if raised else 'nothing'}`. "
              f"Reserved before: {reserved / 2**20:.0f} MiB; after the relief {after_relief[2] / 2**20:.0f} MiB; "
              f"reliefs {after_relief[0]}, floor now {after_relief[1] / 2**20:.0f} MiB.", "",
              "| generation | max rel logit diff vs the policy without CUDA graphs | CUDA-graph replays |", "|---|---|---|",
              f"| with the error | {_rel(during, ref):.2e} | - |"]
    lines += [f"| after, {i + 1} | {d:.2e} | {r} |" for i, (d, r) in enumerate(zip(diffs, replays))]
    lines.append("")
    _write(lines, out)
    _relief_at_batch_2(lines, out, name, m, fast, ref, ref2)
    _mem_get_info_latency(lines, out)


def _relief_at_batch_2(lines: list[str], out: str, name: str, m: torch.nn.Module, fast, ref, ref2) -> None:
    """The error injected into a batch-2 generation: the floor rises for generations of its rows
    only, so the batch-1 generations after it capture and replay as before, and agree."""
    from toprovar_fx.runtime.session import last_session

    call2 = _call(name, m, "cuda", batch=2)
    call = _call(name, m, "cuda")
    for _ in range(2):
        call2(fast)
    pool = last_session().graph_pool()
    fail_one_replay(list(pool.caches), "CUDA out of memory (injected by gpu_check --relief, batch 2)")
    reliefs = pool.reliefs
    _, during = call2(fast)
    rows = [(f"batch 2, with the error (reliefs {pool.reliefs - reliefs})", _rel(during, ref2), "-", "-", "-")]
    for i in range(3):
        refused, t0 = pool.refused, time.perf_counter()
        _, got = call(fast)
        torch.cuda.synchronize()
        ms = 1e3 * (time.perf_counter() - t0)
        rep = toprovar_fx.last_generation()
        rows.append((f"batch 1 after, {i + 1}", _rel(got, ref), rep.graph_replays, pool.refused - refused,
                     f"{ms:.0f} ({rep.compiles} compiles, {rep.compile_seconds:.1f} s)"))
    lines += ["## Out of memory at batch 2, then batch 1 (infinity-tiny, fp32, CUDA)", "",
              f"Floors raised: {pool.floors_text()}; the default floor {(pool.min_free or 0) / 2**20:.0f} MiB.", "",
              "| generation | max rel logit diff vs the policy without CUDA graphs | CUDA-graph replays | "
              "captures refused | wall ms |", "|---|---|---|---|---|"]
    lines += [f"| {a} | {d:.2e} | {r} | {f} | {ms} |" for a, d, r, f, ms in rows]
    lines.append("")
    _write(lines, out)


def _mem_get_info_latency(lines: list[str], out: str) -> None:
    """How long ``torch.cuda.mem_get_info`` takes, idle and with GPU work queued: the free-memory
    floor asks it before captures (``SharedPool.room``)."""
    def timed(n: int) -> list[float]:
        us = []
        for _ in range(n):
            t0 = time.perf_counter()
            torch.cuda.mem_get_info()
            us.append(1e6 * (time.perf_counter() - t0))
        return us

    idle = timed(200)
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(40):
        a @ a
    queued_ms = 1e3 * (time.perf_counter() - t0)
    busy = timed(20)
    t0 = time.perf_counter()
    torch.cuda.synchronize()
    left_ms = 1e3 * (time.perf_counter() - t0)
    lines += ["## `torch.cuda.mem_get_info` latency", "",
              f"Idle: median {statistics.median(idle):.1f} us (max {max(idle):.1f}) over 200 calls. With 40 bf16 "
              f"8192^3 GEMMs queued ({queued_ms:.1f} ms to queue): first call {busy[0]:.1f} us, median "
              f"{statistics.median(busy):.1f} us over 20; the queue then took {left_ms:.1f} ms more to drain "
              "(about 0: a call waited for it).", ""]
    _write(lines, out)


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _profiled(fn, call) -> tuple[str, str]:
    """One generation under cProfile (host: top functions by own time) and one under the torch
    profiler (device: kernels launched, their summed time; host: top ops by own time)."""
    import cProfile
    import io
    import pstats

    prof = cProfile.Profile()
    _sync()
    prof.enable()
    call(fn)
    _sync()
    prof.disable()
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(18)
    host = "\n".join(line for line in buf.getvalue().splitlines() if line.strip())
    acts = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=acts) as tp:
        call(fn)
        _sync()
    events = tp.key_averages()
    kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
    launches = sum(e.count for e in kernels)
    gpu_ms = sum(e.self_device_time_total for e in kernels) / 1e3
    cpu = sorted((e for e in events if e.device_type == torch.autograd.DeviceType.CPU),
                 key=lambda e: e.self_cpu_time_total, reverse=True)[:10]
    ops = ", ".join(f"`{e.key[:50]}` {e.self_cpu_time_total / 1e3:.1f} ms x{e.count}" for e in cpu)
    return host, f"{launches} kernels, {gpu_ms:.1f} GPU ms summed; host ops by own time: {ops}"


REFUSED_STATES = ("plain", "floor", "relief")


def refused(lines: list[str], out: str, name: str, budget_s: float, states: tuple[str, ...] = REFUSED_STATES) -> None:
    """Every CUDA-graph capture refused by the free-memory floor, against ``cuda_graphs: False``
    (the same compiled code run without graphs): the twenty-first session measured 2.9 s on
    Infinity-8B after a relief against 0.9 s without graphs. Three states: no graphs; the floor
    above the device from the start; a relief injected into a captured generation, then the
    floor of its rows raised above the device (the state of that measurement)."""
    from toprovar_fx.runtime.session import last_session

    t_start = time.perf_counter()
    device = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: a smoke run of this check
    m = zoo.build(name, device=device, dtype=torch.bfloat16 if device == "cuda" else torch.float32)
    if device == "cuda":
        torch.cuda.empty_cache()  # the fp32 copy the zoo initialised
    call = _call(name, m, device)
    frozen = frozen_policy(name)
    huge = 2**40  # bytes: more than any device has
    lines += [f"## Every capture refused, {name} (random weights, bf16, CFG, batch 1)", "",
              f"Model built in {time.perf_counter() - t_start:.0f} s. Wall ms of single generations, synchronised.", "",
              "| state | first call s | wall ms (3 calls) | CUDA-graph replays | calls refused | logits vs the first state |",
              "|---|---|---|---|---|---|"]
    details: list[str] = []
    ref = None
    every = {"plain": ("cuda_graphs: False", {"policy": frozen, "cuda_graphs": False}, False),
             "floor": ("floor above the device from the start",
                       {"policy": frozen, "cuda_graph_min_free_mib": huge / 2**20}, False),
             "relief": ("captured, relief injected, then the floor of its rows above the device", {"policy": frozen}, True)}
    for label, opts, relieve in (every[s] for s in states):
        if time.perf_counter() - t_start > budget_s:
            lines.append(f"| {label} | skipped: time budget | | | | |")
            continue
        torch._dynamo.reset()
        fn = torch.compile(m.autoregressive_infer_cfg, backend="toprovar", options=opts)
        t0 = time.perf_counter()
        call(fn)
        _sync()
        first = time.perf_counter() - t0
        for _ in range(3 if relieve else 1):
            call(fn)
        pool = last_session().graph_pool()
        if relieve:
            try:
                fail_one_replay(list(pool.caches), "CUDA out of memory (injected by gpu_check --refused)")
            except ValueError as err:  # no graph captured (a CPU smoke run)
                lines.append(f"| {label} | {first:.1f} | not run: {err} | | | |")
                continue
            call(fn)
            pool.floors[pool.rows()] = huge
        times, got = [], None
        for _ in range(3):
            before = pool.refused if pool is not None else 0
            _sync()
            t0 = time.perf_counter()
            _, got = call(fn)
            _sync()
            times.append(1e3 * (time.perf_counter() - t0))
            n_refused = (pool.refused - before) if pool is not None else 0
        rep = toprovar_fx.last_generation()
        ref = got if ref is None else ref
        lines.append(f"| {label} | {first:.1f} | {', '.join(f'{t:.0f}' for t in times)} | {rep.graph_replays} | "
                     f"{n_refused} | {_rel(got, ref):.2e} |")
        _write(lines, out)
        host, device = _profiled(fn, call)
        details += [f"### {label}", "", device, "", "```", host, "```", ""]
        _write(lines + [""] + details, out)
    lines += [""] + details


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--budget-s", type=float, default=200.0)
    ap.add_argument("--tiny-only", action="store_true", help="equivalence on the tiny models only")
    ap.add_argument("--prompt-lengths", action="store_true",
                    help="only the check with prompts of several lengths (hoisted context with a symbolic text length)")
    ap.add_argument("--relief", action="store_true",
                    help="only the check of an out-of-memory error inside a replay (graphs dropped, call rerun)")
    ap.add_argument("--refused", metavar="MODEL",
                    help="only the check of every capture refused by the free-memory floor, on this zoo model")
    ap.add_argument("--states", default=",".join(REFUSED_STATES),
                    help=f"with --refused: which states, in order (of {', '.join(REFUSED_STATES)})")
    ap.add_argument("--only", choices=("observe", "prune"),
                    help="with --prompt-lengths: one mode only (two processes can then share the GPU and halve the wall time)")
    args = ap.parse_args()
    import triton

    lines = [f"# GPU check ({datetime.date.today()})", "",
             f"{torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU'}, torch {torch.__version__}, triton {triton.__version__}", ""]
    if args.refused:
        refused(lines, args.out, args.refused, args.budget_s, tuple(args.states.split(",")))
        print("\n".join(lines))
        return
    if args.relief:
        relief(lines, args.out)
        print("\n".join(lines))
        return
    if args.prompt_lengths:
        prompt_lengths(lines, args.out, args.only)
        print("\n".join(lines))
        return
    try:
        tiny_equivalence(lines, args.out)
    except Exception as err:  # noqa: BLE001 - report and go on to the timing
        lines.append(f"tiny equivalence failed: {type(err).__name__}: {err}")
    try:
        if not args.tiny_only:
            big_timing(lines, args.budget_s)
    except Exception as err:  # noqa: BLE001
        lines.append(f"timing failed: {type(err).__name__}: {err}")
    text = "\n".join(lines) + "\n"
    with open(args.out, "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
