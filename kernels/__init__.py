"""Fused second-order forward (jet) kernels in Pallas, with pure-jnp references.

Each jet kernel computes a layer's value, first-order and second-order
tangents ``(y, dy, ddy)`` in one pass; :mod:`.flash_attention` holds flash
attention's forward (with the log-sum-exp), backward and tangent as
differentiable primitives, per platform. With ``interpret=None`` the version is chosen
for the platform being lowered for, not the host's: Pallas' interpreter on
CPU, Triton on GPU, Mosaic on TPU, so a program compiled ahead of time for
an accelerator from a CPU host holds the real kernels
(``kernels/lowering.py``; ``docs/accelerators.md``).
"""

from .activation_jet import ACTIVATIONS
from .activation_jet import activation_jet
from .activation_jet import activation_jet_reference
from .attention_jet import attention_jet
from .attention_jet import attention_jet_reference
from .dense_jet import dense_jet
from .flash_attention import flash_attention_backward
from .flash_attention import flash_attention_forward
from .flash_attention import flash_attention_reference
from .flash_attention import flash_attention_tangent
from .dense_jet import dense_jet_reference
from .layer_norm_jet import layer_norm_jet
from .layer_norm_jet import layer_norm_jet_reference

__all__ = [
    "ACTIVATIONS",
    "activation_jet",
    "activation_jet_reference",
    "attention_jet",
    "attention_jet_reference",
    "dense_jet",
    "dense_jet_reference",
    "flash_attention_backward",
    "flash_attention_forward",
    "flash_attention_reference",
    "flash_attention_tangent",
    "layer_norm_jet",
    "layer_norm_jet_reference",
]
