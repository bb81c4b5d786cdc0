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

The learning-rate-free optimizers of ``optax.contrib``, with their published
(Optax's) defaults unless a flag sets their one tuning knob; each runs with
the bases of :data:`PEER_BASES` (``--base`` picks among them):

* ``schedule_free``: Schedule-Free (Defazio et al., 2024),
  :func:`optax.contrib.schedule_free_sgd` (``--base gd``, learning rate 1)
  or :func:`optax.contrib.schedule_free_adamw` (``--base adam``, 0.0025);
  ``--peer-lr`` sets the learning rate, ``--peer-warmup`` a linear warm-up
  over that fraction of the steps (default none). Its gradients are taken
  at the interpolated point ``y``; the harness evaluates, logs and returns
  the averaged parameters ``x`` (:func:`eval_params`), as its users must.
* ``prodigy``: :func:`optax.contrib.prodigy` (Mishchenko & Defazio, 2024),
  Adam with the step size ``d`` estimated from the distance travelled
  (``--base adam``); ``--d-coef`` scales the estimate (its authors' knob).
* ``dadapt``: :func:`optax.contrib.dadapt_adamw` (Defazio & Mishchenko,
  2023), D-Adaptation for AdamW (``--base adam``); ``--peer-lr`` multiplies
  the estimated step (default 1).
* ``dog`` and ``dowg``: :func:`optax.contrib.dog` (Ivgi et al., 2023) and
  :func:`optax.contrib.dowg` (Khaled et al., 2023), SGD with
  ``η = max distance / √(Σ‖g‖²)`` (``--base gd``).
* ``mechanic``: :func:`optax.contrib.mechanize` of the base optimizer run
  with learning rate 1 (Cutkosky et al., 2023): any ``--base``.
* ``cocob``: :func:`optax.contrib.cocob` (Orabona & Tommasi, 2017),
  coin-betting per coordinate (``--base gd``).
* ``momo``: :func:`optax.contrib.momo` (``--base gd``, ``α = 1``) or
  :func:`optax.contrib.momo_adam` (``--base adam``, ``α = 0.01``), Polyak-type
  steps with momentum and the loss's lower bound 0 (Schaipp et al., 2023);
  ``--peer-lr`` sets the cap ``α``.
* ``gen``: :func:`cdat_fast.gen`, GeN (Bu & Xu, 2025) on any base, starting
  from ``η₀ = --lr`` and refreshed every ``--gen-every`` steps (4). In
  minibatch runs the harness gives it the next minibatch for its fit
  (:data:`FRESH_BATCH`), as its authors' code does.

Every peer's ``update(grads, state, params, *, value, value_fn, batch,
**ignored)`` takes what the harness's step passes to every tuner: the loss
``value`` at ``params``, ``value_fn(params, batch)`` and the batch. The
learning rate the harness logs is, in the state's ``learning_rate`` field:
the peer's own (line searches, GeN), the set one (Sophia, Schedule-Free's,
with its warm-up), ``d`` times the learning rate (Prodigy, D-Adaptation),
the sum of Mechanic's scales ``Σ s`` (the factor on the base's updates), or
the effective ``‖Δw‖/‖g‖`` (Polyak SGD, DoG, DoWG, COCOB, MoMo).
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from cdat_fast.gen import gen

LR_FREE = ("schedule_free", "prodigy", "dadapt", "dog", "dowg", "mechanic",
           "cocob", "momo", "gen")
PEERS = ("optax_backtracking", "optax_zoom", "optax_polyak",
         "sophia") + LR_FREE
# The bases a peer runs with; a peer not named takes any base. The first is
# the one ``compare`` gives it when ``--base`` is not among them.
PEER_BASES = {"optax_polyak": ("gd",), "sophia": ("gd",),
              "schedule_free": ("gd", "adam"), "prodigy": ("adam",),
              "dadapt": ("adam",), "dog": ("gd",), "dowg": ("gd",),
              "cocob": ("gd",), "momo": ("gd", "adam")}
# Peers that replace the base optimizer with one of their own (valid with
# ``base="gd"`` only); ``compare`` leaves them out for other bases.
OWN_BASE = ("optax_polyak", "sophia")
# Peers evaluated on parameters other than the iterate (:func:`eval_params`).
AVERAGED = ("schedule_free",)
# Peers that fit on a fresh minibatch: the harness passes the next one.
FRESH_BATCH = ("gen",)
SOPHIA_UPDATE_INTERVAL = 10
# Optax's (the authors') default learning rates, by base where they differ.
PUBLISHED_LR = {"schedule_free": {"gd": 1.0, "adam": 0.0025},
                "dadapt": {"adam": 1.0}, "momo": {"gd": 1.0, "adam": 0.01}}


def published_lr(name: str, base_name: str) -> float | None:
  """The default learning rate of peer ``name`` on ``base_name`` (or None)."""
  return PUBLISHED_LR.get(name, {}).get(base_name)


def eval_params(name: str, state: Any, params: Any) -> Any:
  """The parameters to evaluate, log and return for peer (or tuner) ``name``.

  Schedule-Free's are the average ``x`` of its iterates
  (:func:`optax.contrib.schedule_free_eval_params`); every other tuner's
  are ``params``.
  """
  if name not in AVERAGED:
    return params
  return optax.contrib.schedule_free_eval_params(state.inner, params)


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
  return _own(optax.polyak_sgd(max_learning_rate=max_learning_rate),
              lambda st, g, u: _effective_lr(g, u), needs_value=True,
              name="optax_polyak")


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


