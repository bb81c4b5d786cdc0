"""How the Pallas kernels are lowered: interpret on CPU, Triton on GPU.

Since JAX 0.10 the default GPU lowering of ``pallas_call`` is Mosaic GPU
(``jax_pallas_use_mosaic_gpu``), a different programming model (warpgroup
matmuls, explicit memory spaces) that these generic block kernels are not
written for; Triton compiler parameters select the Triton lowering, which
takes them as they are. On CPU the kernels run in interpret mode (the tests).

JAX 0.11 deprecates the Pallas Triton backend: each lowering warns
(``DeprecationWarning``, id ``jax-pallas-triton``; an error only where that
deprecation is accelerated). Until it is removed the kernels keep this path;
the way forward is a Mosaic GPU port (``plgpu.kernel``) or the official
Triton bindings through jax-triton (the optional ``gpu`` extra).
"""
from __future__ import annotations

import jax

try:
  from jax.experimental.pallas import triton as pltriton
except ImportError:  # pragma: no cover - depends on the jaxlib build.
  pltriton = None


def next_power_of_2(n: int) -> int:
  return 1 << max(0, (int(n) - 1).bit_length())


def default_interpret() -> bool:
  """Interpret mode where no compiler backend for Pallas is wanted: on CPU."""
  return jax.default_backend() == "cpu"


def compiler_params(interpret: bool, num_warps=None, num_stages=None):
  """Triton compiler parameters on GPU; None in interpret mode and elsewhere."""
  if interpret or jax.default_backend() != "gpu" or pltriton is None:
    return None
  kwargs = {"num_warps": num_warps}
  if num_stages is not None:
    kwargs["num_stages"] = num_stages
  return pltriton.CompilerParams(**kwargs)
