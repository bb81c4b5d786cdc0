"""The Optax peers in the harness: closed forms on quadratics, the wiring.

The learning-rate-free peers (Schedule-Free, Prodigy, D-Adaptation, DoG,
DoWG, Mechanic, COCOB, MoMo, GeN): what they log, Schedule-Free's averaged
parameters in the harness, GeN's fresh batch, the compare line-up and its
tuned grids.
"""
import dataclasses
import json
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
from cdat_fast.harness.peers import (PEER_BASES, PEERS, SOPHIA_UPDATE_INTERVAL,
                                     build_peer)

# f(w) = ½ Σ a_i (w_i - 1)² + 0.5 on batch {"a": a}: minimum 0.5 at w = 1.
A = jnp.array([1.0, 4.0, 9.0])


def value_fn(params, batch):
  return 0.5 * jnp.sum(batch["a"] * (params["w"] - 1.0) ** 2) + 0.5


def _peer(name, base=None, **kw):
  base = base or PEER_BASES.get(name, ("gd",))[0]
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
  step = jax.jit(lambda p, s: _step(opt, p, s)[:2])
  for _ in range(100):  # DoG, Prodigy, Mechanic start from tiny steps
    params, state = step(params, state)
  assert float(value_fn(params, {"a": A})) < float(first) - 0.5
  lr = float(optax.tree.get(state, "learning_rate"))
  # COCOB reaches w = 1 to float32 rounding, where its updates round to 0.
  converged = float(value_fn(params, {"a": A})) < 0.5 + 1e-6
  assert np.isfinite(lr) and (lr > 0 or converged)


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


@pytest.mark.parametrize("name, base, allowed", [
    ("optax_polyak", "momentum", "gd"), ("sophia", "momentum", "gd"),
    ("prodigy", "gd", "adam"), ("dadapt", "rmsprop", "adam"),
    ("dog", "adam", "gd"), ("cocob", "adam", "gd"),
    ("schedule_free", "momentum", "gd or adam"),
    ("momo", "rmsprop", "gd or adam")])
def test_peers_refuse_a_base_they_are_not_built_on(name, base, allowed):
  with pytest.raises(ValueError, match=f"base must be {allowed} for tuner"):
    build_optimizer(OptimizerConfig(base=base, tuner=name), 10)


@pytest.mark.parametrize("name", ["mechanic", "gen"])
def test_mechanic_and_gen_take_any_base(name):
  for base in ("gd", "momentum", "rmsprop", "adam"):
    build_optimizer(OptimizerConfig(base=base, tuner=name), 10)


@pytest.mark.parametrize("field, value", [
    ("peer_lr", 0.0), ("peer_warmup", 1.0), ("d_coef", -1.0),
    ("gen_every", 0)])
def test_peer_knobs_are_checked_by_name(field, value):
  with pytest.raises(ValueError, match=field):
    build_optimizer(OptimizerConfig(tuner="gen", **{field: value}), 10)


def test_peers_name_what_update_is_missing():
  opt = build_peer("optax_zoom", optax.sgd(1.0), OptimizerConfig(), 10)
  params = {"w": jnp.zeros(3)}
  with pytest.raises(ValueError, match="value_fn"):
    opt.update(params, opt.init(params), params, value=jnp.ones([]))
  momo = build_peer("momo", optax.sgd(1.0), OptimizerConfig(), 10)
  with pytest.raises(ValueError, match="'momo' needs value"):
    momo.update(params, momo.init(params), params)
  with pytest.raises(ValueError, match="unknown peer"):
    build_peer("adamw", optax.sgd(1.0), OptimizerConfig(), 10)


def _compare_args(base="gd", **kw):
  return types.SimpleNamespace(**{
      "base": base, "learning_rate": 0.1, "sophia_lrs": [0.01, 0.1],
      "schedule_free_lrs": [1.0, 2.0], "schedule_free_warmups": [0.0, 0.05],
      "prodigy_d_coefs": [0.5, 1.0], "dadapt_lrs": [1.0, 2.0],
      "momo_lrs": [0.1, 1.0], "cdat_scales": [1.5, 2.0],
      "fast_curvature_batch": None, **kw})


def test_compare_lines_up_the_peers_by_base():
  gd = _compare_args()
  variants = dict(compare_variants(gd))
  assert {"optax_backtracking", "optax_zoom", "optax_polyak", "gen",
          "schedule_free", "prodigy", "dadapt", "dog", "dowg", "mechanic",
          "cocob", "momo"} <= set(variants)
  # Each learning-rate-free peer runs with a base it is built on.
  assert variants["prodigy"] == {"tuner": "prodigy", "base": "adam"}
  assert variants["dog"] == {"tuner": "dog"}
  assert variants["gen"] == {"tuner": "gen", "learning_rate": 0.1}
  tuned = {t.name: t for t in compare_tuned_variants(gd)}
  assert tuned["sophia"].axes == {"learning_rate": [0.01, 0.1]}
  sf = tuned["schedule_free_tuned"]
  assert sf.axes == {"peer_lr": [0.1, 0.2], "peer_warmup": [0.0, 0.05]}
  assert sf.default == {"peer_lr": 1.0, "peer_warmup": 0.0}  # SGD's
  assert tuned["momo_tuned"].axes == {"peer_lr": [0.1, 1.0]}
  momentum = _compare_args("momentum")
  variants = dict(compare_variants(momentum))
  assert "optax_polyak" not in variants and "optax_zoom" in variants
  assert variants["schedule_free"] == {"tuner": "schedule_free", "base": "gd"}
  assert "sophia" not in {t.name for t in compare_tuned_variants(momentum)}
  adam = {t.name: t for t in compare_tuned_variants(_compare_args("adam"))}
  assert adam["schedule_free_tuned"].default["peer_lr"] == 0.0025
  assert adam["momo_tuned"].axes == {"peer_lr": [0.001, 0.01]}


