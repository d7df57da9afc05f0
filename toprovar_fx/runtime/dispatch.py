"""The call every outlined residual branch makes at run time.

``dispatch_branch(session_id, spec_id, branch, *inputs)`` replaces ``x + branch(...)`` in the
graph. It asks the session's ``Decider`` what to do at the current scale and layer and
returns ``(x_new, *escapes)``:

* keep: ``x + delta`` (the same op as the original graph, so keep-all is bit-exact);
* skip: ``x`` and the escapes' skip values (the K/V cache as it was: nothing appended);
* prune_tokens: the branch runs on the kept tokens (``x`` and position-dependent inputs
  gathered with the same indices), then the result is restored (``runtime/token_ops.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .session import get_session


@dataclass(frozen=True)
class BranchSpec:
    """Compile-time facts about one outlined branch (indices are into its inputs)."""

    kind: str  # self_attn | cross_attn | ffn
    hidden: int
    positional: tuple[tuple[int, int], ...]  # (input index, token dim)
    token_sizes: tuple[int, ...]  # input indices holding the token count (a SymInt) -> k when pruned
    batch_inputs: tuple[int, ...]  # input indices that are not parameters/buffers (may carry batch rows)
    batch_static: bool  # the graph was specialised to its batch size (rows cannot be dropped)
    batch_sizes: tuple[int, ...]  # input indices holding the rows (a SymInt) -> halved for cond-only
    n_escapes: int
    escape_skip: tuple[int, ...]  # input index whose value each escape takes when skipped
    site_ids: tuple[int, ...]  # attention sites inside, their entropies follow the escapes
    linear_flops_per_token: float
    attention_pair_flops: float
    # its hidden input is the ``x_new`` of the dispatch call just before it in the same graph, and
    # nothing else uses that ``x_new``: a planned block may hand its kept tokens on instead of
    # scattering them and gathering them again (``Decider._run_planned``)
    hidden_from_previous: bool = False


def dispatch_branch(session_id: int, spec_id: int, branch: torch.nn.Module, *inputs: torch.Tensor) -> tuple[Any, ...]:
    session = get_session(session_id)
    return session.decider.run_branch(session.branches[spec_id], branch, inputs)


def accumulate_scale(session_id: int, acc: torch.Tensor, delta: torch.Tensor, inplace: bool) -> torch.Tensor:
    """The sampler's residual accumulation: ``acc + delta``, or ``acc`` while a scale is skipped."""
    session = get_session(session_id)
    if session.decider is not None and session.decider.accumulate(acc, delta):
        return acc.add_(delta) if inplace else acc + delta
    return acc
