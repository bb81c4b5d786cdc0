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


@pytest.mark.parametrize("rows", [2048, 4096])
def test_fused_mlp_cdat_step_temp_within_5_percent_of_base(rows, h100):
  # The jet needs x, dx, ddx in and y, dy, ddy out of one layer at a time,
  # fewer activations than the backward pass keeps, so from a few thousand
  # rows the CDAT step should need no more temporaries than the base step.
  # Padding the contraction (784 -> 800 copied x, W and dW) or a
  # materialised zero ddy broke this (1.29x at 4096 rows). At 1024 rows and
  # below the six activations, and u beside g, outweigh the base step's
  # activations (1.61x at 1024; docs/accelerators.md).
  base_step, cdat_step, args = mlp_step_pair(rows)
  base = compile_for(h100.device, base_step, args, h100.compiler_options)
  cdat = compile_for(h100.device, cdat_step, args, h100.compiler_options)
  assert cdat.kernels == 7
  assert cdat.temp_bytes <= 1.05 * base.temp_bytes, (cdat.temp_bytes,
                                                      base.temp_bytes)
