#!/usr/bin/env python
r"""``every=k`` in the minibatch regime: final loss and time, side by side.

The problems of ``bench_curvature.py`` (MLP and small conv net on digits, a
small NanoLM on synthetic text), trained on minibatches of 1/8 of their data
(the same sequence of batches for every variant of a seed) with CDAT
``σ = 2, ema = 0.9`` (the paper's minibatch setting), GD direction:

==================  ============================================================
``gd``              constant learning rate (the base step, for time)
``exact``           exact curvature every step (the reference)
``every10``         ``every=10`` with the default safeguards
``every10_single``  ``every=10, refresh_steps=1``
``every10_noguard`` ``every=10, secant_guard=0``
``every10_notol``   ``every=10, refresh_tol=inf`` (no early refresh)
``every10_neither`` ``every=10, secant_guard=0, refresh_tol=inf``
``sub4``, ``sub16`` ``estimators.subbatch(1/4)``, ``(1/16)``: exact curvature
                    on every 4th, 16th row of each minibatch
==================  ============================================================

Safeguards 3 and 4 of ``every=k`` (secant guard, early refresh) read the
loss change between consecutive steps, which in minibatch is also the change
of batch; this measures what they do there.

The final loss is the full-data loss at the final parameters, as a ratio to
exact CDAT's, per initialisation, and its geometric mean; time per step is
the median over interleaved chunks of steps (``common.side_by_side``), as a
ratio to ``gd``; "jvp steps" is the fraction of steps that ran the
curvature jvp. Run::

  python bench/every_minibatch.py                  # about 5 minutes, 2 cores
  python bench/every_minibatch.py --models mlp --seeds 2
"""
from __future__ import annotations

import argparse
import sys
import time

import jax
import numpy as np

from cdat_fast import estimators

# pylint: disable=g-bad-import-order
from bench_curvature import jvp_steps, make_variant
from common import gmean, markdown_table, side_by_side
from bench_problems import make_problems, minibatches

INF = float("inf")
# name -> (the bench_curvature variant it builds on, cdat keyword arguments
# replacing that variant's).
VARIANTS = {
    "gd": ("gd", None),
    "exact": ("exact", None),
    "every10": ("every10", None),
    "every10_single": ("every10_single", None),
    "every10_noguard": ("exact", dict(curvature=estimators.every(
        10, secant_guard=0.0))),
    "every10_notol": ("exact", dict(curvature=estimators.every(
        10, refresh_tol=INF))),
    "every10_neither": ("exact", dict(curvature=estimators.every(
        10, secant_guard=0.0, refresh_tol=INF))),
    "sub4": ("sub4", None),
    "sub16": ("sub16", None),
}


def _trainer(fn, params, state, batches, chunk):
  """A callable training the next ``chunk`` of ``batches`` from its carry."""
  def run():
    p, s = run.carry
    for b in batches[run.done:run.done + chunk]:
      p, s, _ = fn(p, s, b)
    jax.block_until_ready(p)
    run.carry, run.done = (p, s), run.done + chunk
  run.carry, run.done = (params, state), 0
  return run


def run(problem, variants, seed, steps, chunk, fraction=8):
  """Every variant on the same minibatches; (final loss, time, jvp share)."""
  n = jax.tree.leaves(problem.batch)[0].shape[0]
  order = minibatches(n, max(1, n // fraction), steps, seed)
  batches = [jax.tree.map(lambda v, i=i: v[i], problem.batch) for i in order]
  full = jax.jit(problem.loss)
  runs = {}
  for name in variants:
    base, extra = VARIANTS[name]
    init, step = make_variant(problem, base, ema=0.9, extra=extra)
    state = init(problem.params)
    fn = jax.jit(step).lower(problem.params, state, batches[0]).compile()
    runs[name] = _trainer(fn, problem.params, state, batches, chunk)
  timings = side_by_side(runs, base="gd", rounds=-(-steps // chunk),
                         warmup=0)
  out = {}
  for name in variants:
    p, s = runs[name].carry
    count = jvp_steps(s, steps)
    out[name] = (float(full(p, problem.batch)), timings[name].median / chunk,
                 None if count is None else count / steps)
  return out


def table(variants, loss, speed, jvp) -> str:
  """Markdown: loss / exact per model and init, gmean, max, time, jvp share."""
  models = list(dict.fromkeys(m for m, _ in loss))
  head = (["variant"] + [f"{m}: loss/exact" for m in models]
          + ["gmean", "max", "time/gd " + " ".join(models), "jvp steps"])
  rows = []
  for name in variants:
    if name == "gd":
      continue
    ratios = [r for m in models for r in loss[(m, name)]]
    cells = [" ".join(f"{r:.2f}" for r in loss[(m, name)]) for m in models]
    times = " ".join(f"{np.median(speed[(m, name)]):.2f}" for m in models)
    shares = [s for m in models for s in jvp[(m, name)]]
    share = "-" if None in shares else f"{100 * np.mean(shares):.0f}%"
    rows.append([name] + cells + [f"{gmean(ratios):.2f}",
                                  f"{max(ratios):.2f}", times, share])
  return markdown_table(head, rows)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--models", default="mlp,conv,nanolm")
  parser.add_argument("--variants", default=",".join(VARIANTS))
  parser.add_argument("--seeds", type=int, default=3)
  parser.add_argument("--steps", type=int, default=400)
  parser.add_argument("--chunk", type=int, default=5)
  args = parser.parse_args(argv)
  variants = [v for v in args.variants.split(",") if v]
  for v in variants:
    if v not in VARIANTS:
      parser.error(f"--variants: unknown variant {v!r}")
  for required in ("exact", "gd"):
    if required not in variants:
      variants.insert(0, required)
  t0 = time.perf_counter()
  loss, speed, jvp = {}, {}, {}
  for seed in range(args.seeds):
    for problem in make_problems(args.models.split(","), seed=seed):
      res = run(problem, variants, seed, args.steps, args.chunk)
      for name in variants:
        key = (problem.name, name)
        loss.setdefault(key, []).append(res[name][0] / res["exact"][0])
        speed.setdefault(key, []).append(res[name][1] / res["gd"][1])
        jvp.setdefault(key, []).append(res[name][2])
      print(f"  {problem.name} init {seed}: " + ", ".join(
          f"{n} {loss[(problem.name, n)][-1]:.2f}" for n in variants
          if n != "gd"), file=sys.stderr)
  print(table(variants, loss, speed, jvp))
  print(f"\n(total {time.perf_counter() - t0:.0f}s)")


if __name__ == "__main__":
  main()
