"""The ``toprovar`` command. Subcommands: ``demo`` (more arrive with issue 6)."""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path


def _demo(args: argparse.Namespace) -> int:
    import torch

    import toprovar_fx
    from toprovar_fx import zoo
    from toprovar_fx.metrics import psnr, ssim, token_agreement

    torch.manual_seed(0)
    model = zoo.build(args.model, seed=0)
    labels = torch.tensor([args.label])

    def run(fn):
        return fn(B=1, label_B=labels, g_seed=args.seed, cfg=1.5, return_logits=True)

    fast = torch.compile(model.autoregressive_infer_cfg, backend="toprovar", options={"policy": args.policy})
    t0 = time.perf_counter()
    run(fast)  # first call compiles every scale
    compile_s = time.perf_counter() - t0
    dense_t, fast_t = [], []
    for _ in range(args.runs):  # interleaved, so both see the same machine state
        t0 = time.perf_counter()
        img_d, logits_d = run(model.autoregressive_infer_cfg)
        dense_t.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        img_f, logits_f = run(fast)
        fast_t.append(time.perf_counter() - t0)
    rep = toprovar_fx.last_generation()
    med_d, med_f = statistics.median(dense_t), statistics.median(fast_t)
    print(f"model {args.model}, policy {args.policy}, batch 1 (CFG: transformer batch {rep.rows}), "
          f"torch {torch.__version__}, {'cuda' if torch.cuda.is_available() else 'cpu'}")
    print(f"dense eager   median {1e3 * med_d:8.1f} ms over {args.runs} runs")
    print(f"toprovar      median {1e3 * med_f:8.1f} ms  (first call incl. compile {compile_s:.1f} s)")
    print(f"speedup {med_d / med_f:.2f}x   executed/dense FLOPs {rep.flop_ratio:.3f}   "
          f"pruning from scale {rep.start_scale}")
    print(f"fidelity vs dense: PSNR {psnr(img_f, img_d):.2f} dB, SSIM {ssim(img_f, img_d):.4f}, "
          f"last-scale token agreement {token_agreement(logits_f[-1], logits_d[-1]):.3f}")
    for s in rep.scales[-3:]:
        kept = [layer.kept_tokens if layer.kept_tokens is not None else s.tokens for layer in s.layers]
        print(f"  scale {s.index + 1:2d} {s.h}x{s.w}: kept tokens per layer {kept}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    from PIL import Image

    pair = torch.cat([img_d[0], img_f[0]], dim=2).clamp(0, 1).mul(255).byte().permute(1, 2, 0).numpy()
    Image.fromarray(pair).save(out)
    print(f"wrote {out} (left: dense, right: toprovar)")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="toprovar", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="dense vs toprovar on the embedded tiny model: speed, fidelity, PNG")
    demo.add_argument("--model", default="var-tiny", choices=["var-tiny", "hart-tiny"])
    demo.add_argument("--policy", default="var-tiny", help="policy name or YAML path (default: var-tiny)")
    demo.add_argument("--runs", type=int, default=5)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--label", type=int, default=3)
    demo.add_argument("--out", default="out/demo.png")
    args = parser.parse_args(argv)
    if args.command == "demo":
        if args.runs < 1:
            parser.error("--runs must be >= 1")
        return _demo(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
