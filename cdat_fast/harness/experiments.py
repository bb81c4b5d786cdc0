"""Runs over seeds, their spread, grids tuned by the mean, the comparison.

What ``cdat-fast sweep`` and ``cdat-fast compare`` run
(:mod:`cdat_fast.harness.cli` parses the flags and prints):

* :class:`SeedRunner` runs one configuration with ``seeds`` seeds, ``seed``,
  ``seed + 1``, ...: the seed sets the initialisation and the minibatch order;
  the data (and its ``subset``) is loaded once, with the base seed, and shared
  by every run, so that the seeds vary the optimisation, not the problem.
* :func:`spread` summarises a variant's final losses (mean over the last 5
  iterates, paper appendix C.3) over seeds: the mean, the minimum and the
  maximum; a run that diverged counts as ``inf``, so a variant that diverges
  at any seed has an infinite mean and ranks last.
* :func:`tune` runs every point of a grid over seeds and picks the point of
  lowest *mean* final loss (:func:`select_best`), reporting the axes on whose
  edge it lies (the optimum may be outside the grid).
* :func:`compare` is the paper's Fig. 1/5 line-up: the constant learning rate
  tuned on a log2 grid, the three schedules of appendix C.3 (linear warm-up
  from 0 then constant, linear decay to 0 or cosine decay to 0 at the
  horizon), each with its peak learning rate tuned on the same grid and its
  warm-up fraction on ``{0.05, 0.1, 0.2}`` (and, optionally, the horizon),
  and the tuners (line search, quadratically greedy, CDAT σ ∈ {2, 2.0625,
  2.5}, Polyak, hypergradient), then the peers of
  :mod:`cdat_fast.harness.peers` (Optax's line searches and Polyak SGD,
  Sophia with its learning rate tuned on its own grid, the
  learning-rate-free optimizers with their published defaults and with
  their one knob tuned on a grid, GeN). A tuned variant whose grid holds
  the published defaults (:class:`TunedVariant`'s ``default``) also gives
  the defaults' line, from the same runs.
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import time
from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence

from cdat_fast.harness.config import TrainConfig

SCHEDULE_SHAPES = ("warmup_constant", "warmup_linear", "warmup_cosine")
WARMUP_FRACTIONS = (0.05, 0.1, 0.2)


def spread(losses: Sequence[float]) -> dict[str, Any]:
  """Mean, minimum and maximum of final losses over seeds (inf: diverged).

  Returns:
    ``{"final_loss": mean, "final_loss_min", "final_loss_max",
    "num_diverged", "seeds"}``.
  """
  if not losses:
    raise ValueError("spread: no runs")
  values = [float(v) for v in losses]
  return {"final_loss": math.fsum(values) / len(values)
                        if all(math.isfinite(v) for v in values) else math.inf,
          "final_loss_min": min(values), "final_loss_max": max(values),
          "num_diverged": sum(not math.isfinite(v) for v in values),
          "seeds": len(values)}


def format_spread(row: dict[str, Any]) -> str:
  """``mean [min–max]``; ``diverged k/N`` when a seed diverged."""
  n, bad = row.get("seeds", 1), row.get("num_diverged", 0)
  if bad == n:
    return "diverged" if n == 1 else f"diverged {n}/{n}"
  lo, hi = row["final_loss_min"], row["final_loss_max"]
  if bad:
    return f"diverged {bad}/{n} (finite: from {lo:.4g})"
  if n == 1:
    return f"{row['final_loss']:.5g}"
  return f"{row['final_loss']:.5g} [{lo:.4g}–{hi:.4g}]"


def select_best(rows: list[dict[str, Any]], axes: dict[str, list]
                ) -> tuple[dict[str, Any], list[str]]:
  """The row with the lowest final loss, and the axes on whose edge it sits.

  ``final_loss`` is the mean over seeds of the mean train loss over the last
  5 iterates (paper appendix C.3); diverged runs count as ``inf``. An axis
  with more than one value whose best value is its smallest or largest is
  reported, since the optimum may lie outside the grid.

  Raises:
    ValueError: for no rows, or when every row diverged.
  """
  if not rows:
    raise ValueError("select_best: no runs")
  finite = [r for r in rows if math.isfinite(r["final_loss"])]
  if not finite:
    raise ValueError("every run of the sweep diverged")
  best = min(finite, key=lambda r: r["final_loss"])
  edges = []
  for name, values in axes.items():
    vals = sorted(v for v in values if v is not None)
    if len(vals) > 1 and best[name] is not None and best[name] in (vals[0],
                                                                   vals[-1]):
      edges.append(name)
  return best, edges


class SeedRuns(NamedTuple):
  """The runs of one configuration over seeds.

  Attributes:
    name: the variant's name (its run directory under the output folder).
    cfg: the configuration (with the base seed).
    summaries: each seed's run summary.
    dirs: each seed's run directory (None without an output folder).
  """
  name: str
  cfg: TrainConfig
  summaries: list[dict[str, Any]]
  dirs: list[Path | None]

  def stats(self) -> dict[str, Any]:
    """:func:`spread` of the final losses, with the mean final lr and time."""
    out = spread([s["final_loss"] for s in self.summaries])
    lrs = [s["final_learning_rate"] for s in self.summaries
           if s.get("final_learning_rate") is not None]
    out["final_learning_rate"] = math.fsum(lrs) / len(lrs) if lrs else None
    out["seconds"] = math.fsum(s["seconds"] for s in self.summaries) / len(
        self.summaries)
    return out


class SeedRunner:
  """Runs configurations over seeds, sharing the loaded data.

  Args:
    seeds: the number of seeds ``N``; run ``i`` uses ``cfg.seed + i``.
    out: the output folder: variant ``name`` writes ``out/name`` (one seed)
      or ``out/name/seed=S`` (several); None writes nothing.
    dataset: the data, if already loaded.
    trainer: ``Trainer`` class (the default imports
      :class:`cdat_fast.harness.train.Trainer`).
  """

  def __init__(self, seeds: int = 1, out: Path | None = None, *,
               dataset=None, trainer: Callable | None = None):
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
      raise ValueError(f"seeds must be a positive integer, got {seeds!r}")
    self.seeds, self.out, self.dataset = seeds, out, dataset
    self._trainer = trainer

  def run(self, name: str, cfg: TrainConfig) -> SeedRuns:
    """Trains ``cfg`` with each seed; returns the runs."""
    if self._trainer is None:
      from cdat_fast.harness.train import Trainer  # jax, only when running
      self._trainer = Trainer
    summaries, dirs = [], []
    for i in range(self.seeds):
      seeded = dataclasses.replace(cfg, seed=cfg.seed + i)
      where = None
      if self.out is not None:
        where = self.out / name
        if self.seeds > 1:
          where = where / f"seed={seeded.seed}"
      trainer = self._trainer(seeded, dataset=self.dataset)
      self.dataset = trainer.dataset
      summaries.append(trainer.run(where, progress=False, echo=None).summary)
      dirs.append(where)
    return SeedRuns(name, cfg, summaries, dirs)


def _tag(point: dict[str, Any], axes: dict[str, list]) -> str:
  return "_".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}"
                  for k, v in point.items() if len(axes[k]) > 1) or "run"


class Tuned(NamedTuple):
  """A grid run over seeds and its best point.

  Attributes:
    rows: one per grid point: the point's values, :meth:`SeedRuns.stats`,
      and ``dir``, its run directory's name.
    runs: the :class:`SeedRuns` of each row, in order.
    best: the best row (lowest mean final loss), or None if all diverged.
    edges: the axes on whose edge the best point lies.
  """
  rows: list[dict[str, Any]]
  runs: list[SeedRuns]
  best: dict[str, Any] | None
  edges: list[str]

  def best_runs(self) -> SeedRuns | None:
    return None if self.best is None else self.runs[self.rows.index(
        self.best)]


def tune(runner: SeedRunner, prefix: str, make_cfg: Callable[..., TrainConfig],
         axes: dict[str, list], *,
         on_row: Callable[[dict[str, Any]], None] | None = None) -> Tuned:
  """Runs ``make_cfg(**point)`` for every point of the grid ``axes``.

  Args:
    runner: runs each point over seeds.
    prefix: the run directories are ``prefix + tag`` (the tag names the axes
      with more than one value: ``learning_rate=0.1_warmup_fraction=0.05``).
    make_cfg: the configuration of a point.
    axes: ``{name: values}``; the grid is their product.
    on_row: called with each row as it is done (to print it).

  Returns:
    :class:`Tuned`, its best point chosen by the mean over seeds.
  """
  names = list(axes)
  rows, runs = [], []
  for values in itertools.product(*axes.values()):
    point = dict(zip(names, values))
    tag = prefix + _tag(point, axes)
    seed_runs = runner.run(tag, make_cfg(**point))
    statuses = {s["status"] for s in seed_runs.summaries}
    row = {**point, **seed_runs.stats(), "dir": tag,
           "status": "ok" if statuses == {"ok"} else "diverged"}
    rows.append(row)
    runs.append(seed_runs)
    if on_row is not None:
      on_row(row)
  try:
    best, edges = select_best(rows, axes)
  except ValueError:
    best, edges = None, []
  return Tuned(rows, runs, best, edges)


class Entry(NamedTuple):
  """A line of the comparison table.

  Attributes:
    label: the variant (``constant``, ``warmup_cosine``, ``cdat_2``, ...).
    setting: its tuned or fixed hyperparameters, as text.
    row: :meth:`SeedRuns.stats` of its (best) runs; None if all diverged.
    runs: those runs; None if all diverged.
    edges: tuned axes on whose edge the best point lies.
    grid: the rows of its grid (:attr:`Tuned.rows`); None if not tuned.
  """
  label: str
  setting: str
  row: dict[str, Any] | None
  runs: SeedRuns | None
  edges: list[str]
  grid: list[dict[str, Any]] | None = None


def _tuned_entry(label: str, tuned: Tuned, shown: Sequence[str]) -> Entry:
  best = tuned.best
  if best is None:
    return Entry(label, "every grid point diverged", None, None, [],
                 tuned.rows)
  setting = ", ".join(f"{k} {best[k]:g}" for k in shown)
  return Entry(label, setting, best, tuned.best_runs(), tuned.edges,
               tuned.rows)


class TunedVariant(NamedTuple):
  """A tuner whose own hyperparameters are tuned by the mean over seeds.

  Attributes:
    name: the tuned line's label (e.g. ``prodigy_tuned``).
    overrides: the OptimizerConfig fields it sets.
    axes: the tuned fields and their grids.
    default_label: the label of the published defaults' line (e.g.
      ``prodigy``), taken from the grid's runs; None: no such line.
    default: the defaults' grid point (``{"d_coef": 1.0}``); the line is
      given only when the grid holds it.
  """
  name: str
  overrides: dict[str, Any]
  axes: dict[str, list]
  default_label: str | None = None
  default: dict[str, Any] | None = None


class VariantEvent(NamedTuple):
  """A variant of :func:`compare` starting (``entry`` None) or done.

  Attributes:
    label: the variant.
    index: its place in the line-up, from 1.
    total: the number of variants.
    runs: the runs it takes (grid points × seeds).
    entry: its :class:`Entry` once done (a tuned variant's tuned line);
      None when starting.
    seconds: how long it took; None when starting.
  """
  label: str
  index: int
  total: int
  runs: int
  entry: Entry | None = None
  seconds: float | None = None


def _grid_size(axes: dict[str, list]) -> int:
  return math.prod(len(v) for v in axes.values())


def compare(runner: SeedRunner, base: TrainConfig, *,
            learning_rates: Sequence[float],
            schedules: Sequence[str] = SCHEDULE_SHAPES,
            warmup_fractions: Sequence[float] = WARMUP_FRACTIONS,
            horizon_fractions: Sequence[float] = (1.0,),
            tuners: Sequence[tuple[str, dict[str, Any]]] = (),
            tuned_tuners: Sequence[tuple[str, dict[str, Any],
                                         dict[str, list]]] = (),
            on_row: Callable[[str, dict[str, Any]], None] | None = None,
            on_variant: Callable[[VariantEvent], None] | None = None
            ) -> list[Entry]:
  """The comparison line-up over seeds (see the module docstring).

  Args:
    runner: runs each configuration over seeds.
    base: the setting (data, model, base optimizer, steps).
    learning_rates: the grid of the constant learning rate and of the
      schedules' peak.
    schedules: the schedule shapes of :data:`SCHEDULE_SHAPES` to run.
    warmup_fractions: the warm-up fractions of the schedules' grid.
    horizon_fractions: the horizons of the decaying schedules, as fractions
      of the number of steps (the paper: 1, 1/2, 1/4).
    tuners: ``(name, OptimizerConfig overrides)`` of the tuners.
    tuned_tuners: :class:`TunedVariant` (or ``(name, overrides, axes)``) of
      tuners whose own hyperparameters (``axes``: OptimizerConfig fields
      and their grids) are tuned by the mean over seeds, like the
      constant's (e.g. Sophia's learning rate).
    on_row: called with ``(family, row)`` as each grid point is done.
    on_variant: called with a :class:`VariantEvent` as each variant starts
      and when it is done.

  Returns:
    One :class:`Entry` per variant: the tuned constant, each schedule, each
    tuner.
  """
  def family(name):
    return None if on_row is None else (lambda row: on_row(name, row))

  plan = _plan(base, learning_rates, schedules, warmup_fractions,
               horizon_fractions, tuners, tuned_tuners)
  entries = []
  for index, (label, size, make_entry) in enumerate(plan, 1):
    event = VariantEvent(label, index, len(plan), size * runner.seeds)
    if on_variant is not None:
      on_variant(event)
    start = time.perf_counter()
    made = make_entry(runner, family(label))
    entries.extend(made if isinstance(made, list) else [made])
    if on_variant is not None:
      on_variant(event._replace(entry=entries[-1],
                                seconds=time.perf_counter() - start))
  return entries


def _plan(base, learning_rates, schedules, warmup_fractions,
          horizon_fractions, tuners, tuned_tuners) -> list[tuple]:
  """The line-up: ``(label, grid size, make_entry(runner, on_row))`` each."""
  plan = [_constant_plan(base, learning_rates)]
  for shape in schedules:
    plan.append(_schedule_plan(base, shape, learning_rates, warmup_fractions,
                               horizon_fractions))
  for name, overrides in tuners:
    plan.append((name, 1, functools.partial(_tuner_entry, base, name,
                                            overrides)))
  for variant in tuned_tuners:
    variant = TunedVariant(*variant)
    plan.append((variant.name, _grid_size(variant.axes), functools.partial(
        _tuned_tuner_entry, base, variant)))
  return plan


def _constant_plan(base, learning_rates) -> tuple:
  """The constant learning rate's line of :func:`_plan`, tuned on the grid."""
  def constant(learning_rate):
    opt = dataclasses.replace(base.optimizer, tuner="constant",
                              schedule="constant", learning_rate=learning_rate)
    return dataclasses.replace(base, optimizer=opt)

  axes = {"learning_rate": list(learning_rates)}

  def make_entry(runner, on_row):
    tuned = tune(runner, "constant_", constant, axes, on_row=on_row)
    return _tuned_entry("constant", tuned, ["learning_rate"])

  return "constant", _grid_size(axes), make_entry


