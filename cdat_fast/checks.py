"""Validation of tuner hyperparameters, with errors that name the argument.

Hyperparameters may arrive as Python numbers (checked at construction) or as
JAX arrays, e.g. when a tuner is wrapped in ``optax.inject_hyperparams``; a
traced value cannot be checked and is passed through unchanged.
"""
from __future__ import annotations

import math
from typing import Any

import jax


def concrete_float(value: Any) -> float | None:
  """Returns ``value`` as a Python float, or None if it is traced."""
  if isinstance(value, jax.core.Tracer):
    return None
  try:
    return float(value)
  except (TypeError, jax.errors.ConcretizationTypeError):
    return None


def check_range(
    name: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_inclusive: bool = True,
    high_inclusive: bool = True,
    allow_inf: bool = False,
) -> None:
  """Raises ValueError naming ``name`` if a concrete ``value`` is out of range."""
  v = concrete_float(value)
  if v is None:
    return
  lo = "[" if low_inclusive else "("
  hi = "]" if high_inclusive else ")"
  interval = (
      f"{lo}{'-inf' if low is None else low}, {'inf' if high is None else high}{hi}"
  )
  bad = math.isnan(v) or (math.isinf(v) and not allow_inf)
  if low is not None:
    bad |= v < low if low_inclusive else v <= low
  if high is not None:
    bad |= v > high if high_inclusive else v >= high
  if bad:
    raise ValueError(f"{name} must be in {interval}, got {value!r}")


def check_int(name: str, value: Any, *, low: int = 0) -> None:
  """Raises ValueError unless ``value`` is a Python int >= ``low``."""
  if isinstance(value, bool) or not isinstance(value, int) or value < low:
    raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
  if value not in choices:
    raise ValueError(f"{name} must be one of {choices}, got {value!r}")
