"""The tables and figures of docs/peers.md, from the peers' run folders.

Reads each problem's ``compare.json`` (``cdat-fast compare``), or the stock
transformer's ``results.json`` (``bench/stock_transformer_peers.py``), and
``peers_cost/*.json`` (``bench/peer_cost.py``). Per variant it prints:

* the final training loss (mean of the last 5 iterates), mean [min–max]
  over seeds, and the test metric (accuracy, or held-out loss), the same;
* the steps to reach the tuned constant's mean final loss: the first step
  whose mean over the last 5 losses is at or below it, the median over the
  seeds that reach it, and how many do;
* the wall time to get there: those steps × the run's seconds per step
  (compilation included, so an upper bound);
* the time per step over the base step's, measured side by side
  (``peer_cost.py``), where measured.

A figure per problem: each variant's loss, 5-step means averaged over seeds.

    python bench/peers_report.py --runs runs/peers --figures docs/figures
"""
from __future__ import annotations

import argparse
import json
import math
import pathlib
import re
import statistics

import numpy as np

from common import fmt, markdown_table

WINDOW = 5  # the final loss is the mean of the last 5 iterates
PROBLEMS = {  # folder: (title, compare's base line, test metric)
    "peers_mlp": ("Fashion-MNIST MLP, full batch", "constant", "test acc"),
    "peers_minibatch_64": ("Fashion-MNIST MLP, batch 64", "constant",
                           "test acc"),
    "peers_minibatch_256": ("Fashion-MNIST MLP, batch 256", "constant",
                            "test acc"),
    "peers_minibatch_1024": ("Fashion-MNIST MLP, batch 1024", "constant",
                             "test acc"),
    "peers_minibatch_256_adam": ("Fashion-MNIST MLP, batch 256, Adam",
                                 "constant", "test acc"),
    "peers_nanolm": ("NanoLM on Shakespeare, Adam, batch 64", "constant",
                     "test acc"),
    "peers_transformer": ("Stock flax transformer on Shakespeare, Adam",
                          "adam", "held-out loss"),
}
PEERS = ("schedule_free", "prodigy", "dadapt", "dog", "mechanic", "cocob",
         "momo", "gen")  # at their published defaults
COSTS = {"peers_mlp": "mlp.json", "peers_minibatch_256": "batch256.json",
         "peers_nanolm": "nanolm.json"}


class Variant:
  """One line of a problem: its label, setting and per-seed runs."""

  def __init__(self, label, setting, losses, metrics, curves, seconds,
               base=""):
    self.label, self.setting, self.base = label, setting, base
    self.losses, self.metrics = losses, metrics  # per seed
    self.curves, self.seconds = curves, seconds  # per seed


def _smooth(loss: np.ndarray) -> np.ndarray:
  """The mean of the last ``WINDOW`` losses at every step (fewer at first)."""
  c = np.concatenate([[0.0], np.cumsum(loss)])
  i = np.arange(1, len(loss) + 1)
  lo = np.maximum(i - WINDOW, 0)
  return (c[i] - c[lo]) / (i - lo)


def _history(run_dir: pathlib.Path) -> np.ndarray | None:
  path = run_dir / "history.npz"
  if not path.exists():
    return None
  return np.asarray(np.load(path)["loss"], np.float64)


def load_compare(folder: pathlib.Path) -> list[Variant]:
  """The variants of a ``compare.json``, their curves from each run's folder."""
  data = json.loads((folder / "compare.json").read_text())
  out = []
  for row, run in zip(data["table"], data["runs"]):
    dirs = [_local(folder, d) for d in run["dirs"]]
    sums = run["summaries"]
    out.append(Variant(
        row["label"], row["setting"], [s["final_loss"] for s in sums],
        [s.get("test_accuracy") for s in sums], [_history(d) for d in dirs],
        [s["seconds"] / max(s["steps"], 1) for s in sums], _base(dirs[0])))
  return out


def _base(run_dir: pathlib.Path) -> str:
  """The base optimizer a run stepped with (its ``config.json``)."""
  path = run_dir / "config.json"
  if not path.exists():
    return ""
  return json.loads(path.read_text())["optimizer"]["base"]


