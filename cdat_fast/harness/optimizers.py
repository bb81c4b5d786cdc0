"""Building base optimizers, tuners and learning-rate schedules by name.

The training harness and the CLI describe an optimizer with a few strings and
numbers; this module turns them into an ``optax.GradientTransformationExtraArgs``
following the paper's protocol (appendix C.3): base optimizers keep Optax's
defaults (momentum 0.9, RMSProp and Adam ``β₂ = 0.999``, Adam ``β₁ = 0.9``) and
run with learning rate 1 so that a tuner (or a constant/scheduled learning
rate) sets the step size.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable

import optax

from cdat_fast import checks
from cdat_fast.cdat import cdat, make_estimator
from cdat_fast.harness.peers import PEERS, build_peer, check_base
from cdat_fast.hypergradient import hypergradient
from cdat_fast.linesearch import backtracking_linesearch
from cdat_fast.polyak import polyak
from cdat_fast.sharpness_rule import sharpness_rule

BASES = ("gd", "momentum", "rmsprop", "adam")
TUNERS = ("constant", "cdat", "quadratic_greedy", "linesearch", "polyak",
          "hypergradient", "sharpness_rule") + PEERS
SCHEDULES = ("constant", "warmup_constant", "warmup_linear", "warmup_cosine")
ADAPTIVE = ("rmsprop", "adam")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  """What optimizer to build; every field maps to a CLI flag of the same name."""
  base: str = "gd"
  tuner: str = "cdat"
  learning_rate: float = 0.1  # constant/scheduled peak lr; hypergradient's η₀
  schedule: str = "constant"
  warmup_fraction: float = 0.1
  horizon_fraction: float = 1.0
  scale: float = 2.0  # CDAT σ; sharpness rule σ
  ema: float = 0.0
  eps: float = 0.0
  ls_c: float = 1e-4
  ls_relative_decrease: float = 0.0
  ls_increase_factor: float = math.inf
  ls_decrease_factor: float = 0.8
  ls_max_steps: int = 100
  polyak_max_lr: float = 1.0
  peer_max_lr: float = 100.0  # optax_backtracking's and optax_polyak's η_max
  # The learning-rate-free peers' one knob (cdat_fast.harness.peers): the
  # learning rate of schedule_free, dadapt, dog, dowg, momo (None: the
  # published default), schedule_free's warm-up as a fraction of the steps,
  # Prodigy's d_coef, GeN's refresh period Φ (its η₀ is learning_rate).
  peer_lr: float | None = None
  peer_warmup: float = 0.0
  d_coef: float = 1.0
  gen_every: int = 4
  hyper_beta: float = 1e-2
  curvature: str = "exact"
  every: int = 1


def validate(cfg: OptimizerConfig) -> None:
  """Checks every field by its own name (the CLI flag is ``--`` + dashes)."""
  checks.check_choice("base", cfg.base, BASES)
  checks.check_choice("tuner", cfg.tuner, TUNERS)
  checks.check_choice("schedule", cfg.schedule, SCHEDULES)
  checks.check_range("learning_rate", cfg.learning_rate, low=0.0,
                     low_inclusive=False)
  checks.check_range("warmup_fraction", cfg.warmup_fraction, low=0.0, high=1.0)
  checks.check_range("horizon_fraction", cfg.horizon_fraction, low=0.0,
                     high=1.0, low_inclusive=False)
  checks.check_range("scale", cfg.scale, low=0.0, low_inclusive=False)
  checks.check_range("ema", cfg.ema, low=0.0, high=1.0, high_inclusive=False)
  checks.check_range("eps", cfg.eps, low=0.0)
  checks.check_range("ls_c", cfg.ls_c, low=0.0)
  checks.check_range("ls_relative_decrease", cfg.ls_relative_decrease, low=0.0)
  checks.check_range("ls_increase_factor", cfg.ls_increase_factor, low=1.0,
                     allow_inf=True)
  checks.check_range("ls_decrease_factor", cfg.ls_decrease_factor, low=0.0,
                     high=1.0, low_inclusive=False, high_inclusive=False)
  checks.check_int("ls_max_steps", cfg.ls_max_steps, low=1)
  checks.check_range("polyak_max_lr", cfg.polyak_max_lr, low=0.0,
                     low_inclusive=False, allow_inf=True)
  checks.check_range("peer_max_lr", cfg.peer_max_lr, low=0.0,
                     low_inclusive=False, allow_inf=True)
  _validate_peer_knobs(cfg)
  checks.check_range("hyper_beta", cfg.hyper_beta, low=0.0, high=1.0)
  checks.check_int("every", cfg.every, low=1)
  from cdat_fast.cdat import CURVATURES
  checks.check_choice("curvature", cfg.curvature, CURVATURES)


def _validate_peer_knobs(cfg: OptimizerConfig) -> None:
  if cfg.peer_lr is not None:
    checks.check_range("peer_lr", cfg.peer_lr, low=0.0, low_inclusive=False)
  checks.check_range("peer_warmup", cfg.peer_warmup, low=0.0, high=1.0,
                     high_inclusive=False)
  checks.check_range("d_coef", cfg.d_coef, low=0.0, low_inclusive=False)
  checks.check_int("gen_every", cfg.gen_every, low=1)
  if cfg.tuner in PEERS:
    check_base(cfg.tuner, cfg.base)


def base_optimizer(name: str) -> optax.GradientTransformation:
  """The base direction with learning rate 1 (``u = -g`` for GD)."""
  checks.check_choice("base", name, BASES)
  if name == "gd":
    return optax.sgd(1.0)
  if name == "momentum":
    return optax.sgd(1.0, momentum=0.9)
  if name == "rmsprop":
    return optax.rmsprop(1.0, decay=0.999)
  return optax.adam(1.0, b1=0.9, b2=0.999)


def schedule(cfg: OptimizerConfig, steps: int) -> optax.Schedule:
  """Constant, or linear warm-up followed by constant / linear / cosine decay.

  The warm-up lasts ``warmup_fraction · horizon`` steps from 0, the decays reach
  0 at ``horizon = horizon_fraction · steps`` (paper appendix C.3).
  """
  checks.check_choice("schedule", cfg.schedule, SCHEDULES)
  checks.check_range("learning_rate", cfg.learning_rate, low=0.0,
                     low_inclusive=False)
  if cfg.schedule == "constant":
    return optax.constant_schedule(cfg.learning_rate)
  checks.check_range("warmup_fraction", cfg.warmup_fraction, low=0.0, high=1.0)
  checks.check_range("horizon_fraction", cfg.horizon_fraction, low=0.0,
                     high=1.0, low_inclusive=False)
  horizon = max(1, int(round(cfg.horizon_fraction * steps)))
  warmup = int(round(cfg.warmup_fraction * horizon))
  lr = cfg.learning_rate
  if cfg.schedule == "warmup_constant":
    return optax.join_schedules(
        [optax.linear_schedule(0.0, lr, max(warmup, 1)),
         optax.constant_schedule(lr)], [warmup])
  if cfg.schedule == "warmup_linear":
    return optax.join_schedules(
        [optax.linear_schedule(0.0, lr, max(warmup, 1)),
         optax.linear_schedule(lr, 0.0, max(horizon - warmup, 1))], [warmup])
  return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, horizon, 0.0)


def curvature_estimator(cfg: OptimizerConfig,
                        fraction: float | None = None):
  """CDAT's curvature as the config names it, on a sub-batch if ``fraction``.

  :func:`cdat_fast.cdat.make_estimator`: with ``fraction`` the named
  curvature is measured by :func:`cdat_fast.estimators.subbatch`; ``every >
  1`` wraps that, and the secant estimate falls back to it.
  """
  return make_estimator(cfg.curvature, cfg.every, fraction=fraction)


def build_optimizer(cfg: OptimizerConfig, steps: int, *,
                    curvature_fraction: float | None = None,
                    ) -> tuple[optax.GradientTransformationExtraArgs,
                               Callable | None]:
  """Returns ``(optimizer, schedule or None)``; the schedule only for ``constant``.

  ``curvature_fraction``: CDAT's curvature on that fraction of each batch
  (:func:`curvature_estimator`).
  """
  validate(cfg)
  base = base_optimizer(cfg.base)
  if cfg.tuner == "constant":
    sched = schedule(cfg, steps)
    opt = optax.chain(base, optax.scale_by_schedule(sched))
    return optax.with_extra_args_support(opt), sched
  if cfg.tuner in ("cdat", "quadratic_greedy"):
    scale = 1.0 if cfg.tuner == "quadratic_greedy" else cfg.scale
    return cdat(base, scale=scale, ema=cfg.ema, eps=cfg.eps,
                curvature=curvature_estimator(cfg, curvature_fraction)), None
  if cfg.tuner == "linesearch":
    return backtracking_linesearch(
        base, c=cfg.ls_c, relative_decrease=cfg.ls_relative_decrease,
        increase_factor=cfg.ls_increase_factor,
        decrease_factor=cfg.ls_decrease_factor,
        max_steps=cfg.ls_max_steps), None
  if cfg.tuner == "polyak":
    return polyak(base, max_learning_rate=cfg.polyak_max_lr), None
  if cfg.tuner in PEERS:
    return build_peer(cfg.tuner, base, cfg, steps), None
  if cfg.tuner == "hypergradient":
    return hypergradient(base, learning_rate=cfg.learning_rate,
                         beta=cfg.hyper_beta), None
  return sharpness_rule(base, scale=cfg.scale,
                        preconditioned=cfg.base in ADAPTIVE), None
