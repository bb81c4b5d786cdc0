"""bench/kfac_peer.py: kfac-jax's adaptive learning rate on tiny problems.

Needs the ``kfac`` extra (kfac-jax); skipped without it. In this checkout::

  build/kfac-venv/bin/python -m pytest tests/test_kfac_peer.py
"""
import importlib.util
import pathlib
import sys

import pytest

kfac_jax = pytest.importorskip(
    "kfac_jax", reason="kfac-jax not installed (the `kfac` extra)")

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position

from cdat_fast.harness.losses import make_loss_fn  # pylint: disable=g-import-not-at-top,wrong-import-position
from cdat_fast.harness.models import get_model, init_params  # pylint: disable=g-import-not-at-top,wrong-import-position

_PATH = pathlib.Path(__file__).resolve().parent.parent / "bench" / "kfac_peer.py"
sys.path.insert(0, str(_PATH.parent))  # the script imports bench/common.py
_SPEC = importlib.util.spec_from_file_location("kfac_peer", _PATH)
kfac_peer = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(kfac_peer)
kfac_peer.patch_kfac_for_new_jax()

MU = kfac_peer.WEIGHT_DECAY

pytestmark = [
    # kfac's step donates the batch, whose buffers it cannot reuse.
    pytest.mark.filterwarnings("ignore:Some donated buffers were not usable"),
    # kfac-jax 0.0.8 uses jax.core names that jax 0.10 deprecates.
    pytest.mark.filterwarnings("ignore::DeprecationWarning:kfac_jax.*"),
]


def _data(n=64, d=6, k=3, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, d)).astype(np.float32)
  y = rng.integers(0, k, size=n).astype(np.int32)
  return {"x": jnp.asarray(x), "y": jnp.asarray(y)}


def _run(model, batch, steps, adaptive_momentum, **overrides):
  """Yields (params before, params after, stats) of each step, as numpy."""
  loss_fn = kfac_peer.make_kfac_loss(model)
  opt = kfac_peer.make_optimizer(loss_fn, adaptive_momentum, **overrides)
  key = jax.random.key(0)
  run = kfac_peer.KfacRun(opt, init_params(model, key, batch["x"][:1]),
                          batch, key)
  for _ in range(steps):
    before = jax.tree.map(np.asarray, run.params)  # kfac donates params
    stats = run.step()
    yield before, jax.tree.map(np.asarray, run.params), stats


def test_the_registered_loss_is_the_harness_loss():
  model = get_model("mlp", 3, features=(16,))
  batch = _data()
  params = init_params(model, jax.random.key(1), batch["x"][:1])
  ours = kfac_peer.make_kfac_loss(model)(params, batch)
  harness = make_loss_fn(model, "squared", MU)(params, batch)
  np.testing.assert_allclose(ours, harness, rtol=1e-6)


@pytest.mark.parametrize("adaptive_momentum", [False, True])
def test_the_loss_decreases_on_a_two_layer_mlp(adaptive_momentum):
  model = get_model("mlp", 3, features=(16,))
  losses = [float(s["loss"]) for _, _, s in _run(
      model, _data(), 12, adaptive_momentum)]
  assert all(np.isfinite(losses))
  assert losses[-1] < 0.9 * losses[0], losses
  assert min(losses[1:]) < losses[0]


def _closed_form_lr(batch, before, after, precon_norm, damping, g_scale=1.0):
  """−gᵀΔ/(Δᵀ(G + μI + λI)Δ) of the linear model, in float64 numpy.

  Δ is the descent direction of the step (``after - before``), scaled to
  the norm kfac reports for its preconditioned gradient; G = XᵀX/n acting on
  (dW, db), the Gauss–Newton (= Hessian) of the mean of ½‖z − e_y‖².
  """
  x = np.asarray(batch["x"], np.float64)
  n, k = x.shape[0], before["Dense_0"]["bias"].shape[0]
  t = np.eye(k)[np.asarray(batch["y"])]
  w = before["Dense_0"]["kernel"].astype(np.float64)
  b = before["Dense_0"]["bias"].astype(np.float64)
  r = x @ w + b - t
  g_w, g_b = x.T @ r / n + MU * w, r.sum(0) / n + MU * b
  d_w = after["Dense_0"]["kernel"] - before["Dense_0"]["kernel"]
  d_b = after["Dense_0"]["bias"] - before["Dense_0"]["bias"]
  norm = np.sqrt(np.sum(d_w.astype(np.float64)**2) + np.sum(d_b**2.0))
  u_w, u_b = d_w / norm * precon_norm, d_b / norm * precon_norm
  gu = np.sum(g_w * u_w) + np.sum(g_b * u_b)
  ju = x @ u_w + u_b
  curv = (g_scale * np.sum(ju**2) / n
          + (MU + damping) * (np.sum(u_w**2) + np.sum(u_b**2)))
  return -gu / curv


def test_the_learning_rate_is_the_damped_gauss_newton_closed_form():
  model = get_model("mlp", 3, features=())  # linear: logits = xW + b
  batch = _data(d=5)
  # A small damping, so that G (not λ) dominates the denominator.
  steps = list(_run(model, batch, 12, False, initial_damping=0.3,
                    include_norms_in_stats=True))
  dampings = {float(s["damping"]) for _, _, s in steps}
  assert len(dampings) > 1, "the damping never adapted"
  for before, after, stats in steps:
    lr = float(stats["learning_rate"])
    precon_norm, damping = float(stats["precon_grad_norm"]), float(
        stats["damping"])
    closed = _closed_form_lr(batch, before, after, precon_norm, damping)
    assert lr > 0
    np.testing.assert_allclose(lr, closed, rtol=2e-3)
    assert float(stats["momentum"]) == 0.0
    # The check can fail: without λ, or with twice the Gauss–Newton
    # matrix (the registration weight 1 instead of ½), it is off.
    assert not np.isclose(lr, _closed_form_lr(
        batch, before, after, precon_norm, 0.0), rtol=2e-2)
    assert not np.isclose(lr, _closed_form_lr(
        batch, before, after, precon_norm, damping, g_scale=2.0), rtol=2e-2)
