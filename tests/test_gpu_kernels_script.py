"""bench/gpu_kernels.py's plumbing on CPU, so the one device run it is for works.

The script runs once in ``--dry-run`` (Pallas' interpreter, tiny sizes, a
subprocess: bench/roofline.py imports a ``conftest`` of its own) with a
deliberately wrong reference for one correctness case; its JSON must hold
every section, that case as the only failure and Mosaic GPU as skipped with
the reason. In-process: the comparison reports wrong, non-finite and
mis-shaped outputs; one backend's failure is recorded and the other backend
still runs; an exhausted budget skips cases and says so.
"""
import importlib.util
import json
import math
import os
import pathlib
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "gpu_kernels.py"
KERNELS = ("dense_jet", "activation_jet", "layer_norm_jet", "attention_jet")


@pytest.fixture(scope="module")
def script():
  spec = importlib.util.spec_from_file_location("gpu_kernels_script", SCRIPT)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
  out = tmp_path_factory.mktemp("gpu_kernels")
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
  env.pop("CDAT_FAST_GPU_BACKEND", None)
  proc = subprocess.run(
      [sys.executable, str(SCRIPT), "--dry-run", "--inject-failure",
       "--json", str(out / "g.json"), "--markdown", str(out / "g.md"),
       "--hard-limit", "150"],
      capture_output=True, text=True, timeout=200, env=env, cwd=REPO,
      check=False)
  doc = json.loads((out / "g.json").read_text())
  return proc, doc, (out / "g.md").read_text()


def test_dry_run_has_every_section(dry_run):
  proc, doc, md = dry_run
  assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
  meta = doc["meta"]
  assert meta["finished"] and meta["dry_run"] and meta["in_progress"] is None
  assert not meta.get("aborted")
  assert meta["backends"]["triton"]["available"]
  mosaic = meta["backends"]["mosaic_gpu"]
  assert not mosaic["available"] and "Mosaic GPU" in mosaic["reason"]
  assert not doc["skipped"], doc["skipped"]
  for name in ("correctness", "layers", "models"):
    assert doc["sections"][name]["status"] == "done", name
    assert doc["sections"][name]["cases"], name

  corr = doc["sections"]["correctness"]["cases"]
  for kernel in KERNELS:
    assert any(c["id"].startswith(kernel) and c["backend"] == "triton"
               for c in corr), kernel
  # Mosaic GPU: skipped (the reason) where the kernel has it, n/a elsewhere.
  skipped = {c["kernel"] for c in corr if c["backend"] == "mosaic_gpu"
             and c["status"] == "skipped"}
  assert skipped == {"dense_jet", "activation_jet"}
  assert all(c["reason"] for c in corr if c["backend"] == "mosaic_gpu")

  layers = doc["sections"]["layers"]["cases"]
  assert {c["kernel"] for c in layers} == set(KERNELS)
  for c in layers:
    assert c["roofline_us"] is not None, c["id"]  # the estimate beside it
    for impl in ("fused-triton", "xla"):
      r = c["impls"][impl]
      assert r["status"] == "ok" and r["samples"] >= 3, (c["id"], impl)
      assert r["min_us"] <= r["median_us"] <= r["max_us"]
      assert r["measured_over_roofline"] > 0
    assert c["impls"]["fused-triton"]["rel_diff_vs_xla"] < 1e-2
    assert c["impls"]["fused-mosaic_gpu"]["status"] in ("skipped", "n/a")

  groups = {c["model"]: c for c in doc["sections"]["models"]["cases"]}
  mlp = groups["mlp"]["steps"]
  for step in ("fused base", "fused exact", "fused sub16_gn", "xla exact"):
    assert mlp[step]["status"] == "ok" and mlp[step]["median_us"] > 0, step
  for step in ("fused exact", "fused sub16_gn"):
    assert mlp[step]["over_base"] > 0
    assert mlp[step]["roofline_over_base"] > 1
  assert mlp["fused exact"]["xla_over_fused"] > 0
  assert mlp["fused exact"]["rel_diff_vs_xla"] < 1e-2
  assert groups["nanolm"]["steps"]["xla base"]["status"] == "ok"

  for text in ("| layer | impl |", "| model | T |", "DRY RUN"):
    assert text in md
  assert "FAILED" in proc.stdout


def test_the_injected_wrong_reference_is_the_only_failure(dry_run):
  _, doc, _ = dry_run
  corr = doc["sections"]["correctness"]["cases"]
  bad = [c for c in corr if c["status"] not in ("ok", "skipped", "n/a")]
  assert len(bad) == 1 and bad[0]["status"] == "FAIL"
  assert bad[0]["injected_wrong_reference"] and bad[0]["err"] > bad[0]["tol"]
  assert len(doc["failures"]) == 1 and bad[0]["id"] in doc["failures"][0]
  # The other cases of the same run passed.
  assert sum(c["status"] == "ok" for c in corr) >= 4


