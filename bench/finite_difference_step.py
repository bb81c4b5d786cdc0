"""Accuracy of the finite-difference curvature against the step size.

For each model, at initialisation and after ``--train`` steps of gradient
descent (learning rate 0.5), with ``u = −∇f(w)`` on the full batch, prints
the relative error ``|D − uᵀ∇²f u| / |uᵀ∇²f u|`` of the difference ``D``
(``estimators.finite_difference(upper=False)``) against the exact
``uᵀ∇²f(w)u`` (a jvp of a jvp in float64 at the same parameters):

* at fixed steps ``step=h`` (``μ‖u‖ = h max(‖w‖, 1)``), ``h`` from 1e-5 to
  1e-1;
* at ``μ = η``: CDAT's own on-edge step ``η = 2|gᵀu| / uᵀ∇²f u`` (a secant
  over the step);
* ``auto``: the automatic step from a fresh state (pilot and retries), with
  the ``h`` it asks for next and the retries it took; ``auto, 3rd``: the
  third update at the same point, from the step the previous one chose,
  with the error it estimates for itself;
* ``jvp²``: the jvp of a jvp in the same precision, for comparison.

Precisions: ``f32``; ``bf16``, bfloat16 parameters and activations, the loss
in float32; ``mixed``, float32 parameters cast to bfloat16 inside the model,
with the default ``noise`` (which reads float32's) and with
``noise=1e-3``. ``ε_f`` is the loss's measured rounding,
``|f̃(w) − f₆₄(w)| / |f₆₄(w)|``.

Models: ``mlp`` and ``nanolm`` of ``bench_curvature.py`` (ReLU: the
difference also sees the kinks crossed within ``±μu``, which the jvp of a
jvp counts as zero curvature); ``mlp_gelu``, the same MLP with GELU, and
``vit``, the harness's small ViT (GELU, cross-entropy) on 256 digits: smooth
models, where only truncation and rounding remain.

Run: ``python bench/finite_difference_step.py`` (a few minutes on 2 CPU
cores; ``--models``, ``--train``).
"""
from __future__ import annotations

import argparse

import jax

jax.config.update("jax_enable_x64", True)  # the float64 reference

# pylint: disable=g-import-not-at-top,wrong-import-position,g-bad-import-order
import jax.numpy as jnp

from cdat_fast import estimators, treemath
from cdat_fast.curvature import directional_derivatives
from cdat_fast.estimators.interface import Objective

from common import markdown_table, platform_line
from bench_problems import cast, make_problems

MODELS = ("mlp", "nanolm", "mlp_gelu", "vit")
STEPS = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
PRECISIONS = ("f32", "bf16", "mixed")


def objectives(problem):
  """``(float32, bfloat16 compute, float64)`` losses of the parameters."""
  model, loss, batch = problem.model_fn, problem.loss_fn, problem.batch

  def f32(p):
    return loss(model(p, batch), batch)

  def bf16(p):
    logits = model(cast(p, jnp.bfloat16), cast(batch, jnp.bfloat16))
    return loss(logits.astype(jnp.float32), batch)

  def f64(p):
    return loss(model(cast(p, jnp.float64), cast(batch, jnp.float64)),
                batch)
  return f32, bf16, f64


def point(precision, params, f32, bf16):
  """``(w, f, noise)`` for a precision: the parameters, the loss, ``noise``."""
  if precision == "f32":
    return params, f32, None
  if precision == "bf16":
    return cast(params, jnp.bfloat16), bf16, None
  return params, bf16, 1e-3


def row(w, f, noise, f64):
  """Relative errors at each step, at ``μ = η``, ``auto`` and ``jvp²``."""
  u = jax.tree.map(jnp.negative, jax.grad(f)(w))
  ref = float(directional_derivatives(f64, cast(w, jnp.float64),
                                      cast(u, jnp.float64))[2])
  err = lambda d: abs(float(d) - ref) / abs(ref)
  obj = Objective("bench", value_fn=f)

  def at(w, u, h):
    fixed = estimators.finite_difference(step=h, noise=noise, upper=False)
    return fixed.update(fixed.init(w), w, u, obj)[0].curvature

  at = jax.jit(at)
  auto = estimators.finite_difference(noise=noise, upper=False)
  update = jax.jit(lambda s, w, u: auto.update(s, w, u, obj))
  a_est, a_state = update(auto.init(w), w, u)
  settled, s_state = a_est, a_state
  for _ in range(2):
    settled, s_state = update(s_state, w, u)
  wscale = max(float(treemath.norm(w)), 1.0)
  slope = float(treemath.vdot(jax.grad(f)(w), u))
  eta_h = 2 * abs(slope) / abs(ref) * float(treemath.norm(u)) / wscale
  exact = jax.jit(lambda w, u: directional_derivatives(f, w, u)[2])(w, u)
  fv, fref = float(f(w)), float(f64(cast(w, jnp.float64)))
  return dict(
      noise=abs(fv - fref) / abs(fref),
      steps=[err(at(w, u, h)) for h in STEPS],
      eta=err(at(w, u, min(eta_h, 1.0))), eta_h=eta_h,
      auto=err(a_est.curvature), auto_h=float(a_state.length) / wscale,
      retries=int(a_state.num_retries), exact=err(exact),
      settled=err(settled.curvature), estimated=float(s_state.error))


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--models", default=",".join(MODELS))
  parser.add_argument("--train", type=int, default=200)
  args = parser.parse_args(argv)
  names = args.models.split(",")
  unknown = [n for n in names if n not in MODELS]
  if unknown:
    parser.error(f"unknown models {unknown}; valid: {MODELS}")
  print(f"{platform_line()}; relative error of the curvature against"
        " float64's jvp of a jvp")
  head = (["model", "state", "precision", "ε_f", "jvp²"]
          + [f"h={h:g}" for h in STEPS]
          + ["μ=η (h)", "auto (h, retries)", "auto, 3rd (estimate)"])
  print(markdown_table(head, []))
  for name in names:
    problem = make_problems((name,))[0]
    f32, bf16, f64 = objectives(problem)
    params = problem.params
    descend = jax.jit(lambda p: jax.tree.map(
        lambda w, g: w - 0.5 * g, p, jax.grad(f32)(p)))
    for state in ("init", f"GD {args.train}"):
      if state != "init":
        for _ in range(args.train):
          params = descend(params)
      for precision in PRECISIONS:
        r = row(*point(precision, params, f32, bf16), f64)
        cells = ([name, state, precision, f"{r['noise']:.1e}",
                  f"{r['exact']:.1e}"] + [f"{e:.1e}" for e in r["steps"]]
                 + [f"{r['eta']:.2f} ({r['eta_h']:.1e})",
                    f"{r['auto']:.1e} ({r['auto_h']:.1e}, {r['retries']})",
                    f"{r['settled']:.1e} ({r['estimated']:.1e})"])
        print(markdown_table(head, [cells]).split("\n")[2], flush=True)

if __name__ == "__main__":
  main()