def _effective_lr(grads, updates) -> jax.Array:
  """``‖Δw‖/‖g‖``, the step relative to the gradient (0 for a zero gradient)."""
  g2 = optax.tree.norm(grads, squared=True)
  lr = jnp.sqrt(optax.tree.norm(updates, squared=True)
                / jnp.where(g2 > 0, g2, 1.0))
  return lr.astype(jnp.float32)


def _own(inner, learning_rate: Callable, *, needs_value: bool = False,
         name: str = "") -> optax.GradientTransformationExtraArgs:
  """An Optax optimizer as a peer; ``learning_rate(state, grads, updates)``.

  Args:
    inner: the optimizer (its own learning rate and direction).
    learning_rate: what the harness logs (module docstring).
    needs_value: pass the loss ``value`` (MoMo).
    name: the peer, for errors.
  """

  def init_fn(params):
    return PeerState(inner.init(params), jnp.zeros([], jnp.float32))

  def update_fn(grads, state, params=None, *, value=None, **ignored):
    del ignored
    kwargs = {}
    if needs_value:
      if value is None:
        raise ValueError(f"tuner {name!r} needs value (the loss at params)")
      kwargs["value"] = value
    updates, inner_state = inner.update(grads, state.inner, params, **kwargs)
    lr = learning_rate(inner_state, grads, updates)
    return updates, PeerState(inner_state, jnp.asarray(lr, jnp.float32))

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _schedule_free(base_name: str, learning_rate: float, warmup_steps: int
                   ) -> optax.GradientTransformationExtraArgs:
  """Schedule-Free SGD or AdamW; logs the set (warmed-up) learning rate."""
  make = (optax.contrib.schedule_free_sgd if base_name == "gd"
          else optax.contrib.schedule_free_adamw)
  warmup = warmup_steps or None
  inner = make(learning_rate, warmup_steps=warmup)
  sched = (optax.warmup_constant_schedule(0.0, learning_rate, warmup)
           if warmup else optax.constant_schedule(learning_rate))
  return _own(inner, lambda st, g, u: sched(st.step_count - 1))


def _lr_free(name: str, base: optax.GradientTransformation, base_name: str,
             cfg: Any) -> optax.GradientTransformationExtraArgs:
  """A learning-rate-free peer of :data:`LR_FREE` (but ``schedule_free``)."""
  lr = cfg.peer_lr
  if name == "prodigy":
    return _own(optax.contrib.prodigy(estim_lr_coef=cfg.d_coef),
                lambda st, g, u: st.estim_lr)
  if name == "dadapt":
    lr = 1.0 if lr is None else lr
    return _own(optax.contrib.dadapt_adamw(lr),
                lambda st, g, u: lr * st.estim_lr)
  if name in ("dog", "dowg"):
    make = getattr(optax.contrib, name)
    return _own(make() if lr is None else make(lr),
                lambda st, g, u: _effective_lr(g, u))
  if name == "cocob":
    return _own(optax.contrib.cocob(), lambda st, g, u: _effective_lr(g, u))
  if name == "mechanic":
    return _own(optax.contrib.mechanize(base),
                lambda st, g, u: jnp.sum(st.s))
  if name == "gen":
    return gen(base, cfg.learning_rate, every=cfg.gen_every)
  lr = published_lr("momo", base_name) if lr is None else lr
  make = optax.contrib.momo if base_name == "gd" else optax.contrib.momo_adam
  return _own(make(lr), lambda st, g, u: _effective_lr(g, u),
              needs_value=True, name="momo")


def check_base(name: str, base_name: str) -> None:
  """Raises ValueError unless peer ``name`` runs with ``base_name``."""
  bases = PEER_BASES.get(name)
  if bases is not None and base_name not in bases:
    why = ("its own base optimizer" if len(bases) == 1
           else "the bases it is built on")
    raise ValueError(f"base must be {' or '.join(bases)} for tuner {name}"
                     f" ({why}), got {base_name!r}")


def build_peer(name: str, base: optax.GradientTransformation, cfg: Any,
               steps: int) -> optax.GradientTransformationExtraArgs:
  """The peer ``name`` of :data:`PEERS` (settings: the module docstring).

  Args:
    name: the peer.
    base: the base optimizer (learning rate 1), for the peers that use one.
    cfg: the :class:`~cdat_fast.harness.optimizers.OptimizerConfig` (its
      ``base``, ``learning_rate``, ``peer_lr``, ``peer_warmup``,
      ``d_coef``, ``gen_every``, ``peer_max_lr`` and line-search fields).
    steps: the run's length (Schedule-Free's warm-up is a fraction of it).

  Raises:
    ValueError: for an unknown name, or a base the peer does not run with
      (:data:`PEER_BASES`).
  """
  if name not in PEERS:
    raise ValueError(f"tuner: unknown peer {name!r}; choose from"
                     f" {', '.join(PEERS)}")
  check_base(name, cfg.base)
  if name == "optax_polyak":
    return _polyak_sgd(cfg.peer_max_lr)
  if name == "sophia":
    return _sophia(cfg.learning_rate)
  if name == "schedule_free":
    lr = cfg.peer_lr if cfg.peer_lr is not None else published_lr(name,
                                                                  cfg.base)
    return _schedule_free(cfg.base, lr, int(round(cfg.peer_warmup * steps)))
  if name in LR_FREE:
    return _lr_free(name, base, cfg.base, cfg)
  if name == "optax_backtracking":
    search = optax.scale_by_backtracking_linesearch(
        max_backtracking_steps=cfg.ls_max_steps, slope_rtol=cfg.ls_c,
        decrease_factor=cfg.ls_decrease_factor,
        max_learning_rate=cfg.peer_max_lr)
  else:
    search = optax.scale_by_zoom_linesearch(
        max_linesearch_steps=cfg.ls_max_steps)
  return _line_search(name, optax.chain(base, search))