def test_compare_reports_wrong_outputs(script):
  rng = np.random.default_rng(0)
  ref = [rng.standard_normal((5, 7)).astype(np.float32) for _ in range(3)]
  assert script.compare(ref, ref, 1e-6)["ok"]
  close = [r + 1e-7 for r in ref]
  assert script.compare(close, ref, 1e-5)["ok"]
  wrong = [ref[0], ref[1], 1.1 * ref[2]]  # only ddy off
  r = script.compare(wrong, ref, 1e-3)
  assert not r["ok"] and r["per_output"][:2] == [0.0, 0.0]
  assert r["per_output"][2] > 1e-3
  nan = [ref[0], np.full_like(ref[1], np.nan), ref[2]]
  r = script.compare(nan, ref, 1.0)
  assert not r["ok"] and math.isinf(r["err"]) and "non-finite" in r["why"]
  assert not script.compare([ref[0][:4]] + ref[1:], ref, 1.0)["ok"]
  assert not script.compare(ref[:2], ref, 1.0)["ok"]
  # bf16 outputs against an f32 reference are compared in f32.
  assert script.compare([jnp.asarray(r, jnp.bfloat16) for r in ref], ref,
                        1e-2)["ok"]


def _run(script, argv):
  args = script.parse_args(["--dry-run"] + argv)
  kernels = script._import_kernels()
  run = script.Run(args, kernels)
  run.doc["meta"] = script._meta(run, kernels)
  return run, kernels


def _break_mosaic_gpu(script, run, monkeypatch, message):
  """Pretends Mosaic GPU runs here, with versions that raise ``message``."""
  run.doc["meta"]["backends"]["mosaic_gpu"] = {"available": True,
                                               "reason": None}
  real = script._kernel_fn

  def kernel_fn(kernels, name, backend, interpret, **kw):
    fn = real(kernels, name, backend, interpret, **kw)
    if backend == "mosaic_gpu" and fn is not None:
      def broken(*a):
        raise RuntimeError(message)
      return broken
    return fn

  monkeypatch.setattr(script, "_kernel_fn", kernel_fn)


def test_one_backend_failing_does_not_stop_the_other(script, monkeypatch):
  run, kernels = _run(script, ["--only", "dense_jet 74x19x53 f32"])
  _break_mosaic_gpu(script, run, monkeypatch, "mosaic lowering failed")
  run.start_section("correctness", [1.0])
  script.correctness(run, kernels)
  recs = {(c["id"], c["backend"]): c for c in run.section["cases"]}
  case = "dense_jet 74x19x53 f32"
  assert recs[(case, "triton")]["status"] == "ok"
  assert recs[(case, "mosaic_gpu")]["status"] == "error"
  assert "mosaic lowering failed" in recs[(case, "mosaic_gpu")]["error"]
  # The next case ran after the failure; HIGHEST is not Mosaic GPU's.
  assert recs[(f"{case}-highest", "triton")]["status"] == "ok"
  assert recs[(f"{case}-highest", "mosaic_gpu")]["status"] == "n/a"
  assert run.doc["failures"] == [
      f"{case} [mosaic_gpu]: error RuntimeError: mosaic lowering failed"]


def test_layers_with_a_broken_backend(script, monkeypatch):
  # A backend that raises is recorded and the others are still timed.
  run, kernels = _run(script, ["--only", "dense 8192x1024->4096"])
  _break_mosaic_gpu(script, run, monkeypatch, "no wgmma")
  run.start_section("layers", [1.0])
  script.layers(run, kernels)
  assert run.section["xla_source"] == "bench/roofline.py layer_cases"
  (case,) = run.section["cases"]
  assert case["roofline_id"] == "dense 8192x1024->4096"
  assert case["impls"]["fused-mosaic_gpu"]["status"] == "error"
  for impl in ("fused-triton", "xla"):
    assert case["impls"][impl]["median_us"] > 0
  assert case["impls"]["fused-triton"]["rel_diff_vs_xla"] < 1e-4
  assert len(run.doc["failures"]) == 1 and "no wgmma" in run.doc[
      "failures"][0]


def test_check_reports_a_wrong_reference(script):
  run, kernels = _run(script, [])
  run.start_section("correctness", [1.0])
  args = script.dense_args(20, 8, 12, jnp.float32)
  fused = script._kernel_fn(kernels, "dense_jet", "triton", True)
  good = kernels.dense_jet_reference(*args)
  assert script.check(run, "good", fused, good, args, 1e-4, "triton")["ok"]
  bad = (good[0], -good[1], good[2])  # a wrong reference
  rec = script.check(run, "bad", fused, bad, args, 1e-4, "triton")
  assert rec["status"] == "FAIL" and not rec["ok"]
  assert run.doc["failures"] and "bad [triton]" in run.doc["failures"][0]


def test_exhausted_budget_skips_and_says_which(script):
  run, kernels = _run(script, ["--budget", "0"])
  run.start_section("correctness", [1.0])
  script.correctness(run, kernels)
  ids = {s["id"] for s in run.doc["skipped"]}
  assert "dense_jet 74x19x53 f32" in ids and len(ids) >= 4
  assert all(s["reason"].startswith("budget") for s in run.doc["skipped"])
  assert not [c for c in run.section["cases"] if c["status"] == "ok"]


def test_sections_past_the_budget_are_skipped(script, tmp_path):
  path = tmp_path / "g.json"
  assert script.main(["--dry-run", "--budget", "0", "--json",
                      str(path)]) == 0
  doc = json.loads(path.read_text())
  assert doc["meta"]["finished"]
  assert {s["section"] for s in doc["skipped"]} == {"correctness", "layers",
                                                    "models"}
  assert all(s["status"] == "skipped" for s in doc["sections"].values())
