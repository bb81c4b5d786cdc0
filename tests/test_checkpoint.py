"""Checkpoint and resume: bit-identical continuation, incompatible configs,
checkpoints written by cdat-fast 0.1.0."""
import ast
import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import cdat_fast
from cdat_fast import CDATState
from cdat_fast.harness.checkpoint import CheckpointError
from cdat_fast.harness.cli import main
from cdat_fast.harness.config import config_from_dict
from cdat_fast.harness.optimizers import OptimizerConfig
from cdat_fast.harness.train import TrainConfig, Trainer

BASE = dict(dataset="digits", subset=96, width=8, depth=1, log_every=3,
            checkpoint_every=3)


@pytest.fixture(scope="module")
def digits():
  from cdat_fast.harness.data import load_dataset
  return load_dataset("digits", subset=96, seed=0)


@pytest.mark.parametrize("batch_size, base", [(None, "gd"), (32, "adam")])
def test_resumed_run_is_bit_identical(tmp_path, digits, batch_size, base):
  opt = OptimizerConfig(base=base, ema=0.9 if base == "adam" else 0.0)
  kw = dict(BASE, batch_size=batch_size, sharpness_every=3, optimizer=opt)
  whole = Trainer(TrainConfig(**kw, steps=9), dataset=digits).run(
      tmp_path / "a", progress=False, echo=None)
  Trainer(TrainConfig(**kw, steps=6), dataset=digits).run(
      tmp_path / "b", progress=False, echo=None)
  resumed = Trainer(TrainConfig(**kw, steps=9), dataset=digits).run(
      tmp_path / "b", progress=False, echo=None, resume=True)
  np.testing.assert_array_equal(whole.history["loss"], resumed.history["loss"])
  np.testing.assert_array_equal(whole.history["learning_rate"],
                                resumed.history["learning_rate"])
  assert ((tmp_path / "a" / "metrics.jsonl").read_text()
          == (tmp_path / "b" / "metrics.jsonl").read_text())
  for x, y in zip(*(map(np.asarray, __import__("jax").tree.leaves(p))
                    for p in (whole.params, resumed.params))):
    np.testing.assert_array_equal(x, y)


def test_incompatible_checkpoint_is_reported(tmp_path, digits):
  Trainer(TrainConfig(**BASE, steps=3), dataset=digits).run(
      tmp_path, progress=False, echo=None)
  other = TrainConfig(**{**BASE, "width": 16}, steps=6)
  with pytest.raises(CheckpointError, match="width"):
    Trainer(other, dataset=digits).run(tmp_path, progress=False, echo=None,
                                       resume=True)


def test_checkpoint_from_before_a_new_config_field_resumes(tmp_path, digits):
  """A field added since the checkpoint was written takes its default."""
  Trainer(TrainConfig(**BASE, steps=3), dataset=digits).run(
      tmp_path, progress=False, echo=None)
  for meta_path in (tmp_path / "checkpoints").glob("step_*.json"):
    meta = json.loads(meta_path.read_text())
    del meta["config"]["fused_kernels"]
    meta_path.write_text(json.dumps(meta))
  r = Trainer(TrainConfig(**BASE, steps=6), dataset=digits).run(
      tmp_path, progress=False, echo=None, resume=True)
  assert len(r.history["loss"]) == 6
  with pytest.raises(CheckpointError, match="fused_kernels"):
    Trainer(TrainConfig(**BASE, steps=9, fused_kernels=True),
            dataset=digits).run(tmp_path, progress=False, echo=None,
                                resume=True)


def test_mesh_is_a_resumable_change():
  """The arrays are restored with the new mesh's shardings (8 devices:
  test_sharding.py::test_checkpoint_resumes_on_another_mesh)."""
  from cdat_fast.harness.checkpoint import config_differences
  from cdat_fast.harness.config import config_to_dict
  saved = config_to_dict(TrainConfig(**BASE, mesh="data=8"))
  for mesh in ("data=2,fsdp=2", None):
    assert config_differences(saved, config_to_dict(
        TrainConfig(**BASE, mesh=mesh))) == []
  assert config_differences(saved, config_to_dict(
      TrainConfig(**{**BASE, "width": 9}))) == [
          "width: checkpoint 8, now 9"]


