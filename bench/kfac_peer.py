"""kfac-jax's quadratic-model learning rate as a peer of CDAT (full batch).

CDAT (Roulet et al., 2024) scales an update direction :math:`u` of a base
optimizer by

.. math::
  \\eta_t = \\sigma \\, \\frac{\\max(-\\nabla f(w_t)^\\top u_t, 0)}
                             {|u_t^\\top \\nabla^2 f(w_t) u_t|} ,

:math:`\\sigma = 2` being the edge of stability of the quadratic model and
:math:`\\sigma = 1` its minimiser along :math:`u_t`. kfac-jax's
``Optimizer(use_adaptive_learning_rate=True)`` (Martens & Grosse, 2015,
section 7) picks the step by minimising, along its direction
:math:`\\Delta_t = C_t^{-1} \\nabla f(w_t)` (the K-FAC preconditioned
gradient, the update being :math:`-\\eta_t \\Delta_t`), the damped quadratic
model

.. math::
  M(\\eta) = f(w_t) - \\eta \\nabla f^\\top \\Delta
             + \\frac{\\eta^2}{2} \\Delta^\\top (G + \\mu I + \\lambda I)
             \\Delta ,
  \\qquad
  \\eta_t = \\frac{\\nabla f^\\top \\Delta}
                 {\\Delta^\\top (G + \\mu I + \\lambda I) \\Delta}
          = \\frac{-\\nabla f^\\top u}{u^\\top (G + \\mu I + \\lambda I) u}
  \\ \\ (u = -\\Delta),

with :math:`G` the exact (not K-FAC-approximated) Gauss–Newton matrix of the
data term (here the squared loss, so Gauss–Newton = Fisher), :math:`\\mu` the
weight decay (``l2_reg``, the Hessian of :math:`\\tfrac{\\mu}{2}\\|w\\|^2`)
and :math:`\\lambda` the Levenberg–Marquardt damping, adapted every 5 steps
from the ratio of the actual to the predicted decrease. This is CDAT with
:math:`\\sigma = 1`, the Gauss–Newton curvature :math:`G + \\mu I` in place of
the Hessian, and :math:`\\lambda \\|u\\|^2` added to the denominator, on a
K-FAC base direction instead of the gradient. :math:`G + \\mu I` is positive
definite, so neither CDAT's clipping at 0 nor its absolute value ever acts.
With ``use_adaptive_momentum=True`` (kfac's recommended full-batch mode) the
step is the minimiser of :math:`M` over the plane of :math:`\\Delta_t` and the
previous update, a 2x2 solve giving the learning rate and the momentum.

Two variants, on the harness's Fashion-MNIST MLP (256-256, ReLU, 4096
images, squared loss, weight decay 1e-5, full batch), with the settings of
kfac-jax's full-batch MNIST examples (``examples/*_mnist/pipeline.py``:
initial damping 150, damping decay 0.95 every 5 steps within [1e-5, 1000],
5 burn-in steps, curvature EMA 0.95, inverses every 5 steps):

* ``kfac_adaptive_lr``: adaptive learning rate, momentum fixed at 0 (passed
  as a traced 0, so kfac still computes the Gauss–Newton products of the
  previous update: its step cost is that of the next variant);
* ``kfac_adaptive_lr_mom``: adaptive learning rate and momentum.

Per variant: final loss (mean train loss of the last 5 iterates, as the
harness's ``last5_loss``: the loss kfac evaluates at the start of each of the
last 5 steps), mean [min–max] over seeds (the init key; data fixed); the last
step's learning rate (and momentum, damping); and the time per step relative
to a plain full-batch gradient step (``optax.sgd``, one jitted call per step
as kfac's ``step`` is) of the same model and loss, measured in interleaved
rounds in this process after the training runs: median ratio over rounds
[min–max]. kfac's step includes its Python-side dispatch (it reads the step
counter on the host each step), its periodic inverse and damping updates
(every 5 steps; a round is 10 steps) and a stochastic curvature-propagation
pass for the K-FAC factors.

kfac's learning rate multiplies :math:`\\Delta_t = C_t^{-1} \\nabla f`, not
the gradient, so its magnitude is not comparable with a gradient-descent
learning rate (nor with CDAT's on GD); the final loss is the comparable
number.

Needs the ``kfac`` extra (kfac-jax); without it the script exits with
status 2. kfac-jax 0.0.8, the newest release, fails on jax >= 0.9.2
(``Primitive.get_bind_params`` changed); :func:`patch_kfac_for_new_jax`
installs kfac-jax main's one-function fix. In this checkout kfac-jax lives
in a venv that shares the main environment's jax::

  python -m venv --system-site-packages build/kfac-venv
  build/kfac-venv/bin/pip install 'kfac-jax>=0.0.8'
  build/kfac-venv/bin/python bench/kfac_peer.py --json runs/kfac_peer.json
  build/kfac-venv/bin/python bench/kfac_peer.py --steps 100 --seeds 1

References:
  Roulet et al., `Stepping on the Edge: Curvature Aware Learning Rate Tuners
  <https://arxiv.org/abs/2407.06183>`_, NeurIPS 2024.
  Martens & Grosse, `Optimizing Neural Networks with Kronecker-factored
  Approximate Curvature <https://arxiv.org/abs/1503.05671>`_, ICML 2015.
"""
from __future__ import annotations

