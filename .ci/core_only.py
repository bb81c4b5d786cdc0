"""CI: cdat_fast with its core dependencies only (jax, optax, numpy, flax).

Run in an environment made with ``pip install .`` and nothing else: imports
the package, checks that none of the harness's dependencies came with it,
and runs a jitted CDAT step with the exact curvature and with the sub-batch
Gauss–Newton curvature on a small regression, asserting finite, positive
learning rates and a loss that goes down.
"""
import importlib.util
import sys

import jax
import jax.numpy as jnp
import optax

import cdat_fast
from cdat_fast import estimators

# The harness's own dependencies (orbax-checkpoint also comes with flax).
HARNESS_ONLY = ("sklearn", "matplotlib", "tqdm")


def main() -> int:
  present = [m for m in HARNESS_ONLY if importlib.util.find_spec(m)]
  if present:
    print(f"core-only environment has harness dependencies: {present}")
    return 1
  k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
  params = {"w1": jax.random.normal(k1, (8, 32)) / 8**0.5,
            "w2": jax.random.normal(k2, (32, 1)) / 32**0.5}
  x = jax.random.normal(k3, (64, 8))
  batch = {"x": x, "y": jnp.sin(x.sum(axis=1, keepdims=True))}
  model_fn = lambda p, batch: jnp.tanh(batch["x"] @ p["w1"]) @ p["w2"]
  loss_fn = lambda z, batch: 0.5 * jnp.mean((z - batch["y"]) ** 2)
  value_fn = lambda p, batch: loss_fn(model_fn(p, batch), batch)
  for name, curvature in (
      ("exact", "exact"),
      ("sub-batch", estimators.subbatch(1 / 4,
                                        inner=estimators.gauss_newton()))):
    opt = cdat_fast.cdat(optax.sgd(1.0), curvature=curvature)

    @jax.jit
    def step(p, state):
      value, grad = jax.value_and_grad(value_fn)(p, batch)
      updates, state = opt.update(grad, state, p, value_fn=value_fn,
                                  model_fn=model_fn, loss_fn=loss_fn,
                                  batch=batch)
      return optax.apply_updates(p, updates), state, value

    p, state = params, opt.init(params)
    losses = []
    for _ in range(20):
      p, state, value = step(p, state)
      losses.append(float(value))
    eta = float(optax.tree.get(state, "learning_rate"))
    print(f"{name}: loss {losses[0]:.4f} -> {losses[-1]:.4f}, lr {eta:.4f}")
    if not (0 < eta < float("inf") and losses[-1] < losses[0]):
      return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