def test_resume_without_checkpoint(tmp_path, digits):
  with pytest.raises(CheckpointError, match="no complete checkpoint"):
    Trainer(TrainConfig(**BASE, steps=3), dataset=digits).run(
        tmp_path, progress=False, echo=None, resume=True)


def test_cli_resume(tmp_path, capsys):
  out = str(tmp_path / "run")
  args = ["--subset", "64", "--width", "8", "--depth", "1", "--log-every",
          "2", "--checkpoint-every", "2", "--quiet"]
  assert main(["train", *args, "--steps", "2", "--out", out]) == 0
  assert main(["train", "--resume", out, "--steps", "4", "--quiet"]) == 0
  summary = json.loads((tmp_path / "run" / "summary.json").read_text())
  assert summary["steps"] == 4
  capsys.readouterr()
  assert main(["train", "--resume", out, "--steps", "6", "--width", "9"]) == 2
  assert "width" in capsys.readouterr().err


def test_divergence_keeps_last_good_checkpoint(tmp_path, digits):
  opt = OptimizerConfig(tuner="constant", learning_rate=3.0)
  cfg = TrainConfig(**{**BASE, "log_every": 1, "checkpoint_every": 1},
                    steps=40, divergence_factor=10.0, optimizer=opt)
  r = Trainer(cfg, dataset=digits).run(tmp_path, progress=False, echo=None)
  assert r.summary["status"] == "diverged"
  assert "last good checkpoint" in r.summary["message"]
  from cdat_fast.harness.checkpoint import Checkpointer
  steps = Checkpointer(tmp_path / "checkpoints").steps()
  assert steps and max(steps) < r.summary["steps"]


# -- checkpoints written by another version -------------------------------------
#
# tests/data/checkpoint_0_1_0/ holds two run directories written by cdat-fast
# 0.1.0 (commit b29e26a, before the harness moved to cdat_fast.harness):
#   cd <0.1.0 checkout> && python -m cdat_fast.cli train --steps 20 \
#       --log-every 10 --checkpoint-every 10 --width 16 --out cdat
#   ... the same with --tuner constant --out constant
# keeping config.json and the newest checkpoint (step 20). 0.1.0 wrote no
# version into a checkpoint's JSON metadata.

FIXTURES = Path(__file__).parent / "data" / "checkpoint_0_1_0"


def _copy_fixture(tmp_path, name) -> Path:
  run = tmp_path / name
  shutil.copytree(FIXTURES / name, run)
  return run


def _saved_fields(run: Path, *prefix: str) -> set[str]:
  """Field names saved under ``prefix`` (e.g. the tuner state) in step 20."""
  meta = json.loads((run / "checkpoints" / "step_20" / "_METADATA").read_text())
  fields = set()
  for key in meta["tree_metadata"]:
    path = ast.literal_eval(key)
    if path[:len(prefix)] == prefix and len(path) > len(prefix):
      fields.add(path[len(prefix)])
  return fields


def _cli_in_fresh_python(*argv: str):
  # On the CPU: a GPU plugin installed without a GPU (the compile tier's)
  # makes JAX itself write its failed initialisation to stderr.
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run(
      [sys.executable, "-m", "cdat_fast.harness.cli", *argv],
      capture_output=True, text=True, timeout=300, env=env)


def test_the_fixtures_are_unversioned_and_small():
  size = sum(p.stat().st_size for p in FIXTURES.rglob("*") if p.is_file())
  assert size < 200_000
  for name in ("cdat", "constant"):
    meta = json.loads(
        (FIXTURES / name / "checkpoints" / "step_20.json").read_text())
    assert "version" not in meta and meta["step"] == 20


def test_constant_tuner_checkpoint_from_0_1_0_resumes(tmp_path, capsys):
  """Resumes: the constant tuner's state (optax's) did not change."""
  run = _copy_fixture(tmp_path, "constant")
  assert main(["train", "--resume", str(run), "--steps", "30", "--quiet"]) == 0
  summary = json.loads((run / "summary.json").read_text())
  assert summary["status"] == "ok" and summary["steps"] == 30
  resumed = np.load(run / "history.npz")["loss"]
  saved = json.loads((run / "config.json").read_text())
  whole = Trainer(dataclasses.replace(config_from_dict(saved), steps=30)).run(
      None, progress=False, echo=None)
  # 0.1.0's first 20 steps and this version's 10 more, as one run of 30 now.
  np.testing.assert_allclose(resumed, whole.history["loss"], rtol=1e-5)