import argparse
import itertools
import math
import statistics
import sys
import time
from typing import Any
import warnings

import jax
import jax.extend  # pylint: disable=unused-import (source_info_util)
import jax.numpy as jnp
import numpy as np
import optax

try:
  import kfac_jax
  from kfac_jax._src import tag_graph_matcher as _kfac_tgm
except ImportError:  # pragma: no cover - exercised by running the script
  kfac_jax = _kfac_tgm = None

from cdat_fast.harness.data import load_dataset
from cdat_fast.harness.experiments import format_spread, spread
from cdat_fast.harness.losses import l2_penalty, make_loss_fn, squared_loss
from cdat_fast.harness.models import get_model, init_params

# pylint: disable=g-bad-import-order
from common import markdown_table, side_by_side, write_json

WEIGHT_DECAY = 1e-5

# kfac's step donates its arguments; the batch's buffers cannot be reused.
warnings.filterwarnings("ignore", "Some donated buffers were not usable")

# kfac-jax's full-batch MNIST examples (classifier and autoencoder).
KFAC_SETTINGS = dict(
    initial_damping=150.0,
    min_damping=1e-5,
    max_damping=1000.0,
    damping_adaptation_decay=0.95,
    damping_adaptation_interval=5,
    num_burnin_steps=5,
    curvature_ema=0.95,
    inverse_update_period=5,
    estimation_mode="ggn_curvature_prop",
    exact_quad_model_matrix_type="ggn",
)

VARIANTS = {
    "kfac_adaptive_lr": dict(use_adaptive_momentum=False),
    "kfac_adaptive_lr_mom": dict(use_adaptive_momentum=True),
}

INSTALL_HINT = ("kfac_peer.py: kfac_jax is not importable; install the "
                "`kfac` extra (pip install -e '.[kfac]').")


def _eval_jaxpr_eqn(eqn, in_values):
  """kfac-jax's ``eval_jaxpr_eqn`` for jax >= 0.9.2 (as on kfac-jax's main).

  jax 0.9.2 moved the ``subfuns`` that ``Primitive.get_bind_params`` returned
  beside the params into the params; kfac-jax 0.0.8 (the newest release)
  still unpacks a pair and fails on the first layer-tag pass.
  """
  bind_params = eqn.primitive.get_bind_params(eqn.params)
  with jax.extend.source_info_util.user_context(eqn.source_info.traceback):
    output = eqn.primitive.bind(*in_values, **bind_params)
  return output if isinstance(output, list) else [output]


def patch_kfac_for_new_jax() -> bool:
  """Installs :func:`_eval_jaxpr_eqn` into kfac-jax <= 0.0.8 on jax >= 0.9.2.

  Returns:
    whether the patch was applied.
  """
  jax_version = tuple(int(p) for p in jax.__version__.split(".")[:3])
  kfac_version = tuple(int(p) for p in kfac_jax.__version__.split(".")[:3])
  if jax_version < (0, 9, 2) or kfac_version > (0, 0, 8):
    return False
  _kfac_tgm.eval_jaxpr_eqn = _eval_jaxpr_eqn
  return True


