"""Pass order of prune mode (kept apart so observe mode imports nothing it does not run)."""

from __future__ import annotations

from .find_attention import find_attention
from .find_residual_branches import find_residual_branches
from .gate_scale_accumulation import gate_scale_accumulation
from .hoist_entropy_outputs import hoist_entropy_outputs
from .insert_branch_dispatch import insert_branch_dispatch
from .rewrite_attention import rewrite_attention

PRUNE_PASSES = [
    find_attention,
    rewrite_attention,
    find_residual_branches,
    insert_branch_dispatch,
    hoist_entropy_outputs,
    gate_scale_accumulation,
]
