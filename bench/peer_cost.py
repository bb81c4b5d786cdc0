"""Time per step of every tuner and peer relative to the base step, side by side.

Each variant is the harness's own compiled training chunk (``Trainer._chunk``:
``steps`` steps in one ``lax.scan``, full batch or ``steps`` minibatches) on
the same data and model; the variants are timed in interleaved rounds in one
process, and each round's time is divided by the same round's
constant-learning-rate (base) time, so that a slow spell of a shared machine
falls on both sides of a ratio. The table gives the median ratio over rounds
and its min–max.

A line search's cost depends on how many trials it takes, which depends on
where the run is: the chunk starts from the same initialisation for every
variant, after ``--warmup`` steps of the variant itself. GeN's cost is
amortised: it evaluates the objective every ``Φ = 4`` steps, so a chunk of a
multiple of 4 steps holds its share. Schedule-Free is timed without the
harness's logging of the loss at its averaged parameters (one forward pass
more a step, which a user pays only when evaluating).

The learning-rate-free peers that run with one base only (Prodigy and
D-Adaptation on Adam; DoG, DoWG, COCOB on SGD) take that base whatever
``--base`` is, as in ``cdat-fast compare``; Polyak SGD and Sophia only run
with ``--base gd``.

    python bench/peer_cost.py --dataset fashion-mnist --data-dir DIR --subset 4096
    python bench/peer_cost.py --dataset fashion-mnist --data-dir DIR \\
        --subset 4096 --batch-size 256
    python bench/peer_cost.py --dataset shakespeare --data-dir FILE \\
        --subset 2048 --batch-size 64 --model nanolm-small --base adam --lr 0.004
"""
from __future__ import annotations

import argparse
import sys
import time

import jax
import numpy as np

from cdat_fast.harness.config import TrainConfig
from cdat_fast.harness.data import is_text_dataset
from cdat_fast.harness.optimizers import OptimizerConfig
from cdat_fast.harness.peers import OWN_BASE, PEER_BASES
from cdat_fast.harness.train import BatchStream, Trainer

# pylint: disable=g-bad-import-order
from common import markdown_table, side_by_side, write_json

VARIANTS = {
    "constant": dict(tuner="constant"),
    "cdat": dict(tuner="cdat"),
    "cdat_sub16_gn": dict(tuner="cdat", curvature="gauss_newton"),
    "linesearch": dict(tuner="linesearch"),
    "polyak": dict(tuner="polyak", polyak_max_lr=100.0),
    "hypergradient": dict(tuner="hypergradient"),
    "optax_backtracking": dict(tuner="optax_backtracking"),
    "optax_zoom": dict(tuner="optax_zoom"),
    "optax_polyak": dict(tuner="optax_polyak"),
    "sophia": dict(tuner="sophia", learning_rate=0.004),
    "schedule_free": dict(tuner="schedule_free", peer_lr=0.1),
    "prodigy": dict(tuner="prodigy"),
    "dadapt": dict(tuner="dadapt"),
    "dog": dict(tuner="dog"),
    "dowg": dict(tuner="dowg"),
    "mechanic": dict(tuner="mechanic"),
    "cocob": dict(tuner="cocob"),
    "momo": dict(tuner="momo"),
    "gen": dict(tuner="gen"),
}
# The peers a default run times (the paper's classical tuners are in
# docs/reproduction.md's table).
DEFAULT = ("constant", "cdat", "cdat_sub16_gn", "schedule_free", "prodigy",
           "dadapt", "dog", "dowg", "mechanic", "cocob", "momo", "gen")


def _optimizer(args, name: str) -> OptimizerConfig:
  over = dict(VARIANTS[name])
  over.setdefault("learning_rate", args.lr)
  over.setdefault("base", args.base)
  bases = PEER_BASES.get(over["tuner"])
  if bases is not None and over["base"] not in bases:
    over["base"] = bases[0]
  if over["tuner"] == "schedule_free":
    over["peer_lr"] = args.lr
  return OptimizerConfig(**over)


def _config(args, name: str) -> TrainConfig:
  rows = args.batch_size or args.subset
  text = is_text_dataset(args.dataset)
  return TrainConfig(
      dataset=args.dataset, data_dir=args.data_dir, subset=args.subset,
      model=args.model or ("nanolm" if text else "mlp"), width=args.width,
      loss="cross_entropy" if text else "squared", steps=args.steps,
      batch_size=args.batch_size,
      curvature_batch=rows // 16 if name.endswith("sub16_gn") else None,
      optimizer=_optimizer(args, name))


