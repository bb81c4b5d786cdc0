"""The tuners a user would pick instead of CDAT, from Optax, in the harness.

The comparison (:func:`cdat_fast.harness.experiments.compare`) runs these
beside the paper's own baselines (``cdat_fast.linesearch``, ``polyak``, ...),
with Optax's implementations and defaults, so that a reader can see where
CDAT stands against what is already a ``pip install`` away:

* ``optax_backtracking``: :func:`optax.scale_by_backtracking_linesearch`
  after the base optimizer: the Armijo condition
  ``f(w + ηu) ≤ f(w) + c·η·gᵀu`` with ``c = --ls-c``, ``η`` shrunk by
  ``--ls-decrease-factor`` at most ``--ls-max-steps`` times, each search
  starting from the last ``η`` times Optax's increase factor 1.5, capped at
  ``--peer-max-lr``.
* ``optax_zoom``: :func:`optax.scale_by_zoom_linesearch` after the base
  optimizer: the strong Wolfe conditions by Nocedal & Wright's zoom
  (algorithms 3.5–3.6), at most ``--ls-max-steps`` trials (each a value and
  a gradient), Optax's defaults otherwise (``initial_guess_strategy="keep"``).
* ``optax_polyak``: :func:`optax.polyak_sgd`, gradient descent with
  ``η = min((f(w) - f*)/‖g‖², η_max)``, ``f* = 0``, ``η_max =
  --peer-max-lr``. It is its own base: only with ``--base gd``.
* ``sophia``: :func:`optax.contrib.sophia` (Liu et al., 2023), a clipped
  diagonal-Newton method whose Hessian diagonal is a Hutchinson estimate
  refreshed every 10 steps; its learning rate ``--lr`` is tuned on a grid.
  It is its own base (only with ``--base gd``); its decoupled weight decay is
  0 since the training loss carries the model's weight decay already.

Every peer's ``update(grads, state, params, *, value, value_fn, batch,
**ignored)`` takes what the harness's step passes to every tuner: the loss
``value`` at ``params``, ``value_fn(params, batch)`` and the batch. The
learning rate the harness logs is the peer's own (line searches), the
effective ``‖u‖/‖g‖`` (Polyak) or the set one (Sophia), in the state's
``learning_rate`` field.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax.numpy as jnp
import optax

PEERS = ("optax_backtracking", "optax_zoom", "optax_polyak", "sophia")
# Peers that replace the base optimizer (valid with ``base="gd"`` only).
OWN_BASE = ("optax_polyak", "sophia")
SOPHIA_UPDATE_INTERVAL = 10


class PeerState(NamedTuple):
  """State of a peer whose Optax state holds no learning rate.

  Attributes:
    inner: the Optax optimizer's state.
    learning_rate: the step size of the last update (see the module doc).
  """
  inner: Any
  learning_rate: jnp.ndarray


def _objective(value_fn: Callable | None, batch: Any, name: str) -> Callable:
  if value_fn is None:
    raise ValueError(f"tuner {name!r} needs value_fn (the training loss) in"
                     " update's keyword arguments")
  return lambda p: value_fn(p, batch)


def _line_search(name: str, inner: optax.GradientTransformationExtraArgs
                 ) -> optax.GradientTransformationExtraArgs:
  """A line search after the base; its state's ``learning_rate`` is logged."""

  def update_fn(grads, state, params=None, *, value=None, value_fn=None,
                batch=None, **ignored):
    del ignored
    if value is None:
      raise ValueError(f"tuner {name!r} needs value (the loss at params)")
    return inner.update(grads, state, params, value=value, grad=grads,
                        value_fn=_objective(value_fn, batch, name))

  return optax.GradientTransformationExtraArgs(inner.init, update_fn)


def _polyak_sgd(max_learning_rate: float) -> optax.GradientTransformationExtraArgs:
  inner = optax.polyak_sgd(max_learning_rate=max_learning_rate)

  def init_fn(params):
    return PeerState(inner.init(params), jnp.zeros([], jnp.float32))

  def update_fn(grads, state, params=None, *, value=None, **ignored):
    del ignored
    if value is None:
      raise ValueError("tuner 'optax_polyak' needs value (the loss at params)")
    updates, inner_state = inner.update(grads, state.inner, params,
                                        value=value)
    g2 = optax.tree.norm(grads, squared=True)
    lr = jnp.sqrt(optax.tree.norm(updates, squared=True)
                  / jnp.where(g2 > 0, g2, 1.0))
    return updates, PeerState(inner_state, lr.astype(jnp.float32))

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _sophia(learning_rate: float) -> optax.GradientTransformationExtraArgs:
  inner = optax.contrib.sophia(learning_rate, weight_decay=0.0,
                               update_interval=SOPHIA_UPDATE_INTERVAL)

  def init_fn(params):
    return PeerState(inner.init(params),
                     jnp.asarray(learning_rate, jnp.float32))

  def update_fn(grads, state, params=None, *, value_fn=None, batch=None,
                **ignored):
    del ignored
    updates, inner_state = inner.update(
        grads, state.inner, params,
        obj_fn=_objective(value_fn, batch, "sophia"))
    return updates, PeerState(inner_state, state.learning_rate)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def build_peer(name: str, base: optax.GradientTransformation, *,
               base_name: str, learning_rate: float, max_learning_rate: float,
               slope_rtol: float, decrease_factor: float, max_steps: int
               ) -> optax.GradientTransformationExtraArgs:
  """The peer ``name`` of :data:`PEERS` (settings: the module docstring).

  Raises:
    ValueError: for an unknown name, or a peer of :data:`OWN_BASE` with a
      base other than ``gd``.
  """
  if name not in PEERS:
    raise ValueError(f"tuner: unknown peer {name!r}; choose from"
                     f" {', '.join(PEERS)}")
  if name in OWN_BASE and base_name != "gd":
    raise ValueError(f"tuner {name!r} is its own base optimizer: use base gd,"
                     f" got {base_name!r}")
  if name == "optax_polyak":
    return _polyak_sgd(max_learning_rate)
  if name == "sophia":
    return _sophia(learning_rate)
  if name == "optax_backtracking":
    search = optax.scale_by_backtracking_linesearch(
        max_backtracking_steps=max_steps, slope_rtol=slope_rtol,
        decrease_factor=decrease_factor, max_learning_rate=max_learning_rate)
  else:
    search = optax.scale_by_zoom_linesearch(max_linesearch_steps=max_steps)
  return _line_search(name, optax.chain(base, search))
