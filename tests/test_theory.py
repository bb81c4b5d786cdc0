"""Tests for cdat_fast.theory, the paper's simplified dynamical models."""

import subprocess
import sys

import numpy as np
import pytest

from cdat_fast import theory
from cdat_fast.harness.theory_figures import FIG4_CONSTANT, theory_figures

_FIG9 = dict(a=5e-2, b=1e-1, nu=0.1, lam0=18.0, eta0=0.05, p0=4.0, g0=4.0)


def test_eos_constant_first_steps_by_hand():
  traj = theory.eos_model(a=0.03, b=0.3, eta0=1.0, lam0=1.9, x0=1.0, steps=3)
  # t=1: x = (1 - 1.9) * 1 = -0.9;  lam = 1.9 + (0.03 - 0.3) = 1.63.
  # t=2: x = (1 - 1.63) * -0.9 = 0.567;  lam = 1.63 + (0.03 - 0.3 * 0.81).
  np.testing.assert_allclose(traj.x, [1.0, -0.9, 0.567])
  np.testing.assert_allclose(traj.lam, [1.9, 1.63, 1.417])
  np.testing.assert_allclose(traj.eta, [1.0, 1.0, 1.0])
  np.testing.assert_allclose(traj.y, [-0.1, -0.37, -0.583])
  assert all(a.dtype == np.float64 for a in traj)


def test_eos_below_edge_tuner_first_steps_by_hand():
  traj = theory.eos_model(a=1.0, b=0.5, eta0=1.0, lam0=1.9, x0=1.0, steps=3,
                          tuner="below_edge", eps=0.05)
  # t=1: x = -0.9, lam = 1.9 + 1 * (1 - 0.5) = 2.4, eta = 1.9 / 2.4.
  # t=2: x = (1 - 1.9) * -0.9 = 0.81,
  #      lam = 2.4 + (1.9 / 2.4) * (1 - 0.5 * 0.81), eta = 1.9 / lam.
  lam2 = 2.4 + (1.9 / 2.4) * (1 - 0.5 * 0.81)
  np.testing.assert_allclose(traj.x, [1.0, -0.9, 0.81])
  np.testing.assert_allclose(traj.lam, [1.9, 2.4, lam2])
  np.testing.assert_allclose(traj.eta, [1.0, 1.9 / 2.4, 1.9 / lam2])
  np.testing.assert_allclose(traj.y, [-0.1, -0.1, -0.1])


def test_eos_tuner_default_eta0_is_on_its_rule():
  traj = theory.eos_model(a=1.0, b=0.5, eta0=None, lam0=4.0, x0=1.0,
                          steps=2, tuner="below_edge", eps=0.1)
  assert traj.eta[0] == pytest.approx(1.8 / 4.0)
  np.testing.assert_allclose(traj.y, [-0.2, -0.2])


def test_cdat_first_steps_by_hand():
  traj = theory.cdat_model(2.0, steps=3, **_FIG9)
  lam0, p0, g0, nu, eta0 = 18.0, 4.0, 4.0, 0.1, 0.05
  y0 = eta0 * lam0 - 2  # -1.1
  eta1 = 2.0 * (lam0**2 * p0 + nu**2 * g0) / (lam0**3 * p0 + nu**3 * g0)
  g1 = (1 - eta0 * nu) ** 2 * g0  # 3.9601
  p1 = (1 + y0) ** 2 * p0  # 0.04
  lam1 = lam0 + eta0 * (0.05 - 0.1 * p0)  # 17.9825
  eta2 = 2.0 * (lam1**2 * p1 + nu**2 * g1) / (lam1**3 * p1 + nu**3 * g1)
  y1 = eta1 * lam1 - 2
  np.testing.assert_allclose(traj.eta, [eta0, eta1, eta2])
  np.testing.assert_allclose(traj.lam[:2], [18.0, 17.9825])
  np.testing.assert_allclose(traj.g[:2], [4.0, 3.9601])
  np.testing.assert_allclose(traj.p, [4.0, 0.04, (1 + y1) ** 2 * 0.04])
  np.testing.assert_allclose(traj.y[:2], [-1.1, y1])
  np.testing.assert_allclose(traj.y, traj.eta * traj.lam - 2)
  assert eta1 == pytest.approx(2.0 * 1296.04 / 23328.004)


