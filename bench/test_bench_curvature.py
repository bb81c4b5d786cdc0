"""pytest-benchmark view of ``bench_curvature.py``: one jitted step per variant.

Not collected by the default test run (``testpaths = ["tests"]``). Run with

  python -m pytest bench/test_bench_curvature.py --benchmark-group-by=param:model

Each benchmark times one compiled training step of a variant on a model
(full batch; ``fashion`` needs Debian's ``dataset-fashion-mnist``), the
same step functions as ``bench_curvature.py``; compare
the medians within a group. The variants run one after the other, so slow
drifts of a shared CPU (±20% seen on 2 cores) enter the ratios; the
interleaved measurement with final losses, ``python
bench/bench_curvature.py``, is the reference.
"""
import functools
import os
import sys

import jax
import pytest

sys.path.insert(0, os.path.dirname(__file__))
import bench_curvature  # pylint: disable=g-import-not-at-top,wrong-import-position


@functools.lru_cache(maxsize=None)
def _problem(model):
  return bench_curvature.make_problems((model,))[0]


@pytest.mark.parametrize("variant", bench_curvature.VARIANTS)
@pytest.mark.parametrize("model", bench_curvature.PROBLEMS)
def test_step(benchmark, model, variant):
  problem = _problem(model)
  init, step = bench_curvature.make_variant(problem, variant)
  state = init(problem.params)
  step = jax.jit(step).lower(problem.params, state, problem.batch).compile()
  carry = {"params": problem.params, "state": state}

  def one_step():
    p, s, value = step(carry["params"], carry["state"], problem.batch)
    carry["params"], carry["state"] = p, s
    return jax.block_until_ready(value)

  for _ in range(3):  # leave the first, transient steps out of the timing
    one_step()
  benchmark.pedantic(one_step, rounds=30, iterations=1, warmup_rounds=2)
