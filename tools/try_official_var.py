"""Try the ``toprovar`` backend on the unmodified official FoundationVision/VAR code.

    python tools/try_official_var.py --var-path /tmp/official_var [--depths 4 8] [--json out.json]

``--var-path`` is an exported tree of github.com/FoundationVision/VAR (never vendored here).
Their ``models`` package is imported from it; nothing of theirs is edited. Random weights, CPU,
float32. Only parameters are changed after ``build_vae_var`` (see ``reinit``), so that attention
matters and the VQVAE decoder does not run on uninitialised memory.

Runs ``var.autoregressive_infer_cfg`` eagerly and under ``torch.compile(..., backend="toprovar")``
in observe mode, with a pruning policy derived from ``var-d16`` and with ``var-d16-keepall``, and
prints image and per-scale logit differences (logits captured by a forward hook on ``var.head``)
and the ``toprovar_fx.last_generation()`` report.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import traceback
from typing import Any

import torch
import torch.nn as nn
from official_report import summarise  # tools/official_report.py (this folder is on sys.path)

PATCH_NUMS = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)


def reinit(vae: nn.Module, var: nn.Module, seed: int) -> dict[str, str]:
    """Re-initialise parameters (no source edits) so that attention and every block matter."""
    g = torch.Generator().manual_seed(seed)
    C = var.C
    with torch.no_grad():
        # build_vae_var disables reset_parameters of Conv/Linear/Norm classes and VAR.init_weights
        # only covers the VAR: the VQVAE convs hold uninitialised memory.
        for m in vae.modules():
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
                fan_in = m.weight[0].numel()
                m.weight.normal_(0.0, 1.0 / math.sqrt(fan_in), generator=g)
                if m.bias is not None:
                    m.bias.zero_()
            elif isinstance(m, (nn.GroupNorm, nn.LayerNorm, nn.BatchNorm2d)) and m.weight is not None:
                m.weight.fill_(1.0)
                m.bias.zero_()
        for b in var.blocks:
            lin = b.ada_lin[-1]  # rows: gamma1, gamma2, scale1, scale2, shift1, shift2
            lin.weight.normal_(0.0, 0.02, generator=g)
            lin.bias.zero_()
            lin.bias[: 2 * C].fill_(1.0)  # residual gains gamma1 = gamma2 ~ 1 (their init: 1e-5)
            b.attn.scale_mul_1H11.fill_(math.log(20.0))  # l2-norm attention temperature 20 (theirs: 4)
        var.head_nm.ada_lin[-1].weight.normal_(0.0, 0.02, generator=g)
        var.head.weight.normal_(0.0, 2.0 / math.sqrt(C), generator=g)  # theirs: 0.02 * init_std
    return {
        "vqvae convs": "N(0, 1/fan_in), bias 0; norms weight 1 bias 0 (were uninitialised memory)",
        "blocks[*].ada_lin[-1]": "weight N(0, 0.02); bias 1 for gamma1/gamma2 rows, 0 elsewhere",
        "blocks[*].attn.scale_mul_1H11": "log(20) (l2-normalised q.k scaled by 20 instead of 4)",
        "head_nm.ada_lin[-1].weight": "N(0, 0.02)",
        "head.weight": "N(0, 2/sqrt(C))",
    }


def attention_path(models_mod: Any, var: nn.Module) -> dict[str, Any]:
    bv = sys.modules["models.basic_var"]
    a = var.blocks[0].attn
    return {
        "flash_attn_func": bv.flash_attn_func is not None,
        "xformers memory_efficient_attention": bv.memory_efficient_attention is not None,
        "fused_mlp_func": bv.fused_mlp_func is not None,
        "dropout_add_layer_norm": bv.dropout_add_layer_norm is not None,
        "slow_attn is F.scaled_dot_product_attention":
            bv.slow_attn is torch.nn.functional.scaled_dot_product_attention,
        "blocks[0].attn.using_flash": a.using_flash,
        "blocks[0].attn.using_xform": a.using_xform,
        "attn_l2_norm": a.attn_l2_norm,
    }


class HeadTap:
    """Forward hook on ``var.head``: records the CFG-guided logits of every scale."""

    def __init__(self, var: nn.Module, B: int, cfg: float):
        self.B, self.cfg, self.n = B, cfg, len(var.patch_nums)
        self.raw: list[torch.Tensor] = []
        self.handle = var.head.register_forward_hook(self._hook)

    def _hook(self, mod: nn.Module, inp: Any, out: torch.Tensor) -> None:
        self.raw.append(out.detach().clone())

    def guided(self) -> list[torch.Tensor]:
        out = []
        for si, lg in enumerate(self.raw):
            t = self.cfg * si / (self.n - 1)
            out.append((1 + t) * lg[: self.B] - t * lg[self.B:])
        return out


def run_once(fn: Any, var: nn.Module, kw: dict[str, Any]) -> tuple[torch.Tensor, list[torch.Tensor], float]:
    tap = HeadTap(var, kw["B"], kw["cfg"])
    t0 = time.perf_counter()
    try:
        img = fn(**kw)
    finally:
        tap.handle.remove()
    return img, tap.guided(), time.perf_counter() - t0


def diffs(ref: tuple[torch.Tensor, list[torch.Tensor]], got: tuple[torch.Tensor, list[torch.Tensor]]) -> dict:
    img_r, lg_r = ref
    img_g, lg_g = got
    per_scale = []
    for a, b in zip(lg_r, lg_g):
        per_scale.append(float((a - b).abs().max()) if a.shape == b.shape else f"shape {tuple(b.shape)}")
    return {
        "image_max_abs": float((img_r - img_g).abs().max()),
        "logits_max_abs_per_scale": per_scale,
        "logit_calls": [len(lg_r), len(lg_g)],
        "image_finite": bool(torch.isfinite(img_g).all()),
    }


def compiled_run(var: nn.Module, options: dict[str, Any], kw: dict[str, Any], calls: int) -> dict[str, Any]:
    import toprovar_fx

    torch._dynamo.reset()
    fn = torch.compile(var.autoregressive_infer_cfg, backend="toprovar", options=options)
    out: dict[str, Any] = {"calls": []}
    try:
        for i in range(calls):
            img, lg, sec = run_once(fn, var, kw)
            out["calls"].append({"seconds": round(sec, 2), "report": summarise(toprovar_fx.last_generation())})
            if i == 0:
                out["result"] = (img, lg)
    except Exception as err:  # noqa: BLE001 - report, do not hide
        out["error"] = f"{type(err).__name__}: {err}"
        out["traceback"] = traceback.format_exc()
    return out


_FLASH_SHIM = """# stand-in written by tools/try_official_var.py: flash-attn is not installed (CPU)
def flash_attn_func(*args, **kwargs):
    raise NotImplementedError("flash_attn shim: flash_attn_func")


