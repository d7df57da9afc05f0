#!/usr/bin/env python3
"""Train the reference model ``var-ref``: procedural data -> tokenizer -> VAR-style transformer.

One command, seeded, bounded by a wall-clock budget (``--max-minutes``, counted from process
start); it always saves what it has::

    PYTHONPATH=. python3 tools/train_reference.py --preset h200 --out OUT/ref     # one H200, ~8.5 min
    PYTHONPATH=. python3 tools/train_reference.py --preset micro --out /tmp/ref   # CPU, < 1 min
    # warm start: continue training the transformer of a saved checkpoint, tokenizer frozen
    PYTHONPATH=. python3 tools/train_reference.py --preset h200 --init-from toprovar_fx/zoo/weights/var-ref \
        --tok-steps 0 --out OUT/ref

Phases (each logs with timestamps):

1. data: ``--num-images`` procedural images (``toprovar_fx.data.procedural``, seed ``--seed``,
   indices ``0..N-1``; held-out ``N..N+E-1``) rendered by a process pool, kept as uint8 on the
   device. Rendering stops early at ``--data-max-seconds`` (the data set is then the rendered
   prefix, recorded in ``config.json``).
2. tokenizer (``toprovar_fx.zoo.ref_tokenizer``): encoder + multi-scale residual VQ + the zoo's
   ``MultiScaleVQ`` decoder, L1 + L2 + image-gradient L1 + VQ loss, dead-code restarts.
3. token maps of every training image and their teacher-forcing inputs.
4. transformer (``VARStyle``), VAR's training init, teacher forcing with the block-causal mask
   (``toprovar_fx.zoo.ref_model.teacher_forced_logits``), 10% null-class labels for CFG.
5. save: fp16 safetensors shards + ``config.json`` + index (``ref_model.save_reference``),
   ``metrics.json``, ``loss.png``; then the saved checkpoint is reloaded and generates
   ``samples.png`` (rows: classes). ``data_recon.png`` (written after the tokenizer phase):
   training images, then held-out images with their reconstructions. A run writes exactly
   these 8 files (with a 2-shard checkpoint) and nothing else into ``--out``.

Warm start (``--init-from DIR``, a saved checkpoint directory): the tokenizer and the
transformer start from DIR's weights (strict key/shape check; DIR's config must equal the
preset's, else the run stops naming the field). ``--tok-steps 0`` freezes the tokenizer (no
tokenizer phase: all the time after the data and the token maps goes to the transformer).
Each phase that runs gets a fresh warm-up + cosine schedule (a warm restart) with a peak
learning rate of ``WARM_RESTART_LR_SCALE`` x the preset's unless ``--tf-lr`` / ``--tok-lr``
is given; the optimiser moments start at zero (they are not saved). ``metrics.json`` and
``config.json`` record the lineage (``training.lineage``: every run's steps and budget).

Each training phase runs until ``max(step / steps, elapsed / phase budget) >= 1``; the
learning rate follows that progress (warm-up, cosine), so a slower machine anneals fully in
fewer steps. On a machine fast enough to finish the steps, the run is a pure function of the
seed (up to GPU kernel non-determinism).
"""

from __future__ import annotations

import time

_T0 = time.time()  # the wall-clock budget counts from here (before importing torch)

import argparse  # noqa: E402
import ast  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402
import traceback  # noqa: E402
from collections.abc import Callable  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from toprovar_fx.data import procedural  # noqa: E402
from toprovar_fx.zoo.ref_model import (  # noqa: E402
    block_causal_bias,
    load_into,
    load_reference,
    load_reference_tokenizer,
    read_reference_config,
    save_reference,
    teacher_forced_logits,
    training_init_,
)
from toprovar_fx.zoo.ref_tokenizer import RefTokenizer, TokenizerConfig, count_params, psnr_batch  # noqa: E402
from toprovar_fx.zoo.var import VAR_256_PATCH_NUMS, VARConfig, VARStyle  # noqa: E402

PRESETS: dict[str, dict] = {
    # CPU smoke test: 64 px, 4 scales, tiny everything
    "micro": dict(
        size=64, patch_nums=(1, 2, 3, 4), vocab=64, cvae=8, tok_ch=8, tok_ch_mult=(1, 1, 2, 2, 2),
        enc_ch=8, enc_ch_mult=(1, 2, 2, 2, 2), depth=2, width=64, heads=2, mlp_ratio=4.0,
        num_images=512, eval_images=64, tok_steps=60, tok_batch=32, tok_lr=2e-3, tf_steps=80,
        tf_batch=32, tf_lr=2e-3, max_minutes=1.5, tok_frac=0.4, reserve_s=8.0, eval_every=20,
        restart_every=10, grid_per_class=2, grid_px=64,
    ),
    # one H200, ~8.5 min wall: 256 px, VAR's 10 scales (16x16 last), fp16 checkpoint ~23 MB
    "h200": dict(
        size=256, patch_nums=VAR_256_PATCH_NUMS, vocab=2048, cvae=32, tok_ch=32, tok_ch_mult=(1, 1, 2, 2, 4),
        enc_ch=32, enc_ch_mult=(1, 2, 2, 2, 4), depth=8, width=288, heads=6, mlp_ratio=4.0,
        num_images=49152, eval_images=512, tok_steps=4000, tok_batch=64, tok_lr=6e-4, tf_steps=8000,
        tf_batch=192, tf_lr=8e-4, max_minutes=8.5, tok_frac=0.42, reserve_s=45.0, eval_every=250,
        restart_every=25, grid_per_class=4, grid_px=128,
    ),
}

