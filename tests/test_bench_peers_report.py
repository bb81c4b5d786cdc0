"""``bench/peers_report.py``: its smoothing, its target, its table.

The script is loaded by path with bench/ on ``sys.path`` (it imports
``common``), on run folders made here in the layout ``cdat-fast compare``
writes.
"""
import importlib.util
import json
import math
import pathlib
import sys

import numpy as np
import pytest

_BENCH = pathlib.Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture(scope="module")
def report():
  sys.path.insert(0, str(_BENCH))
  try:
    spec = importlib.util.spec_from_file_location(
        "bench_peers_report", _BENCH / "peers_report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
  finally:
    sys.path.remove(str(_BENCH))
  return module


def test_smooth_is_the_mean_of_the_last_five(report):
  loss = np.arange(1.0, 9.0)
  got = report._smooth(loss)  # noqa: SLF001
  want = [np.mean(loss[max(0, i - 4):i + 1]) for i in range(len(loss))]
  np.testing.assert_allclose(got, want)


def test_reach_is_the_first_step_whose_mean_is_at_the_target(report):
  loss = np.array([10.0, 9, 8, 7, 6, 5, 4, 3, 2, 1])
  # 5-step means from step 5: 8, 7, 6, 5, 4, 3.
  assert report.reach(loss, 6.0) == 7
  assert report.reach(loss, 0.5) is None
  assert report.reach(loss, math.nan) is None


def _write_run(folder, label, losses, base):
  runs = []
  for seed, loss in enumerate(losses):
    d = folder / label / f"seed={seed}"
    d.mkdir(parents=True)
    np.savez(d / "history.npz", loss=np.asarray(loss))
    (d / "config.json").write_text(json.dumps({"optimizer": {"base": base}}))
    runs.append({"final_loss": float(np.mean(loss[-5:])), "steps": len(loss),
                 "seconds": 2.0 * len(loss), "test_accuracy": 0.5 + seed})
  return {"name": label, "dirs": [f"/elsewhere/{folder.name}/{label}/"
                                  f"seed={s}" for s in range(len(losses))],
          "summaries": runs}


def test_the_table_reads_compare_json_and_times_to_the_constant(report,
                                                                 tmp_path):
  folder = tmp_path / "peers_minibatch_64"
  flat = [np.full(10, 4.0), np.full(10, 6.0)]  # constant: target 5
  falling = [np.linspace(9.0, 0.0, 10), np.linspace(9.0, 0.0, 10)]
  runs = [_write_run(folder, "constant", flat, "gd"),
          _write_run(folder, "prodigy", falling, "adam")]
  table = [{"label": "constant", "setting": "learning_rate 0.1"},
           {"label": "prodigy", "setting": ""}]
  (folder / "compare.json").write_text(json.dumps(
      {"seeds": 2, "table": table, "runs": runs}))
  text = report.report(tmp_path, None)
  rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")]
          for line in text.splitlines() if line.startswith("| ")}
  assert rows["constant"][2] == "gd" and rows["prodigy"][2] == "adam"
  assert rows["constant"][3] == "5.0000 [4.000–6.000]"  # mean [min–max]
  # linspace(9, 0, 10) falls by 1 a step: the 5-step mean first reaches 5 at
  # step 7 (mean of 7, 6, 5, 4, 3), at 2 s a step.
  assert rows["prodigy"][5] == "7 (2/2)"
  assert rows["prodigy"][6] == "14.0"
  assert rows["prodigy"][4] == "1.0000 [0.500–1.500]"  # test acc 0.5, 1.5


@pytest.mark.parametrize("name, family", [
    ("adam_lr=0.001", "adam"), ("cdat_fd_0.5", "cdat_fd"),
    ("schedule_free_lr=0.003_warmup=0", "schedule_free"),
    ("prodigy_d_coef=0.5", "prodigy"), ("cdat_exact_2", "cdat_exact"),
    ("dog", "dog")])
def test_a_variants_family_drops_its_settings(report, name, family):
  assert report._family(name) == family  # noqa: SLF001
