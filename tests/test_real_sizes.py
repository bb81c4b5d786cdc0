"""The harness at real sizes: data as arguments, the memory check, text."""
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cdat_fast.harness import memory
from cdat_fast.harness.errors import InputError
from cdat_fast.harness.optimizers import OptimizerConfig
from cdat_fast.harness.train import TrainConfig, Trainer

TEXT_ROWS = 256  # blocks of the text fixture: its batch outnumbers any mask
CONSTANT = OptimizerConfig(tuner="constant")  # the cheapest step to compile


def _lowered_constant_sizes(text: str) -> list[int]:
  """Element counts of the constants of a lowered StableHLO module."""
  sizes = []
  for m in re.finditer(r"stablehlo\.constant dense.*?: tensor<([\dx]*)"
                       r"[a-z]+\d*>", text):
    dims = [int(d) for d in m.group(1).split("x") if d]
    sizes.append(math.prod(dims))
  return sizes


def _main_arguments(text: str) -> str:
  """The argument list of a lowered module's ``@main``."""
  return text.split("func.func public @main(", 1)[1].split(") ->", 1)[0]


def _tensor_type(x) -> str:
  dtype = {"float32": "f32", "int32": "i32"}[str(x.dtype)]
  return "tensor<" + "x".join(map(str, x.shape)) + f"x{dtype}>"


def _lowered_chunk(trainer: Trainer):
  """The full batch and the training chunk lowered for it."""
  run = trainer._fresh_progress()  # noqa: SLF001
  data = trainer._run_data()  # noqa: SLF001
  lowered = trainer._chunk.lower(run.carry, data.full, length=2)  # noqa: SLF001
  return data.full, lowered.as_text()


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
  rng = np.random.default_rng(0)
  words = ["to", "be", "or", "not", "that", "is", "the", "question,", "\n"]
  text = " ".join(rng.choice(words, size=8 * TEXT_ROWS * 17))
  path = tmp_path_factory.mktemp("text") / "input.txt"
  path.write_text(text)
  return path


def _text_config(text_file, **kw):
  return TrainConfig(**{
      "dataset": "text", "data_dir": str(text_file), "subset": TEXT_ROWS,
      "model": "nanolm-small", "loss": "cross_entropy", "steps": 2,
      "log_every": 2, "optimizer": CONSTANT, **kw})


def _assert_data_is_an_argument(trainer):
  batch, lowered = _lowered_chunk(trainer)
  assert _tensor_type(batch["x"]) in _main_arguments(lowered)
  assert _tensor_type(batch["y"]) in _main_arguments(lowered)
  assert max(_lowered_constant_sizes(lowered), default=0) < batch["x"].size


def test_full_batch_enters_the_step_as_an_argument():
  # CDAT's step: the batch reaches the loss through the tuner's value_fn too.
  _assert_data_is_an_argument(Trainer(TrainConfig(
      dataset="digits", subset=128, width=16, depth=1, steps=2,
      log_every=2)))


def test_text_batch_enters_the_step_as_an_argument(text_file):
  _assert_data_is_an_argument(Trainer(_text_config(text_file)))


def test_a_closed_over_batch_would_be_caught():
  """The checks above see a training set baked into the program."""
  x = jnp.asarray(np.random.default_rng(0).normal(size=(128, 8, 8, 1)),
                  jnp.float32)
  lowered = jax.jit(lambda w: jnp.sum(w * x)).lower(jnp.ones([])).as_text()
  assert _tensor_type(x) not in _main_arguments(lowered)
  assert max(_lowered_constant_sizes(lowered)) >= x.size


def test_a_step_that_does_not_fit_stops_before_running(tmp_path,
                                                       monkeypatch):
  monkeypatch.setattr(memory, "available_bytes", lambda device: 1000)
  cfg = TrainConfig(dataset="digits", subset=128, width=16, depth=1,
                    steps=2, log_every=2, optimizer=CONSTANT)
  with pytest.raises(InputError) as e:
    Trainer(cfg).run(tmp_path / "run", progress=False, echo=None)
  message = str(e.value)
  assert "full batch of 128 examples" in message
  assert "--subset" in message and "--batch-size" in message
  assert not (tmp_path / "run").exists()  # nothing written
  with pytest.raises(InputError, match="--batch-size 32 needs"):
    Trainer(TrainConfig(**{**cfg.__dict__, "batch_size": 32})).run(
        progress=False, echo=None)


def test_the_compiled_step_is_reused_after_its_check(monkeypatch):
  checked = []
  monkeypatch.setattr(memory, "available_bytes",
                      lambda device: checked.append(device) or 2 ** 62)
  trainer = Trainer(TrainConfig(dataset="digits", subset=64, width=8,
                                depth=1, steps=6, log_every=2,
                                optimizer=CONSTANT))
  result = trainer.run(progress=False, echo=None)
  assert result.summary["steps"] == 6
  assert len(checked) == 1 and len(trainer._programs) == 1  # noqa: SLF001


def test_rows_that_fit_scale_with_the_memory():
  assert memory.rows_that_fit(70023, need=133 * 10 ** 9,
                              available=20 * 10 ** 9) == 8192
  assert memory.rows_that_fit(10, need=10 ** 12, available=1) == 1
  assert memory.gigabytes(133_548_538_372) == "133.5 GB"
  assert memory.gigabytes(340 * 10 ** 6) == "340 MB"


def test_host_memory_is_known_here():
  assert memory.host_available_bytes() > 0


def test_text_needs_a_sequence_model(text_file):
  with pytest.raises(InputError, match="nanolm"):
    _text_config(text_file, model="mlp").validate()
  with pytest.raises(InputError, match="mlp"):
    TrainConfig(dataset="digits", model="nanolm").validate()


@pytest.mark.parametrize("loss", ["cross_entropy", "squared"])
def test_a_loss_names_mismatched_shapes(loss):
  from cdat_fast.harness.losses import get_loss
  logits, labels = jnp.zeros((4, 64)), jnp.zeros((4, 16), jnp.int32)
  with pytest.raises(ValueError, match=r"\(4, 16\).*\(4, 64\)"):
    get_loss(loss)(logits, labels)
  assert get_loss(loss)(jnp.zeros((4, 16, 64)), labels).shape == ()