def test_compare_adds_cdat_fast_mode_lines_with_a_curvature_batch():
  args = _compare_args(fast_curvature_batch=16)
  fast = dict(compare_variants(args))["cdat_2_fast"]
  assert fast["curvature_batch"] == 16 and fast["curvature"] == "gauss_newton"
  tuned = {t.name: t for t in compare_tuned_variants(args)}
  assert tuned["cdat_tuned_fast"].default_label == "cdat_2_fast"


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


def test_a_tuned_grid_gives_the_defaults_line_from_its_own_runs(tmp_path):
  runner = experiments.SeedRunner(1, tmp_path, trainer=_Trainer)
  base = dataclasses.replace(TrainConfig(), optimizer=OptimizerConfig())
  variant = experiments.TunedVariant(
      "prodigy_tuned", {"tuner": "prodigy", "base": "adam"},
      {"learning_rate": [0.001, 0.1]}, "prodigy", {"learning_rate": 0.1})
  entries = experiments.compare(runner, base, learning_rates=[0.1],
                                schedules=(), tuned_tuners=[variant])
  labels = [e.label for e in entries]
  assert labels == ["constant", "prodigy", "prodigy_tuned"]
  default, best = entries[1], entries[2]
  assert default.row["learning_rate"] == 0.1 and default.row["final_loss"] == 1
  assert "published default" in default.setting
  assert best.row["learning_rate"] == 0.001
  assert default.runs.dirs == [tmp_path / "prodigy_tuned_learning_rate=0.1"]


def test_a_run_level_override_reaches_the_train_config():
  base = dataclasses.replace(TrainConfig(), optimizer=OptimizerConfig())
  cfg = experiments.configured(base, {"tuner": "cdat", "curvature_batch": 8,
                                      "curvature": "gauss_newton"})
  assert cfg.curvature_batch == 8 and cfg.optimizer.curvature == "gauss_newton"


def test_the_learning_rate_free_peers_run_on_the_digits_and_end_finite(
    tmp_path, capsys):
  """The issue's line-up, a few steps each (Adam: SGD's lr 1 diverges here)."""
  rc = main(["compare", "--subset", "128", "--width", "16", "--depth", "1",
             "--steps", "6", "--log-every", "3", "--base", "adam", "--lr",
             "0.001", "--lr-exponents", "0", "0", "--schedules", "none",
             "--variants", "schedule_free,prodigy,dadapt,dog,mechanic,cocob,"
             "momo,gen", "--out", str(tmp_path)])
  assert rc == 0, capsys.readouterr().err
  table = json.loads((tmp_path / "compare.json").read_text())["table"]
  peers = {r["label"]: r for r in table if r["label"] != "constant"}
  assert set(peers) == {"schedule_free", "prodigy", "dadapt", "dog",
                        "mechanic", "cocob", "momo", "gen"}
  for label, row in peers.items():
    assert math.isfinite(row["final_loss"]), label
    assert math.isfinite(row["final_learning_rate"]), label




def test_schedule_free_logs_and_returns_the_averaged_parameters():
  from cdat_fast.harness.train import Trainer
  cfg = TrainConfig(subset=64, width=8, depth=1, steps=6, log_every=3,
                    optimizer=OptimizerConfig(tuner="schedule_free",
                                              peer_lr=0.05))
  trainer = Trainer(cfg)
  result = trainer.run(None, progress=False, echo=None)
  carry = trainer.init()
  batch = {"x": jnp.asarray(trainer.dataset.x_train),
           "y": jnp.asarray(trainer.dataset.y_train)}
  losses_x, losses_y = [], []
  params, state = carry[0], carry[1]
  for _ in range(6):
    x = optax.contrib.schedule_free_eval_params(state.inner, params)
    losses_x.append(float(trainer.loss_fn(x, batch)))
    value, grads = jax.value_and_grad(trainer.loss_fn)(params, batch)
    losses_y.append(float(value))
    updates, state = trainer.optimizer.update(grads, state, params,
                                              value=value)
    params = optax.apply_updates(params, updates)
  np.testing.assert_allclose(result.history["loss"], losses_x, rtol=1e-5)
  assert not np.allclose(losses_x[1:], losses_y[1:], rtol=1e-5)
  final = optax.contrib.schedule_free_eval_params(state.inner, params)
  np.testing.assert_allclose(jax.tree.leaves(result.params)[0],
                             jax.tree.leaves(final)[0], rtol=1e-5)


def test_gen_fits_on_the_next_minibatch():
  from cdat_fast.harness.train import Trainer
  cfg = TrainConfig(subset=64, width=8, depth=1, steps=4, log_every=4,
                    batch_size=16, optimizer=OptimizerConfig(
                        tuner="gen", gen_every=1, learning_rate=0.05))
  trainer = Trainer(cfg)
  seen = []
  loss_fn = trainer.loss_fn

  def recording(params, batch):
    jax.debug.callback(lambda x: seen.append(np.asarray(x)), batch["x"][0])
    return loss_fn(params, batch)

  trainer.curvature_kwargs = dict(value_fn=recording)
  run = trainer.run(None, progress=False, echo=None)
  jax.effects_barrier()
  assert run.summary["status"] == "ok"
  from cdat_fast.harness.train import BatchStream
  stream = BatchStream(trainer.dataset, 16, cfg.seed)
  firsts = [next(stream)["x"][0] for _ in range(4)]
  # 3 probe points per step; step i probes batch i + 1 (the last: batch 0).
  for i, want in enumerate(firsts[1:] + firsts[:1]):
    for seen_x in seen[3 * i:3 * i + 3]:
      np.testing.assert_array_equal(seen_x, want)
