"""bench/gpu_kernels.py on CPU, so that the device run it is for works.

The script runs once with ``--interpret`` (Pallas' interpreter, tiny sizes,
a subprocess, as bench/device_check.sh runs it) on a few groups: both
tables come out, kernels and steps timed beside their base. In-process:
every model step of every mode traces; XLA's jvp of a jvp (the layers'
base) computes what the kernels' references do; a program that does not
compile is reported and the others are still timed; bad options are
refused by name; without a GPU it measures nothing.
"""
import functools
import importlib.util
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cdat_fast import kernels

REPO = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "gpu_kernels.py"


@pytest.fixture(scope="module")
def script():
  sys.path.insert(0, str(SCRIPT.parent))  # the script's own `common`
  try:
    spec = importlib.util.spec_from_file_location("gpu_kernels_script",
                                                  SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
  finally:
    sys.path.remove(str(SCRIPT.parent))
  return module


def test_interpret_run_writes_both_tables(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env["PYTHONPATH"] = os.pathsep.join(
      p for p in (env.get("PYTHONPATH"), str(REPO)) if p)
  env.pop("CDAT_FAST_GPU_BACKEND", None)
  md = tmp_path / "g.md"
  proc = subprocess.run(
      [sys.executable, str(SCRIPT), "--interpret", "--rounds", "2",
       "--dtypes", "f32", "--modes", "base",
       "--only", "dense,attention,mlp 1024",
       "--markdown", str(md)],
      capture_output=True, text=True, timeout=300, env=env, cwd=REPO,
      check=False)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  text = md.read_text()
  assert "interpret mode: times mean nothing" in text
  rows = [line.split(" | ") for line in text.splitlines()
          if line.startswith("| ") and "---" not in line]
  layers = {(r[0][2:].split()[0], r[2]) for r in rows if r[1] == "f32"
            and r[2] in ("fused-triton", "xla")}
  for kernel in ("dense", "attention"):
    assert {(kernel, "fused-triton"), (kernel, "xla")} <= layers, kernel
  steps = {r[3]: r for r in rows if r[0] == "| mlp"}
  assert set(steps) == {"fused base", "xla base"}
  assert steps["xla base"][5].startswith("1.00 ")  # the base
  assert float(steps["fused base"][6].rstrip(" |")) > 0  # XLA ÷ fused
  for absent in ("nanolm", "bf16", "gelu"):  # --only, --dtypes
    assert absent not in text


@pytest.mark.parametrize("model", [
    "mlp", pytest.param("nanolm", marks=pytest.mark.slow)])
def test_every_step_traces(script, model):
  # Traced, not compiled: the steps' arguments fit them (all modes).
  rows = 16  # batch rows; tokens of the sequence for NanoLM
  for fused in (True, False):
    for mode in script.MODES:
      step, args = script.model_step(model, fused, rows, mode, jnp.float32,
                                     tiny=True)
      _, _, value = jax.eval_shape(step, *args)
      assert value.shape == () and value.dtype == jnp.float32


def test_xla_jet_is_the_kernels_jet(script):
  refs = {"dense_jet": kernels.dense_jet_reference,
          "activation_jet": kernels.activation_jet_reference,
          "layer_norm_jet": kernels.layer_norm_jet_reference,
          "attention_jet": kernels.attention_jet_reference}
  for layer, case in script.layer_cases(True).items():
    fns = script.layer_programs(case, jnp.float32, True)
    assert set(fns) == {"fused-triton", "xla"}
    xla, args = fns["xla"]
    ref = jax.jit(functools.partial(refs[case[0]], **case[1]))(*args)
    for a, e in zip(jax.jit(xla)(*args), ref):
      np.testing.assert_allclose(a, e, rtol=2e-4, atol=2e-4, err_msg=layer)


def test_a_failing_program_is_reported_and_the_rest_timed(script):
  x = jnp.ones((8,))

  def broken(x):
    raise RuntimeError("no kernel for you")
  failures = []
  programs = script.compile_group("g", {
      "base": (lambda x: x + 1, (x,)), "twice": (lambda x: 2 * x, (x,)),
      "broken": (broken, (x,))}, failures)
  assert set(programs) == {"base", "twice"}
  assert failures == ["g [broken]: RuntimeError: no kernel for you"]
  timings = script.time_group(programs, "base", rounds=3, target_s=1e-3)
  assert timings["base"].ratios == [1.0] * 3
  assert all(s > 0 for s in timings["twice"].seconds)


def test_bad_options_are_named(script, capsys):
  for argv in (["--dtypes", "f64"], ["--sections", "models"],
               ["--modes", "exact"], ["--rounds", "0"]):
    with pytest.raises(SystemExit):
      script.parse_args(argv)
    assert argv[0] in capsys.readouterr().err


def test_without_a_gpu_it_measures_nothing(script, capsys):
  if jax.default_backend() == "gpu":
    pytest.skip("a GPU is present")
  assert script.main([]) == 0
  assert "needs a GPU" in capsys.readouterr().out