def test_cdat_checkpoint_from_0_1_0_resumes_or_fails_in_one_line(tmp_path):
  """Resumes while CDATState keeps 0.1.0's fields; else exits 2, one line.

  Run in a fresh interpreter, as a user would: nothing but that line on
  stderr, no traceback.
  """
  run = _copy_fixture(tmp_path, "cdat")
  fits = _saved_fields(run, "carry", "1", "tuner") == set(CDATState._fields)
  done = _cli_in_fresh_python("train", "--resume", str(run), "--steps", "30",
                              "--quiet")
  if fits:
    assert done.returncode == 0, done.stderr
    assert json.loads((run / "summary.json").read_text())["steps"] == 30
    return
  assert done.returncode == 2, done.stderr
  lines = done.stderr.strip().splitlines()
  assert len(lines) == 1, done.stderr
  assert lines[0].startswith(f"cdat-fast: error: {run / 'checkpoints'}")
  if cdat_fast.__version__ != "0.1.0":
    assert "written by cdat-fast 0.1.0" in lines[0]
    assert f"does not fit cdat-fast {cdat_fast.__version__}" in lines[0]
    assert "resume it with cdat-fast 0.1.0, or start a new run" in lines[0]
  else:  # Same version: orbax's reason, as for any checkpoint that won't fit.
    assert "cannot restore checkpoint" in lines[0]


class _ChangedTunerState(NamedTuple):
  """A tuner state whose fields differ from what 0.1.0 saved."""
  count: jax.Array
  learning_rate: jax.Array
  estimator: jax.Array


def _changed_init(init):
  def changed(self):
    params, state, prev_u, step = init(self)
    tuner = _ChangedTunerState(jnp.zeros([], jnp.int32), jnp.zeros([]),
                               jnp.zeros([]))
    return params, state._replace(tuner=tuner), prev_u, step
  return changed


@pytest.mark.parametrize("running", ["0.2.0", "0.1.0"])
def test_a_checkpoint_that_does_not_fit_is_one_line(tmp_path, capsys,
                                                    monkeypatch, running):
  """The tuner state's fields changed; the running version is ``running``."""
  run = _copy_fixture(tmp_path, "cdat")
  monkeypatch.setattr(cdat_fast, "__version__", running)
  monkeypatch.setattr(Trainer, "init", _changed_init(Trainer.init))
  assert main(["train", "--resume", str(run), "--steps", "30", "--quiet"]) == 2
  lines = capsys.readouterr().err.strip().splitlines()
  assert len(lines) == 1
  line = lines[0]
  assert line.startswith(f"cdat-fast: error: {run / 'checkpoints'}")
  if running == "0.1.0":  # Same version: the message of any misfit.
    assert "step_20: cannot restore checkpoint: ValueError" in line
    return
  assert ("checkpoint written by cdat-fast 0.1.0 does not fit cdat-fast"
          " 0.2.0") in line
  assert "only in the checkpoint: carry.1.tuner.curvature, " in line
  assert "only in this version: carry.1.tuner.estimator" in line
  assert line.endswith("resume it with cdat-fast 0.1.0, or start a new run")


def test_checkpoints_record_their_version(tmp_path, digits, monkeypatch):
  Trainer(TrainConfig(**BASE, steps=3), dataset=digits).run(
      tmp_path, progress=False, echo=None)
  meta_path = tmp_path / "checkpoints" / "step_3.json"
  meta = json.loads(meta_path.read_text())
  assert meta["version"] == cdat_fast.__version__
  # Another version's checkpoint that fits resumes.
  meta_path.write_text(json.dumps({**meta, "version": "0.0.1"}))
  r = Trainer(TrainConfig(**BASE, steps=6), dataset=digits).run(
      tmp_path, progress=False, echo=None, resume=True)
  assert len(r.history["loss"]) == 6
