"""toprovar_fx: a torch.compile backend that prunes VAR-family generators by attention entropy.

``torch.compile(sampler, backend="toprovar", options={"policy": ...})``; the backend is found
through the ``torch_dynamo_backends`` entry point, so importing this package is optional.
"""

from .runtime.report import GenerationReport, LayerReport, ScaleReport
from .runtime.session import entropy_maps, last_generation

__all__ = ["GenerationReport", "LayerReport", "ScaleReport", "entropy_maps", "last_generation"]
__version__ = "0.1.0"