def _local(folder: pathlib.Path, written: str) -> pathlib.Path:
  """A run folder written under another root, found under ``folder``."""
  parts = pathlib.Path(written).parts
  at = len(parts) - 1 - parts[::-1].index(folder.name)
  return folder.joinpath(*parts[at + 1:])


def load_transformer(folder: pathlib.Path) -> list[Variant]:
  """The variants of ``stock_transformer_peers.py``'s ``results.json``."""
  data = json.loads((folder / "results.json").read_text())
  out = []
  for name, seeds in data["runs"].items():
    rs = [seeds[k] for k in sorted(seeds)]
    out.append(Variant(
        name, "", [r["final_loss"] if r["status"] == "ok" else math.inf
                   for r in rs],
        [r.get("held_out_loss") for r in rs],
        [np.asarray(r["losses"], np.float64) for r in rs],
        [r["seconds"] / max(len(r["losses"]), 1) for r in rs]))
  return out


def reach(curve: np.ndarray | None, target: float) -> int | None:
  """The first step (1-based) whose 5-step mean is ≤ ``target``, or None."""
  if curve is None or not np.isfinite(target):
    return None
  hit = np.nonzero(_smooth(curve) <= target)[0]
  return int(hit[0]) + 1 if hit.size else None


def _spread(values) -> str:
  vals = [v for v in values if v is not None]
  if not vals:
    return "-"
  bad = sum(not math.isfinite(v) for v in vals)
  if bad:
    return f"diverged {bad}/{len(vals)}"
  return (f"{fmt(statistics.fmean(vals), 4)} "
          f"[{fmt(min(vals), 3)}–{fmt(max(vals), 3)}]")


def rows(variants: list[Variant], base: str, cost: dict | None) -> list:
  """The table's rows: loss, metric, steps and time to the target, cost."""
  refs = [statistics.fmean(v.losses) for v in variants
          if v.label.startswith(base)]
  target = min(refs) if refs else math.nan  # the tuned constant's
  out = []
  for v in variants:
    hits = [reach(c, target) for c in v.curves]
    got = [(h, s) for h, s in zip(hits, v.seconds) if h is not None]
    steps = statistics.median([h for h, _ in got]) if got else None
    wall = statistics.median([h * s for h, s in got]) if got else None
    ratio = _cost(cost, v.label)
    out.append([v.label, v.base, _spread(v.losses), _spread(v.metrics),
                "-" if steps is None else f"{steps:g} ({len(got)}/"
                f"{len(hits)})", "-" if wall is None else f"{wall:.1f}",
                ratio, v.setting])
  return out


def _cost(cost: dict | None, label: str) -> str:
  if not cost:
    return "-"
  key = label.replace("_tuned", "")
  if label.startswith("cdat") and label in ("cdat_2", "cdat_tuned",
                                            "cdat_2_fast", "cdat_tuned_fast"):
    key = "cdat_sub16_gn" if "fast" in label else "cdat"
  r = cost.get(label) or cost.get(key) or next(
      (v for k, v in cost.items() if _family(k) == _family(label)), None)
  if not r:
    return "-"
  return f"{r['ratio']:.2f} [{r['ratio_min']:.2f}–{r['ratio_max']:.2f}]"


def _family(name: str) -> str:
  """A variant's name without its settings (``adam_lr=0.001``: ``adam``,
  ``cdat_fd_2``: ``cdat_fd``): one step's cost whatever they are."""
  return re.sub(r"(_(lr|warmup|d_coef)=[^_]+)+$|_[0-9.]+$", "", name)


