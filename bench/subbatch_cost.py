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

import jax
import jax.numpy as jnp

from cdat_fast.curvature import directional_derivatives
from cdat_fast.estimators.subbatch import every_mth_row

# pylint: disable=g-bad-import-order
from common import markdown_table, platform_line, side_by_side
from bench_problems import PROBLEMS, make_problems


def _rows(batch, k):
  """Every ``k``-th row of each leaf, as ``estimators.subbatch(1/k)``."""
  return jax.tree.map(lambda v: every_mth_row(v, k), batch)


def _jvp2(loss, params, direction):
  return directional_derivatives(loss, params, direction)[2]


def functions(loss, params, batch, parts):
  """name -> zero-argument callable running one jitted function (module doc)."""
  direction = jax.tree.map(jnp.negative, jax.grad(loss)(params, batch))

  def step(p, full, k):
    value, grad = jax.value_and_grad(loss)(p, full)
    u = jax.tree.map(jnp.negative, grad)
    return value, _jvp2(lambda q: loss(q, _rows(full, k)), p, u)

  def call(fn):
    return lambda: jax.block_until_ready(fn(params, batch))

  fns = {"grad": call(jax.jit(jax.value_and_grad(loss)))}
  for k in parts:
    fns[f"jvp2 1/{k}"] = call(jax.jit(lambda p, b, k=k: _jvp2(
        lambda q: loss(q, _rows(b, k)), p, direction)))
    fns[f"step 1/{k}"] = call(jax.jit(functools.partial(step, k=k)))
  return fns


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--model", default="nanolm", choices=PROBLEMS)
  parser.add_argument("--parts", default="1,2,4,16")
  parser.add_argument("--rounds", type=int, default=20)
  args = parser.parse_args(argv)
  if args.rounds < 1:
    parser.error("--rounds must be >= 1")
  problem = make_problems((args.model,))[0]
  fns = functions(problem.loss, problem.params, problem.batch,
                  [int(x) for x in args.parts.split(",")])
  timings = side_by_side(fns, base="grad", rounds=args.rounds)
  base = timings["grad"].median
  print(f"{problem.name}, {platform_line()}, median of {args.rounds} rounds")
  print(markdown_table(("function", "ms", "/ grad"), [
      (name, f"{1e3 * t.median:.2f}", f"{t.median / base:.2f}")
      for name, t in timings.items()]))


if __name__ == "__main__":
  main()
