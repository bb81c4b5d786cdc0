"""Calling the objective: Optax's ``value_fn`` convention for tuners.

A tuner's ``update`` receives ``value_fn`` (the objective as a function of the
parameters) and arbitrary extra keyword arguments. As in
``optax.scale_by_backtracking_linesearch``, the extra arguments whose names
appear in ``value_fn``'s signature (all of them, if it takes ``**kwargs``) are
passed on to it, so ``value_fn(params, batch=batch)`` works with
``update(..., value_fn=value_fn, batch=batch)``.
"""
from __future__ import annotations

import functools
import inspect
from typing import Any, Callable


def value_fn_kwargs(
    value_fn: Callable[..., Any], extra_args: dict[str, Any]
) -> dict[str, Any]:
  """The subset of ``extra_args`` that ``value_fn`` accepts by keyword."""
  try:
    sig = inspect.signature(value_fn)
  except (TypeError, ValueError):
    return {}
  params = sig.parameters.values()
  if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
    return dict(extra_args)
  names = {
      p.name
      for p in params
      if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD,
                    inspect.Parameter.KEYWORD_ONLY)
  }
  return {k: v for k, v in extra_args.items() if k in names}


def scalar_valued(tuner: str, name: str,
                  fn: Callable[..., Any]) -> Callable[..., Any]:
  """``fn`` with its output checked (at trace time) to be a scalar.

  A vector would otherwise flow through the tuner's jvps and reductions and
  become a vector learning rate, scaling the update entry by entry.
  """
  @functools.wraps(fn)
  def checked(*args, **kwargs):
    out = fn(*args, **kwargs)
    shape = getattr(out, "shape", None)
    if shape is None or tuple(shape) != ():
      what = (f"an array of shape {tuple(shape)}" if shape is not None
              else type(out).__name__)
      raise ValueError(
          f"{tuner}: {name} must return a scalar loss, got {what}; reduce it"
          " (e.g. jnp.mean over the batch) before returning")
    return out

  return checked


def bind_objective(
    tuner: str, value_fn: Callable[..., Any] | None, extra_args: dict[str, Any]
) -> Callable[[Any], Any]:
  """Returns ``params -> value_fn(params, **kwargs)``; names ``value_fn`` if
  missing or if it returns anything but a scalar."""
  if value_fn is None:
    raise TypeError(
        f"{tuner}.update needs the objective: pass value_fn=<function of the"
        " parameters returning a scalar loss> (and any batch it needs as extra"
        " keyword arguments)"
    )
  if not callable(value_fn):
    raise TypeError(f"{tuner}: value_fn must be callable, got {type(value_fn)}")
  kwargs = value_fn_kwargs(value_fn, extra_args)
  return scalar_valued(tuner, "value_fn",
                       functools.partial(value_fn, **kwargs) if kwargs
                       else value_fn)
