"""Tables and figures of docs/reproduction.md from the runs of bench/reproduction.sh.

    python bench/reproduction_report.py [--runs runs/repro] [--figures docs/figures]

prints the markdown tables (every figure in them is read from the run folders)
and writes the figures ``repro_*.png``. Stages that have not run are skipped.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from cdat_fast.harness.experiments import format_spread, spread  # noqa: E402

from common import markdown_table  # noqa: E402  # pylint: disable=g-bad-import-order


def _jsonl(path: Path) -> list[dict]:
  if not path.is_file():
    return []
  return [json.loads(line) for line in path.read_text().splitlines() if line]


def _history(d: Path) -> dict[str, np.ndarray]:
  with np.load(d / "history.npz") as h:
    return {k: h[k] for k in h}


def _loss(summary: dict) -> float:
  """A run's final loss; a diverged run's (None) counts as inf."""
  v = summary.get("final_loss")
  return math.inf if v is None else float(v)


def _seed_dirs(d: Path) -> list[Path]:
  """The finished runs (with a summary) of a variant's folder."""
  seeds = sorted(d.glob("seed=*")) or [d]
  return [s for s in seeds if (s / "summary.json").is_file()]


def _curve_stats(dirs, key):
  """Per-step mean, min and max of ``key`` over runs (NaN after divergence)."""
  hs = [_history(d)[key] for d in dirs]
  n = max(len(h) for h in hs)
  arr = np.full((len(hs), n), np.nan)
  for i, h in enumerate(hs):
    arr[i, :len(h)] = h
  return np.nanmean(arr, 0), np.nanmin(arr, 0), np.nanmax(arr, 0)


# -- compare ------------------------------------------------------------------

def compare_table(root: Path, stage: str, steps: int | None = None) -> str:
  data = json.loads((root / stage / "compare.json").read_text())
  rows = []
  for row in data["table"]:
    if "final_loss" not in row:
      rows.append([row["label"], "every grid point diverged", "", "", ""])
      continue
    lr = row.get("final_learning_rate")
    edge = f" (edge: {', '.join(row['edges'])})" if row["edges"] else ""
    rows.append([row["label"], format_spread(row),
                 "-" if lr is None else f"{lr:.3g}", f"{row['seconds']:.1f}",
                 f"{row['setting']}{edge}"])
  return markdown_table(
      ("variant", f"final loss, mean [min–max] of {data['seeds']}",
       "final lr", "s/run", "setting"), rows, align="llrrl")


def _curves_figure(series, out: Path, title: str = "") -> Path:
  """Loss (mean, min–max shaded) and learning rate of ``(label, dirs)`` series."""
  fig, (ax_l, ax_r) = plt.subplots(1, 2, figsize=(11, 4))
  for label, dirs in series:
    mean, lo, hi = _curve_stats(dirs, "loss")
    steps = np.arange(1, len(mean) + 1)
    line, = ax_l.plot(steps, mean, label=label, lw=1)
    ax_l.fill_between(steps, lo, hi, color=line.get_color(), alpha=0.15, lw=0)
    ax_r.plot(steps, _curve_stats(dirs, "learning_rate")[0], lw=1,
              color=line.get_color())
  ax_l.set(xscale="log", yscale="log", xlabel="step", title=title,
           ylabel="train loss (mean over seeds, min–max shaded)")
  ax_r.set(xscale="log", yscale="log", xlabel="step",
           ylabel="learning rate (mean over seeds)")
  ax_l.legend(fontsize=7, ncol=2)
  fig.tight_layout()
  fig.savefig(out, dpi=90)
  plt.close(fig)
  return out


def compare_figure(root: Path, stage: str, out: Path, labels=None,
                   title: str = "") -> Path:
  data = json.loads((root / stage / "compare.json").read_text())
  series = []
  for run in data["runs"]:
    label = next((e["label"] for e in data["table"]
                  if e.get("dir") == run["name"] or e["label"] == run["name"]),
                 run["name"])
    if labels is None or label in labels:
      series.append((label, [Path(d) for d in run["dirs"]]))
  return _curves_figure(series, out, title)


# -- the edge of stability (C2, C5) -------------------------------------------

