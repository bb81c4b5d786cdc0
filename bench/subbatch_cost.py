"""Where a sub-batch curvature step's time goes, piece by piece.

For one benchmark problem of ``bench_curvature.py`` (default: the NanoLM),
times, each as one jitted function and interleaved round by round:

* ``grad``: ``value_and_grad`` on the full batch (the base step's work);
* ``jvp2 1/k``: the jvp of a jvp alone on every ``k``-th row of the batch
  (the rows ``estimators.subbatch(1/k)`` takes, cut inside the function as
  the estimator does);
* ``step 1/k``: both in one jitted function, as in a sub-batch CDAT step
  (``k = 1`` is exact CDAT's work).

If the combined function costs more than its two parts timed apart, the
difference is XLA's compiled program, not the sub-batch computation.

Run: ``python bench/subbatch_cost.py [--model nanolm] [--rounds 20]``.
"""
from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp

from cdat_fast.estimators.subbatch import every_mth_row

sys.path.insert(0, os.path.dirname(__file__))
import bench_curvature  # pylint: disable=g-import-not-at-top,wrong-import-position


def _rows(batch, k):
  """Every ``k``-th row of each leaf, as ``estimators.subbatch(1/k)``."""
  return jax.tree.map(lambda v: every_mth_row(v, k), batch)


def _jvp2(loss, params, direction):
  slope = lambda q: jax.jvp(loss, (q,), (direction,))[1]
  return jax.jvp(slope, (params,), (direction,))[1]


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--model", default="nanolm",
                      choices=bench_curvature.PROBLEMS)
  parser.add_argument("--parts", default="1,2,4,16")
  parser.add_argument("--rounds", type=int, default=20)
  args = parser.parse_args(argv)
  if args.rounds < 1:
    parser.error("--rounds must be >= 1")
  problem = bench_curvature.make_problems((args.model,))[0]
  loss, params, batch = problem.loss, problem.params, problem.batch
  direction = jax.tree.map(jnp.negative, jax.grad(loss)(params, batch))

  def step(p, full, k):
    value, grad = jax.value_and_grad(loss)(p, full)
    u = jax.tree.map(jnp.negative, grad)
    return value, _jvp2(lambda q: loss(q, _rows(full, k)), p, u)

  fns = {"grad": (jax.jit(jax.value_and_grad(loss)), (params, batch))}
  for k in (int(x) for x in args.parts.split(",")):
    fns[f"jvp2 1/{k}"] = (jax.jit(lambda p, b, k=k: _jvp2(
        lambda q: loss(q, _rows(b, k)), p, direction)), (params, batch))
    fns[f"step 1/{k}"] = (jax.jit(functools.partial(step, k=k)),
                          (params, batch))
  times = {name: [] for name in fns}
  for name, (fn, fargs) in fns.items():
    jax.block_until_ready(fn(*fargs))  # compile
  for _ in range(args.rounds):
    for name, (fn, fargs) in fns.items():
      t = time.perf_counter()
      jax.block_until_ready(fn(*fargs))
      times[name].append(time.perf_counter() - t)
  base = statistics.median(times["grad"])
  print(f"{problem.name}, jax {jax.__version__} on "
        f"{jax.devices()[0].platform}, median of {args.rounds} rounds")
  print("| function | ms | / grad |\n|---|---|---|")
  for name, ts in times.items():
    m = statistics.median(ts)
    print(f"| {name} | {1e3 * m:.2f} | {m / base:.2f} |")


if __name__ == "__main__":
  main()
