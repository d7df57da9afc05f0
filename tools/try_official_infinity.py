"""Try the ``toprovar`` backend on the unmodified official FoundationVision/Infinity code.

    python tools/try_official_infinity.py --infinity-path /tmp/official_infinity \
        [--depth 8 --width 512 --heads 8] [--only observe prune keepall] [--json out.json]

``--infinity-path`` is an exported tree of github.com/FoundationVision/Infinity (never vendored
here); its ``infinity`` package is imported from it and nothing of theirs is edited. Random
weights, CPU, float32 (their cross-attention casts to bfloat16 itself).

Packages their import chain needs that are not installed here are replaced by in-process modules
(``sys.modules`` entries made by this script, nothing written to disk):

* ``timm`` (``infinity/models/__init__.py``, ``basic.py``, ``infinity.py``): ``timm.loss.
  SoftTargetCrossEntropy``, ``timm.models.layers.DropPath`` / ``drop_path`` / ``trunc_normal_``,
  ``timm.models.register_model``, written here for inference (``DropPath`` is the identity and
  refuses training). timm itself pulls torchvision, whose wheels pin another torch.
* ``flash_attn`` (``basic.py``): ``flash_attn_varlen_kvpacked_func``, their cross-attention's only
  kernel, implemented with ``F.scaled_dot_product_attention`` on a padded batch with a key-padding
  mask (checked against a per-sequence loop at start-up); ``flash_attn_func`` raises (it is only
  called with ``customized_flash_attn=True``, which their constructor turns off when the kernel is
  not their customised build). No ``flash_attn.ops``: their fused-op import falls back.

Their BSQ VAE (``bsq_vae/flux_vqgan.py``) imports torchvision, imageio and safetensors and is not
built. ``TinyVAE`` stands in: their own ``MultiScaleBSQ`` quantizer (the sampler calls
``vae.quantizer.lfq.indices_to_codes`` and reads ``z_interplote_up``; the model reads
``quantizer.lfq.mask``) and a fixed random 1x1 conv + x16 upsampling as ``decode``, which records
its input (the summed codes), so eager and compiled runs can be compared exactly.

The model is built as ``tools/run_infinity.py::load_infinity`` builds it (``shared_aln=True``,
``fused_norm=True``, ``pad_to_multiplier=128``, ``rope2d_each_sa_layer=1``,
``rope2d_normalized_by_hw=2``, ``add_lvl_embeding_only_first_block=1``, ``use_bit_label=1``,
``inference_mode=True``, ``use_flex_attn=False``, ``customized_flash_attn=False``), small.
Only parameters are changed after construction (see ``reinit``).

Runs ``infinity.autoregressive_infer_cfg`` eagerly and under ``torch.compile(..., backend=
"toprovar")`` in observe mode, with a pruning policy derived from ``infinity-tiny`` and with
``infinity-tiny-keepall``; prints per-scale logit differences (forward hook on ``infinity.head``),
summed-code / image differences, the ``toprovar_fx.last_generation()`` report, Dynamo's graph-break
counters and one line per graph the backend was handed (recorded by wrapping
``toprovar_fx.backend.compile_graph``, which is called unchanged).
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import re
import sys
import time
import traceback
import types
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from official_report import summarise  # tools/official_report.py (this folder is on sys.path)

# Infinity's dynamic_resolution_h_w[1.0]["0.06M"] (= the first 7 scales of the 1M 1:1 row), as
# tools/run_infinity.py uses it: (1, h, w).
SCHEDULE_KEY = "256:1:1"


# --------------------------------------------------------------------------------------------
# timm stand-in: the names their import chain needs, written here for inference only
# --------------------------------------------------------------------------------------------
class SoftTargetCrossEntropy(nn.Module):
    """Cross-entropy against soft targets (imported by their training code, unused here)."""

    def forward(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return -(target * x.log_softmax(-1)).sum(-1).mean()


def drop_path(x: torch.Tensor, drop_prob: float = 0.0, training: bool = False,
              scale_by_keep: bool = True) -> torch.Tensor:
    """Stochastic depth: the identity at inference, the only mode this script runs."""
    if training and drop_prob > 0.0:
        raise NotImplementedError("timm stand-in (tools/try_official_infinity.py): drop_path runs at inference only")
    return x


class DropPath(nn.Module):
    def __init__(self, drop_prob: float = 0.0, scale_by_keep: bool = True):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return drop_path(x, self.drop_prob, self.training)


def trunc_normal_(tensor: torch.Tensor, mean: float = 0.0, std: float = 1.0, a: float = -2.0,
                  b: float = 2.0) -> torch.Tensor:
    return nn.init.trunc_normal_(tensor, mean=mean, std=std, a=a, b=b)


_MODEL_REGISTRY: dict[str, Any] = {}


def register_model(fn: Any) -> Any:
    _MODEL_REGISTRY[fn.__name__] = fn
    return fn


# --------------------------------------------------------------------------------------------
# flash_attn stand-in
# --------------------------------------------------------------------------------------------
def flash_attn_func(*args: Any, **kwargs: Any) -> torch.Tensor:
    raise NotImplementedError("flash_attn stand-in (tools/try_official_infinity.py): flash_attn_func")


def flash_attn_varlen_kvpacked_func(q: torch.Tensor, kv: torch.Tensor, cu_seqlens_q: torch.Tensor,
                                    cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int,
                                    dropout_p: float = 0.0, softmax_scale: float | None = None,
                                    causal: bool = False, window_size: tuple[int, int] = (-1, -1),
                                    softcap: float = 0.0, alibi_slopes: Any = None,
                                    deterministic: bool = False, return_attn_probs: bool = False,
                                    block_table: Any = None) -> torch.Tensor:
    """flash-attn 2's varlen kv-packed attention: q ``[Nq, H, D]``, kv ``[Nk, 2, Hk, D]``, sequence
    ``b`` is ``q[cu_q[b]:cu_q[b+1]]`` against ``kv[cu_k[b]:cu_k[b+1]]``; returns ``[Nq, H, D]``.

    SDPA on a padded batch ``[nb, H, max_seqlen, D]`` with a key-padding mask; no host sync (the
    packing indices are computed on the device), so Dynamo can trace it."""
    if dropout_p != 0.0 or causal or window_size != (-1, -1) or softcap != 0.0 or alibi_slopes is not None \
            or return_attn_probs or block_table is not None:
        raise NotImplementedError("flash_attn stand-in: only dropout_p=0, non-causal, no window/softcap/alibi")
    nq, nk = q.shape[0], kv.shape[0]
    hq, hk = q.shape[1], kv.shape[2]
    dev = q.device
    cq = cu_seqlens_q.to(device=dev, dtype=torch.long)
    ck = cu_seqlens_k.to(device=dev, dtype=torch.long)
    jq = torch.arange(max_seqlen_q, device=dev)
    jk = torch.arange(max_seqlen_k, device=dev)
    kidx = (ck[:-1, None] + jk).clamp(max=nk - 1)              # [nb, Lk]
    kvalid = jk < (ck[1:] - ck[:-1])[:, None]                   # [nb, Lk]
    qidx = (cq[:-1, None] + jq).clamp(max=nq - 1)               # [nb, Lq]
    kvp = kv[kidx]                                              # [nb, Lk, 2, Hk, D]
    k = kvp[:, :, 0].transpose(1, 2)
    v = kvp[:, :, 1].transpose(1, 2)
    qp = q[qidx].transpose(1, 2)                                # [nb, H, Lq, D]
    out = F.scaled_dot_product_attention(qp, k, v, attn_mask=kvalid[:, None, None, :], dropout_p=0.0,
                                         scale=softmax_scale, enable_gqa=hq != hk)
    out = out.transpose(1, 2)                                   # [nb, Lq, H, D]
    n = torch.arange(nq, device=dev)
    b = torch.searchsorted(cq[1:].contiguous(), n, right=True)  # sequence of each packed query
    return out[b, n - cq[b]]                                    # [Nq, H, D]


def _check_varlen(seed: int) -> float:
    """Max abs difference of the stand-in against a per-sequence SDPA loop (fp32 and GQA)."""
    g = torch.Generator().manual_seed(seed)
    worst = 0.0
    for lq, lk, hq, hk in (([3, 1, 4], [5, 2, 7], 4, 4), ([1, 1], [6, 3], 4, 2)):
        cq = torch.tensor([0] + lq).cumsum(0).to(torch.int32)
        ck = torch.tensor([0] + lk).cumsum(0).to(torch.int32)
        q = torch.randn(sum(lq), hq, 16, generator=g)
        kv = torch.randn(sum(lk), 2, hk, 16, generator=g)
        got = flash_attn_varlen_kvpacked_func(q, kv, cq, ck, max(lq), max(lk), softmax_scale=0.3)
        for i in range(len(lq)):
            qi = q[cq[i]:cq[i + 1]].transpose(0, 1)[None]
            ki = kv[ck[i]:ck[i + 1], 0].transpose(0, 1)[None].repeat_interleave(hq // hk, 1)
            vi = kv[ck[i]:ck[i + 1], 1].transpose(0, 1)[None].repeat_interleave(hq // hk, 1)
            ref = F.scaled_dot_product_attention(qi, ki, vi, scale=0.3)[0].transpose(0, 1)
            worst = max(worst, float((got[cq[i]:cq[i + 1]] - ref).abs().max()))
    return worst


def install_stand_ins() -> dict[str, str]:
    def module(name: str, **attrs: Any) -> types.ModuleType:
        m = types.ModuleType(name)
        m.__dict__.update(attrs)
        m.__file__ = __file__
        sys.modules[name] = m
        return m

    for name in ("timm", "flash_attn"):
        try:
            __import__(name)
            raise RuntimeError(f"{name} is installed: remove the stand-in or the installed package")
        except ImportError:
            pass
    layers = module("timm.models.layers", DropPath=DropPath, drop_path=drop_path, trunc_normal_=trunc_normal_)
    models = module("timm.models", register_model=register_model, layers=layers)
    loss = module("timm.loss", SoftTargetCrossEntropy=SoftTargetCrossEntropy)
    module("timm", models=models, loss=loss)
    module("flash_attn", flash_attn_func=flash_attn_func,
           flash_attn_varlen_kvpacked_func=flash_attn_varlen_kvpacked_func)
    return {
        "timm": "in-process: loss.SoftTargetCrossEntropy, models.layers.DropPath/drop_path/trunc_normal_, "
                "models.register_model",
        "flash_attn": "in-process: flash_attn_varlen_kvpacked_func = SDPA on padded batch + key-padding mask; "
                      "flash_attn_func raises; no flash_attn.ops (their fused ops fall back)",
    }


# --------------------------------------------------------------------------------------------
# model, VAE stand-in, text condition
# --------------------------------------------------------------------------------------------
class TinyVAE(nn.Module):
    """Stand-in for their BSQ VAE: their MultiScaleBSQ quantizer, a 1x1 conv + x16 upsampling decoder."""

    def __init__(self, codebook_dim: int, seed: int, numpy_scale: bool = False):
        super().__init__()
        from infinity.models.bsq_vae.multiscale_bsq import MultiScaleBSQ  # their quantizer

        self.embed_dim = self.codebook_dim = codebook_dim
        self.vocab_size = 2 ** codebook_dim
        # as flux_vqgan.AutoEncoder builds it for vae_model(..., schedule_mode="dynamic") (new_quant=True)
        self.quantizer = MultiScaleBSQ(dim=codebook_dim, codebook_size=2 ** codebook_dim, new_quant=True,
                                       schedule_mode="dynamic")
        # Their BSQ.codebook_scale is a numpy float64 (1/np.sqrt(d)). Eager `LongTensor * np.float64`
        # is float32; under Dynamo (torch 2.13) it is float64, and the sampler then fails in
        # word_embed ("mat1 and mat2 must have the same dtype, but got Double and Float"). A Dynamo
        # bug, not theirs nor toprovar's: the stand-in holds the same value as a Python float.
        self.numpy_codebook_scale = type(self.quantizer.lfq.codebook_scale).__name__
        if not numpy_scale:
            self.quantizer.lfq.codebook_scale = float(self.quantizer.lfq.codebook_scale)
        self.proj = nn.Conv2d(codebook_dim, 3, 1)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            self.proj.weight.normal_(0.0, 2.0, generator=g)
            self.proj.bias.zero_()
        self.decoded: list[torch.Tensor] = []

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        self.decoded.append(z.detach().clone())
        return F.interpolate(self.proj(z).tanh(), scale_factor=16, mode="nearest")


def build(args: argparse.Namespace) -> tuple[nn.Module, TinyVAE, list[tuple[int, int, int]]]:
    from infinity.models.infinity import Infinity
    from infinity.utils.dynamic_resolution import dynamic_resolution_h_w

    vae = TinyVAE(args.codebook_dim, args.seed, numpy_scale=args.numpy_codebook_scale)
    torch.manual_seed(args.seed)
    model = Infinity(
        vae_local=vae, text_channels=args.text_channels, text_maxlen=512,
        shared_aln=True, raw_scale_schedule=None, checkpointing="full-block",
        customized_flash_attn=False, fused_norm=bool(args.fused_norm), pad_to_multiplier=128,
        use_flex_attn=False, add_lvl_embeding_only_first_block=1, use_bit_label=1,
        rope2d_each_sa_layer=1, rope2d_normalized_by_hw=2, pn="0.06M", apply_spatial_patchify=0,
        inference_mode=True, train_h_div_w_list=[1.0],
        depth=args.depth, embed_dim=args.width, num_heads=args.heads, drop_path_rate=0.1, mlp_ratio=4,
        block_chunks=args.block_chunks,
    )
    model.eval()
    model.requires_grad_(False)
    vae.eval()
    schedule = [(1, h, w) for (_, h, w) in dynamic_resolution_h_w[1.0]["0.06M"]["scales"]]
    return model, vae, schedule


def reinit(model: nn.Module, seed: int) -> dict[str, str]:
    """Re-initialise parameters (no source edits) so that attention and every block matter."""
    g = torch.Generator().manual_seed(seed)
    C = model.C
    with torch.no_grad():
        model.shared_ada_lin[-1].weight.normal_(0.0, 0.02, generator=g)
        model.shared_ada_lin[-1].bias.zero_()
        for b in model.unregistered_blocks:
            b.ada_gss[:, :, :2].fill_(1.0)                              # gamma1, gamma2
            b.ada_gss[:, :, 2:].normal_(0.0, 0.02, generator=g)         # scale1/2, shift1/2
            b.sa.scale_mul_1H11.fill_(math.log(20.0))
        model.head_nm.ada_lin[-1].weight.normal_(0.0, 0.02, generator=g)
        model.head.weight.normal_(0.0, 2.0 / math.sqrt(C), generator=g)
    return {
        "shared_ada_lin[-1]": "weight N(0, 0.02), bias 0 (constructor: nn.Linear default)",
        "blocks[*].ada_gss": "gamma1/gamma2 rows 1, scale/shift rows N(0, 0.02) (constructor: randn/sqrt(C))",
        "blocks[*].sa.scale_mul_1H11": "log(20) (cos-attention temperature 20; constructor: 4)",
        "head_nm.ada_lin[-1].weight": "N(0, 0.02)",
        "head.weight": "N(0, 2/sqrt(C)) (constructor: nn.Linear default)",
    }


def text_condition(channels: int, length: int, seed: int) -> tuple[torch.Tensor, list[int], torch.Tensor, int]:
    """(kv_compact, lens, cu_seqlens_k, max_seqlen_k) as tools/run_infinity.py::encode_prompt packs it."""
    g = torch.Generator().manual_seed(seed + 1)
    kv_compact = torch.randn(length, channels, generator=g) * 0.2
    return kv_compact, [length], torch.tensor([0, length], dtype=torch.int32), length


def attention_path(model: nn.Module) -> dict[str, Any]:
    basic = sys.modules["infinity.models.basic"]
    sa = model.unregistered_blocks[0].sa
    return {
        "customized_flash_attn": model.customized_flash_attn,
        "blocks[0].sa.using_flash": sa.using_flash,
        "use_flex_attn": sa.use_flex_attn,
        "slow_attn is F.scaled_dot_product_attention": basic.slow_attn is F.scaled_dot_product_attention,
        "flash_fused_op_installed": basic.flash_fused_op_installed,
        "fused_norm_func": getattr(model.unregistered_blocks[0].fused_norm_func, "__name__",
                                   str(model.unregistered_blocks[0].fused_norm_func)),
        "cos_attn": sa.cos_attn,
    }


# --------------------------------------------------------------------------------------------
# runs
# --------------------------------------------------------------------------------------------
class HeadTap:
    def __init__(self, model: nn.Module):
        self.raw: list[torch.Tensor] = []
        self.handle = model.head.register_forward_hook(lambda m, i, o: self.raw.append(o.detach().clone()))

    def guided(self, B: int, cfg_list: list[float], tau_list: list[float]) -> list[torch.Tensor]:
        # their add_cfg_on_logits path (cfg_insertion_layer=[0]): logits / tau, cfg * cond + (1 - cfg) * uncond
        return [(cfg_list[s] * lg[:B] + (1 - cfg_list[s]) * lg[B:]) / tau_list[s] for s, lg in enumerate(self.raw)]


def run_once(fn: Any, model: nn.Module, vae: TinyVAE, kw: dict[str, Any]) -> dict[str, Any]:
    tap = HeadTap(model)
    vae.decoded.clear()
    t0 = time.perf_counter()
    try:
        _, _, img = fn(**kw)
    finally:
        tap.handle.remove()
    return {"img": img, "codes": vae.decoded[-1] if vae.decoded else None,
            "logits": tap.guided(kw["B"], kw["cfg_list"], kw["tau_list"]), "seconds": time.perf_counter() - t0}


def diffs(ref: dict[str, Any], got: dict[str, Any]) -> dict[str, Any]:
    per_scale = [float((a - b).abs().max()) if a.shape == b.shape else f"shape {tuple(b.shape)}"
                 for a, b in zip(ref["logits"], got["logits"])]
    return {
        "logits_max_abs_per_scale": per_scale,
        "logit_calls": [len(ref["logits"]), len(got["logits"])],
        "summed_codes_max_abs": None if got["codes"] is None else float((ref["codes"] - got["codes"]).abs().max()),
        "image_uint8_max_abs": int((ref["img"].int() - got["img"].int()).abs().max()),
    }


_FRAME = re.compile(r'File "([^"]+)", line (\d+), in (\w+)')


class GraphLog:
    """Wraps ``toprovar_fx.backend.compile_graph`` (called unchanged) to describe each graph
    (records nothing for the ``eager`` control backend)."""

    def __init__(self) -> None:
        import toprovar_fx.backend as backend

        self.backend = backend
        self.orig = backend.compile_graph
        self.graphs: list[dict[str, Any]] = []
        backend.compile_graph = self._wrapped

    def _wrapped(self, gm: Any, example_inputs: list[Any], session: Any) -> Any:
        frames: collections.Counter[str] = collections.Counter()
        sdpa = 0
        for n in gm.graph.nodes:
            if n.op in ("call_function", "call_method", "call_module"):
                st = n.meta.get("stack_trace") or ""
                last = _FRAME.findall(st)
                if last:
                    f, line, fn = last[-1]
                    frames[f"{f.rsplit('/', 1)[-1]}:{fn}"] += 1
                if "scaled_dot_product_attention" in str(n.target):
                    sdpa += 1
        sym = [type(t).__name__ for t in example_inputs if not isinstance(t, torch.Tensor)]
        self.graphs.append({"id": len(self.graphs), "nodes": len(gm.graph.nodes), "sdpa": sdpa,
                            "frames": dict(frames.most_common(4)), "non_tensor_inputs": len(sym)})
        return self.orig(gm, example_inputs, session)

    def restore(self) -> None:
        self.backend.compile_graph = self.orig


def compiled_run(model: nn.Module, vae: TinyVAE, options: dict[str, Any] | None, kw: dict[str, Any],
                 calls: int, backend: str = "toprovar") -> tuple[dict[str, Any], dict[str, Any] | None]:
    from torch._dynamo.utils import counters

    import toprovar_fx

    torch._dynamo.reset()
    counters.clear()
    glog = GraphLog()
    fn = torch.compile(model.autoregressive_infer_cfg, backend=backend, options=options)
    out: dict[str, Any] = {"calls": []}
    first = None
    try:
        for i in range(calls):
            res = run_once(fn, model, vae, kw)
            rep = summarise(toprovar_fx.last_generation()) if backend == "toprovar" else None
            out["calls"].append({"seconds": round(res["seconds"], 2), "report": rep})
            if i == 0:
                first = res
                out["graphs_first_call"] = len(glog.graphs)
    except Exception as err:  # noqa: BLE001 - report, do not hide
        out["error"] = f"{type(err).__name__}: {err}"
        out["traceback"] = traceback.format_exc()
    finally:
        glog.restore()
    out["graph_breaks"] = {k: v for k, v in counters["graph_break"].items()}
    out["graphs"] = glog.graphs
    return out, first


def lengths_run(model: nn.Module, vae: TinyVAE, kw: dict[str, Any], lens: list[int], channels: int, seed: int,
                options: dict[str, Any]) -> dict[str, Any]:
    """One compiled function called with texts of the lengths ``lens`` in turn (Dynamo recompiles once
    with a symbolic text length): per call, the logits against eager with the same text, and the
    session's hoisted-context computations so far."""
    from toprovar_fx.runtime.session import last_session

    torch._dynamo.reset()
    fn = torch.compile(model.autoregressive_infer_cfg, backend="toprovar", options=options)
    out: dict[str, Any] = {"options": options, "calls": []}
    try:
        for n in lens:
            kw_n = {**kw, "label_B_or_BLT": text_condition(channels, n, seed)}
            ref = run_once(model.autoregressive_infer_cfg, model, vae, kw_n)
            got = run_once(fn, model, vae, kw_n)
            session = last_session()
            out["calls"].append({"text_len": n, "vs_eager": diffs(ref, got),
                                 "context_computes": session.context_computes,
                                 # buffers padded to buckets (option context_bucket): 0 where not applied
                                 "context_slots": sum(len(m.slots) for m in session.context_memos.values()),
                                 "fallbacks": session.session_fallbacks + session.gen.fallbacks})
    except Exception as err:  # noqa: BLE001 - report, do not hide
        out["error"] = f"{type(err).__name__}: {err}"
        out["traceback"] = traceback.format_exc()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--infinity-path", required=True, help="exported FoundationVision/Infinity tree")
    ap.add_argument("--depth", type=int, default=8)
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--block-chunks", type=int, default=2, help="their sampler needs > 1")
    ap.add_argument("--codebook-dim", type=int, default=32, help="their vae_type (bit labels: V = 2 * d)")
    ap.add_argument("--text-channels", type=int, default=2048, help="flan-t5-xl width, as their infer.sh")
    ap.add_argument("--text-len", type=int, default=24)
    ap.add_argument("--text-lens", type=int, nargs="+", default=None,
                    help="also run observe mode with texts of these lengths in turn, with the context hoisted "
                    "and not, and padded to buckets of 8 and of 16 tokens (prune mode's default; variants "
                    "observe_lengths, observe_lengths_nohoist, observe_lengths_bucket, observe_lengths_bucket16)")
    ap.add_argument("--fused-norm", type=int, default=1, choices=[0, 1])
    ap.add_argument("--cfg", type=float, default=4.0)
    ap.add_argument("--tau", type=float, default=0.5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--numpy-codebook-scale", action="store_true",
                    help="keep their numpy float64 codebook_scale (reproduces the Dynamo dtype failure)")
    ap.add_argument("--only", nargs="+", default=None, help="run only these compiled variants")
    ap.add_argument("--debug-log", action="store_true", help="toprovar logger at DEBUG (pass summaries)")
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args()

    import logging

    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")
    if args.debug_log:
        logging.getLogger("toprovar").setLevel(logging.DEBUG)

    results: dict[str, Any] = {"torch": torch.__version__, "infinity_path": args.infinity_path,
                               "args": vars(args)}
    results["stand_ins"] = install_stand_ins()
    results["varlen_check_max_abs"] = _check_varlen(args.seed)
    print("varlen stand-in vs per-sequence SDPA:", results["varlen_check_max_abs"], flush=True)
    sys.path.insert(0, args.infinity_path)

    from toprovar_fx.policies import load_policy

    model, vae, schedule = build(args)
    results["reinit"] = reinit(model, args.seed)
    results["attention_path"] = attention_path(model)
    results["schedule"] = schedule
    results["params_M"] = round(sum(p.numel() for p in model.parameters()) / 1e6, 2)
    print("attention path:", json.dumps(results["attention_path"]), flush=True)
    n = len(schedule)
    kw = dict(vae=vae, scale_schedule=schedule, label_B_or_BLT=text_condition(args.text_channels, args.text_len,
                                                                              args.seed),
              B=1, negative_label_B_or_BLT=None, g_seed=0, cfg_list=[args.cfg] * n, tau_list=[args.tau] * n,
              cfg_sc=3, top_k=900, top_p=0.97, returns_vemb=1, cfg_insertion_layer=[0], vae_type=args.codebook_dim,
              ret_img=True, trunk_scale=1000, gt_leak=0, gt_ls_Bl=None, inference_mode=True, sampling_per_bits=1)

    ref = run_once(model.autoregressive_infer_cfg, model, vae, kw)
    rep = run_once(model.autoregressive_infer_cfg, model, vae, kw)
    results["eager"] = {"seconds": round(ref["seconds"], 2), "image_shape": list(ref["img"].shape),
                        "logit_calls": len(ref["logits"]), "repeat": diffs(ref, rep),
                        "repeat_seconds": round(rep["seconds"], 2)}
    print("eager:", json.dumps(results["eager"]), flush=True)

    fp = {"family": "infinity", "depth": args.depth, "width": args.width, "heads": args.heads, "num_scales": n}
    sched = {SCHEDULE_KEY: [[h, w] for (_, h, w) in schedule]}
    prune = load_policy("infinity-tiny").to_dict()
    prune.update(name=f"official-infinity-d{args.depth}", model=fp, schedules=sched)
    forced = load_policy("infinity-tiny").to_dict()
    forced.update(name=f"official-infinity-d{args.depth}-all-detail", model=fp, schedules=sched)
    forced["layer"]["mode"] = "off"
    keepall = load_policy("infinity-tiny-keepall").to_dict()
    keepall.update(name=f"official-infinity-d{args.depth}-keepall", model=fp, schedules=sched)
    runs = {
        # control: Dynamo with its "eager" backend (same graphs and graph breaks, no toprovar)
        "dynamo_eager": (None, 1),
        "observe": ({"mode": "observe"}, 2),
        "prune": ({"policy": prune}, 2),
        "prune_layer-off": ({"policy": forced}, 1),
        "keepall": ({"policy": keepall}, 1),
    }
    for name, (options, calls) in runs.items():
        if args.only and name not in args.only:
            continue
        print(f"--- {name}", flush=True)
        backend = "eager" if name == "dynamo_eager" else "toprovar"
        out, first = compiled_run(model, vae, options, kw, calls, backend)
        if first is not None:
            out["vs_eager"] = diffs(ref, first)
        print(json.dumps(out, indent=1, default=str), flush=True)
        results[name] = out
    for name, extra in (("observe_lengths", {"context_bucket": 0}), ("observe_lengths_nohoist", {"hoist_context": False}),
                        ("observe_lengths_bucket", {"context_bucket": 8}),
                        ("observe_lengths_bucket16", {"context_bucket": 16})):
        if not args.text_lens or (args.only and name not in args.only):
            continue
        print(f"--- {name}", flush=True)
        results[name] = lengths_run(model, vae, kw, args.text_lens, args.text_channels, args.seed,
                                    {"mode": "observe", **extra})
        print(json.dumps(results[name], indent=1, default=str), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1, default=str)


if __name__ == "__main__":
    main()
