"""The ``toprovar`` command: calibrate, plan, inspect, bench, demo (``docs/cli.md``).

This module parses arguments and prints; the work is done by ``toprovar_fx.tools`` (which
returns data and writes files). Bad arguments are one-line errors with exit code 2.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any, NoReturn

EPILOG = "MODEL is a zoo name (toprovar_fx.zoo.list_models()) or module:factory; see docs/cli.md."


class _Parser(argparse.ArgumentParser):
    """``ArgumentParser`` whose errors are one line: ``toprovar CMD: error: MESSAGE`` (exit 2)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {' '.join(str(message).split())}\n")


# ------------------------------------------------------------------------------------------------
# argument helpers
# ------------------------------------------------------------------------------------------------


def _int_at_least(name: str, lowest: int):
    """argparse type: an integer >= ``lowest``; errors name the flag."""

    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be an integer, got {text!r}") from None
        if v < lowest:
            raise argparse.ArgumentTypeError(f"{name} must be >= {lowest}, got {v}")
        return v

    parse.__name__ = name
    return parse


def _positive(name: str):
    return _int_at_least(name, 1)


def _batches(text: str) -> list[int]:
    try:
        vals = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--batch must be integers separated by commas, got {text!r}") from None
    if not vals or any(v < 1 for v in vals):
        raise argparse.ArgumentTypeError(f"--batch sizes must be >= 1, got {text!r}")
    return vals


