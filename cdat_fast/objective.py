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


def bind_objective(
    tuner: str, value_fn: Callable[..., Any] | None, extra_args: dict[str, Any]
) -> Callable[[Any], Any]:
  """Returns ``params -> value_fn(params, **kwargs)``; names ``value_fn`` if missing."""
  if value_fn is None:
    raise TypeError(
        f"{tuner}.update needs the objective: pass value_fn=<function of the"
        " parameters returning a scalar loss> (and any batch it needs as extra"
        " keyword arguments)"
    )
  if not callable(value_fn):
    raise TypeError(f"{tuner}: value_fn must be callable, got {type(value_fn)}")
  kwargs = value_fn_kwargs(value_fn, extra_args)
  if not kwargs:
    return value_fn
  return functools.partial(value_fn, **kwargs)
