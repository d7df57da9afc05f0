"""Kernels of toprovar_fx: Flash-Attention-Entropy (``fae``) and its float64 reference."""

from toprovar_fx.kernels.fae import (
    FAE_OP,
    fae,
    fae_torch,
    reference_attention_entropy,
    validate_fae_inputs,
)

__all__ = ["FAE_OP", "fae", "fae_torch", "reference_attention_entropy", "validate_fae_inputs"]