def _schedule_plan(base, shape, learning_rates, warmup_fractions,
                   horizon_fractions) -> tuple:
  """A schedule's line of :func:`_plan`: its peak lr and warm-up tuned."""
  horizons = [1.0] if shape == "warmup_constant" else list(horizon_fractions)

  def scheduled(learning_rate, warmup_fraction, horizon_fraction):
    opt = dataclasses.replace(
        base.optimizer, tuner="constant", schedule=shape,
        learning_rate=learning_rate, warmup_fraction=warmup_fraction,
        horizon_fraction=horizon_fraction)
    return dataclasses.replace(base, optimizer=opt)

  axes = {"learning_rate": list(learning_rates),
          "warmup_fraction": list(warmup_fractions),
          "horizon_fraction": horizons}
  shown = [k for k in axes if len(axes[k]) > 1 or k == "learning_rate"]

  def make_entry(runner, on_row):
    tuned = tune(runner, f"{shape}_", scheduled, axes, on_row=on_row)
    return _tuned_entry(shape, tuned, shown)

  return shape, _grid_size(axes), make_entry


def configured(base: TrainConfig, overrides: dict[str, Any]) -> TrainConfig:
  """``base`` with ``overrides``: OptimizerConfig fields, or TrainConfig's
  (``curvature_batch`` for CDAT's fast mode)."""
  run_fields = {f.name for f in dataclasses.fields(TrainConfig)} - {
      "optimizer"}
  run = {k: v for k, v in overrides.items() if k in run_fields}
  opt = {k: v for k, v in overrides.items() if k not in run_fields}
  return dataclasses.replace(
      base, **run, optimizer=dataclasses.replace(base.optimizer, **opt))