# Peak learning rate of a warm restart (``--init-from``) relative to the preset's, unless
# ``--tf-lr`` / ``--tok-lr`` is given. Below 1 because the loaded weights already sit in an
# annealed basin and the AdamW moments restart from zero (a full-height re-warm would first
# undo part of the annealing gain); not much below, because the first h200 run stopped far from
# convergence (held-out CE still falling at the end) and the warm start is meant to move on.
WARM_RESTART_LR_SCALE = 0.75
# the at most 8 files a run writes into --out (with a checkpoint of 2 shards)
OUT_PICTURES = ("loss.png", "samples.png", "data_recon.png")


# --------------------------------------------------------------------------- logging / budget
class Clock:
    """Wall-clock budget and timestamped logging."""

    def __init__(self, max_minutes: float) -> None:
        self.deadline = _T0 + 60.0 * max_minutes
        self.stop_requested = False

    @staticmethod
    def now() -> float:
        return time.time() - _T0

    def left(self) -> float:
        return self.deadline - time.time()

    def log(self, msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')} +{self.now():7.1f}s] {msg}", flush=True)


def lr_at(progress: float, base: float, warmup: float = 0.03, final: float = 0.05) -> float:
    """Linear warm-up over the first ``warmup`` of training, then cosine to ``final * base``."""
    if progress < warmup:
        return base * max(progress / warmup, 0.01)
    t = min((progress - warmup) / max(1 - warmup, 1e-9), 1.0)
    return base * (final + (1 - final) * 0.5 * (1 + math.cos(math.pi * t)))


def to_float_img(batch_u8: torch.Tensor) -> torch.Tensor:
    """uint8 ``[B, H, W, 3]`` -> float ``[B, 3, H, W]`` in ``[-1, 1]``."""
    return batch_u8.permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)