def _batch(trainer: Trainer, length: int, seed: int):
  """The full batch, or ``length`` stacked minibatches, placed."""
  data = trainer._run_data()  # noqa: SLF001
  if trainer.cfg.batch_size is None:
    return data.full
  stream = BatchStream(trainer.dataset, trainer.cfg.batch_size, seed)
  chunk = [next(stream) for _ in range(length)]
  return trainer._place({k: np.stack([b[k] for b in chunk])  # noqa: SLF001
                         for k in ("x", "y")}, stacked=True)


def _prepare(args, name: str, dataset):
  """A variant's trainer, its carry after the warm-up, and its timed batch."""
  t = Trainer(_config(args, name), dataset=dataset,
              averaged_loss=False)  # the optimizer alone (module doc)
  carry = t.init()
  if args.warmup:
    carry, _ = t._chunk(carry, _batch(t, args.warmup, 1),  # noqa: SLF001
                        length=args.warmup)
  jax.block_until_ready(carry)
  return t, carry, _batch(t, args.steps, 2)


def measure(args) -> dict:
  chunks, trainers = {}, {}
  dataset = None
  for name in args.variants:
    t, carry, batch = _prepare(args, name, dataset)
    dataset = t.dataset  # the data loaded once
    trainers[name] = t
    chunks[name] = (lambda t=t, carry=carry, batch=batch: jax.block_until_ready(
        _run(t, carry, batch, args.steps)))
    t0 = time.perf_counter()
    chunks[name]()
    print(f"  {name}: compiled and ran once in {time.perf_counter() - t0:.1f}s",
          file=sys.stderr, flush=True)
  timings = side_by_side(chunks, base="constant", rounds=args.rounds,
                         warmup=0)
  return {name: {"ms_per_step": 1e3 * t.median / args.steps,
                 "ratio": t.median_ratio,
                 "ratio_min": t.ratio_range[0], "ratio_max": t.ratio_range[1],
                 "base": trainers[name].cfg.optimizer.base}
          for name, t in timings.items()}


def _run(trainer, carry, batch, steps):
  # The chunk donates its carry: run on a copy.
  carry = jax.tree.map(lambda x: x.copy(), carry)
  return trainer._chunk(carry, batch, length=steps)  # noqa: SLF001


def _parse(argv):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--dataset", default="fashion-mnist")
  p.add_argument("--data-dir", default=None)
  p.add_argument("--subset", type=int, default=4096)
  p.add_argument("--model", default=None)
  p.add_argument("--width", type=int, default=256)
  p.add_argument("--base", default="gd")
  p.add_argument("--batch-size", type=int, default=None,
                 help="minibatch size (default: full batch)")
  p.add_argument("--lr", type=float, default=0.05,
                 help="the constant's learning rate, Schedule-Free's, GeN's η₀")
  p.add_argument("--steps", type=int, default=20, help="steps per timing")
  p.add_argument("--warmup", type=int, default=20)
  p.add_argument("--rounds", type=int, default=7)
  p.add_argument("--variants", default=",".join(DEFAULT),
                 help=f"among {', '.join(VARIANTS)}")
  p.add_argument("--json", default=None)
  args = p.parse_args(argv)
  args.variants = [v for v in args.variants.split(",") if v]
  unknown = [v for v in args.variants if v not in VARIANTS]
  if unknown:
    p.error(f"--variants: unknown {', '.join(unknown)}")
  if args.base != "gd":  # Polyak SGD and Sophia are SGD-only
    args.variants = [v for v in args.variants
                     if VARIANTS[v]["tuner"] not in OWN_BASE]
  if "constant" not in args.variants:
    args.variants.insert(0, "constant")
  return args


def main(argv=None) -> int:
  args = _parse(argv)
  res = measure(args)
  print(markdown_table(
      ("variant", "base", "ms/step", "time / base step [min–max]"),
      [(name, r["base"], f"{r['ms_per_step']:.2f}",
        f"{r['ratio']:.2f} [{r['ratio_min']:.2f}–{r['ratio_max']:.2f}]")
       for name, r in res.items()], align="llrl"))
  if args.json:
    write_json(args.json, {"args": vars(args), "results": res})
  return 0


if __name__ == "__main__":
  sys.exit(main())
