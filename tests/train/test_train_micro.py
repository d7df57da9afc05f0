"""A micro run of tools/train_reference.py on CPU: it trains, saves shards, reloads, generates;
a warm start from its output (``--init-from``, tokenizer frozen) continues the transformer only."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from toprovar_fx.zoo.ref_model import load_reference, load_reference_tokenizer, read_reference_state

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
# what a run writes into --out, and nothing else (the GPU box returns at most 8 files)
OUT_FILES = {"config.json", "model.safetensors.index.json", "metrics.json", "loss.png", "samples.png", "data_recon.png"}


def _train(args: list[str], timeout: int = 150) -> subprocess.CompletedProcess:
    cmd = [sys.executable, os.path.join(ROOT, "tools", "train_reference.py"), "--preset", "micro", "--device", "cpu",
           *args]
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=ROOT)


@pytest.fixture(scope="module")
def micro_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref_micro")
    proc = _train(["--out", str(out), "--workers", "2", "--num-images", "256", "--eval-images", "32",
                   "--tok-steps", "30", "--tf-steps", "60", "--max-minutes", "1.5"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc.stdout


def test_outputs(micro_run):
    out, log = micro_run
    cfg = json.loads((out / "config.json").read_text())
    assert set(os.listdir(out)) == OUT_FILES | set(cfg["shards"])
    assert len(os.listdir(out)) <= 8
    assert cfg["format"] == "toprovar-var-ref/1" and cfg["dtype"] == "float16"
    assert cfg["training"]["data"]["classes"][0] == "glyph_W"
    for shard in cfg["shards"]:
        assert os.path.getsize(out / shard) <= 16_000_000
    assert "done in" in log


def test_losses_decrease(micro_run):
    out, _ = micro_run
    m = json.loads((out / "metrics.json").read_text())
    for phase in ("tokenizer", "transformer"):
        losses = [h["loss"] for h in m[phase]["history"]]
        assert len(losses) >= 20, phase
        assert np.mean(losses[-5:]) < np.mean(losses[:5]), phase
    assert m["transformer"]["evals"][-1]["val_loss"] < np.log(64)  # below a uniform guess over V=64


def test_reload_and_generate(micro_run):
    out, _ = micro_run
    model = load_reference(out)
    state = read_reference_state(out)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, state[k].float())
    imgs = model.autoregressive_infer_cfg(2, label_B=torch.tensor([0, 5]), g_seed=1, cfg=1.5, top_p=0.9)
    assert imgs.shape == (2, 3, 64, 64) and torch.isfinite(imgs).all()
    again = load_reference(out).autoregressive_infer_cfg(2, label_B=torch.tensor([0, 5]), g_seed=1, cfg=1.5, top_p=0.9)
    torch.testing.assert_close(imgs, again)
    tok = load_reference_tokenizer(out)
    rec = tok.reconstruct(torch.zeros(1, 3, 64, 64))
    assert rec.shape == (1, 3, 64, 64)
    assert model.fingerprint() == {"family": "var", "depth": 2, "width": 64, "heads": 2, "num_scales": 4}


def test_warm_start_frozen_tokenizer(micro_run, tmp_path):
    """``--init-from A --tok-steps 0``: the tokenizer is A's bit for bit, the transformer moved on,
    at most 8 files, and the lineage counts both runs."""
    a, _ = micro_run
    b = tmp_path / "warm"
    proc = _train(["--out", str(b), "--init-from", str(a), "--tok-steps", "0", "--tf-steps", "3", "--workers", "1",
                   "--num-images", "64", "--eval-images", "16", "--max-minutes", "1"], timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    cfg = json.loads((b / "config.json").read_text())
    assert set(os.listdir(b)) == OUT_FILES | set(cfg["shards"]) and len(os.listdir(b)) <= 8
    sa, sb = read_reference_state(a), read_reference_state(b)
    assert sa.keys() == sb.keys()
    tokenizer_keys = [k for k in sa if k.startswith(("tokenizer.", "vae."))]
    assert tokenizer_keys
    for k in tokenizer_keys:
        assert torch.equal(sa[k], sb[k]), k
    assert any(not torch.equal(sa[k], sb[k]) for k in sa if k not in tokenizer_keys)

    m = json.loads((b / "metrics.json").read_text())
    m_a = json.loads((a / "metrics.json").read_text())
    assert m["tokenizer"]["history"] == [] and m["tokenizer"]["frozen"]
    assert len(m["transformer"]["history"]) == 3
    assert m["transformer"]["evals"][0]["step"] == 0  # the loaded model, evaluated before this run
    lineage = cfg["training"]["lineage"]
    assert lineage == m["summary"]["lineage"]
    first, warm = lineage["runs"]
    assert first["init_from"] is None and first["transformer_steps"] == m_a["transformer"]["steps"]
    assert first["tokenizer_steps"] == m_a["tokenizer"]["steps"]
    assert warm["init_from"] == str(a) and warm["tokenizer_steps"] == 0 and warm["tokenizer_frozen"]
    assert warm["transformer_steps"] == 3
    assert lineage["total_transformer_steps"] == m_a["transformer"]["steps"] + 3
    assert warm["transformer_lr"] < first["transformer_lr"]  # a warm restart peaks lower by default


def test_warm_start_refuses_other_config(micro_run, tmp_path):
    a, _ = micro_run
    proc = _train(["--out", str(tmp_path / "x"), "--init-from", str(a), "--tok-steps", "0", "--set", "depth=3"],
                  timeout=60)
    assert proc.returncode != 0 and "var.depth" in proc.stderr
    assert not (tmp_path / "x").exists()  # refused before any work
    proc = _train(["--out", str(tmp_path / "y"), "--tok-steps", "0"], timeout=60)
    assert proc.returncode != 0 and "--init-from" in proc.stderr


def test_wall_clock_budget_stops_and_saves(tmp_path):
    """Unreachable step counts: both phases stop on the budget, anneal by time, and the run still saves."""
    proc = _train(["--out", str(tmp_path), "--workers", "1", "--num-images", "64", "--eval-images", "16",
                   "--tok-steps", "100000", "--tf-steps", "100000", "--max-minutes", "0.3", "--no-samples"],
                  timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    m = json.loads((tmp_path / "metrics.json").read_text())
    for phase in ("tokenizer", "transformer"):
        hist = m[phase]["history"]
        assert 0 < len(hist) < 100000
        # the schedule followed the time: by steps (progress <= 1e-3) it would still be at its peak.
        # Not "fully annealed": on a loaded 2-core host one step may take a sixth of a phase's few
        # seconds, and the last step then starts at 0.8 of it (CI, twentieth session: 0.23 of the peak)
        assert hist[-1]["lr"] < 0.5 * max(h["lr"] for h in hist)
    assert load_reference(tmp_path).fingerprint()["depth"] == 2