def flash_attn_varlen_kvpacked_func(*args, **kwargs):
    raise NotImplementedError("flash_attn shim: flash_attn_varlen_kvpacked_func")
"""


def try_infinity(path: str) -> dict[str, Any]:
    """Import ``infinity.models.infinity`` from an exported FoundationVision/Infinity tree, with a
    stand-in ``flash_attn`` module (in a temp dir) on ``sys.path``; report what breaks."""
    import importlib
    import os
    import tempfile

    shim = tempfile.mkdtemp(prefix="flash_attn_shim_")
    os.makedirs(os.path.join(shim, "flash_attn"))
    with open(os.path.join(shim, "flash_attn", "__init__.py"), "w") as f:
        f.write(_FLASH_SHIM)
    sys.path[:0] = [path, shim]
    out: dict[str, Any] = {}
    for mod in ("infinity.models.basic", "infinity.models.infinity"):
        try:
            importlib.import_module(mod)
            out[mod] = "ok"
        except Exception as err:  # noqa: BLE001 - the failure is the result
            out[mod] = f"{type(err).__name__}: {err}"
            out[mod + " traceback"] = traceback.format_exc(limit=-4)
            break
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--var-path", required=True, help="exported FoundationVision/VAR tree")
    ap.add_argument("--depths", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--only", nargs="+", default=None, help="run only these compiled variants")
    ap.add_argument("--label", type=int, default=207)
    ap.add_argument("--top-k", type=int, default=900)
    ap.add_argument("--top-p", type=float, default=0.96)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--infinity-path", default=None,
                    help="exported FoundationVision/Infinity tree: only try importing it, then stop")
    args = ap.parse_args()

    if args.infinity_path:
        res = try_infinity(args.infinity_path)
        print(json.dumps(res, indent=1))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(res, f, indent=1)
        return

    sys.path.insert(0, args.var_path)  # their code imports `models` and `dist` as top-level modules
    import models  # noqa: PLC0415 - their package, only importable after the path insertion

    from toprovar_fx.policies import load_policy

    torch.manual_seed(args.seed)
    results: dict[str, Any] = {"torch": torch.__version__, "var_path": args.var_path, "depths": {}}
    for depth in args.depths:
        print(f"\n===== official VAR depth {depth} =====", flush=True)
        vae, var = models.build_vae_var(device="cpu", patch_nums=PATCH_NUMS, depth=depth)
        vae.eval()
        var.eval()
        res: dict[str, Any] = {"width": var.C, "heads": var.num_heads, "reinit": reinit(vae, var, args.seed),
                               "attention_path": attention_path(models, var)}
        print("attention path:", json.dumps(res["attention_path"]), flush=True)
        kw = dict(B=1, label_B=args.label, cfg=1.5, top_k=args.top_k, top_p=args.top_p, g_seed=0, more_smooth=False)

        img, lg, sec = run_once(var.autoregressive_infer_cfg, var, kw)
        ref = (img, lg)
        res["eager"] = {"seconds": round(sec, 2), "image_shape": list(img.shape),
                        "image_finite": bool(torch.isfinite(img).all())}
        img2, lg2, _ = run_once(var.autoregressive_infer_cfg, var, kw)
        res["eager_repeat"] = diffs(ref, (img2, lg2))
        print("eager:", res["eager"], "repeat:", res["eager_repeat"]["image_max_abs"], flush=True)

        fp = {"family": "var", "depth": depth, "width": var.C, "heads": var.num_heads, "num_scales": len(PATCH_NUMS)}
        prune = load_policy("var-d16").to_dict()
        prune.update(name=f"official-var-d{depth}", model=fp)
        # same policy, layer stage off: every layer after measure_layer counts as Detail, so token
        # pruning acts wherever the scale stage activates (random weights give few Detail layers)
        forced = load_policy("var-d16").to_dict()
        forced.update(name=f"official-var-d{depth}-all-detail", model=fp)
        forced["layer"]["mode"] = "off"
        keepall = load_policy("var-d16-keepall").to_dict()
        keepall.update(name=f"official-var-d{depth}-keepall", model=fp)
        runs = {
            "observe": ({"mode": "observe"}, 2),
            "prune_var-d16": ({"policy": prune}, 2),
            "prune_var-d16_layer-off": ({"policy": forced}, 1),
            "keepall": ({"policy": keepall}, 1),
        }
        for name, (options, calls) in runs.items():
            if args.only and name not in args.only:
                continue
            print(f"--- {name}", flush=True)
            out = compiled_run(var, options, kw, calls)
            if "result" in out:
                out["vs_eager"] = diffs(ref, out.pop("result"))
            print(json.dumps(out, indent=1, default=str), flush=True)
            res[name] = out
        results["depths"][depth] = res
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1, default=str)


if __name__ == "__main__":
    main()
