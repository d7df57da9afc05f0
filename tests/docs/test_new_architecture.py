"""docs/new-architecture.md: the policies written in the walkthrough validate and run on hart-tiny.

The YAML is read from the page itself (the ```yaml block after ``<!-- policy: NAME -->``), so the
page cannot drift from what the schema and the backend accept.
"""

import re
from pathlib import Path

import pytest
import torch
import yaml

import toprovar_fx
from toprovar_fx import zoo
from toprovar_fx.policies import Policy, load_policy

DOC = Path(__file__).resolve().parents[2] / "docs" / "new-architecture.md"


def doc_policy(name: str) -> dict:
    """The YAML block marked ``<!-- policy: name -->`` in the page, parsed with ``yaml.safe_load``."""
    text = DOC.read_text(encoding="utf-8")
    found = re.findall(rf"<!-- policy: {re.escape(name)} -->\s*```yaml\n(.*?)```", text, re.S)
    assert len(found) == 1, f"expected one ```yaml block after <!-- policy: {name} --> in {DOC}"
    return yaml.safe_load(found[0])


@pytest.mark.parametrize("name", ["hart-tiny-walkthrough", "hart-tiny-walkthrough-keepall"])
def test_doc_policy_validates_and_fits_hart_tiny(name):
    policy = load_policy(doc_policy(name))
    assert isinstance(policy, Policy) and policy.name == name
    model = zoo.build("hart-tiny", device="meta")
    assert policy.check_fingerprint(model.fingerprint()) == []
    assert {k: [list(hw) for hw in v] for k, v in policy.schedules.items()} == {
        k: [list(hw) for hw in v] for k, v in model.scale_schedules.items()
    }


def test_doc_policy_resolves_as_the_page_says():
    r = load_policy(doc_policy("hart-tiny-walkthrough")).resolved("256:1:1")
    assert (r.min_start, r.max_start, r.representative) == (7, 9, 6)  # 10x10, 16x16, 8x8


def test_doc_policy_prunes_hart_tiny_without_fallbacks():
    # One DDIM step instead of eight: the diffusion head runs after the last scale and is left alone
    # by the passes (the page shows it), so this changes nothing toprovar sees and saves ~5 s of tracing.
    model = zoo.build("hart-tiny", seed=0, diff_steps=1)
    # strict: a schedule or fingerprint mismatch raises instead of silently running dense
    fast = torch.compile(model.autoregressive_infer_cfg, backend="toprovar",
                         options={"policy": doc_policy("hart-tiny-walkthrough"), "strict": True})
    images = fast(B=1, label_B=torch.tensor([3]), g_seed=0, cfg=1.5)
    assert images.shape == (1, 3, 256, 256) and torch.isfinite(images).all()
    rep = toprovar_fx.last_generation()
    assert rep.mode == "prune" and rep.policy == "hart-tiny-walkthrough"
    assert rep.fallbacks == [] and rep.attention_skipped == []
    assert rep.depth == 4 and [s.tokens for s in rep.scales] == [1, 4, 9, 16, 25, 36, 64, 100, 169, 256]
    assert rep.start_scale is not None and 7 <= rep.start_scale <= 9
    last = rep.scales[-1]
    assert last.pruning_active
    for layer in last.layers[:2]:  # blocks 0..measure_layer always run dense
        assert layer.action == "keep"
    assert all(layer.layer_class in ("global", "detail") for layer in last.layers)
    pruned = [layer for layer in last.layers if layer.action == "prune_tokens"]
    for layer in pruned:
        assert layer.kept_tokens % 16 == 0 and 26 <= layer.kept_tokens < 256  # bucket 16, min_keep 10%
    assert 0 < rep.flop_ratio <= 1
    assert rep.flop_ratio < 1 if pruned else rep.flop_ratio == 1