def test_cdat_on_edge_holds_y_near_zero():
  traj = theory.cdat_model(2.0, steps=600, **_FIG9)
  assert np.all(np.isfinite(traj.y))
  assert np.max(np.abs(traj.y[10:])) < 0.02
  # p stabilises (appendix A.2): it neither collapses nor explodes.
  assert 0.01 < traj.p[-1] < 1.0 and traj.p[-1] > traj.p[100] / 10


def test_cdat_below_edge_settles_slightly_negative():
  traj = theory.cdat_model(1.9, steps=600, **_FIG9)
  late = traj.y[100:]
  assert np.all(late < -1e-3) and np.all(late > -0.05)
  assert abs(traj.y[599] - traj.y[300]) < 5e-3
  # y stays much closer to 0 than the eps = 0.1 of sigma = 2 - eps.
  assert np.all(np.abs(late) < 0.1 / 2)
  # p decays but its ratio to g stays roughly constant (appendix A.2), and
  # the sharpness keeps growing (Fig. 9, middle).
  assert traj.p[-1] < 1e-3 * traj.p[100]
  ratio = traj.p[100:] / traj.g[100:]
  assert ratio.max() / ratio.min() < 2.0
  assert np.all(np.diff(traj.lam[100:]) > 0)


def test_below_edge_tuner_lets_sharpness_grow_and_eta_fall():
  traj = theory.eos_model(a=1.0, b=0.5, eta0=1.0, lam0=1.9, x0=1.0,
                          steps=100, tuner="below_edge")
  assert np.all(np.diff(traj.lam) > 0) and np.all(np.diff(traj.eta) < 0)
  assert traj.lam[-1] > 5 * traj.lam[0]
  assert traj.eta[-1] < traj.eta[0] / 5
  # p = x^2 decays to 0: no negative feedback on the sharpness.
  assert traj.x[-1] ** 2 < 1e-6


def test_constant_eta_oscillates_around_the_edge():
  traj = theory.eos_model(**FIG4_CONSTANT)
  assert np.all(np.isfinite(traj.y))
  crossings = np.sum(np.diff(np.sign(traj.y)) != 0)
  assert crossings >= 4
  assert abs(np.mean(traj.y)) < 0.2
  # The sharpness stays near the edge 2 / eta instead of growing.
  assert np.all((traj.lam > 1.0) & (traj.lam < 3.0))


@pytest.mark.parametrize("kwargs,name", [
    (dict(lam0=-1.0), "lam0"),
    (dict(steps=0), "steps"),
    (dict(steps=2.5), "steps"),
    (dict(tuner="line_search"), "tuner"),
    (dict(eps=1.0), "eps"),
    (dict(b=-0.1), "b"),
    (dict(eta0=0.0), "eta0"),
    (dict(eta0=None), "eta0"),
    (dict(x0=float("nan")), "x0"),
])
def test_eos_model_validates_arguments(kwargs, name):
  args = dict(a=0.03, b=0.3, eta0=1.0, lam0=1.9, x0=1.0, steps=5)
  args.update(kwargs)
  with pytest.raises(ValueError, match=name):
    theory.eos_model(**args)


@pytest.mark.parametrize("kwargs,name", [
    (dict(scale=0.0), "scale"),
    (dict(nu=-0.1), "nu"),
    (dict(p0=0.0, g0=0.0), "p0"),
    (dict(g0=-1.0), "g0"),
    (dict(lam0=0.0), "lam0"),
    (dict(a="x"), "a"),
    (dict(steps=-3), "steps"),
])
def test_cdat_model_validates_arguments(kwargs, name):
  args = dict(scale=2.0, steps=5, **_FIG9)
  args.update(kwargs)
  with pytest.raises(ValueError, match=name):
    theory.cdat_model(**args)


def test_the_models_import_no_plotting():
  code = ("import sys, cdat_fast.theory; "
          "assert 'matplotlib' not in sys.modules, 'matplotlib imported'")
  subprocess.run([sys.executable, "-c", code], check=True)


def test_theory_figures_write_pngs(tmp_path):
  paths = theory_figures(tmp_path / "figs")
  assert len(paths) == 4
  names = {p.name for p in paths}
  assert {"fig4_eos_model.png", "fig9_cdat_model.png",
          "fig10_eos_projection.png", "fig11_cdat_projection.png"} == names
  for p in paths:
    assert p.parent == tmp_path / "figs"
    assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
