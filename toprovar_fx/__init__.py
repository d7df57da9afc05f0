"""toprovar_fx: a torch.compile backend that prunes VAR-family generators by attention entropy.

``torch.compile(sampler, backend="toprovar", options={"policy": ...})``; the backend is found
through the ``torch_dynamo_backends`` entry point, so importing this package is optional.
"""

from .runtime.report import GenerationReport, LayerReport, ScaleReport
from .runtime.session import entropy_maps, last_generation

__all__ = ["GenerationReport", "LayerReport", "ScaleReport", "entropy_maps", "last_generation"]
__version__ = "0.1.0"


def _register_backend() -> None:
    """Make ``backend="toprovar"`` work from a source checkout too (no entry point installed)."""
    try:
        from torch._dynamo.backends.registry import _COMPILER_FNS, register_backend
    except ImportError:  # a torch without this registry: the entry point still works when installed
        return
    if "toprovar" not in _COMPILER_FNS:
        from .backend import toprovar_backend

        register_backend(compiler_fn=toprovar_backend, name="toprovar")


_register_backend()