def make_kfac_loss(model, weight_decay: float = WEIGHT_DECAY):
  """The harness's squared loss + weight decay, output registered for kfac.

  The value is ``cdat_fast.harness.losses.make_loss_fn(model, "squared",
  weight_decay)``'s: :math:`\\frac1n \\sum_i \\frac12 \\|z_i - e_{y_i}\\|^2 +
  \\frac{\\mu}{2}\\|w\\|^2`. kfac's squared-error registration means
  ``weight * sum((z - t)**2) / n``, hence ``weight=0.5``.
  """

  def loss_fn(params, batch):
    logits = model.apply({"params": params}, batch["x"])
    targets = jax.nn.one_hot(batch["y"], logits.shape[-1], dtype=logits.dtype)
    kfac_jax.register_squared_error_loss(logits, targets, weight=0.5)
    value = squared_loss(logits, batch["y"])
    if weight_decay:
      value = value + l2_penalty(params, weight_decay)
    return value

  return loss_fn


def make_optimizer(loss_fn, adaptive_momentum: bool,
                   weight_decay: float = WEIGHT_DECAY, **overrides):
  """kfac_jax.Optimizer with adaptive learning rate and damping."""
  settings = dict(KFAC_SETTINGS, **overrides)
  return kfac_jax.Optimizer(
      value_and_grad_func=jax.value_and_grad(loss_fn),
      l2_reg=weight_decay,
      use_adaptive_learning_rate=True,
      use_adaptive_momentum=adaptive_momentum,
      use_adaptive_damping=True,
      multi_device=False,
      **settings)


class KfacRun:
  """Steps one kfac optimizer on a fixed (full) batch."""

  def __init__(self, optimizer, params, batch, key):
    self.opt = optimizer
    self.adaptive_momentum = optimizer._use_adaptive_momentum  # pylint: disable=protected-access
    init_key, self.key = jax.random.split(key)
    self.batches = itertools.repeat(batch)
    self.params = params
    self.state = optimizer.init(params, init_key, batch)
    self.t = 0

  def step(self) -> dict[str, Any]:
    """One step; returns kfac's stats (``loss`` is at the pre-step params)."""
    kwargs = {} if self.adaptive_momentum else {"momentum": 0.0}
    self.params, self.state, stats = self.opt.step(
        self.params, self.state, jax.random.fold_in(self.key, self.t),
        data_iterator=self.batches, global_step_int=self.t, **kwargs)
    self.t += 1
    return stats


def load_problem(subset: int):
  """Fashion-MNIST subset (seed 0), the harness's 256-256 MLP, full batch."""
  ds = load_dataset("fashion-mnist", subset=subset, seed=0)
  model = get_model("mlp", 10, features=(256, 256))
  batch = {"x": jnp.asarray(ds.x_train), "y": jnp.asarray(ds.y_train)}
  return model, batch


def train(variant: str, model, batch, seed: int, steps: int) -> dict:
  """One training run; the harness's summary fields."""
  loss_fn = make_kfac_loss(model)
  opt = make_optimizer(loss_fn, **_variant_kwargs(variant))
  key = jax.random.key(seed)
  params = init_params(model, key, batch["x"][:1])
  run = KfacRun(opt, params, batch, key)
  losses, stats = [], {}
  start = time.perf_counter()
  for _ in range(steps):
    stats = run.step()
    losses.append(float(stats["loss"]))
    if not math.isfinite(losses[-1]):
      break
  seconds = time.perf_counter() - start
  tail = np.asarray(losses[-5:])
  ok = len(losses) == steps and bool(np.all(np.isfinite(tail)))
  return {
      "seed": seed, "steps": len(losses), "seconds": seconds,
      "status": "ok" if ok else "diverged",
      "final_loss": float(np.mean(tail)) if ok else math.inf,
      "initial_loss": losses[0],
      "final_learning_rate": float(stats["learning_rate"]),
      "final_momentum": float(stats["momentum"]),
      "final_damping": float(stats["damping"]),
      "loss_every_10": losses[::10],
  }


def _variant_kwargs(variant: str) -> dict:
  return {"adaptive_momentum": VARIANTS[variant]["use_adaptive_momentum"]}


def make_gd_step(model, learning_rate: float = 0.1):
  """A jitted full-batch ``optax.sgd`` step on the harness's own loss."""
  loss_fn = make_loss_fn(model, "squared", WEIGHT_DECAY)
  tx = optax.sgd(learning_rate)

  @jax.jit
  def step(params, opt_state, batch):
    loss, grads = jax.value_and_grad(loss_fn)(params, batch)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return step, tx


def _repeat(fn, n: int):
  """A callable running ``fn`` ``n`` times and waiting for the last result."""
  def run():
    out = None
    for _ in range(n):
      out = fn()
    jax.block_until_ready(out)
  return run


