"""The plain layers the fused kernels compute, and XLA's jet of a layer.

Shared by ``roofline.py``, ``gpu_kernels.py`` and ``attention_accuracy.py``:
a fused kernel returns a layer's value and its first and second directional
derivatives ``(y, ẏ, ÿ)``; :func:`jet` is what XLA computes for the same
inputs, a jvp of a jvp of the plain layer. It is a layer's (vector) jet,
not the loss's scalar ``uᵀHu`` of ``cdat_fast.curvature``.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def causal_attention(q, k, v):
  """Softmax attention with a causal mask, ``1/√d`` scale, ``(B, H, T, D)``."""
  t = q.shape[-2]
  s = jnp.einsum("bhqd,bhkd->bhqk", q, k) / jnp.sqrt(q.shape[-1])
  s = jnp.where(jnp.tril(jnp.ones((t, t), bool)), s, -jnp.inf)
  return jnp.einsum("bhqk,bhkd->bhqd", jax.nn.softmax(s, axis=-1), v)


def layer_norm(x, scale, bias, epsilon=1e-6):
  """The textbook layer norm (two-pass variance) in the dtype of ``x``."""
  xc = x - jnp.mean(x, axis=-1, keepdims=True)
  var = jnp.mean(xc * xc, axis=-1, keepdims=True)
  return xc * jax.lax.rsqrt(var + epsilon) * scale + bias


def jet(f, n: int, k: int):
  """XLA's jvp of a jvp of ``f`` (``n`` primals): (primals, tangents, second
  tangents of the first ``k`` primals) -> (y, dy, ddy), as the kernels.

  ``ddy = d²/dt² f(w + t·d + t²/2·dd)`` at ``t = 0``, with ``dd`` zero past
  the first ``k`` primals.
  """
  def run(*args):
    p, d, dd = args[:n], args[n:2 * n], args[2 * n:]
    inner = lambda *pd: jax.jvp(f, pd[:n], pd[n:] + d[k:])  # noqa: E731
    (y, dy), (_, ddy) = jax.jvp(inner, p + d[:k], d + dd)
    return y, dy, ddy
  return run
