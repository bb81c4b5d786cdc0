"""The analogues of the paper's Figs. 4, 9, 10 and 11, from its simplified models.

The models are :mod:`cdat_fast.theory` (float64 numpy, no plotting); this
module draws them with matplotlib's object-oriented API and the Agg canvas
(``cdat-fast theory --out DIR``).

References:
  Roulet et al., `Stepping on the Edge: Curvature Aware Learning Rate Tuners
  <https://arxiv.org/abs/2407.06183>`_, NeurIPS 2024, sections 2.3 and 3.2,
  appendix A.2.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from cdat_fast.theory import cdat_model, eos_model

# Settings of the figures (section 2.3, 3.2, appendix A.2).
FIG4_CONSTANT = dict(a=3e-2, b=3e-1, eta0=1.0, lam0=1.95, x0=0.3, steps=100)
FIG4_TUNER = dict(a=1.0, b=0.5, eta0=1.0, lam0=1.9, x0=1.0, steps=100,
                  tuner="below_edge", eps=0.05)
FIG9_CDAT = dict(a=5e-2, b=1e-1, nu=0.1, lam0=18.0, eta0=0.05, p0=4.0, g0=4.0,
                 steps=600)
FIG9_SCALES = (1.9, 2.0)


def theory_figures(out_dir: str | os.PathLike) -> list[Path]:
  """Draws the analogues of the paper's Figs. 4, 9, 10 and 11 as PNG files.

  Settings (the paper's where it states them):

  * Figs. 4 and 10, constant :math:`\\eta = 1`, :math:`a = 0.03`,
    :math:`b = 0.3`. The paper does not give :math:`\\lambda_0, x_0`; we take
    :math:`\\lambda_0 = 1.95` (:math:`y_0 = -0.05`) and :math:`x_0 = 0.3`
    (:math:`p_0 = 0.09`, near :math:`a/b = 0.1`), which gives oscillations of
    :math:`y` around 0 within about [-0.7, 0.35] over the 100 steps shown.
    The literal model is only transiently stable at these settings: the
    oscillation grows and diverges after about 140 steps, sooner from
    initial points farther from the fixed point :math:`(\\lambda, p) = (2,
    a/b)`.
  * Figs. 4 and 10, tuner :math:`\\eta_t = 1.9/\\lambda_t`, :math:`a = 1`,
    :math:`b = 0.5`, :math:`\\eta_0 = 1`, :math:`y_0 = -0.1`, hence
    :math:`\\lambda_0 = 1.9`; we take :math:`x_0 = 1` (:math:`p_0 = 1`).
  * Figs. 9 and 11: :math:`a = 0.05`, :math:`b = 0.1`, :math:`\\nu = 0.1`,
    :math:`\\lambda_0 = 18`, :math:`\\eta_0 = 0.05`, :math:`g_0 = p_0 = 4`,
    :math:`\\sigma \\in \\{1.9, 2\\}`, 600 steps.

  Args:
    out_dir: folder for the PNG files (created if missing).

  Returns:
    The paths of ``fig4_eos_model.png``, ``fig9_cdat_model.png``,
    ``fig10_eos_projection.png`` and ``fig11_cdat_projection.png``.
  """
  # The object-oriented API with the Agg canvas leaves pyplot's global state
  # (and the user's backend) alone; matplotlib is imported only when drawing.
  # pylint: disable=g-import-not-at-top
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  # pylint: enable=g-import-not-at-top

  out = Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  const = eos_model(**FIG4_CONSTANT)
  tuned = eos_model(**FIG4_TUNER)
  cdat = {s: cdat_model(s, **FIG9_CDAT) for s in FIG9_SCALES}
  eos_runs = ((const, "η=1"), (tuned, "η=1.9/λ"))
  paths = []

  def save(fig, name):
    FigureCanvasAgg(fig)
    fig.tight_layout()
    path = out / name
    fig.savefig(path, dpi=100)
    paths.append(path)

  # Fig. 4: eta, lambda, y for the constant learning rate and the tuner.
  fig = Figure(figsize=(12, 3.2))
  axes = fig.subplots(1, 3)
  for traj, label in eos_runs:
    t = np.arange(len(traj.eta))
    for ax, v in zip(axes, (traj.eta, traj.lam, traj.y)):
      ax.plot(t, v, label=label)
  for ax, title in zip(axes, ("learning rate η", "sharpness λ",
                              "y = ηλ − 2")):
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.legend()
  axes[2].axhline(0.0, color="gray", lw=0.5)
  save(fig, "fig4_eos_model.png")

  # Fig. 9: eta, lambda, y for CDAT with sigma in {1.9, 2}.
  fig = Figure(figsize=(12, 3.2))
  axes = fig.subplots(1, 3)
  for s, traj in cdat.items():
    t = np.arange(len(traj.eta))
    for ax, v in zip(axes, (traj.eta, traj.lam, traj.y)):
      ax.plot(t, v, label=f"σ={s}")
  for ax, title in zip(axes, ("learning rate η", "sharpness λ",
                              "y = ηλ − 2")):
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.legend()
  for ax in (axes[0], axes[2]):
    ax.set_xscale("symlog", linthresh=1.0)
  axes[2].set_ylim(-0.3, 0.3)
  axes[2].axhline(0.0, color="gray", lw=0.5)
  save(fig, "fig9_cdat_model.png")

  # Fig. 10: p for the constant learning rate and the tuner.
  fig = Figure(figsize=(4.5, 3.2))
  ax = fig.subplots()
  for traj, label in eos_runs:
    ax.semilogy(np.arange(len(traj.x)), traj.x**2, label=label)
  ax.set_title("p = x²")
  ax.set_xlabel("step")
  ax.legend()
  save(fig, "fig10_eos_projection.png")

  # Fig. 11: p and g for CDAT.
  fig = Figure(figsize=(4.5, 3.2))
  ax = fig.subplots()
  for s, traj in cdat.items():
    t = np.arange(len(traj.p))
    line, = ax.semilogy(t, traj.p, label=f"p, σ={s}")
    ax.semilogy(t, traj.g, ls="--", color=line.get_color(),
                label=f"g (orth.), σ={s}")
  ax.set_title("projections p and g")
  ax.set_xlabel("step")
  ax.legend(fontsize=7)
  save(fig, "fig11_cdat_projection.png")
  return paths