def figure(variants: list[Variant], title: str, path: pathlib.Path) -> None:
  """Each variant's mean smoothed loss over seeds, on a log scale."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(9, 5.5))
  colours = plt.get_cmap("tab20").colors
  styles = ["-", "--", ":", "-."]
  drawn = []
  for i, v in enumerate(variants):
    curves = [_smooth(c) for c in v.curves if c is not None]
    if not curves or v.losses in drawn:  # a tuned line that chose the default
      continue
    drawn.append(v.losses)
    n = min(len(c) for c in curves)
    mean = np.mean([c[:n] for c in curves], axis=0)
    mean = np.where(np.isfinite(mean), mean, np.nan)
    ax.plot(np.arange(1, n + 1), mean, color=colours[i % 20],
            ls=styles[(i // 10) % 4], lw=1.4, label=v.label)
  ax.set(yscale="log", xlabel="step", ylabel="training loss (5-step mean)",
         title=title)
  starts = [c[0] for v in variants for c in v.curves
            if c is not None and np.isfinite(c[0])]
  lows = [np.nanmin(np.where(c > 0, c, np.nan)) for v in variants
          for c in v.curves if c is not None and np.any(c > 0)]
  if starts and lows:  # a diverged line would set the scale
    ax.set_ylim(0.8 * float(np.nanmin(lows)), 2 * float(np.median(starts)))
  ax.legend(fontsize=7, ncol=2, loc="center left", bbox_to_anchor=(1, 0.5))
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def _mean(v: Variant) -> float:
  return (statistics.fmean(v.losses) if all(map(math.isfinite, v.losses))
          else math.inf)


def _best(variants, keep) -> tuple[float, str]:
  """The lowest mean final loss among the variants ``keep`` accepts."""
  got = [(_mean(v), v.label) for v in variants if keep(v.label)]
  return min(got) if got else (math.nan, "-")


def summary_row(title: str, variants: list[Variant], base: str) -> list:
  """A problem's line: the constant, CDAT's lines, the best peers (× it)."""
  ref, _ = _best(variants, lambda n: n.startswith(base))
  fast = lambda n: n.startswith("cdat") and ("fast" in n or "_fd" in n)
  exact = lambda n: n.startswith("cdat") and not fast(n)
  sigma2 = lambda n: n in ("cdat_2", "cdat_2_fast", "cdat_fd_2",
                           "cdat_exact_2")
  peer = lambda n: not (n.startswith(("cdat", "constant", base)))

  def cell(keep, named=False):
    loss, label = _best(variants, keep)
    if not math.isfinite(loss):
      return "diverged" if label != "-" else "-"
    return f"{loss:.4g} ({loss / ref:.2f})" + (f" {label}" if named else "")
  return [title, f"{ref:.4g}",
          cell(lambda n: exact(n) and sigma2(n)),
          cell(lambda n: fast(n) and sigma2(n)), cell(exact, True),
          cell(fast, True), cell(lambda n: n in PEERS, True),
          cell(peer, True)]


def report(runs: pathlib.Path, figures: pathlib.Path | None) -> str:
  """The Markdown of every problem found under ``runs``."""
  parts, lines = [], []
  for name, (title, base, metric) in PROBLEMS.items():
    folder = runs / name
    loader = load_transformer if name == "peers_transformer" else load_compare
    needed = "results.json" if name == "peers_transformer" else "compare.json"
    if not (folder / needed).exists():
      continue
    variants = loader(folder)
    lines.append(summary_row(title, variants, base))
    cost = None
    if name == "peers_transformer":
      cost = json.loads((folder / needed).read_text()).get("timing")
    elif name in COSTS and (runs / "peers_cost" / COSTS[name]).exists():
      cost = json.loads((runs / "peers_cost" / COSTS[name]).read_text())[
          "results"]
    header = ["variant", "base", "final train loss", metric, "steps to constant",
              "s to constant", "time/step ÷ base", "setting"]
    parts.append(f"### {title}\n\n" + markdown_table(
        header, rows(variants, base, cost)))
    if figures is not None:
      figure(variants, title, figures / f"{name}.png")
      parts[-1] += (f"\n\nFigure: [`figures/{name}.png`]"
                    f"(figures/{name}.png).")
  head = ["problem", "tuned constant", "CDAT σ=2", "CDAT σ=2, fast",
          "CDAT, best σ", "CDAT fast, best σ", "best peer, defaults",
          "best peer, tuned"]
  return "\n\n".join(["### Summary\n\n" + markdown_table(head, lines)]
                     + parts) + "\n"


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--runs", default="runs/peers")
  p.add_argument("--figures", default=None,
                 help="folder for the figures (none: no figures)")
  args = p.parse_args(argv)
  figures = pathlib.Path(args.figures) if args.figures else None
  if figures is not None:
    figures.mkdir(parents=True, exist_ok=True)
  print(report(pathlib.Path(args.runs), figures))
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
