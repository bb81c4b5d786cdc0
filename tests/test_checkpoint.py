"""Checkpoint and resume: bit-identical continuation, incompatible configs."""
import json

import numpy as np
import pytest

from cdat_fast.harness.checkpoint import CheckpointError
from cdat_fast.harness.cli import main
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
