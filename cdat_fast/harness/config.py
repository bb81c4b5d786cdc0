"""The configuration of a training run, and its JSON form.

:class:`TrainConfig` describes a run of :mod:`cdat_fast.harness.train`; it is
written to a run's ``config.json`` and into every checkpoint
(:mod:`cdat_fast.harness.checkpoint`) as :func:`config_to_dict`, and read back
with :func:`config_from_dict`. This module imports neither of those two, so
both can import it.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from cdat_fast import checks
from cdat_fast.harness.errors import checked
from cdat_fast.harness.optimizers import OptimizerConfig
from cdat_fast.harness.optimizers import validate as validate_optimizer

# Models with a ``fused`` variant built from cdat_fast.nn (--fused-kernels).
FUSED_MODELS = ("mlp", "nanolm", "nanolm-paper", "vit", "vit-ti32", "mixer",
                "mixer-ti8")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """A training run. Defaults are the README's first command."""
  dataset: str = "digits"
  data_dir: str | None = None
  subset: int | None = None
  model: str = "mlp"  # for text data sets a model of TEXT_MODELS
  width: int = 256  # MLP hidden width
  depth: int = 2  # MLP hidden layers (0: a linear model)
  loss: str = "squared"
  weight_decay: float = 1e-5
  steps: int = 300
  batch_size: int | None = None  # None: full batch
  curvature_batch: int | None = None  # CDAT's curvature on k examples of a batch
  seed: int = 0
  log_every: int = 25
  sharpness_every: int = 0  # 0: never
  sharpness_iters: int = 100
  track_alignment: bool = False
  divergence_factor: float = 1e3  # stop when loss > factor × initial loss
  checkpoint_every: int = 0  # 0: no checkpoints
  mesh: str | None = None  # e.g. "data=4,fsdp=2"; None: one device
  fused_kernels: bool = False  # model from cdat_fast.nn (fused jvp-of-jvp)
  optimizer: OptimizerConfig = OptimizerConfig()

  def validate(self) -> None:
    """Checks every field by its own name.

    Raises:
      InputError: naming the field (the CLI flag is ``--`` + dashes) and
        what was wrong.
    """
    checked(self._validate)

  def _validate(self) -> None:
    for name in ("steps", "log_every", "width", "sharpness_iters"):
      checks.check_int(name, getattr(self, name), low=1)
    checks.check_int("depth", self.depth, low=0)
    checks.check_int("sharpness_every", self.sharpness_every, low=0)
    checks.check_int("checkpoint_every", self.checkpoint_every, low=0)
    checks.check_int("seed", self.seed, low=0)
    for name in ("batch_size", "curvature_batch", "subset"):
      if getattr(self, name) is not None:
        checks.check_int(name, getattr(self, name), low=1)
    checks.check_range("weight_decay", self.weight_decay, low=0.0)
    checks.check_range("divergence_factor", self.divergence_factor, low=1.0,
                       allow_inf=True)
    checks.check_choice("loss", self.loss, ("squared", "cross_entropy"))
    validate_optimizer(self.optimizer)
    if self.fused_kernels and self.model not in FUSED_MODELS:
      raise ValueError(f"fused_kernels must be used with a model in"
                       f" {FUSED_MODELS} (the models built from cdat_fast.nn),"
                       f" got {self.model!r}")
    if self.curvature_batch is not None and self.optimizer.tuner not in (
        "cdat", "quadratic_greedy"):
      raise ValueError("curvature_batch applies to the cdat and"
                       " quadratic_greedy tuners, not"
                       f" {self.optimizer.tuner!r}")
    _check_model_fits_data(self.model, self.dataset)


def _check_model_fits_data(model: str, dataset: str) -> None:
  """Text data needs a sequence model, images a model that reads images."""
  from cdat_fast.harness.data import is_text_dataset
  from cdat_fast.harness.models import MODEL_NAMES, TEXT_MODELS
  if model not in MODEL_NAMES:
    return  # get_model names the valid ones
  if is_text_dataset(dataset) and model not in TEXT_MODELS:
    raise ValueError(
        f"model must be a sequence model for the text data set {dataset!r},"
        f" got {model!r}, which maps a whole input to one prediction; use"
        f" {TEXT_MODELS[0]} (the default for text) or"
        f" {', '.join(TEXT_MODELS[1:])}")
  if not is_text_dataset(dataset) and model in TEXT_MODELS:
    raise ValueError(
        f"model must read images for {dataset!r}, got {model!r} (a language"
        " model of character ids); use mlp (the default), resnet, mixer or"
        " vit")


def config_to_dict(cfg: TrainConfig) -> dict[str, Any]:
  return dataclasses.asdict(cfg)


def config_from_dict(d: dict[str, Any]) -> TrainConfig:
  d = dict(d)
  opt = OptimizerConfig(**d.pop("optimizer", {}))
  return TrainConfig(**d, optimizer=opt)
