"""The kernels and fused models' CDAT steps compiled for a TPU v5e chip.

Each compile must hold the Pallas kernels as Mosaic TPU kernels (one
``tpu_custom_call`` per kernel call; Mosaic checks its block-shape rule and
VMEM while compiling) and fit the chip's 16 GiB of HBM.
"""
import pytest

from compile_cases import cdat_step_case, compile_for, kernel_cases, MODELS

pytestmark = pytest.mark.accel

KERNELS = kernel_cases()


@pytest.mark.parametrize("case", list(KERNELS))
def test_kernel_compiles_as_one_mosaic_kernel(case, v5e, record):
  fn, args = KERNELS[case]
  compiled = compile_for(v5e.device, fn, args, v5e.compiler_options)
  record(v5e, compiled)
  assert compiled.kernels == 1
  assert compiled.total_bytes < v5e.memory_bytes


@pytest.mark.parametrize("model", list(MODELS))
def test_cdat_step_runs_every_fused_layer_as_a_kernel(model, v5e, record):
  step, args, expected = cdat_step_case(model)
  compiled = compile_for(v5e.device, step, args, v5e.compiler_options)
  record(v5e, compiled)
  assert compiled.kernels == expected
  assert compiled.total_bytes < v5e.memory_bytes
