"""The kernels and fused models' CDAT steps compiled for an H100 (sm_90).

Each compile must hold the Pallas kernels as Triton kernels (one custom
call per kernel call; none would mean Pallas' interpreter) and fit the
device's memory. An H200 has the same architecture (the same shared memory
per block); one model is compiled for it to check its target description.
"""
import pytest

from compile_cases import (cdat_step_case, compile_for, kernel_cases,
                           mlp_step_pair, MODELS)

pytestmark = pytest.mark.accel

KERNELS = kernel_cases()


@pytest.mark.parametrize("case", list(KERNELS))
def test_kernel_compiles_as_one_triton_kernel(case, h100, record):
  fn, args = KERNELS[case]
  compiled = compile_for(h100.device, fn, args, h100.compiler_options)
  record(h100, compiled)
  assert compiled.kernels == 1
  assert compiled.total_bytes < h100.memory_bytes


@pytest.mark.parametrize("model", list(MODELS))
def test_cdat_step_runs_every_fused_layer_as_a_kernel(model, h100, record):
  step, args, expected = cdat_step_case(model)
  compiled = compile_for(h100.device, step, args, h100.compiler_options)
  record(h100, compiled)
  assert compiled.kernels == expected
  assert compiled.total_bytes < h100.memory_bytes


def test_h200_target_compiles_a_cdat_step(h200, record):
  step, args, expected = cdat_step_case("nanolm-paper-T1024")
  compiled = compile_for(h200.device, step, args, h200.compiler_options)
  record(h200, compiled)
  assert compiled.kernels == expected
  assert compiled.total_bytes < h200.memory_bytes


# rows -> the bound on the fused MLP's CDAT step temp over the base step's.
TEMP_BOUNDS = {1024: 1.40, 2048: 1.05, 4096: 1.05}


@pytest.mark.parametrize("rows", list(TEMP_BOUNDS))
def test_fused_mlp_cdat_step_temp_near_base(rows, h100):
  # The jet needs x, dx, ddx in and y, dy, ddy out of one layer at a time,
  # fewer activations than the backward pass keeps, so from a few thousand
  # rows the CDAT step should need no more temporaries than the base step
  # (target 1.05x). Padding the contraction (784 -> 800 copied x, W and dW)
  # or a materialised zero ddy broke this (1.29x at 4096 rows). At 1024
  # rows the six activations and u outweigh the base step's activations
  # (1.36x); g kept beside u through the jet made it 1.61x.
  base_step, cdat_step, args = mlp_step_pair(rows)
  base = compile_for(h100.device, base_step, args, h100.compiler_options)
  cdat = compile_for(h100.device, cdat_step, args, h100.compiler_options)
  assert cdat.kernels == 7
  assert cdat.temp_bytes <= TEMP_BOUNDS[rows] * base.temp_bytes, (
      cdat.temp_bytes, base.temp_bytes)