def to_u8(img01: torch.Tensor) -> np.ndarray:
    """float ``[B, 3, H, W]`` in ``[0, 1]`` -> uint8 ``[B, H, W, 3]`` numpy."""
    return img01.clamp(0, 1).mul(255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


# --------------------------------------------------------------------------- configs / warm start
def tokenizer_config(args: argparse.Namespace) -> TokenizerConfig:
    return TokenizerConfig(vocab_size=args.vocab, cvae=args.cvae, ch=args.tok_ch, ch_mult=tuple(args.tok_ch_mult),
                           enc_ch=args.enc_ch, enc_ch_mult=tuple(args.enc_ch_mult), patch_nums=tuple(args.patch_nums))


def var_config(args: argparse.Namespace) -> VARConfig:
    return VARConfig(depth=args.depth, width=args.width, heads=args.heads, mlp_ratio=args.mlp_ratio,
                     num_classes=procedural.NUM_CLASSES, vocab_size=args.vocab, cvae=args.cvae,
                     patch_nums=tuple(args.patch_nums), vq_ch=args.tok_ch, vq_ch_mult=tuple(args.tok_ch_mult))


def _plain(v: object) -> object:
    return list(v) if isinstance(v, tuple) else v


def check_init_compatible(args: argparse.Namespace) -> dict:
    """``config.json`` of ``--init-from``; exits naming the first field that differs from this run's."""
    try:
        cfg = read_reference_config(args.init_from)
    except (OSError, ValueError) as exc:
        raise SystemExit(f"--init-from {args.init_from}: not a reference checkpoint directory ({exc})") from exc
    if not cfg.get("tokenizer"):
        raise SystemExit(f"--init-from {args.init_from}: the checkpoint has no tokenizer encoder")
    try:
        ours = {"var": var_config(args).to_dict(), "tokenizer": tokenizer_config(args).to_dict()}
    except ValueError as exc:
        raise SystemExit(f"invalid model config: {exc}") from exc
    for section, fields in ours.items():
        theirs = cfg[section]
        for key in sorted(set(fields) | set(theirs)):
            a, b = _plain(fields.get(key)), _plain(theirs.get(key))
            if a != b:
                raise SystemExit(f"--init-from {args.init_from}: config field {section}.{key} is {b!r} in the "
                                 f"checkpoint but {a!r} in this run (preset {args.preset!r} and --set)")
    return cfg


def _run_record(summary: dict) -> dict:
    """One run of a lineage, from the ``training`` record of a checkpoint's ``config.json``."""
    tf = summary.get("transformer_train") or {}
    tk = summary.get("tokenizer_train") or {}
    return {"init_from": summary.get("init_from"), "preset": summary.get("preset"),
            "budget_minutes": (summary.get("args") or {}).get("max_minutes"),
            "wall_minutes": summary.get("wall_minutes"),
            "tokenizer_steps": tk.get("steps"), "tokenizer_frozen": bool(tk.get("frozen", False)),
            "transformer_steps": tf.get("steps"), "transformer_lr": tf.get("lr"),
            "val_loss": (tf.get("heldout") or {}).get("val_loss"),
            "heldout_psnr": (tk.get("heldout_psnr") or {}).get("psnr")}


def previous_runs(init_cfg: dict, init_dir: str) -> list[dict]:
    """The runs that produced ``init_dir``: its recorded lineage, else one run read from its
    ``config.json`` training record (or ``metrics.json`` summary), else one run marked unknown."""
    summary = init_cfg.get("training")
    if not summary:
        try:
            with open(os.path.join(init_dir, "metrics.json")) as fh:
                summary = json.load(fh)["summary"]
        except (OSError, ValueError, KeyError):
            return [{"unknown": True, "note": f"no training record in {init_dir}"}]
    if summary.get("lineage"):
        return list(summary["lineage"]["runs"])
    return [_run_record(summary)]


def lineage_of(runs: list[dict]) -> dict:
    def total(key: str) -> float:
        return sum(r.get(key) or 0 for r in runs)

    return {"runs": runs, "total_tokenizer_steps": int(total("tokenizer_steps")),
            "total_transformer_steps": int(total("transformer_steps")),
            "total_budget_minutes": round(total("budget_minutes"), 2)}


def checkpoint_sha256(init_cfg: dict, init_dir: str) -> str:
    """SHA-256 over the shards of a checkpoint, in ``config.json`` order (identifies the warm start)."""
    import hashlib

    h = hashlib.sha256()
    for name in init_cfg["shards"]:
        with open(os.path.join(init_dir, name), "rb") as fh:
            h.update(fh.read())
    return h.hexdigest()


# --------------------------------------------------------------------------- phases
def make_data(args: argparse.Namespace, clock: Clock) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Render the training set (stops early at ``--data-max-seconds``) and the held-out set."""
    t = time.time()
    ev, ev_labels = procedural.make_batch(args.seed, args.num_images, args.eval_images, args.size, workers=args.workers)
    train = np.empty((args.num_images, args.size, args.size, 3), np.uint8)
    n = 0
    for first, part in procedural.iter_chunks(args.seed, 0, args.num_images, args.size, workers=args.workers):
        train[first : first + len(part)] = part
        n = first + len(part)
        if time.time() - t > args.data_max_seconds or clock.stop_requested:
            clock.log(f"data: time limit, keeping the first {n} images")
            break
    labels = np.array([procedural.label_of(i) for i in range(n)], np.int64)
    dt = time.time() - t
    clock.log(f"data: {n} train + {len(ev)} held-out images at {args.size}px in {dt:.1f}s "
              f"({(n + len(ev)) / dt:.0f} img/s, {args.workers} workers)")
    return train[:n], labels, ev, ev_labels


def image_grad_l1(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """L1 distance of horizontal and vertical finite differences (keeps edges sharp)."""
    dxa, dxb = a[..., :, 1:] - a[..., :, :-1], b[..., :, 1:] - b[..., :, :-1]
    dya, dyb = a[..., 1:, :] - a[..., :-1, :], b[..., 1:, :] - b[..., :-1, :]
    return (dxa - dxb).abs().mean() + (dya - dyb).abs().mean()


def run_phase(
    name: str,
    steps: int,
    budget_s: float,
    clock: Clock,
    step_fn: Callable[[int, float], dict],
    eval_fn: Callable[[int], dict] | None = None,
    eval_every: int = 0,
    log_every: int = 25,
) -> tuple[list[dict], list[dict], int]:
    """Run ``step_fn(step, progress)`` until progress ``max(step/steps, t/budget) >= 1``
    (``steps <= 0``: no step, only the final evaluation)."""
    t = time.time()
    hist: list[dict] = []
    evals: list[dict] = []
    step = 0
    clock.log(f"{name}: up to {steps} steps or {budget_s:.0f}s")
    while steps > 0 and not clock.stop_requested:
        progress = max(step / steps, (time.time() - t) / max(budget_s, 1e-6))
        if progress >= 1.0:
            break
        rec = step_fn(step, progress)
        rec.update(step=step, t=round(time.time() - t, 2))
        hist.append(rec)
        step += 1
        if step % log_every == 0 or step == 1:
            shown = " ".join(f"{k}={float(v):.4g}" for k, v in rec.items() if k not in ("step", "t"))
            clock.log(f"{name} step {step} p={progress:.3f} {shown} ({step / (time.time() - t):.2f} it/s)")
        if eval_fn is not None and eval_every and step % eval_every == 0:
            evals.append(eval_fn(step))
    if eval_fn is not None and (not evals or evals[-1]["step"] != step):
        evals.append(eval_fn(step))
    mem = ""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        mem = f", peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB"
    clock.log(f"{name}: {step} steps in {time.time() - t:.1f}s ({step / max(time.time() - t, 1e-9):.2f} it/s){mem}")
    hist = [{k: (v if isinstance(v, (int, str)) else float(v)) for k, v in h.items()} for h in hist]
    return hist, evals, step


def train_tokenizer(args, clock, dev, train_u8, ev_u8, ev_labels, amp) -> tuple[RefTokenizer, dict]:
    """Train the tokenizer (from ``--init-from``'s weights if given); ``--tok-steps 0``: frozen."""
    cfg = tokenizer_config(args)
    if args.init_from:
        tok = load_reference_tokenizer(args.init_from)  # strict keys/shapes, safetensors only
        tok.train()
        origin = f"weights from {args.init_from}"
    else:
        tok = RefTokenizer(cfg)
        tok.init_weights(torch.Generator().manual_seed(args.seed + 1))
        origin = "training init"
    frozen = args.tok_steps <= 0
    if frozen:
        tok.requires_grad_(False)
    tok.to(dev)
    if dev.type == "cuda":
        tok.to(memory_format=torch.channels_last)
    clock.log(f"tokenizer: {count_params(tok) / 1e6:.2f}M params (encoder {count_params(tok.encoder) / 1e6:.2f}M, "
              f"decoder side {count_params(tok.vae) / 1e6:.2f}M), V={cfg.vocab_size}, Cvae={cfg.cvae}, {origin}"
              + (", frozen (--tok-steps 0)" if frozen else ""))
    params = [p for p in tok.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.tok_lr, betas=(0.9, 0.99), weight_decay=0.0) if params else None
    g_batch = torch.Generator().manual_seed(args.seed + 2)
    g_dev = torch.Generator(device=dev).manual_seed(args.seed + 3)
    n = train_u8.shape[0]
    codebook = tok.codebook.weight

    def step_fn(step: int, progress: float) -> dict:
        lr = lr_at(progress, args.tok_lr)
        for gr in opt.param_groups:
            gr["lr"] = lr
        ids = torch.randint(0, n, (args.tok_batch,), generator=g_batch).to(dev)
        x = to_float_img(train_u8[ids])
        if dev.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
            rec, q = tok(x)
        rec = rec.float()
        l1 = (rec - x).abs().mean()
        l2 = F.mse_loss(rec, x)
        lg = image_grad_l1(rec, x)
        loss = l1 + l2 + 0.5 * lg + q.vq_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gn = torch.nn.utils.clip_grad_norm_(tok.parameters(), 1.0)
        opt.step()
        tok.count_usage(q.idx)
        rec_out = {"loss": loss.detach(), "l1": l1.detach(), "l2": l2.detach(), "grad": lg.detach(),
                   "vq": q.vq_loss.detach(), "gnorm": gn, "lr": lr}  # tensors: no sync per step
        if (step + 1) % args.restart_every == 0:
            used = float((tok.usage > 0).float().mean())
            rec_out["usage"] = used
            if progress < 0.85:
                dead = tok.restart_dead_codes(q.rest, g_dev)
                st = opt.state.get(codebook, {})
                for key in ("exp_avg", "exp_avg_sq"):
                    if key in st:
                        st[key][dead] = 0
                rec_out["restarted"] = int(dead.sum())
            else:
                tok.usage.zero_()
        return rec_out

    @torch.no_grad()
    def eval_fn(step: int) -> dict:
        tok.eval()
        ps = []
        for i in range(0, ev_u8.shape[0], 64):
            x = to_float_img(ev_u8[i : i + 64])
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
                rec = tok.reconstruct(x)
            ps.append(psnr_batch(rec.float(), x.add(1).mul(0.5)))
        tok.train()
        ps_t = torch.cat(ps).cpu()
        per_class = {procedural.class_names()[c]: round(float(ps_t[torch.as_tensor(ev_labels) == c].mean()), 2)
                     for c in range(procedural.NUM_CLASSES) if (ev_labels == c).any()}
        out = {"step": step, "psnr": round(float(ps_t.mean()), 3), "psnr_per_class": per_class}
        clock.log(f"tokenizer eval step {step}: held-out recon PSNR {out['psnr']:.2f} dB")
        return out

    tok.train()
    budget = 0.0 if frozen else max((clock.left() - args.reserve_s) * args.tok_frac, 1.0)
    hist, evals, steps = run_phase("tokenizer", args.tok_steps, budget, clock, step_fn, eval_fn,
                                   args.eval_every, args.log_every)
    tok.eval()
    return tok, {"history": hist, "evals": evals, "steps": steps, "frozen": frozen, "config": cfg.to_dict(),
                 "params": count_params(tok)}


@torch.no_grad()
def tokenize_all(tok: RefTokenizer, images_u8: torch.Tensor, dev: torch.device, amp: bool, bs: int = 256
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids ``[N, L]`` (int64) and teacher-forcing inputs ``[N, L - 1, Cvae]`` (fp32) of every image."""
    ids, xs = [], []
    for i in range(0, images_u8.shape[0], bs):
        x = to_float_img(images_u8[i : i + bs])
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
            f = tok.encode(x)
        idx = tok.quantize(f.float()).idx
        ids.append(torch.cat(idx, 1))
        xs.append(tok.idx_to_var_input(idx).float())
    return torch.cat(ids, 0), torch.cat(xs, 0)


def train_transformer(args, clock, dev, tok, ids, x_in, labels, ev_ids, ev_x, ev_labels, amp,
                      generation: int = 0) -> tuple[VARStyle, dict]:
    """Train the transformer (from ``--init-from``'s weights if given: a warm restart).

    ``generation``: how many runs came before this one (varies the batch order of a warm start).
    """
    vcfg = var_config(args)
    model = VARStyle(vcfg)
    if args.init_from:
        load_into(model, args.init_from)  # strict keys/shapes, safetensors only
        origin = f"weights from {args.init_from}"
    else:
        training_init_(model, torch.Generator().manual_seed(args.seed + 4))
        origin = "VAR training init"
    model.vae.load_state_dict(tok.vae.state_dict())  # the tokenizer's decoder side (unchanged when frozen)
    model.to(dev)
    model.vae.requires_grad_(False)
    n_tf = count_params(model) - count_params(model.vae)
    clock.log(f"transformer: depth {vcfg.depth}, width {vcfg.width}, heads {vcfg.heads}, {n_tf / 1e6:.2f}M params "
              f"(+{count_params(model.vae) / 1e6:.2f}M VQ decoder), {model.total_tokens} tokens/image, {origin}, "
              f"peak lr {args.tf_lr:.3g}")
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim == 2 and "emb" not in name and "pos_" not in name else no_decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.tf_lr, betas=(0.9, 0.95), **({"fused": True} if dev.type == "cuda" else {}))
    bias = block_causal_bias(model.patch_nums, dev)
    g_batch = torch.Generator().manual_seed(args.seed + 5 + 7919 * generation)
    n = ids.shape[0]
    nc = procedural.NUM_CLASSES
    lens = [p * p for p in model.patch_nums]

    def step_fn(step: int, progress: float) -> dict:
        lr = lr_at(progress, args.tf_lr)
        for gr in opt.param_groups:
            gr["lr"] = lr
        sel = torch.randint(0, n, (args.tf_batch,), generator=g_batch)
        drop = torch.rand(args.tf_batch, generator=g_batch) < args.cfg_drop
        sel_d = sel.to(dev)
        lab = torch.where(drop.to(dev), torch.full_like(labels[sel_d], nc), labels[sel_d])
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
            logits = teacher_forced_logits(model, lab, x_in[sel_d], bias)
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), ids[sel_d].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gn = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 2.0)
        opt.step()
        return {"loss": loss.detach(), "gnorm": gn, "lr": lr}  # tensors: no sync per step

    @torch.no_grad()
    def eval_fn(step: int) -> dict:
        model.eval()
        ce_sum = torch.zeros(len(lens), device=dev)
        acc_sum = torch.zeros(len(lens), device=dev)
        for i in range(0, ev_ids.shape[0], 128):
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
                logits = teacher_forced_logits(model, ev_labels[i : i + 128], ev_x[i : i + 128], bias)
            logits = logits.float()
            tgt = ev_ids[i : i + 128]
            ce = F.cross_entropy(logits.transpose(1, 2), tgt, reduction="none")  # [b, L]
            acc = (logits.argmax(-1) == tgt).float()
            for s, part in enumerate(ce.split(lens, 1)):
                ce_sum[s] += part.mean(1).sum()
            for s, part in enumerate(acc.split(lens, 1)):
                acc_sum[s] += part.mean(1).sum()
        model.train()
        m = ev_ids.shape[0]
        ce_s = (ce_sum / m).tolist()
        w = torch.tensor(lens, dtype=torch.float32)
        out = {"step": step, "val_loss": float((torch.tensor(ce_s) * w).sum() / w.sum()),
               "val_loss_per_scale": [round(v, 4) for v in ce_s],
               "val_acc_per_scale": [round(v, 4) for v in (acc_sum / m).tolist()]}
        clock.log(f"transformer eval step {step}: val CE {out['val_loss']:.4f}, "
                  f"last-scale acc {out['val_acc_per_scale'][-1]:.3f}")
        return out

    model.train()
    hist: list[dict] = []
    evals: list[dict] = []
    steps = 0
    try:
        start_evals = [eval_fn(0)] if args.init_from else []  # the loaded model, before this run
        budget = max(clock.left() - args.reserve_s, 1.0)
        hist, evals, steps = run_phase("transformer", args.tf_steps, budget, clock, step_fn, eval_fn,
                                       args.eval_every, args.log_every)
        evals = start_evals + evals
    except Exception:  # keep going: a partly trained transformer is still saved with the tokenizer
        clock.log("transformer training failed:\n" + traceback.format_exc())
    model.eval()
    return model, {"history": hist, "evals": evals, "steps": steps, "config": vcfg.to_dict(), "params": n_tf}


# --------------------------------------------------------------------------- outputs
def plot_curves(path: str, tok_info: dict, tf_info: dict) -> None:
    """Loss curves (tokenizer, codebook usage, transformer train/val, per-scale accuracy) to a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(2, 2, figsize=(11, 7.5))

    def smooth(v: list[float], k: int = 25) -> np.ndarray:
        v = np.asarray(v, np.float64)
        if len(v) < k:
            return v
        return np.convolve(v, np.ones(k) / k, mode="valid")

    th = tok_info.get("history", [])
    if th:
        for key in ("loss", "l1", "vq"):
            y = smooth([h[key] for h in th])
            ax[0, 0].plot(np.arange(len(y)) + (len(th) - len(y)), y, label=key)
        ax[0, 0].set_yscale("log")
        ax[0, 0].set_title("tokenizer training loss (smoothed)")
        ax[0, 0].set_xlabel("step")
        ax[0, 0].legend()
        us = [(h["step"], h["usage"]) for h in th if "usage" in h]
        if us:
            ax[0, 1].plot(*zip(*us), label="codebook usage (fraction used per window)")
        ev = tok_info.get("evals", [])
        if ev:
            a2 = ax[0, 1].twinx()
            a2.plot([e["step"] for e in ev], [e["psnr"] for e in ev], "o-", color="C3", label="held-out PSNR")
            a2.set_ylabel("recon PSNR (dB)", color="C3")
        ax[0, 1].set_title("codebook usage / reconstruction")
        ax[0, 1].set_xlabel("step")
        if us:
            ax[0, 1].legend(loc="lower right")
    fh = tf_info.get("history", [])
    if fh:
        y = smooth([h["loss"] for h in fh])
        ax[1, 0].plot(np.arange(len(y)) + (len(fh) - len(y)), y, label="train CE (10% null class)")
        ev = tf_info.get("evals", [])
        if ev:
            ax[1, 0].plot([e["step"] for e in ev], [e["val_loss"] for e in ev], "o-", label="held-out CE")
            last = ev[-1]
            xs = np.arange(len(last["val_acc_per_scale"]))
            ax[1, 1].bar(xs - 0.2, last["val_acc_per_scale"], 0.4, label="top-1 acc")
            a3 = ax[1, 1].twinx()
            a3.bar(xs + 0.2, last["val_loss_per_scale"], 0.4, color="C1", label="CE")
            a3.set_ylabel("CE (nats)", color="C1")
            ax[1, 1].set_xlabel("scale")
            ax[1, 1].set_title("transformer, held-out, per scale (teacher forcing)")
            ax[1, 1].legend(loc="upper center")
        ax[1, 0].set_title("transformer cross-entropy" + (" (warm start: step 0 = loaded model)"
                                                          if tf_info.get("init_from") else ""))
        ax[1, 0].set_xlabel("step")
        ax[1, 0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def _resized(images_u8: np.ndarray, px: int) -> np.ndarray:
    from PIL import Image

    if images_u8.shape[1] == px:
        return images_u8
    return np.stack([np.asarray(Image.fromarray(im).resize((px, px), Image.BICUBIC)) for im in images_u8])


def save_png(path: str, images_u8: np.ndarray, cols: int, px: int) -> None:
    from PIL import Image

    Image.fromarray(procedural.grid(_resized(images_u8, px), cols)).save(path, optimize=True)


def save_data_recon(path: str, train_u8: np.ndarray, heldout_u8: np.ndarray, recon_u8: np.ndarray, cols: int,
                    px: int) -> None:
    """One picture: training images, then rows of held-out images each above its reconstructions."""
    from PIL import Image, ImageDraw

    def section(title: str, images: np.ndarray) -> np.ndarray:
        g = procedural.grid(_resized(images, px), cols)
        band = Image.new("RGB", (g.shape[1], 16), (255, 255, 255))
        ImageDraw.Draw(band).text((4, 2), title, fill=(0, 0, 0))
        return np.concatenate([np.asarray(band), g])

    rows = []
    for i in range(0, len(heldout_u8), cols):
        rows += [heldout_u8[i : i + cols], recon_u8[i : i + cols]]
    pairs = np.concatenate(rows)
    Image.fromarray(np.concatenate([
        section(f"training images ({len(train_u8)}, classes 0-15 in order)", train_u8),
        section("held-out images (odd rows) and their tokenizer reconstructions (even rows)", pairs),
    ])).save(path, optimize=True)


@torch.no_grad()
def sample_grid(args, clock, out_dir: str, dev: torch.device) -> dict:
    """Reload the saved checkpoint and generate ``grid_per_class`` images per class."""
    model = load_reference(out_dir, device=dev)
    nc = procedural.NUM_CLASSES
    labels = torch.arange(nc, device=dev).repeat_interleave(args.grid_per_class)
    t = time.time()
    imgs = []
    for i in range(0, len(labels), 64):
        imgs.append(model.autoregressive_infer_cfg(len(labels[i : i + 64]), label_B=labels[i : i + 64],
                                                   g_seed=args.seed + i, cfg=args.sample_cfg,
                                                   top_k=args.sample_top_k, top_p=args.sample_top_p))
    imgs_t = torch.cat(imgs)
    dt = time.time() - t
    cols = args.grid_per_class * (2 if args.grid_per_class <= 4 else 1)
    save_png(os.path.join(out_dir, "samples.png"), to_u8(imgs_t), cols, args.grid_px)
    clock.log(f"samples.png: {len(labels)} dense generations from the saved checkpoint in {dt:.1f}s "
              f"(cfg {args.sample_cfg}, top_k {args.sample_top_k}, top_p {args.sample_top_p})")
    return {"images": len(labels), "seconds": round(dt, 2)}


# --------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="micro")
    p.add_argument("--out", required=True, help="output directory (checkpoint, config, PNGs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: 1 on a CPU device, where small ops are contention-bound)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="data rendering processes")
    p.add_argument("--max-minutes", type=float, default=None, help="wall-clock budget from process start")
    p.add_argument("--max-steps", type=int, default=None, help="cap both phases' step counts (smoke tests)")
    p.add_argument("--batch", type=int, default=None, help="set both phases' batch sizes (smoke tests)")
    p.add_argument("--num-images", type=int, default=None)
    p.add_argument("--eval-images", type=int, default=None)
    p.add_argument("--data-max-seconds", type=float, default=75.0,
                   help="stop rendering training images after this long (keeps the rendered prefix)")
    p.add_argument("--init-from", default=None, metavar="DIR",
                   help="warm start: load tokenizer and transformer from this saved checkpoint directory "
                        "(config.json + index + safetensors shards; its config must equal the preset's)")
    p.add_argument("--tok-steps", type=int, default=None, help="0 freezes the tokenizer (needs --init-from)")
    p.add_argument("--tf-steps", type=int, default=None)
    p.add_argument("--tok-lr", type=float, default=None)
    p.add_argument("--tf-lr", type=float, default=None)
    p.add_argument("--tok-frac", type=float, default=None, help="share of the training time for the tokenizer")
    p.add_argument("--cfg-drop", type=float, default=0.1, help="fraction of null-class labels (CFG)")
    p.add_argument("--sample-cfg", type=float, default=2.0)
    p.add_argument("--sample-top-k", type=int, default=0)
    p.add_argument("--sample-top-p", type=float, default=0.9)
    p.add_argument("--log-every", type=int, default=None)
    p.add_argument("--amp", choices=("auto", "on", "off"), default="auto", help="bf16 autocast (auto: on CUDA)")
    p.add_argument("--no-samples", action="store_true", help="skip the sample grid")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a preset field, e.g. --set width=256 --set 'patch_nums=(1,2,4)' (Python literal)")
    args = p.parse_args(argv)
    preset = dict(PRESETS[args.preset])
    for item in args.set:
        key, _, value = item.partition("=")
        if key not in preset:
            raise SystemExit(f"--set {key}: not a preset field ({', '.join(sorted(preset))})")
        preset[key] = ast.literal_eval(value)
    smoke = args.max_steps is not None and args.num_images is None
    if args.init_from:  # a warm restart peaks lower (see WARM_RESTART_LR_SCALE)
        for k in ("tok_lr", "tf_lr"):
            if getattr(args, k) is None:
                setattr(args, k, preset[k] * WARM_RESTART_LR_SCALE)
    for k, v in preset.items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    if smoke:  # a smoke test with few steps does not need the full data set
        args.num_images = min(args.num_images, max(64, 4 * args.max_steps * (args.batch or args.tf_batch)))
        args.eval_images = min(args.eval_images, 32)
    if args.max_steps is not None:
        args.tok_steps = min(args.tok_steps, args.max_steps)
        args.tf_steps = min(args.tf_steps, args.max_steps)
    if args.batch is not None:
        args.tok_batch = args.tf_batch = args.batch
    if args.log_every is None:
        args.log_every = 25 if args.preset != "micro" else 10
    if args.size != args.patch_nums[-1] * 2 ** (len(args.tok_ch_mult) - 1):
        raise SystemExit("size must equal patch_nums[-1] * 2**(len(tok_ch_mult) - 1)")
    if args.tok_steps <= 0 and not args.init_from:
        raise SystemExit("--tok-steps 0 freezes the tokenizer: it needs trained weights (--init-from DIR)")
    if args.init_from and os.path.abspath(args.init_from) == os.path.abspath(args.out):
        raise SystemExit("--init-from and --out must be different directories")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    clock = Clock(args.max_minutes)
    # warm start: check the checkpoint before spending time on data
    init_cfg = check_init_compatible(args) if args.init_from else None
    prev_runs = previous_runs(init_cfg, args.init_from) if init_cfg is not None else []

    def on_signal(signum: int, _frame: object) -> None:
        clock.log(f"signal {signum}: stopping the current phase, then saving")
        clock.stop_requested = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    dev = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.threads or dev.type == "cpu":
        torch.set_num_threads(args.threads or 1)
    amp = args.amp == "on" or (args.amp == "auto" and dev.type == "cuda")
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    os.makedirs(args.out, exist_ok=True)
    clock.log(f"train_reference preset={args.preset} device={dev} amp={amp} torch={torch.__version__} "
              f"budget={args.max_minutes} min out={args.out}")
    if init_cfg is not None:
        before = lineage_of(prev_runs)
        clock.log(f"warm start from {args.init_from}: {len(prev_runs)} earlier run(s), "
                  f"{before['total_tokenizer_steps']} tokenizer + {before['total_transformer_steps']} transformer "
                  f"steps in {before['total_budget_minutes']} min; tokenizer "
                  f"{'frozen' if args.tok_steps <= 0 else f'lr {args.tok_lr:.3g}'}, transformer lr {args.tf_lr:.3g}")

    # 1. data (rendered before CUDA is touched by the training, with forked workers)
    train_np, labels_np, ev_np, ev_labels_np = make_data(args, clock)
    train_u8 = torch.from_numpy(train_np).to(dev)
    ev_u8 = torch.from_numpy(ev_np).to(dev)
    if dev.type == "cuda":
        clock.log(f"GPU: {torch.cuda.get_device_name(dev)}, {torch.cuda.get_device_properties(dev).total_memory / 2**30:.0f} GiB")
    data_preview = train_np[: 4 * procedural.NUM_CLASSES].copy()
    del train_np

    # 2. tokenizer (frozen with --tok-steps 0)
    tok, tok_info = train_tokenizer(args, clock, dev, train_u8, ev_u8, ev_labels_np, amp)
    with torch.no_grad():
        k = min(16, ev_u8.shape[0])
        rec = tok.reconstruct(to_float_img(ev_u8[:k]))
    save_data_recon(os.path.join(args.out, "data_recon.png"), data_preview, ev_np[:k], to_u8(rec), 8, args.grid_px)
    del data_preview

    # 3. token maps
    t = time.time()
    ids, x_in = tokenize_all(tok, train_u8, dev, amp)
    ev_ids, ev_x = tokenize_all(tok, ev_u8, dev, amp)
    del train_u8
    used = int(torch.unique(ids).numel())
    clock.log(f"tokenized {ids.shape[0]} images ({ids.shape[1]} tokens each) in {time.time() - t:.1f}s; "
              f"{used}/{args.vocab} codes used")
    labels = torch.from_numpy(labels_np).to(dev)
    ev_labels = torch.from_numpy(ev_labels_np).to(dev)

    # 4. transformer
    model, tf_info = train_transformer(args, clock, dev, tok, ids, x_in, labels, ev_ids, ev_x, ev_labels, amp,
                                       generation=len(prev_runs))
    tf_info["init_from"] = args.init_from

    # 5. save
    summary = {
        "seed": args.seed,
        "preset": args.preset,
        "data": {"generator": "toprovar_fx.data.procedural", "seed": args.seed, "size": args.size,
                 "train_indices": [0, int(ids.shape[0])], "heldout_indices":
                 [args.num_images, args.num_images + int(ev_ids.shape[0])], "classes": procedural.class_names()},
        "init_from": args.init_from,
        "init_sha256": checkpoint_sha256(init_cfg, args.init_from) if init_cfg is not None else None,
        "tokenizer_train": {"steps": tok_info["steps"], "frozen": tok_info["frozen"],
                            "heldout_psnr": tok_info["evals"][-1] if tok_info["evals"] else None,
                            "codes_used": used, "params": tok_info["params"]},
        "transformer_train": {"steps": tf_info["steps"], "heldout": tf_info["evals"][-1] if tf_info["evals"] else None,
                              "heldout_at_start": tf_info["evals"][0] if args.init_from and tf_info["evals"] else None,
                              "params": tf_info["params"], "batch": args.tf_batch, "lr": args.tf_lr,
                              "cfg_drop": args.cfg_drop},
        "sampling": {"cfg": args.sample_cfg, "top_k": args.sample_top_k, "top_p": args.sample_top_p},
        "args": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items()},
        "versions": {"torch": torch.__version__, "python": sys.version.split()[0]},
        "wall_minutes": round(clock.now() / 60, 2),  # at saving
    }
    # every run that led to this checkpoint, this one last ("trained 5.5 min + N min warm start")
    summary["lineage"] = lineage_of(prev_runs + [_run_record(summary)])
    files = save_reference(model, tok, args.out, {"training": summary})
    sizes = {f: os.path.getsize(os.path.join(args.out, f)) for f in files}
    weights = sum(v for f, v in sizes.items() if f.endswith(".safetensors"))
    clock.log(f"saved {', '.join(files)}; weights {weights / 1e6:.2f} MB in {len(files) - 2} shard(s)")
    with open(os.path.join(args.out, "metrics.json"), "w") as fh:
        json.dump({"summary": summary, "sizes": sizes, "tokenizer": tok_info, "transformer": tf_info}, fh)
    try:
        plot_curves(os.path.join(args.out, "loss.png"), tok_info, tf_info)
        clock.log("loss.png written")
    except Exception:
        clock.log("loss plot failed:\n" + traceback.format_exc())
    if not args.no_samples:
        try:
            info = sample_grid(args, clock, args.out, dev)
            with open(os.path.join(args.out, "metrics.json")) as fh:
                metrics = json.load(fh)
            metrics["samples"] = info
            with open(os.path.join(args.out, "metrics.json"), "w") as fh:
                json.dump(metrics, fh)
        except Exception:
            clock.log("sample grid failed:\n" + traceback.format_exc())
    clock.log(f"done in {clock.now():.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

