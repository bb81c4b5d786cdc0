"""What CDAT's rule and the sub-batch modes cost over the base step.

For each problem of ``bench_curvature.py`` it compiles the ``gd`` step and
each variant, then times ``--chunk`` steps of each in interleaved rounds
(``common.side_by_side``: the order rotated each round, so machine noise
hits all alike), and a variant's ratio is the median over rounds of its time
over the same round's ``gd`` chunk's. Beside
it, XLA's own model of the compiled programs (``cost_analysis()``): the
FLOP ratio (what the arithmetic predicts) and the ratio of bytes accessed.

Variants: ``floor`` (CDAT's rule with a free curvature; ``floor_norm``
with its ``‖u‖²`` computed by a pass over ``u``),
``sub16_gn`` (``subbatch(1/16, inner=gauss_newton())``), ``sub16_fwd`` (the
sub-batch with the plain forward-only central difference below: three
forward passes and nothing else) and any variant name of
``bench_curvature.py`` (``sub16_fd``: ``estimators.finite_difference()`` on
the sub-batch, ``sub16_fd3`` with its fixed step, three passes); a sub-batch variant with ``_waits`` appended has
its rows wait for ``gᵀu`` on CPU too, as they did before the wait was left
to GPU and TPU programs (``sub16_gn_waits``).

Run: ``python bench/rule_cost.py [--models fashion,mlp] [--rounds 15]``.
"""
from __future__ import annotations

import argparse
from unittest import mock

import jax
import jax.numpy as jnp
import optax

from cdat_fast import estimators

# pylint: disable=g-bad-import-order
import bench_curvature
from common import markdown_table, platform_line, side_by_side
from bench_problems import PROBLEMS, make_problems


def forward_only(mu: float = 1e-2) -> estimators.CurvatureEstimator:
  """A stand-in: ``(f(w+hu) − 2f(w) + f(w−hu))/h²``, three forward passes.

  ``h = μ/√|gᵀu|`` (``gᵀu`` is given, so ``h`` costs no pass over ``u``).
  """
  def update(state, params, direction, objective, *, slope=None, value=None,
             learning_rate=None):
    del value, learning_rate
    f = objective.value()
    h = mu * jax.lax.rsqrt(jnp.maximum(jnp.abs(slope), 1e-30))
    at = lambda t: f(jax.tree.map(lambda w, u: w + (t * h).astype(w.dtype) * u,
                                  params, direction))
    f0, fp, fm = f(params), at(1.0), at(-1.0)
    return estimators.Estimate(f0, slope, (fp - 2 * f0 + fm) / h**2), state

  return estimators.CurvatureEstimator(lambda params: optax.EmptyState(),
                                       update)


def _rows_wait(step):
  """``step`` traced with the sub-batch's rows made to wait for ``gᵀu`` on
  every platform, as GPU and TPU programs are (the CPU's were, before)."""
  def traced(*args):
    with mock.patch.object(jax.lax, "platform_dependent",
                           lambda *a, default, **_: default(*a)):
      return step(*args)
  return traced


def variant_step(problem, name):
  """``(init, step)`` of a variant (module doc)."""
  if name.endswith("_waits"):
    init, step = variant_step(problem, name[:-len("_waits")])
    return init, _rows_wait(step)
  if name == "floor_norm":  # the floor's κ‖u‖² by a pass over u
    return bench_curvature.make_variant(problem, "floor", extra=dict(
        curvature=bench_curvature.constant_curvature(
            2.0 / problem.gd_learning_rate, from_slope=False)))
  if name != "sub16_fwd":
    return bench_curvature.make_variant(problem, name)
  return bench_curvature.make_variant(problem, "sub16", extra=dict(
      curvature=estimators.subbatch(1 / 16, inner=forward_only())))


def _chunk(fn, carry, batch, chunk):
  """A callable running ``chunk`` steps of ``fn`` from the carry it holds."""
  def run():
    p, s = run.carry
    for _ in range(chunk):
      p, s, v = fn(p, s, batch)
    jax.block_until_ready(v)
    run.carry = p, s
  run.carry = carry
  return run


def measure(problem, variants, rounds, chunk):
  """``{variant: (time ratio quartiles, FLOP ratio, bytes ratio, gd ms)}``."""
  fns, costs = {}, {}
  for name in ("gd", *variants):
    init, step = variant_step(problem, name)
    state = init(problem.params)
    fn = jax.jit(step).lower(problem.params, state, problem.batch).compile()
    costs[name] = fn.cost_analysis()
    fns[name] = _chunk(fn, (problem.params, state), problem.batch, chunk)
  timings = side_by_side(fns, base="gd", rounds=rounds)
  gd = costs["gd"]
  return {name: (timings[name].ratio_quartiles,
                 costs[name]["flops"] / gd["flops"],
                 costs[name]["bytes accessed"] / gd["bytes accessed"],
                 1e3 * timings["gd"].median / chunk) for name in variants}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--models", default=",".join(PROBLEMS))
  parser.add_argument("--variants", default="floor,sub16_gn,sub16_fwd,sub16_fd")
  parser.add_argument("--rounds", type=int, default=15)
  parser.add_argument("--chunk", type=int, default=10)
  args = parser.parse_args(argv)
  variants = [v for v in args.variants.split(",") if v]
  print(f"{platform_line()}; median over {args.rounds} rounds of"
        f" {args.chunk} steps, each beside a gd chunk")
  head = ("problem", "variant", "time / gd (quartiles)", "FLOPs / gd",
          "bytes / gd", "gd ms/step")
  print(markdown_table(head, []), flush=True)
  for problem in make_problems(args.models.split(",")):
    for name, (t, f, b, ms) in measure(problem, variants, args.rounds,
                                       args.chunk).items():
      row = [problem.name, name, f"{t[1]:.3f} ({t[0]:.2f}–{t[2]:.2f})",
             f"{f:.3f}", f"{b:.3f}", f"{ms:.2f}"]
      print(markdown_table(head, [row]).split("\n")[2], flush=True)


if __name__ == "__main__":
  main()
