"""Plots of training runs: loss, learning rate, sharpness and η·λ_max.

Reads the files :mod:`cdat_fast.harness.train` writes (``history.npz`` for per-step
loss and learning rate, ``metrics.jsonl`` for sharpness) and draws the four
panels of the paper's Fig. 3/5/6 with matplotlib's Agg backend.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from cdat_fast.harness.errors import InputError  # noqa: E402


class RunFilesError(InputError):
  """A run directory lacks the files a plot needs."""


def read_run(run_dir: str | os.PathLike) -> dict:
  """Loads a run directory's history, metrics and config."""
  d = Path(run_dir)
  hist_path, metrics_path = d / "history.npz", d / "metrics.jsonl"
  if not hist_path.is_file() or not metrics_path.is_file():
    raise RunFilesError(
        f"{d}: not a run directory (needs history.npz and metrics.jsonl)")
  try:
    with np.load(hist_path) as h:
      history = {k: h[k] for k in h.files}
    records = [json.loads(line) for line in metrics_path.read_text().splitlines()
               if line.strip()]
  except (OSError, ValueError) as e:
    raise RunFilesError(f"{d}: unreadable run files: {e}") from e
  config = {}
  if (d / "config.json").is_file():
    try:
      config = json.loads((d / "config.json").read_text())
    except (OSError, ValueError) as e:
      raise RunFilesError(f"{d / 'config.json'}: unreadable: {e}") from e
  return {"history": history, "records": records, "config": config,
          "name": d.name}


# Series styles: ten colours, then the same ten dashed, dotted, dash-dotted:
# 40 distinct colour × line-style pairs.
_COLORS = tuple(f"C{i}" for i in range(10))
_LINESTYLES = ("-", "--", ":", "-.")


def series_style(i: int) -> dict[str, str]:
  """The ``i``-th series' colour and line style, distinct for i < 40."""
  return {"color": _COLORS[i % len(_COLORS)],
          "linestyle": _LINESTYLES[(i // len(_COLORS)) % len(_LINESTYLES)]}


def draw_runs(runs: Sequence[dict], labels: Sequence[str]):
  """The figure of :func:`plot_runs` for runs read by :func:`read_run`.

  Each run has its own colour × line style (:func:`series_style`); with more
  than one run a single legend sits to the right of the panels, outside
  them.
  """
  has_sharpness = any(r.get("sharpness") is not None
                      for run in runs for r in run["records"])
  panels = 4 if has_sharpness else 2
  fig, axes = plt.subplots(1, panels, figsize=(4.5 * panels, 3.8))
  for i, (run, label) in enumerate(zip(runs, labels)):
    _draw_run(axes, run, label, series_style(i), has_sharpness)
  axes[0].set(title="train loss", xlabel="step", yscale="log")
  axes[1].set(title="learning rate", xlabel="step", yscale="log")
  if has_sharpness:
    axes[2].set(title="sharpness λ_max", xlabel="step")
    axes[3].set(title="η·λ_max", xlabel="step")
    axes[3].axhline(2.0, color="k", ls="--", lw=0.8)
  fig.tight_layout()
  if len(runs) > 1:
    handles, names = axes[0].get_legend_handles_labels()
    fig.legend(handles, names, loc="center left", bbox_to_anchor=(1.0, 0.5),
               fontsize=7, frameon=False)
  return fig


def _draw_run(axes, run: dict, label: str, style: dict, has_sharpness: bool):
  h, recs = run["history"], run["records"]
  steps = np.arange(1, len(h.get("loss", [])) + 1)
  if "loss" in h:
    axes[0].plot(steps, h["loss"], label=label, lw=1, **style)
  if "learning_rate" in h:
    axes[1].plot(steps, h["learning_rate"], label=label, lw=1, **style)
  sharp = [(r["step"], r["sharpness"], r.get("eta_sharpness"))
           for r in recs if r.get("sharpness") is not None]
  if sharp and has_sharpness:
    s, lam, el = zip(*sharp)
    axes[2].plot(s, lam, marker=".", label=label, **style)
    axes[3].plot(s, [np.nan if e is None else e for e in el], marker=".",
                 label=label, **style)


def plot_runs(run_dirs: Sequence[str | os.PathLike], out: str | os.PathLike,
              labels: Sequence[str] | None = None) -> Path:
  """Draws loss, learning rate, sharpness and η·λ for runs side by side."""
  runs = [read_run(d) for d in run_dirs]
  labels = list(labels) if labels is not None else [r["name"] for r in runs]
  fig = draw_runs(runs, labels)
  out = Path(out)
  out.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(out, dpi=90, bbox_inches="tight")
  plt.close(fig)
  return out