def _tuner_entry(base, name, overrides, runner, on_row) -> Entry:
  """A tuner with fixed settings, run over seeds."""
  del on_row  # one configuration: no grid rows
  runs = runner.run(name, configured(base, overrides))
  setting = ", ".join(f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}"
                      for k, v in overrides.items() if k != "tuner")
  return Entry(name, setting, runs.stats(), runs, [])


def _tuned_tuner_entry(base, variant: TunedVariant, runner, on_row
                       ) -> list[Entry]:
  """A tuner whose own hyperparameters are tuned by the mean.

  Returns:
    The tuned line, after the defaults' line when the grid holds it.
  """
  def tuned_cfg(**point):
    return configured(base, {**variant.overrides, **point})
  tuned = tune(runner, f"{variant.name}_", tuned_cfg, variant.axes,
               on_row=on_row)
  entries = [_tuned_entry(variant.name, tuned, list(variant.axes))]
  if variant.default_label is None or variant.default is None:
    return entries
  for row, runs in zip(tuned.rows, tuned.runs):
    if all(row[k] == v for k, v in variant.default.items()):
      setting = ", ".join(f"{k} {v:g}" for k, v in variant.default.items())
      entries.insert(0, Entry(variant.default_label,
                              f"{setting} (published default)", row, runs,
                              []))
  return entries


def format_table(entries: Sequence[Entry], seeds: int) -> list[str]:
  """The comparison table's lines: final loss as ``mean [min–max]``."""
  head = ("final loss" if seeds == 1
          else f"final loss, mean [min–max] of {seeds}")
  lines = [f"{'variant':<19} {head:<36} {'final lr':>10} {'time s':>7}"
           "  setting"]
  for e in entries:
    if e.row is None:
      lines.append(f"{e.label:<19} {'diverged':<36} {'-':>10} {'-':>7}"
                   f"  {e.setting}")
      continue
    lr = e.row["final_learning_rate"]
    lr = "-" if lr is None else f"{lr:.4g}"
    mark = " (edge: " + ", ".join(e.edges) + ")" if e.edges else ""
    lines.append(f"{e.label:<19} {format_spread(e.row):<36} {lr:>10}"
                 f" {e.row['seconds']:>7.1f}  {e.setting}{mark}")
  return lines
