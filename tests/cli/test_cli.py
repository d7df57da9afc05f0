"""The ``toprovar`` command end to end on the tiny zoo models (small settings): every command's
outputs exist and parse (PNG sizes, YAML validates, JSON fields), bad arguments are one-line
errors with exit code 2."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from PIL import Image

from toprovar_fx.cli import main
from toprovar_fx.policies import load_policy
from toprovar_fx.tools import load_model, make_plan
from toprovar_fx.tools.progress import Progress

PNG_MIN = 200  # every picture is at least this many pixels on each side


def png_size(path: Path) -> tuple[int, int]:
    assert path.is_file(), f"{path} was not written"
    with Image.open(path) as im:
        assert im.format == "PNG"
        return im.size


def run(argv: list[str]) -> int:
    return main([*argv, "--quiet"])


# ------------------------------------------------------------------------------------------------
# arguments
# ------------------------------------------------------------------------------------------------


def test_help_runs_as_the_console_script():
    exe = shutil.which("toprovar")  # installed (editable) with the package; else the module
    cmd = [exe, "--help"] if exe is not None else [sys.executable, "-m", "toprovar_fx.cli", "--help"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    for sub in ("calibrate", "plan", "inspect", "bench", "demo"):
        assert sub in out


BAD = [
    (["plan", "--model", "nope", "--policy", "var-tiny"], "unknown model 'nope'; valid zoo names: var-tiny"),
    (["plan", "--model", "var-tiny", "--policy", "nope"], "unknown policy name 'nope'"),
    (["plan", "--model", "var-tiny", "--policy", "missing.yaml"], "cannot read the policy file"),
    (["plan", "--model", "var-tiny", "--policy", "var-tiny:turbo"], "no preset named 'turbo'"),
    (["plan", "--model", "var-tiny", "--policy", "var-tiny", "--resolution", "512:1:1"], "not a schedule"),
    (["plan", "--model", "var-tiny", "--policy", "var-tiny", "--calibration", "missing.json"], "does not exist"),
    (["plan", "--model", "var-tiny", "--policy", "var-tiny", "--batch", "0"], "--batch must be >= 1"),
    (["bench", "--model", "var-tiny", "--policies", "dense,var-tiny", "--runs", "0"], "--runs must be >= 1"),
    (["bench", "--model", "var-tiny", "--policies", "dense,var-tiny", "--dtype", "int8"], "unknown dtype 'int8'"),
    (["bench", "--model", "var-tiny", "--policies", "dense,var-tiny,var-tiny"], "more than once"),
    (["calibrate", "--model", "var-tiny", "--prompts", "missing.txt", "--out", "p.yaml"], "does not exist"),
    (["calibrate", "--model", "infinity-tiny", "--classes", "2", "--out", "p.yaml"], "text-conditional"),
    (["calibrate", "--model", "var-tiny", "--classes", "2", "--out", "p.txt"], "must end with .yaml"),
    (["calibrate", "--model", "var-tiny", "--classes", "0", "--out", "p.yaml"], "--classes must be >= 1"),
    (["calibrate", "--model", "var-tiny", "--out", "p.yaml", "--tau", "1.5"], "--tau must be in [0, 1]"),
    (["inspect", "--model", "no_such_module:make", "--policy", "var-tiny", "--out", "x"], "cannot import module"),
    (["inspect", "--model", "var-tiny", "--policy", "var-tiny"], "required: --out"),
    (["demo", "--runs", "0"], "--runs must be >= 1"),
    (["bench", "--model", "var-tiny", "--policies", "dense", "--top-p", "1.5"], "--top-p must be in [0, 1]"),
    (["bench", "--model", "var-tiny", "--policies", "dense", "--top-k", "-1"], "--top-k must be an integer >= 0"),
    (["calibrate", "--model", "var-tiny", "--out", "p.yaml", "--cfg", "-1"], "--cfg must be a finite number"),
    (["calibrate", "--model", "var-tiny", "--out", "p.yaml", "--top-k", "x"], "invalid int value"),
    (["bench", "--model", "cli_sampling_factory:make", "--policies", "dense", "--cfg", "2"], "apply to zoo models"),
]
if not torch.cuda.is_available():
    BAD.append((["bench", "--model", "var-tiny", "--policies", "dense", "--device", "cuda"], "CUDA is not available"))


@pytest.mark.parametrize(("argv", "message"), BAD, ids=[" ".join(a[:1] + a[-2:]) for a, _ in BAD])
def test_bad_arguments_are_one_line_errors_with_exit_code_2(argv, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "cli_sampling_factory.py").write_text("def make():\n    raise AssertionError('not built')\n")
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1, err
    assert err[0].startswith(f"toprovar {argv[0]}: error: ")
    assert message in err[0]


def test_progress_bar_writes_plain_lines_to_a_log():
    buf = io.StringIO()  # not a terminal: one line per state, no carriage returns
    with Progress(3, "work", stream=buf) as bar:
        for i in range(3):
            bar.update(note=f"item {i}")
    lines = buf.getvalue().splitlines()
    assert "\r" not in buf.getvalue()
    assert lines[-1].startswith("work [") and "3/3" in lines[-1]
    silent = io.StringIO()
    with Progress(2, "quiet", enabled=False, stream=silent) as bar:
        bar.update()
    assert silent.getvalue() == ""


# ------------------------------------------------------------------------------------------------
# plan (no generation)
# ------------------------------------------------------------------------------------------------


def test_plan_prints_ranges_and_writes_json(tmp_path, capsys):
    out = tmp_path / "plan.json"
    assert run(["plan", "--model", "infinity-2b", "--policy", "infinity-2b", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "start scale D (1-based): 10-13" in text and "decided online" in text
    plan = json.loads(out.read_text())
    assert plan["schedule"] == "1024:1:1" and plan["rows"] == 2 and len(plan["scales"]) == 13
    lo, hi = plan["flop_ratio"]
    assert 0 < lo < hi == 1.0
    for s in plan["scales"]:
        assert s["flops_planned"][0] <= s["flops_planned"][1] <= s["flops_dense"] * (1 + 1e-9)
    assert [s["active"] for s in plan["scales"][8:]] == ["no", "maybe", "maybe", "maybe", "yes"]


def test_plan_of_a_fixed_policy_is_exact(capsys):
    assert run(["plan", "--model", "var-tiny", "--policy", "var-tiny-fastvar-released"]) == 0
    text = capsys.readouterr().out
    assert "start scale D (1-based): 7" in text
    plan = make_plan("var-tiny", load_policy("var-tiny-fastvar-released"))
    assert plan.flop_ratio[0] == plan.flop_ratio[1] < 0.5
    assert [s.skipped for s in plan.scales][-2:] == ["yes", "yes"]


def test_a_user_factory_is_a_model(tmp_path, monkeypatch):
    (tmp_path / "my_models.py").write_text(textwrap.dedent("""
        import torch
        from toprovar_fx import zoo

        def make(device="cpu", dtype=torch.float32):
            m = zoo.build("var-tiny", device=device, dtype=dtype)

            def call(fn, conditions, seed):
                labels = torch.tensor(conditions, device=m.device)
                return fn(B=len(conditions), label_B=labels, g_seed=seed, cfg=1.5, return_logits=True)

            return m, call, {"conditioning": "class", "num_classes": 10}
    """))
    monkeypatch.chdir(tmp_path)
    policy = load_policy("var-tiny")
    assert make_plan("my_models:make", policy).flops_dense == make_plan("var-tiny", policy).flops_dense
    adapter = load_model("my_models:make")
    gen = adapter.generate(adapter.sampler, adapter.prepare(adapter.conditions(2, 1)), 0)
    assert gen.images.shape == (1, 3, 256, 256) and len(gen.logits) == 10


# ------------------------------------------------------------------------------------------------
# sampling flags: --cfg / --top-p / --top-k reach the sampler
# ------------------------------------------------------------------------------------------------


def test_sampling_defaults_come_from_the_checkpoint_else_the_tool():
    from toprovar_fx.tools.calibrate import recorded_sampling, sampling_for

    assert recorded_sampling("var-ref") == {"cfg": 2.0, "top_p": 0.9, "top_k": 0}  # config.json training.sampling
    assert recorded_sampling("var-tiny") is None
    ref = sampling_for(load_model("var-ref", device="meta"))  # meta: no weights loaded, so no record used
    assert (ref["cfg"], ref["top_p"], ref["top_k"]) == (1.5, 0.0, 0) and ref["source"] == "the tool's default"
    tiny = load_model("var-tiny")
    assert sampling_for(tiny) == {"cfg": 1.5, "top_p": 0.0, "top_k": 0, "source": "the tool's default"}
    part = sampling_for(tiny, top_k=7)
    assert part["top_k"] == 7 and part["cfg"] == 1.5 and part["source"].startswith("top-k given")
    assert sampling_for(load_model("infinity-tiny"))["cfg"] == 3.0  # Infinity's cfg_list


def _recording_sampler(monkeypatch):
    """VARStyle.autoregressive_infer_cfg wrapped to record the keywords of every eager call."""
    from toprovar_fx.zoo.var import VARStyle

    calls: list[dict] = []
    original = VARStyle.autoregressive_infer_cfg

    def recording(self, *args, **kwargs):
        calls.append({k: kwargs.get(k) for k in ("cfg", "top_k", "top_p")})
        return original(self, *args, **kwargs)

    monkeypatch.setattr(VARStyle, "autoregressive_infer_cfg", recording)
    return calls


def test_var_ref_default_sampling_reaches_the_sampler(monkeypatch):
    from toprovar_fx.tools.calibrate import apply_sampling

    calls = _recording_sampler(monkeypatch)
    adapter = load_model("var-ref")
    st = apply_sampling(adapter)
    assert (st["cfg"], st["top_p"], st["top_k"]) == (2.0, 0.9, 0) and st["source"] == "the checkpoint's training.sampling"
    adapter.generate(adapter.sampler, adapter.prepare([3]), 0)
    assert calls == [{"cfg": 2.0, "top_k": 0, "top_p": 0.9}]


def test_bench_sampling_flags_reach_the_sampler_and_change_the_images(tmp_path, monkeypatch, capsys):
    calls = _recording_sampler(monkeypatch)
    common = ["bench", "--model", "var-tiny", "--policies", "dense", "--runs", "1", "--warmup", "0", "--no-kv-probe"]
    assert run([*common, "--out", str(tmp_path / "default")]) == 0
    assert calls and all(c == {"cfg": 1.5, "top_k": 0, "top_p": 0.0} for c in calls)  # the tool's default
    calls.clear()
    assert run([*common, "--cfg", "3", "--top-k", "1", "--top-p", "0.5", "--out", str(tmp_path / "flags")]) == 0
    assert calls and all(c == {"cfg": 3.0, "top_k": 1, "top_p": 0.5} for c in calls)
    assert "sampling: cfg 3, top-p 0.5, top-k 1 (given)" in capsys.readouterr().out
    d0 = json.loads((tmp_path / "default" / "bench.json").read_text())
    d1 = json.loads((tmp_path / "flags" / "bench.json").read_text())
    assert d0["settings"]["sampling"]["source"] == "the tool's default"
    assert d1["settings"]["sampling"] == {"cfg": 3.0, "top_p": 0.5, "top_k": 1, "source": "given"}

    # and the flags change what is generated: greedy (top-k 1) vs the default sampler, same seed
    from toprovar_fx.tools.calibrate import apply_sampling

    monkeypatch.undo()
    adapter = load_model("var-tiny")
    prepared = adapter.prepare([3])
    default = adapter.generate(adapter.sampler, prepared, 0)
    apply_sampling(adapter, top_k=1)
    greedy = [adapter.generate(adapter.sampler, prepared, s) for s in (0, 1)]
    assert torch.equal(greedy[0].images, greedy[1].images)  # top-k 1: the seed no longer matters
    assert not torch.equal(default.images, greedy[0].images)


# ------------------------------------------------------------------------------------------------
# commands that generate (each compiles the tiny sampler once)
# ------------------------------------------------------------------------------------------------


def test_calibrate_var_tiny_writes_a_valid_policy_then_plan_uses_it(tmp_path, capsys):
    out = tmp_path / "cal" / "var-tiny-cal.yaml"
    assert run(["calibrate", "--model", "var-tiny", "--classes", "2", "--out", str(out), "--top-p", "0.9"]) == 0
    printed = capsys.readouterr().out
    assert "tau" in printed and f"wrote {out}" in printed
    assert "sampling: cfg 1.5, top-p 0.9, top-k 0 (top-p given, the rest the tool's default)" in printed
    pol = load_policy(out)  # validates
    assert pol.name == "var-tiny-calibrated" and pol.layer.mode == "frozen"
    assert sorted(pol.layer.frozen["global"] + pol.layer.frozen["detail"]) == [0, 1, 2, 3]
    text = out.read_text()
    assert "# rho_s" in text and "sigma1/sigma2" in text and "  tau: " in text
    cal_path = tmp_path / "cal" / "var-tiny-cal.calibration.json"
    cal = json.loads(cal_path.read_text())
    assert len(cal["rho"]) == 2 and len(cal["rho"][0]) == 10
    assert cal["sampling"] == {"cfg": 1.5, "top_p": 0.9, "top_k": 0,
                               "source": "top-p given, the rest the tool's default"}
    assert "# Sampling: cfg 1.5, top-p 0.9, top-k 0" in text
    assert len(cal["layer_ratio_median"]) == 4 and all(r >= 1.0 for r in cal["layer_ratio_median"])
    assert cal["tau"] == pol.scale.tau and 0.0 <= cal["tau"] <= 1.0
    assert cal["layer_class"] == ["detail" if i in pol.layer.frozen["detail"] else "global" for i in range(4)]
    w, h = png_size(tmp_path / "cal" / "var-tiny-cal.calibration.png")
    assert w > 2 * PNG_MIN and h > PNG_MIN

    plan_json = tmp_path / "plan.json"
    assert run(["plan", "--model", "var-tiny", "--policy", str(out), "--calibration", str(cal_path),
                "--json", str(plan_json)]) == 0
    plan = json.loads(plan_json.read_text())
    assert plan["source"].startswith("calibration") and plan["flop_ratio"][0] == plan["flop_ratio"][1]


def test_calibrate_infinity_tiny_from_a_prompts_file(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# calibration prompts\na red cat\n\ntwo blue dogs\n")  # equal lengths: no recompile
    out = tmp_path / "inf.yaml"
    assert run(["calibrate", "--model", "infinity-tiny", "--prompts", str(prompts), "--out", str(out)]) == 0
    pol = load_policy(out)
    assert pol.model.family == "infinity" and pol.layer.mode == "frozen"
    cal = json.loads((tmp_path / "inf.calibration.json").read_text())
    assert [it["condition"] for it in cal["items"]] == ["a red cat", "two blue dogs"]
    assert cal["schedule"] == "256:1:1" and len(cal["rho"][0]) == 7


def test_inspect_writes_pictures_page_and_report(tmp_path, capsys):
    out = tmp_path / "inspect"
    assert run(["inspect", "--model", "var-tiny", "--policy", "var-tiny-fastvar-released", "--out", str(out),
                "--top-p", "0.9"]) == 0
    assert "executed/dense FLOPs" in capsys.readouterr().out
    for name in ("overlay", "entropy_layers", "rho", "r_scores", "flops", "pair"):
        w, h = png_size(out / f"{name}.png")
        assert w >= PNG_MIN and h >= PNG_MIN, name
    report = json.loads((out / "report.json").read_text())
    assert report["policy"] == "var-tiny-fastvar-released" and report["fallbacks"] == []
    assert report["sampling"] == {"cfg": 1.5, "top_p": 0.9, "top_k": 0,
                                  "source": "top-p given, the rest the tool's default"}
    assert [s["skipped"] for s in report["scales"]][-2:] == [True, True]
    # the dry run predicts exactly what this fixed policy executed
    plan = make_plan("var-tiny", load_policy("var-tiny-fastvar-released"))
    assert report["flop_ratio"] == pytest.approx(plan.flop_ratio[0], rel=1e-9)
    assert report["fidelity"]["ssim"] < 1.0
    page = (out / "index.html").read_text()
    for name in ("overlay.png", "entropy_layers.png", "rho.png", "r_scores.png", "flops.png", "pair.png"):
        assert f"src='{name}'" in page
    assert page.count("<table>") >= 3 and "Per scale" in page


def test_bench_writes_markdown_and_json(tmp_path, capsys):
    out = tmp_path / "bench"
    assert run(["bench", "--model", "var-tiny", "--policies", "dense,var-tiny-fastvar-released", "--runs", "1",
                "--warmup", "0", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| variant | batch | median ms" in printed
    data = json.loads((out / "bench.json").read_text())
    assert data["schema"] == "toprovar-bench/1"
    env, settings, results = data["environment"], data["settings"], data["results"]
    for key in ("device", "gpu", "torch", "triton", "dtype", "cpu_threads"):
        assert key in env
    assert env["device"] == "cpu" and env["dtype"] == "float32" and env["torch"] == torch.__version__
    assert settings["batches"] == [1] and settings["cfg_rows"] == 2 and settings["runs"] == 1
    assert "VQ-VAE decode" in settings["timing_scope"] and settings["timer"] == "time.perf_counter"
    assert [r["variant"] for r in results] == ["dense", "var-tiny-fastvar-released"]
    dense, fast = results
    for r in results:
        assert r["latency_ms"]["min"] <= r["latency_ms"]["median"] and len(r["latency_ms"]["all"]) == 1
        assert r["first_call_s"] > 0 and r["throughput_img_s"] > 0 and r["peak_memory_bytes"] is None
        assert len(r["fidelity"]["token_agreement"]) == 10
    assert dense["speedup"] == 1.0 and dense["flop_ratio"] == 1.0 and dense["fidelity"]["psnr_db"] is None
    assert fast["flop_ratio"] < 0.5 and fast["backend_compile_s"] > 0 and fast["recompiles_in_timed_runs"] == 0
    assert 0 < fast["kv_cache_bytes"] < dense["kv_cache_bytes"]
    assert dense["kv_cache_bytes"] == pytest.approx(dense["kv_cache_estimate_bytes"])
    assert fast["kv_cache_bytes"] == pytest.approx(fast["kv_cache_estimate_bytes"])
    assert (out / "bench.md").read_text().startswith("# toprovar bench: var-tiny")


def test_demo_writes_side_by_side_and_overlay(tmp_path, capsys):
    out = tmp_path / "demo.png"
    assert run(["demo", "--runs", "1", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "speedup" in printed and "fidelity vs dense" in printed
    # var-ref samples as it was trained to (its checkpoint's recorded cfg 2.0 / top-p 0.9)
    assert "sampling: cfg 2, top-p 0.9, top-k 0 (the checkpoint's training.sampling)" in printed
    assert png_size(out) == (512, 256)
    w, h = png_size(tmp_path / "demo_overlay.png")
    assert w >= PNG_MIN and h >= PNG_MIN
