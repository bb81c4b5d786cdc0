"""The Optax peers in the harness: closed forms on quadratics, the wiring."""
import dataclasses
import math
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cdat_fast.harness import experiments
from cdat_fast.harness.cli import compare_tuned_variants, compare_variants, main
from cdat_fast.harness.config import TrainConfig
from cdat_fast.harness.optimizers import OptimizerConfig, build_optimizer
from cdat_fast.harness.peers import PEERS, SOPHIA_UPDATE_INTERVAL, build_peer

# f(w) = ½ Σ a_i (w_i - 1)² + 0.5 on batch {"a": a}: minimum 0.5 at w = 1.
A = jnp.array([1.0, 4.0, 9.0])


def value_fn(params, batch):
  return 0.5 * jnp.sum(batch["a"] * (params["w"] - 1.0) ** 2) + 0.5


def _peer(name, base="gd", **kw):
  cfg = OptimizerConfig(base=base, tuner=name, **kw)
  opt, sched = build_optimizer(cfg, 10)
  assert sched is None
  return opt


def _step(opt, params, state):
  batch = {"a": A}
  value, grads = jax.value_and_grad(value_fn)(params, batch)
  updates, state = opt.update(grads, state, params, value=value, batch=batch,
                              value_fn=value_fn)
  return optax.apply_updates(params, updates), state, value, grads, updates


@pytest.mark.parametrize("name", PEERS)
def test_every_peer_decreases_the_loss_and_logs_a_learning_rate(name):
  opt = _peer(name, learning_rate=0.05)
  params = {"w": jnp.zeros(3)}
  state = opt.init(params)
  first = value_fn(params, {"a": A})
  for _ in range(30):
    params, state, *_ = _step(opt, params, state)
  assert float(value_fn(params, {"a": A})) < float(first) - 0.5
  lr = optax.tree.get(state, "learning_rate")
  assert np.isfinite(float(lr)) and float(lr) > 0


def test_backtracking_peer_satisfies_armijo_and_is_capped():
  opt = _peer("optax_backtracking", ls_c=0.5, peer_max_lr=0.3)
  params = {"w": jnp.zeros(3)}
  state = opt.init(params)
  for _ in range(5):
    new, state, value, grads, updates = _step(opt, params, state)
    slope = optax.tree.vdot(grads, updates)
    assert float(value_fn(new, {"a": A})) <= float(value + 0.5 * slope) + 1e-6
    lr = float(optax.tree.get(state, "learning_rate"))
    assert lr <= 0.3 + 1e-7
    np.testing.assert_allclose(updates["w"], -lr * grads["w"], rtol=1e-5)
    params = new


def test_polyak_peer_is_the_polyak_step_with_f_star_zero():
  opt = _peer("optax_polyak", peer_max_lr=10.0)
  params = {"w": jnp.array([0.5, 0.0, 2.0])}
  state = opt.init(params)
  _, state, value, grads, updates = _step(opt, params, state)
  g2 = float(jnp.sum(grads["w"] ** 2))
  eta = min(float(value) / g2, 10.0)  # f* = 0
  np.testing.assert_allclose(updates["w"], -eta * grads["w"], rtol=1e-5)
  np.testing.assert_allclose(float(state.learning_rate), eta, rtol=1e-5)


def test_sophia_refreshes_its_hessian_every_ten_steps():
  opt = _peer("sophia", learning_rate=0.01)
  params = {"w": jnp.zeros(3)}
  state = opt.init(params)
  nus = []
  for _ in range(2 * SOPHIA_UPDATE_INTERVAL + 1):
    params, state, *_ = _step(opt, params, state)
    nus.append(np.asarray(state.inner[0].nu["w"]))
  changed = [not np.array_equal(a, b) for a, b in zip(nus, nus[1:])]
  # Steps 0, 10, 20 measure: after the first, only step 10 and 20 change ν.
  assert [i + 1 for i, c in enumerate(changed) if c] == [10, 20]
  # A quadratic's Hessian diagonal is a: Hutchinson's estimate is exact.
  np.testing.assert_allclose(
      nus[0], (1 - 0.99) * np.asarray(A), rtol=1e-5)