def time_ratio(variant: str, model, batch, rounds: int,
               round_steps: int = 10) -> dict:
  """Step time of ``variant`` / an sgd step, interleaved rounds."""
  key = jax.random.key(0)
  params = init_params(model, key, batch["x"][:1])
  gd_step, tx = make_gd_step(model)
  gd_params = jax.tree.map(jnp.copy, params)  # kfac donates its params
  gd = {"params": gd_params, "state": tx.init(gd_params)}
  run = KfacRun(make_optimizer(make_kfac_loss(model), **_variant_kwargs(
      variant)), params, batch, key)

  def one_gd():
    gd["params"], gd["state"], loss = gd_step(gd["params"], gd["state"], batch)
    return loss

  def one_kfac():
    run.step()
    return run.params

  _repeat(one_kfac, 2 * round_steps)()  # compiles every static branch
  _repeat(one_gd, 3)()
  t = side_by_side({"kfac": _repeat(one_kfac, round_steps),
                    "sgd": _repeat(one_gd, round_steps)},
                   base="sgd", rounds=rounds, warmup=0)
  lo, hi = t["kfac"].ratio_range
  return {"ratio_median": t["kfac"].median_ratio,
          "ratio_min": lo, "ratio_max": hi,
          "kfac_ms_median": 1e3 * t["kfac"].median / round_steps,
          "sgd_ms_median": 1e3 * t["sgd"].median / round_steps,
          "rounds": rounds, "round_steps": round_steps}


def measure(args) -> dict:
  model, batch = load_problem(args.subset)
  results = {"config": {"steps": args.steps, "seeds": args.seeds,
                        "subset": args.subset, "rounds": args.rounds,
                        "weight_decay": WEIGHT_DECAY, "kfac": KFAC_SETTINGS,
                        "kfac_jax": kfac_jax.__version__,
                        "jax": jax.__version__},
             "variants": {}}
  for variant in VARIANTS:
    runs = []
    for seed in range(args.seeds):
      runs.append(train(variant, model, batch, seed, args.steps))
      print(f"  {variant} seed {seed}: final loss {runs[-1]['final_loss']:.5g}"
            f", lr {runs[-1]['final_learning_rate']:.4g}, "
            f"{runs[-1]['seconds']:.0f} s", file=sys.stderr, flush=True)
    row = spread([r["final_loss"] for r in runs])
    row["runs"] = runs
    row["timing"] = time_ratio(variant, model, batch, args.rounds)
    results["variants"][variant] = row
  return results


def table(results: dict) -> str:
  """Markdown table of the results."""
  rows = []
  for name, row in results["variants"].items():
    lrs = [r["final_learning_rate"] for r in row["runs"]]
    moms = [r["final_momentum"] for r in row["runs"]]
    damps = [r["final_damping"] for r in row["runs"]]
    t = row["timing"]
    rows.append([
        name, format_spread(row), _range(lrs), _range(moms), _range(damps),
        f"{t['ratio_median']:.2f}x [{t['ratio_min']:.2f}–"
        f"{t['ratio_max']:.2f}] ({t['kfac_ms_median']:.1f} ms vs "
        f"{t['sgd_ms_median']:.1f} ms)"])
  return markdown_table(
      ("variant", "final loss (mean [min–max])", "final lr",
       "final momentum", "final damping",
       "step time / sgd step (median [min–max])"), rows)


def _range(values) -> str:
  if len(values) == 1 or max(values) == min(values):
    return f"{values[0]:.4g}"
  return f"{statistics.mean(values):.4g} [{min(values):.4g}–{max(values):.4g}]"


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--steps", type=int, default=800)
  parser.add_argument("--seeds", type=int, default=3)
  parser.add_argument("--subset", type=int, default=4096)
  parser.add_argument("--rounds", type=int, default=7,
                      help="interleaved timing rounds of 10 steps each")
  parser.add_argument("--json", default=None, metavar="OUT")
  args = parser.parse_args(argv)
  if kfac_jax is None:
    print(INSTALL_HINT, file=sys.stderr)
    return 2
  patched = patch_kfac_for_new_jax()
  start = time.perf_counter()
  results = measure(args)
  results["seconds"] = time.perf_counter() - start
  results["config"]["kfac_patched_eval_jaxpr_eqn"] = patched
  text = table(results)
  print(text)
  print(f"({results['seconds']:.0f} s in all)")
  if args.json:
    write_json(args.json, results, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