def _sampling(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling (zoo models; default: the checkpoint's recorded settings, else cfg 1.5 "
                             "for VAR / HART, cfg_list 3.0 for Infinity, no top-k / top-p)")
    g.add_argument("--cfg", type=float, metavar="G", help="classifier-free guidance (VAR / HART cfg, Infinity cfg_list)")
    g.add_argument("--top-p", type=float, metavar="P", help="nucleus sampling threshold in [0, 1] (0 = off)")
    g.add_argument("--top-k", type=int, metavar="K", help="top-k sampling (0 = off)")


def _common(p: argparse.ArgumentParser, *, model_required: bool = True, device: bool = True) -> None:
    p.add_argument("--model", required=model_required, metavar="MODEL",
                   help="zoo name (e.g. var-tiny, infinity-tiny) or module:factory for your own model")
    p.add_argument("--resolution", default=None, metavar="SCHEDULE",
                   help="scale schedule to generate, a key of the model's scale_schedules (e.g. 256:1:1)")
    p.add_argument("--seed", type=int, default=0)
    if device:
        p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N (default cpu)")
    p.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16 (default float32)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``toprovar`` (exposed for the docs and tests)."""
    parser = _Parser(prog="toprovar", description=__doc__, epilog=EPILOG,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("calibrate", help="pre-sample the model dense and write a calibrated policy YAML",
                       epilog=EPILOG)
    _common(p)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompts", metavar="FILE", help="calibration prompts, one per line (text models)")
    src.add_argument("--classes", type=_positive("--classes"), metavar="N",
                     help="N evenly spaced class labels (class-conditional models; default 16)")
    p.add_argument("--out", required=True, metavar="POLICY.yaml", help="where to write the policy")
    p.add_argument("--base", metavar="POLICY", help="policy to start from (default: the model's shipped policy)")
    p.add_argument("--name", help="name of the written policy (default: BASE-calibrated)")
    p.add_argument("--tau", type=float, help="use this tau instead of the calibration rule")
    _sampling(p)
    p.set_defaults(handler=_calibrate, _parser=p)

    p = sub.add_parser("plan", help="dry run: per-scale decisions and FLOPs of a policy, nothing generated",
                       epilog=EPILOG)
    _common(p, device=False)
    p.add_argument("--policy", required=True, help="shipped policy name, NAME:PRESET or YAML path")
    p.add_argument("--preset", help="preset of the policy (quality | balanced | fast | ...)")
    p.add_argument("--batch", type=_positive("--batch"), default=1)
    p.add_argument("--calibration", metavar="FILE",
                   help="calibration JSON from toprovar calibrate: entropy-dependent decisions from it")
    p.add_argument("--json", metavar="FILE", help="also write the plan as JSON")
    p.set_defaults(handler=_plan, _parser=p)

    p = sub.add_parser("inspect", help="generate once and draw what the policy pruned (PNGs + index.html)",
                       epilog=EPILOG)
    _common(p)
    p.add_argument("--policy", required=True, help="shipped policy name, NAME:PRESET or YAML path")
    p.add_argument("--preset", help="preset of the policy")
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--condition", help="class id or prompt (default: the model's demo condition)")
    p.add_argument("--no-dense", action="store_true", help="skip the dense reference (no fidelity, no pair.png)")
    p.add_argument("--dynamic", action="store_true",
                   help="torch.compile(dynamic=True): needed by cfg.reuse_cond_from (SkipVAR)")
    _sampling(p)
    p.set_defaults(handler=_inspect, _parser=p)

    p = sub.add_parser("bench", help="latency, speedup, FLOPs, fidelity and memory vs dense (Markdown + JSON)",
                       epilog=EPILOG)
    _common(p)
    p.add_argument("--policies", required=True,
                   help="comma-separated: dense, observe, NAME, NAME:PRESET or a YAML path (dense is always first)")
    p.add_argument("--runs", type=_positive("--runs"), default=5, help="timed runs per variant (default 5)")
    p.add_argument("--warmup", type=_int_at_least("--warmup", 0), default=1, help="untimed rounds after the first call (default 1)")
    p.add_argument("--batch", type=_batches, default=[1], metavar="B[,B...]",
                   help="batch sizes: latency at 1, throughput at larger ones (default 1)")
    p.add_argument("--condition", help="class id or prompt (default: the model's demo condition)")
    p.add_argument("--out", metavar="DIR", help="write DIR/bench.md and DIR/bench.json")
    p.add_argument("--no-kv-probe", action="store_true", help="skip the extra untimed call per variant that measures the K/V cache")
    p.add_argument("--dynamic", action="store_true",
                   help="torch.compile(dynamic=True): needed by cfg.reuse_cond_from (SkipVAR)")
    _sampling(p)
    p.set_defaults(handler=_bench, _parser=p)

    p = sub.add_parser("demo", help="dense vs toprovar on the embedded trained model: speed, fidelity, PNGs")
    p.add_argument("--model", default="var-ref", choices=["var-ref", "var-tiny", "hart-tiny"],
                   help="var-ref: the trained reference model shipped in the package (default)")
    p.add_argument("--policy", default=None, help="policy name or YAML path (default: the model's own policy)")
    p.add_argument("--runs", type=_positive("--runs"), default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--label", type=int, default=0,
                   help="class id (var-ref: 0 = the letter W, the paper's example of a simple image; 3 = a text page)")
    p.add_argument("--device", default="auto", help="auto (cuda if available) | cpu | cuda")
    p.add_argument("--out", default="out/demo.png",
                   help="side-by-side PNG; the pruned-token overlay goes next to it as *_overlay.png")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    _sampling(p)
    p.set_defaults(handler=_demo, _parser=p)
    return parser


def _validate(args: argparse.Namespace) -> None:
    """Checks that need no model weights; raise ToolError / PolicyError with a one-line message."""
    import torch

    from toprovar_fx.policies import load_policy
    from toprovar_fx.tools.models import (
        ToolError,
        check_model_spec,
        load_policy_arg,
        parse_dtype,
        read_prompts,
    )

    if getattr(args, "dtype", None) is not None:
        args.torch_dtype = parse_dtype(args.dtype)
    dev = getattr(args, "device", None)
    if dev == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    elif dev is not None:
        try:
            d = torch.device(dev)
        except RuntimeError:
            raise ToolError(f"unknown device {dev!r}; expected cpu, cuda or cuda:N") from None
        if d.type == "cuda" and not torch.cuda.is_available():
            raise ToolError("--device cuda: CUDA is not available on this machine")
        if d.type not in ("cpu", "cuda"):
            raise ToolError(f"unsupported device {dev!r}; expected cpu, cuda or cuda:N")
    if args.command != "demo":
        check_model_spec(args.model)
    if args.command in ("calibrate", "bench", "inspect", "demo"):
        from toprovar_fx import zoo
        from toprovar_fx.tools.calibrate import SAMPLING_FLAGS, check_sampling

        check_sampling(args.cfg, args.top_p, args.top_k)
        given = any(v is not None for v in (args.cfg, args.top_p, args.top_k))
        if given and args.model not in zoo.list_models():
            raise ToolError(f"{SAMPLING_FLAGS} apply to zoo models; {args.model!r} samples as its factory's "
                            "sampler_call does (set cfg / top_p / top_k there)")
    if args.command == "calibrate":
        args.prompt_list = read_prompts(args.prompts) if args.prompts else None
        _check_conditioning(args.model, args.classes, args.prompts)
        if args.tau is not None and not 0.0 <= args.tau <= 1.0:
            raise ToolError(f"--tau must be in [0, 1], got {args.tau}")
        if not args.out.endswith((".yaml", ".yml")):
            raise ToolError(f"--out must end with .yaml or .yml, got {args.out!r}")
        if args.base is not None:
            load_policy(args.base)
    if args.command == "demo" and args.policy is None:
        args.policy = args.model  # every demo model ships a policy of its own name
    if args.command in ("plan", "inspect", "demo"):
        args.policy_obj = load_policy_arg(args.policy, getattr(args, "preset", None))
    if args.command == "plan" and args.calibration is not None:
        from toprovar_fx.tools.plan import load_calibration

        args.calibration_data = load_calibration(args.calibration)
    if args.command == "bench":
        from toprovar_fx.tools.bench import parse_variants

        args.variants = parse_variants(args.policies)


def _check_conditioning(model: str, classes: int | None, prompts: str | None) -> None:
    """Class labels for class-conditional zoo models, prompts for text ones (before building weights)."""
    from toprovar_fx import zoo
    from toprovar_fx.tools.models import ToolError

    if model not in zoo.list_models():
        return  # a factory's conditioning is known once it is built
    text = zoo.model_card(model)["family"] == "infinity"
    if text and classes is not None:
        raise ToolError(f"{model} is text-conditional: use --prompts FILE (one prompt per line)")
    if not text and prompts is not None:
        raise ToolError(f"{model} is class-conditional: use --classes N, not --prompts")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``toprovar`` console script; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    from toprovar_fx.policies import PolicyError
    from toprovar_fx.tools.models import ToolError

    try:
        _validate(args)
        return int(args.handler(args) or 0)
    except (ToolError, PolicyError) as e:
        args._parser.error(str(e))


# ------------------------------------------------------------------------------------------------
# commands (print only here)
# ------------------------------------------------------------------------------------------------


def _calibrate(args: argparse.Namespace) -> int:
    from toprovar_fx.tools import calibrate_policy

    r = calibrate_policy(args.model, classes=args.classes, prompts=args.prompt_list, out=args.out, base=args.base,
                         name=args.name, tau=args.tau, resolution=args.resolution, seed=args.seed,
                         device=args.device, dtype=args.torch_dtype, cfg=args.cfg, top_p=args.top_p,
                         top_k=args.top_k, show_progress=not args.quiet)
    d = r.data
    from toprovar_fx.tools.calibrate import describe_sampling

    print(f"calibrated {d['model']} on {len(d['items'])} items (schedule {d['schedule']}), base {d['base_policy']}")
    print(f"sampling: {describe_sampling(d.get('sampling'))}")
    print(f"tau {d['tau']:g}: {d['tau_rule']}")
    starts = [None if s is None else s + 1 for s in d["start_scale"]]
    print(f"start scale D (1-based) per item: {starts}")
    rep = d["representative_scale"]
    print(f"layer classes at scale {rep + 1}: detail {list(r.policy.layer.frozen['detail'])}, "
          f"global {list(r.policy.layer.frozen['global'])}")
    for n in r.notes:
        print(f"note: {n}")
    for what, path in r.paths.items():
        print(f"wrote {path} ({what})")
    return 0


def _plan(args: argparse.Namespace) -> int:
    from toprovar_fx.tools import make_plan

    plan = make_plan(args.model, args.policy_obj, resolution=args.resolution, batch=args.batch,
                     dtype=args.torch_dtype, calibration=getattr(args, "calibration_data", None))
    if args.calibration:
        plan.source = f"calibration {args.calibration}"
    print(plan.to_text())
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(plan.to_dict(), indent=1), encoding="utf-8")
        print(f"wrote {args.json}")
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from toprovar_fx.tools import inspect_policy
    from toprovar_fx.tools.models import parse_condition

    r = inspect_policy(args.model, args.policy_obj, args.out, condition=parse_condition(args.condition),
                       seed=args.seed, resolution=args.resolution, device=args.device, dtype=args.torch_dtype,
                       dense=not args.no_dense, dynamic=args.dynamic or None, show_progress=not args.quiet,
                       cfg=args.cfg, top_p=args.top_p, top_k=args.top_k)
    rep = r.report
    d = rep["start_scale"]
    line = (f"{rep['model']} with {rep['policy']}: executed/dense FLOPs {rep['flop_ratio']:.3f}, "
            f"pruning from scale {'never' if d is None else d + 1}")
    if r.fidelity:
        p = r.fidelity["psnr_db"]
        line += f", vs dense PSNR {'identical' if p is None else f'{p:.2f} dB'} SSIM {r.fidelity['ssim']:.4f}"
    print(line)
    for what, path in r.files.items():
        print(f"wrote {path} ({what})")
    return 0


def _bench(args: argparse.Namespace) -> int:
    from toprovar_fx.tools import bench_policies
    from toprovar_fx.tools.models import parse_condition

    r = bench_policies(args.model, args.variants, runs=args.runs, warmup=args.warmup, batches=args.batch,
                       condition=parse_condition(args.condition), seed=args.seed, resolution=args.resolution,
                       device=args.device, dtype=args.torch_dtype, out=args.out, kv_probe=not args.no_kv_probe,
                       dynamic=args.dynamic or None, cfg=args.cfg, top_p=args.top_p, top_k=args.top_k,
                       show_progress=not args.quiet)
    print(r.to_markdown(), end="")
    if args.out:
        print(f"wrote {Path(args.out) / 'bench.md'} and {Path(args.out) / 'bench.json'}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    import torch

    import toprovar_fx
    from toprovar_fx.metrics import psnr, ssim, token_agreement
    from toprovar_fx.runtime.session import last_session
    from toprovar_fx.tools.bench import _Timer
    from toprovar_fx.tools.calibrate import apply_sampling, describe_sampling
    from toprovar_fx.tools.inspect import overlay_panels
    from toprovar_fx.tools.models import load_model
    from toprovar_fx.tools.progress import progress

    torch.manual_seed(0)
    adapter = load_model(args.model, device=args.device, seed=0)
    sampling = apply_sampling(adapter, cfg=args.cfg, top_p=args.top_p, top_k=args.top_k)
    labels = adapter.prepare([args.label])
    timer = _Timer(torch.device(args.device))

    def run(fn: Any) -> Any:
        return adapter.generate(fn, labels, args.seed)

    fast = torch.compile(adapter.sampler, backend="toprovar", options={"policy": args.policy_obj.to_dict()})
    dense_t, fast_t = [], []
    with progress(1 + args.runs, "demo", not args.quiet) as bar:
        bar.set_note("first call (compiles every scale)")
        compile_s, _ = timer.time(run, fast)
        bar.update()
        for i in range(args.runs):  # interleaved, so both see the same machine state
            bar.set_note(f"run {i + 1}/{args.runs}")
            t, gd = timer.time(run, adapter.sampler)
            dense_t.append(t)
            t, gf = timer.time(run, fast)
            fast_t.append(t)
            bar.update()
    img_d, logits_d, img_f, logits_f = gd.images, gd.logits, gf.images, gf.logits
    rep = toprovar_fx.last_generation()
    sess = last_session()
    med_d, med_f = statistics.median(dense_t), statistics.median(fast_t)
    where = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    weights = "trained checkpoint" if adapter.extra.get("pretrained") else "random weights"
    print(f"model {args.model} ({weights}), policy {args.policy}, batch 1 (CFG: transformer batch {rep.rows}), "
          f"torch {torch.__version__}, {where}")
    print(f"sampling: {describe_sampling(sampling)}")
    print(f"dense eager   median {1e3 * med_d:8.1f} ms over {args.runs} runs")
    print(f"toprovar      median {1e3 * med_f:8.1f} ms  (first call incl. compile {compile_s:.1f} s)")
    print(f"speedup {med_d / med_f:.2f}x   executed/dense FLOPs {rep.flop_ratio:.3f}   "
          f"pruning from scale {'never' if rep.start_scale is None else rep.start_scale + 1} (1-based)")
    a, b = img_f.float().cpu(), img_d.float().cpu()
    print(f"fidelity vs dense: PSNR {psnr(a, b):.2f} dB, SSIM {ssim(a, b):.4f}, "
          f"last-scale token agreement {token_agreement(logits_f[-1].cpu(), logits_d[-1].cpu()):.3f}")
    for s in rep.scales[-3:]:
        kept = [layer.kept_tokens if layer.kept_tokens is not None else s.tokens for layer in s.layers]
        print(f"  scale {s.index + 1:2d} {s.h}x{s.w}: kept tokens per layer {kept}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    from PIL import Image

    pair = torch.cat([img_d[0], img_f[0]], dim=2).float().clamp(0, 1).mul(255).byte().permute(1, 2, 0).cpu().numpy()
    Image.fromarray(pair).save(out)
    print(f"wrote {out} (left: dense, right: toprovar)")
    from toprovar_fx.tools.pictures import save_token_overlay

    kept_idx = {k: v.detach().cpu() for k, v in sess.gen.kept_idx.items()} if sess and sess.gen else {}
    panels = overlay_panels(rep, kept_idx) or [{"keep": None, "h": 1, "w": 1, "title": "nothing was pruned"}]
    overlay_path = out.with_name(out.stem + "_overlay.png")
    save_token_overlay(img_f[0], panels, overlay_path, title=f"pruned tokens: {args.model}, policy {args.policy}")
    print(f"wrote {overlay_path} (kept tokens in colour, pruned in grey)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
