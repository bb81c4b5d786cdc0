"""Time per step of every tuner and peer relative to the base step, side by side.

Each variant is the harness's own compiled training chunk (``Trainer._chunk``:
``steps`` full-batch steps in one ``lax.scan``) on the same data and model;
the variants are timed in interleaved rounds in one process, and each round's
time is divided by the same round's constant-learning-rate (base) time, so
that a slow spell of a shared machine falls on both sides of a ratio. The
table gives the median ratio over rounds and its min–max.

A line search's cost depends on how many trials it takes, which depends on
where the run is: the chunk starts from the same initialisation for every
variant, after ``--warmup`` steps of the variant itself.

    python bench/peer_cost.py --dataset fashion-mnist --subset 4096
    python bench/peer_cost.py --dataset digits --subset 1024 --rounds 5
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import jax

from cdat_fast.harness.config import TrainConfig
from cdat_fast.harness.optimizers import OptimizerConfig
from cdat_fast.harness.train import Trainer

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
}


def _config(args, name: str) -> TrainConfig:
  over = dict(VARIANTS[name])
  over.setdefault("learning_rate", args.lr)
  return TrainConfig(
      dataset=args.dataset, subset=args.subset, width=args.width,
      loss="squared", steps=args.steps,
      curvature_batch=args.subset // 16 if name.endswith("sub16_gn") else None,
      optimizer=OptimizerConfig(**over))


def measure(args) -> dict:
  trainers, chunks = {}, {}
  dataset = None
  for name in args.variants:
    t = Trainer(_config(args, name), dataset=dataset)  # the data loaded once
    dataset = t.dataset
    data = t._run_data()  # noqa: SLF001
    carry = t.init()
    carry, _ = t._chunk(carry, data.full, length=args.warmup)  # noqa: SLF001
    jax.block_until_ready(carry)
    trainers[name], chunks[name] = t, (carry, data.full)
    t0 = time.perf_counter()
    jax.block_until_ready(_run(t, carry, data.full, args.steps))
    print(f"  {name}: compiled and ran once in {time.perf_counter() - t0:.1f}s",
          file=sys.stderr, flush=True)
  times = {name: [] for name in args.variants}
  for _ in range(args.rounds):
    for name in args.variants:
      carry, batch = chunks[name]
      t0 = time.perf_counter()
      jax.block_until_ready(_run(trainers[name], carry, batch, args.steps))
      times[name].append((time.perf_counter() - t0) / args.steps)
  base = times["constant"]
  out = {}
  for name, ts in times.items():
    ratios = [t / b for t, b in zip(ts, base)]
    out[name] = {"ms_per_step": 1e3 * statistics.median(ts),
                 "ratio": statistics.median(ratios),
                 "ratio_min": min(ratios), "ratio_max": max(ratios)}
  return out


def _run(trainer, carry, batch, steps):
  # The chunk donates its carry: run on a copy.
  carry = jax.tree.map(lambda x: x.copy(), carry)
  return trainer._chunk(carry, batch, length=steps)  # noqa: SLF001


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--dataset", default="fashion-mnist")
  p.add_argument("--subset", type=int, default=4096)
  p.add_argument("--width", type=int, default=256)
  p.add_argument("--lr", type=float, default=0.05)
  p.add_argument("--steps", type=int, default=20, help="steps per timing")
  p.add_argument("--warmup", type=int, default=20)
  p.add_argument("--rounds", type=int, default=7)
  p.add_argument("--variants", default=",".join(VARIANTS))
  p.add_argument("--json", default=None)
  args = p.parse_args(argv)
  args.variants = [v for v in args.variants.split(",") if v]
  unknown = [v for v in args.variants if v not in VARIANTS]
  if unknown:
    p.error(f"--variants: unknown {', '.join(unknown)}")
  if "constant" not in args.variants:
    args.variants.insert(0, "constant")
  res = measure(args)
  print(f"| variant | ms/step | time / base step [min–max] |")
  print("|---|---:|---|")
  for name, r in res.items():
    print(f"| {name} | {r['ms_per_step']:.2f} | {r['ratio']:.2f}"
          f" [{r['ratio_min']:.2f}–{r['ratio_max']:.2f}] |")
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"args": vars(args), "results": res}, f, indent=2)
  return 0


if __name__ == "__main__":
  sys.exit(main())
