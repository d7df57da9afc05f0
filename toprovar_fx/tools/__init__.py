"""The functions behind the ``toprovar`` command (``docs/cli.md``).

They return data and write files; printing is the CLI's job (``toprovar_fx/cli.py``).

>>> from toprovar_fx.tools import calibrate_policy, make_plan, inspect_policy, bench_policies
>>> from toprovar_fx.policies import load_policy
>>> print(make_plan("var-tiny", load_policy("var-tiny")).to_text())          # doctest: +SKIP
>>> calibrate_policy("var-tiny", classes=8, out="my-policy.yaml")            # doctest: +SKIP
>>> inspect_policy("var-tiny", "my-policy.yaml", "inspect/")                 # doctest: +SKIP
>>> bench_policies("var-tiny", "dense,var-tiny,my-policy.yaml", runs=5, out="bench/")  # doctest: +SKIP

Bad arguments raise :class:`ToolError` (a ``ValueError``; the CLI exits with code 2) or
``toprovar_fx.policies.PolicyError``.
"""

from .bench import BenchResult, bench_policies, parse_variants
from .calibrate import CalibrationResult, calibrate_policy
from .inspect import InspectResult, inspect_policy
from .models import Generation, ModelAdapter, ToolError, load_model
from .plan import Plan, make_plan

__all__ = [
    "BenchResult",
    "CalibrationResult",
    "Generation",
    "InspectResult",
    "ModelAdapter",
    "Plan",
    "ToolError",
    "bench_policies",
    "calibrate_policy",
    "inspect_policy",
    "load_model",
    "make_plan",
    "parse_variants",
]