def _edge_numbers(d: Path) -> dict:
  recs = [r for r in _jsonl(d / "metrics.jsonl") if "sharpness" in r]
  h = _history(d)
  lr = h["learning_rate"]
  steps = [r["step"] for r in recs]
  lam = np.array([r["sharpness"] for r in recs])
  el = np.array([r["eta_sharpness"] for r in recs])
  half = el[len(el) // 2:]
  at_edge = np.nonzero(el >= 1.9)[0]
  reach = steps[at_edge[0]] if len(at_edge) else None
  stay = (float(np.mean(el[at_edge[0]:] >= 1.8)) if len(at_edge) else None)
  ok = json.loads((d / "summary.json").read_text())["status"] == "ok"
  return {"lr_first": float(lr[0]), "lr_end": float(lr[-1]),
          "lr_max": float(np.max(lr)),
          "lr_min": float(np.min(lr)), "lam_first": float(lam[0]),
          "lam_max": float(np.max(lam)), "lam_end": float(lam[-1]),
          "el_median": float(np.median(half)), "el_lo": float(np.min(half)),
          "el_hi": float(np.max(half)), "reach": reach, "stay": stay,
          "ok": ok}


def _mm(xs, fmt="{:.3g}") -> str:
  xs = [x for x in xs if x is not None]
  if not xs:
    return "-"
  mean = statistics.fmean(xs)
  if len(xs) == 1:
    return fmt.format(mean)
  return f"{fmt.format(mean)} [{fmt.format(min(xs))}–{fmt.format(max(xs))}]"


def edge_table(root: Path) -> str:
  rows = []
  for vdir in sorted((root / "mlp_edge").iterdir()):
    if not vdir.is_dir():
      continue
    nums = [_edge_numbers(d) for d in _seed_dirs(vdir)]
    loss = spread([_loss(json.loads((d / "summary.json").read_text()))
                   for d in _seed_dirs(vdir)])
    c = lambda k: [n[k] for n in nums]  # noqa: E731
    rows.append([
        vdir.name,
        f"{_mm(c('lr_first'))} → {_mm(c('lr_max'))} → {_mm(c('lr_end'))}",
        f"{_mm(c('lam_first'))} → {_mm(c('lam_max'))} → {_mm(c('lam_end'))}",
        f"{_mm(c('el_median'))} [{min(c('el_lo')):.3g}–{max(c('el_hi')):.3g}]",
        _mm(c("reach"), "{:.0f}"), _mm(c("stay"), "{:.2f}"),
        format_spread(loss)])
  return markdown_table(
      ("variant", "η step 1 → max → end", "λ_max first → max → end",
       "median η·λ, 2nd half [its min–max]", "first step η·λ ≥ 1.9",
       "share ≥ 1.8 after it", "final loss"), rows)


def edge_figure(root: Path, out: Path) -> Path:
  fig, axes = plt.subplots(1, 3, figsize=(14, 4))
  for vdir in sorted((root / "mlp_edge").iterdir()):
    if not vdir.is_dir():
      continue
    d = _seed_dirs(vdir)[0]
    recs = [r for r in _jsonl(d / "metrics.jsonl") if "sharpness" in r]
    steps = [r["step"] for r in recs]
    h = _history(d)
    line, = axes[0].plot(np.arange(1, len(h["loss"]) + 1), h["loss"], lw=1,
                         label=vdir.name)
    axes[1].plot(steps, [r["sharpness"] for r in recs], color=line.get_color(),
                 lw=1)
    axes[1].plot(steps, [2 / r["learning_rate"] for r in recs], ls=":",
                 color=line.get_color(), lw=1)
    axes[2].plot(steps, [r["eta_sharpness"] for r in recs],
                 color=line.get_color(), lw=1)
  axes[0].set(yscale="log", xscale="log", xlabel="step", ylabel="train loss")
  axes[1].set(yscale="log", xlabel="step",
              ylabel="λ_max (solid), 2/η (dotted)")
  axes[2].axhline(2.0, color="k", lw=0.5)
  axes[2].set(xlabel="step", ylabel="η·λ_max", ylim=(0, 4))
  axes[0].legend(fontsize=7)
  fig.suptitle("seed 0")
  fig.tight_layout()
  fig.savefig(out, dpi=90)
  plt.close(fig)
  return out


def density_figure(root: Path, out: Path, variants=None) -> tuple[Path, str]:
  """The SLQ spectral density at the end, Gaussian-broadened (seed 0).

  One grid and one width (1% of the largest λ_max among the variants) for
  every variant, so that the curves compare.
  """
  lasts = {}
  for vdir in sorted((root / "mlp_edge").iterdir()):
    if (variants is not None and vdir.name not in variants) or not (
        vdir.is_dir() and _seed_dirs(vdir)):
      continue
    spec = _jsonl(_seed_dirs(vdir)[0] / "spectrum.jsonl")
    if spec:
      lasts[vdir.name] = spec[-1]
  rows = []
  top = max(max(last["top_eigenvalues"]) for last in lasts.values())
  grid = np.linspace(-0.1 * top, 1.1 * top, 800)
  width = 0.01 * top
  fig, ax = plt.subplots(figsize=(7, 4))
  for name, last in lasts.items():
    nodes = np.asarray(last["density_nodes"], float).ravel()
    weights = np.asarray(last["density_weights"], float).ravel()
    weights = weights / max(len(last["density_nodes"]), 1)
    dens = (weights[:, None] * np.exp(
        -0.5 * ((grid - nodes[:, None]) / width) ** 2)).sum(0) / (
            width * math.sqrt(2 * math.pi))
    ax.plot(grid, np.maximum(dens, 1e-12), lw=1, label=name)
    tops = ", ".join(f"{v:.3g}" for v in last["top_eigenvalues"])
    rows.append([name, tops, f"{last['hessian_trace']:.4g} ±"
                 f" {last['hessian_trace_stderr']:.2g}"])
  ax.set(yscale="log", xlabel="Hessian eigenvalue", ylim=(1e-6, None),
         ylabel=f"density (SLQ, Gaussian width {width:.2g})")
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(out, dpi=90)
  plt.close(fig)
  return out, markdown_table(
      ("variant", "top-5 eigenvalues at the end (seed 0)",
       "trace (Hutchinson, ± stderr)"), rows)


def warmup_table(root: Path, variant="cdat_2") -> str:
  """C4: CDAT's η at a few steps (mean [min–max] over seeds)."""
  dirs = _seed_dirs(root / "mlp_edge" / variant)
  lrs = [_history(d)["learning_rate"] for d in dirs]
  at = [1, 10, 25, 100, 200, 400, 800]
  cells = [_mm([float(lr[min(s, len(lr)) - 1]) for lr in lrs]) for s in at]
  return markdown_table(["step", *map(str, at)], [[f"η of {variant}", *cells]])


# -- minibatch (C6) -------------------------------------------------------------

def _sweep(root: Path, name: str) -> dict | None:
  path = root / "minibatch" / name / "sweep.json"
  return json.loads(path.read_text()) if path.is_file() else None


def minibatch_table(root: Path) -> str:
  cdat, const, ls = (_sweep(root, n) for n in ("cdat", "constant",
                                               "linesearch"))
  lines = []
  for bs in sorted({r["batch_size"] for r in cdat["rows"]}):
    rows = [r for r in cdat["rows"] if r["batch_size"] == bs]
    finite = [r for r in rows if math.isfinite(r["final_loss"])]
    best = min(finite, key=lambda r: r["final_loss"])
    s2 = next(r for r in rows if r["scale"] == 2.0 and r["ema"] == 0.0)
    b0 = min((r for r in finite if r["ema"] == 0.0),
             key=lambda r: r["final_loss"])
    cell = lambda r: format_spread(r)  # noqa: E731
    c = "-"
    if const:
      crow = min((r for r in const["rows"] if r["batch_size"] == bs
                  and math.isfinite(r["final_loss"])),
                 key=lambda r: r["final_loss"])
      c = f"{cell(crow)} (lr {crow['learning_rate']:g})"
    lrow = "-"
    if ls:
      lrow = cell(next(r for r in ls["rows"] if r["batch_size"] == bs))
    lines.append([
        bs, f"σ {best['scale']:g}, β {best['ema']:g}: {cell(best)}",
        cell(s2), f"σ {b0['scale']:g}: {cell(b0)}", c, lrow])
  return markdown_table(
      ("batch", "best CDAT σ, β (mean [min–max])", "CDAT σ=2, β=0",
       "best σ at β=0", "tuned constant (lr)", "line search"), lines,
      align="rlllll")


def minibatch_figure(root: Path, out: Path) -> Path:
  cdat = _sweep(root, "cdat")
  emas = sorted({r["ema"] for r in cdat["rows"]})
  fig, axes = plt.subplots(1, len(emas), figsize=(5.5 * len(emas), 4),
                           squeeze=False)
  for ax, ema in zip(axes[0], emas):
    for bs in sorted({r["batch_size"] for r in cdat["rows"]}):
      rows = sorted((r for r in cdat["rows"] if r["batch_size"] == bs
                     and r["ema"] == ema), key=lambda r: r["scale"])
      xs = [r["scale"] for r in rows]
      fin = lambda v: v if math.isfinite(v) else np.nan  # noqa: E731
      line, = ax.plot(xs, [fin(r["final_loss"]) for r in rows], marker="o",
                      label=f"batch {bs}")
      ax.fill_between(xs, [fin(r["final_loss_min"]) for r in rows],
                      [fin(r["final_loss_max"]) for r in rows],
                      color=line.get_color(), alpha=0.15, lw=0)
    ax.set(yscale="log", xlabel="CDAT scale σ", title=f"β = {ema:g}",
           ylabel="final train loss (mean of last 5 minibatches)")
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(out, dpi=90)
  plt.close(fig)
  return out


def runs_table(root: Path, stage: str) -> str:
  """Single train runs ``stage/<variant>/seed=S`` (the ResNet)."""
  lines = []
  for vdir in sorted((root / stage).iterdir()):
    if not vdir.is_dir():
      continue
    sums = [json.loads((d / "summary.json").read_text())
            for d in _seed_dirs(vdir) if (d / "summary.json").is_file()]
    if not sums:
      continue
    row = spread([_loss(s) for s in sums])
    lines.append([
        vdir.name, f"{format_spread(row)} ({len(sums)} seeds)",
        _mm([s.get("final_learning_rate") for s in sums]),
        _mm([s.get("test_accuracy") for s in sums]),
        f"{statistics.fmean(s['seconds'] for s in sums):.0f}"])
  return markdown_table(
      ("variant", "final loss, mean [min–max]", "final lr", "test acc",
       "s/run"), lines, align="llrrr")


def runs_figure(root: Path, stage: str, out: Path, title: str = "") -> Path:
  """Loss and learning rate of the runs ``stage/<variant>/seed=S``."""
  series = [(vdir.name, _seed_dirs(vdir))
            for vdir in sorted((root / stage).iterdir()) if vdir.is_dir()]
  return _curves_figure([(n, d) for n, d in series if d], out, title)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--runs", default="runs/repro")
  p.add_argument("--figures", default="docs/figures")
  args = p.parse_args(argv)
  root, figs = Path(args.runs), Path(args.figures)
  figs.mkdir(parents=True, exist_ok=True)
  out = []
  for stage, title in (("mlp_compare", "MLP 256×2 on 4096 Fashion-MNIST"),
                       ("linear", "linear model on 4096 Fashion-MNIST"),
                       ("mlp_schedules", "schedules, MLP on Fashion-MNIST"),
                       ("sophia_grid", "Sophia's learning rate, MLP")):
    if (root / stage / "compare.json").is_file():
      fig = compare_figure(root, stage, figs / f"repro_{stage}.png",
                           title=title)
      out += [f"### {stage}: {title}", "", compare_table(root, stage), "",
              f"![{stage}](figures/{fig.name})", ""]
  if (root / "mlp_edge").is_dir():
    fig = edge_figure(root, figs / "repro_mlp_edge.png")
    dfig, dtable = density_figure(root, figs / "repro_density.png")
    out += ["### mlp_edge", "", edge_table(root), "",
            f"![edge](figures/{fig.name})", "", warmup_table(root), "",
            dtable, "", f"![density](figures/{dfig.name})", ""]
  if _sweep(root, "cdat"):
    fig = minibatch_figure(root, figs / "repro_minibatch.png")
    out += ["### minibatch", "", minibatch_table(root), "",
            f"![minibatch](figures/{fig.name})", ""]
  for stage, title in (("nanolm", "NanoLM-small on 2048 Shakespeare blocks"),
                       ("resnet", "ResNet (no norm, width 8) on 256"
                                  " Fashion-MNIST images")):
    if (root / stage).is_dir():
      fig = runs_figure(root, stage, figs / f"repro_{stage}.png", title)
      out += [f"### {stage}: {title}", "", runs_table(root, stage), "",
              f"![{stage}](figures/{fig.name})", ""]
  print("\n".join(out))
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
