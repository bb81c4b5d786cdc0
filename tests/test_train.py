"""The training harness on tiny settings."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cdat_fast.harness.optimizers import OptimizerConfig, build_optimizer, schedule
from cdat_fast.harness.train import TrainConfig, Trainer, config_from_dict, config_to_dict

TINY = dict(dataset="digits", subset=128, width=16, depth=1, steps=12,
            log_every=4)


@pytest.fixture(scope="module")
def digits():
  from cdat_fast.harness.data import load_dataset
  return load_dataset("digits", subset=128, seed=0)


def test_full_batch_cdat_run_writes_files(tmp_path, digits):
  cfg = TrainConfig(**TINY, sharpness_every=8, track_alignment=True)
  result = Trainer(cfg, dataset=digits).run(tmp_path, progress=False, echo=None)
  s = result.summary
  assert s["status"] == "ok" and s["steps"] == 12
  assert len(result.history["loss"]) == 12
  np.testing.assert_allclose(s["final_loss"],
                             np.mean(result.history["loss"][-5:]), rtol=1e-6)
  assert s["final_loss"] < s["initial_loss"]
  lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
  records = [json.loads(l) for l in lines]
  assert [r["step"] for r in records] == [4, 8, 12]
  # Sharpness at the first log point and at each multiple of 8.
  assert [("sharpness" in r) for r in records] == [True, True, False]
  r = records[1]
  np.testing.assert_allclose(r["eta_sharpness"],
                             r["learning_rate"] * r["sharpness"], rtol=1e-6)
  assert 0 <= r["alignment"] <= 1 + 1e-6
  assert -1 <= r["update_cosine"] <= 1
  assert {"numerator", "denominator", "test_accuracy"} <= set(r)
  for name in ("summary.json", "config.json", "history.npz", "training.png"):
    assert (tmp_path / name).stat().st_size > 0
  assert config_from_dict(json.loads((tmp_path / "config.json").read_text())
                          ) == cfg


def test_minibatch_run_is_deterministic(digits):
  cfg = TrainConfig(**TINY, batch_size=32,
                    optimizer=OptimizerConfig(tuner="cdat", ema=0.9,
                                              scale=1.5))
  a = Trainer(cfg, dataset=digits).run(progress=False, echo=None)
  b = Trainer(cfg, dataset=digits).run(progress=False, echo=None)
  np.testing.assert_array_equal(a.history["loss"], b.history["loss"])
  c = Trainer(TrainConfig(**{**TINY, "seed": 1}, batch_size=32,
                          optimizer=cfg.optimizer), dataset=digits).run(
                              progress=False, echo=None)
  assert not np.array_equal(a.history["loss"], c.history["loss"])


def test_constant_lr_logs_the_schedule(digits):
  opt = OptimizerConfig(tuner="constant", learning_rate=0.5,
                        schedule="warmup_cosine", warmup_fraction=0.25)
  cfg = TrainConfig(**TINY, optimizer=opt)
  r = Trainer(cfg, dataset=digits).run(progress=False, echo=None)
  sched = schedule(opt, cfg.steps)
  np.testing.assert_allclose(r.history["learning_rate"],
                             [float(sched(i)) for i in range(12)], rtol=1e-6)


def test_divergence_is_detected(digits):
  opt = OptimizerConfig(tuner="constant", learning_rate=1e3)
  r = Trainer(TrainConfig(**TINY, optimizer=opt), dataset=digits).run(
      progress=False, echo=None)
  assert r.summary["status"] == "diverged"
  assert r.summary["steps"] < 12 or not np.isfinite(r.summary["final_loss"])


def test_curvature_batch_changes_only_the_curvature(digits):
  cfg = TrainConfig(**{**TINY, "steps": 4}, curvature_batch=16)
  trainer = Trainer(cfg, dataset=digits)
  r = trainer.run(progress=False, echo=None)
  full = Trainer(TrainConfig(**{**TINY, "steps": 4}), dataset=digits).run(
      progress=False, echo=None)
  # Same first loss (same init), different learning rates.
  assert r.history["loss"][0] == full.history["loss"][0]
  assert r.history["learning_rate"][0] != full.history["learning_rate"][0]


def test_curvature_batch_is_the_sub_batch_estimator(digits):
  # All rows (m = 1) is exact CDAT; half the rows is every other example.
  base = dict(**{**TINY, "steps": 3})
  full = Trainer(TrainConfig(**base), dataset=digits).run(
      progress=False, echo=None)
  same = Trainer(TrainConfig(**base, curvature_batch=128),
                 dataset=digits).run(progress=False, echo=None)
  np.testing.assert_array_equal(same.history["learning_rate"],
                                full.history["learning_rate"])
  trainer = Trainer(TrainConfig(**base, curvature_batch=64), dataset=digits)
  params = trainer.init()[0]
  batch = {"x": jnp.asarray(digits.x_train), "y": jnp.asarray(digits.y_train)}
  g = jax.grad(trainer.loss_fn)(params, batch)
  exact, _ = build_optimizer(OptimizerConfig(), 3)  # by hand on the rows
  _, state = exact.update(
      g, exact.init(params), params, value_fn=lambda p: trainer.loss_fn(
          p, jax.tree.map(lambda v: v[::2], batch)))
  half = trainer.run(progress=False, echo=None)
  np.testing.assert_allclose(half.history["learning_rate"][0],
                             optax.tree.get(state, "learning_rate"),
                             rtol=1e-6)


def test_curvature_batch_must_divide_the_batch(digits):
  with pytest.raises(ValueError, match="curvature_batch=48 must divide"):
    Trainer(TrainConfig(**TINY, curvature_batch=48), dataset=digits)


@pytest.mark.parametrize("tuner", ["linesearch", "polyak", "hypergradient",
                                   "quadratic_greedy", "sharpness_rule"])
def test_every_tuner_trains(tuner, digits):
  opt = OptimizerConfig(tuner=tuner, base="adam" if tuner == "sharpness_rule"
                        else "gd", learning_rate=0.05)
  r = Trainer(TrainConfig(**TINY, optimizer=opt), dataset=digits).run(
      progress=False, echo=None)
  assert r.summary["status"] == "ok"
  assert r.summary["final_loss"] < r.summary["initial_loss"]


@pytest.mark.parametrize("field, value", [
    ("steps", 0), ("log_every", -1), ("batch_size", 0),
    ("weight_decay", -1.0), ("loss", "hinge")])
def test_bad_config_names_the_field(field, value):
  with pytest.raises(ValueError, match=field):
    TrainConfig(**{**TINY, field: value}).validate()


def test_bad_optimizer_names_the_field():
  with pytest.raises(ValueError, match="base"):
    build_optimizer(OptimizerConfig(base="lbfgs"), 10)
  with pytest.raises(ValueError, match="tuner"):
    build_optimizer(OptimizerConfig(tuner="magic"), 10)
  with pytest.raises(ValueError, match="learning_rate"):
    build_optimizer(OptimizerConfig(tuner="constant", learning_rate=-1.0), 10)


@pytest.mark.multidevice
def test_mesh_run_matches_single_device(tmp_path):
  """``--mesh data=4,fsdp=2`` on 8 fake CPU devices, in a subprocess."""
  import os
  import subprocess
  import sys
  args = ["-m", "cdat_fast.harness.cli", "train", "--subset", "128", "--width", "16",
          "--depth", "1", "--steps", "6", "--log-every", "3", "--batch-size",
          "32", "--ema", "0.9", "--quiet"]
  env = dict(os.environ,
             XLA_FLAGS="--xla_force_host_platform_device_count=8")
  for name, extra in (("mesh", ["--mesh", "data=4,fsdp=2"]), ("one", [])):
    subprocess.run([sys.executable, *args, *extra, "--out",
                    str(tmp_path / name)], env=env, check=True, timeout=300,
                   capture_output=True)
  a = np.load(tmp_path / "mesh" / "history.npz")
  b = np.load(tmp_path / "one" / "history.npz")
  np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-5)
  np.testing.assert_allclose(a["learning_rate"], b["learning_rate"], rtol=1e-5)


def test_gauss_newton_equals_exact_on_a_linear_model(digits):
  """Linear model + squared loss (+ weight decay): the GN form is exact."""
  runs = {}
  for curvature in ("exact", "gauss_newton"):
    cfg = TrainConfig(**{**TINY, "depth": 0, "steps": 6, "log_every": 3},
                      optimizer=OptimizerConfig(curvature=curvature))
    runs[curvature] = Trainer(cfg, dataset=digits).run(progress=False,
                                                       echo=None)
  np.testing.assert_allclose(runs["gauss_newton"].history["learning_rate"],
                             runs["exact"].history["learning_rate"], rtol=1e-4)


@pytest.mark.parametrize("kw", [dict(curvature="secant"), dict(every=3),
                                dict(curvature="gauss_newton")])
def test_cheap_curvature_modes_train(kw, digits):
  cfg = TrainConfig(**TINY, curvature_batch=64,
                    optimizer=OptimizerConfig(scale=1.8, **kw))
  r = Trainer(cfg, dataset=digits).run(progress=False, echo=None)
  assert r.summary["status"] == "ok"
  assert r.summary["final_loss"] < r.summary["initial_loss"]


def test_fused_kernels_run_matches_the_plain_one(digits):
  """--fused-kernels: same parameters, so the same run up to rounding."""
  cfg = dict(**{**TINY, "steps": 4})
  fused = Trainer(TrainConfig(**cfg, fused_kernels=True), dataset=digits).run(
      progress=False, echo=None)
  plain = Trainer(TrainConfig(**cfg), dataset=digits).run(
      progress=False, echo=None)
  np.testing.assert_allclose(fused.history["learning_rate"],
                             plain.history["learning_rate"], rtol=1e-4)
  np.testing.assert_allclose(fused.history["loss"], plain.history["loss"],
                             rtol=1e-5)


def test_fused_kernels_need_a_model_with_a_fused_variant(digits):
  with pytest.raises(ValueError, match="fused_kernels must be used with"):
    TrainConfig(**TINY, model="resnet", fused_kernels=True).validate()
  from cdat_fast.harness.train import build_model
  for name in ("mlp", "nanolm", "vit", "mixer"):
    kw = {**TINY, "model": name}
    if name == "nanolm":  # a language model: text data
      kw.update(dataset="text", loss="cross_entropy")
    cfg = TrainConfig(**kw)
    assert not build_model(cfg, digits).fused
    cfg = TrainConfig(**kw, fused_kernels=True)
    cfg.validate()
    assert build_model(cfg, digits).fused
