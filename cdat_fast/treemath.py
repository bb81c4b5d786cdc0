"""Pytree arithmetic that keeps shardings.

``optax.tree.vdot`` in optax 0.2.8 falls back to ``jnp.vdot`` under JAX ≥ 0.10
(a string comparison of version numbers), which flattens each leaf and so
all-gathers every parameter sharded on a non-leading dimension. The inner
product here contracts every axis in place, so a sharded leaf only adds a
scalar all-reduce.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp


def vdot(a: Any, b: Any) -> jax.Array:
  """``Σ_leaves ⟨a, b⟩`` without reshaping (real inputs; float32 or wider)."""
  leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
  if len(leaves_a) != len(leaves_b):
    raise ValueError("vdot: trees have different numbers of leaves")
  if not leaves_a:
    return jnp.zeros([], jnp.float32)
  terms = []
  for x, y in zip(leaves_a, leaves_b):
    x, y = jnp.asarray(x), jnp.asarray(y)
    dtype = jnp.promote_types(jnp.promote_types(x.dtype, y.dtype), jnp.float32)
    terms.append(jnp.tensordot(x.astype(dtype), y.astype(dtype), axes=x.ndim,
                               precision=jax.lax.Precision.HIGHEST))
  return sum(terms[1:], terms[0])


def norm(a: Any) -> jax.Array:
  """Euclidean norm of a pytree, computed like :func:`vdot`."""
  return jnp.sqrt(vdot(a, a))


def cast_like(tree: Any, like: Any) -> Any:
  """``tree`` with each leaf cast to the dtype of the matching leaf of ``like``."""
  return jax.tree.map(lambda t, p: jnp.asarray(t, dtype=jnp.asarray(p).dtype),
                      tree, like)
