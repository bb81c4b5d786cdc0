r"""A trace-time promise: a jvp of a jvp along one direction is being traced.

CDAT's curvature ``uᵀ∇²f(w)u`` is the second-order term of

.. math::
  \frac{d}{d\tau}\Big|_{\tau=0}\, \partial f(w + \tau u)[u],

a jvp of a jvp whose two tangents are the same ``u``. Every intermediate
``x(w)`` of ``f`` then has the same tangent at both levels, ``∂x(w)[u]``:
the inner jvp's tangent of ``x`` and the outer jvp's tangent of ``x`` are
equal as values, and the outer tangent of the inner tangent is the second
derivative ``∂²x(w)[u, u]``. :mod:`cdat_fast.nn`'s layers use that to run a
fused kernel for ``(y, ẏ, ÿ)``. Without this promise they can only see it
when the two tangents are the same Python objects, which holds through a
chain of :mod:`cdat_fast.nn` layers but not through a stock layer (a flax
``DenseGeneral`` makes new tracers for each level).

:func:`cdat_fast.curvature.directional_derivatives` (so every curvature
estimator that takes a jvp of a jvp) traces under :func:`along_one_direction`;
:func:`active` tells a layer whether it is inside one. The promise is a JAX
configuration state that is part of JAX's trace context, so a function
traced under it (a ``jax.jit``, ``jax.checkpoint`` or ``lax.scan`` body
inside the model) is cached apart from the same function traced without
it, and a fused rule can never be reused for a jvp of a jvp along two
different directions. Where this JAX has no such state, :func:`active` is
always False and the layers fall back to the identity test, exact as
before.

The promise covers the jvp-of-jvp that :func:`along_one_direction`
encloses, and nothing nested inside the model: a model that takes its own
``jax.jvp`` internally must not be differentiated under it.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

try:
  from jax._src import config as _jax_config  # pylint: disable=g-import-not-at-top
  _STATE = _jax_config.bool_state(
      "cdat_fast_along_one_direction", False,
      help="cdat-fast: a jvp of a jvp along one direction is being traced",
      include_in_trace_context=True)
except (ImportError, AttributeError, TypeError):  # pragma: no cover
  _STATE = None


def supported() -> bool:
  """Whether this JAX lets the promise be made (and cached apart)."""
  return _STATE is not None


def active() -> bool:
  """Whether the tracing in progress is a jvp of a jvp along one direction."""
  return _STATE is not None and bool(_STATE.value)


@contextlib.contextmanager
def along_one_direction() -> Iterator[None]:
  """Traces the enclosed code as a jvp of a jvp along one direction."""
  if _STATE is None:  # pragma: no cover - depends on the JAX version.
    yield
    return
  with _STATE(True):
    yield