@pytest.mark.parametrize("name", ["optax_polyak", "sophia"])
def test_own_base_peers_reject_another_base(name):
  with pytest.raises(ValueError, match="base must be gd"):
    build_optimizer(OptimizerConfig(base="momentum", tuner=name), 10)


def test_peers_name_what_update_is_missing():
  opt = build_peer("optax_zoom", optax.sgd(1.0), base_name="gd",
                   learning_rate=0.1, max_learning_rate=1.0, slope_rtol=1e-4,
                   decrease_factor=0.8, max_steps=10)
  params = {"w": jnp.zeros(3)}
  with pytest.raises(ValueError, match="value_fn"):
    opt.update(params, opt.init(params), params, value=jnp.ones([]))
  with pytest.raises(ValueError, match="unknown peer"):
    build_peer("adamw", optax.sgd(1.0), base_name="gd", learning_rate=0.1,
               max_learning_rate=1.0, slope_rtol=1e-4, decrease_factor=0.8,
               max_steps=10)


def test_compare_lines_up_the_peers_by_base():
  gd = types.SimpleNamespace(base="gd", learning_rate=0.1,
                             sophia_lrs=[0.01, 0.1])
  names = [n for n, _ in compare_variants(gd)]
  assert {"optax_backtracking", "optax_zoom", "optax_polyak"} <= set(names)
  assert compare_tuned_variants(gd) == [
      ("sophia", {"tuner": "sophia"}, {"learning_rate": [0.01, 0.1]})]
  momentum = types.SimpleNamespace(**{**vars(gd), "base": "momentum"})
  names = [n for n, _ in compare_variants(momentum)]
  assert "optax_polyak" not in names and "optax_zoom" in names
  assert compare_tuned_variants(momentum) == []


class _Trainer:
  """The final loss is |log10(lr / 0.01)|: Sophia's best lr is 0.01."""

  def __init__(self, cfg, dataset=None):
    self.cfg, self.dataset = cfg, None

  def run(self, where, progress=False, echo=None):
    o = self.cfg.optimizer
    loss = abs(math.log10(o.learning_rate / 0.01)) + 0.1 * self.cfg.seed
    return type("R", (), {"summary": {
        "final_loss": loss, "status": "ok", "seconds": 0.1,
        "final_learning_rate": o.learning_rate}})()


def test_compare_tunes_a_peer_on_its_own_grid(tmp_path):
  runner = experiments.SeedRunner(2, tmp_path, trainer=_Trainer)
  base = dataclasses.replace(TrainConfig(), optimizer=OptimizerConfig())
  entries = experiments.compare(
      runner, base, learning_rates=[0.1], schedules=(),
      tuned_tuners=[("sophia", {"tuner": "sophia"},
                     {"learning_rate": [0.001, 0.01, 0.1]})])
  sophia = entries[-1]
  assert sophia.label == "sophia" and len(sophia.grid) == 3
  assert sophia.row["learning_rate"] == 0.01 and sophia.edges == []
  assert sophia.row["final_loss"] == pytest.approx(0.05)
  assert sophia.setting == "learning_rate 0.01"
  assert sophia.runs.dirs[1] == tmp_path / "sophia_learning_rate=0.01" / "seed=1"


def test_compare_command_runs_a_peer(tmp_path, capsys):
  rc = main(["compare", "--subset", "64", "--width", "8", "--depth", "1",
             "--steps", "4", "--log-every", "4", "--lr", "0.1",
             "--lr-exponents", "0", "0", "--schedules", "none",
             "--variants", "optax_backtracking,sophia", "--sophia-lrs",
             "0.01", "--out", str(tmp_path)])
  assert rc == 0, capsys.readouterr().err
  out = capsys.readouterr().out
  assert "optax_backtracking" in out and "sophia" in out
  assert (tmp_path / "sophia_run" / "summary.json").is_file()
  assert (tmp_path / "optax_backtracking" / "summary.json").is_file()
