"""cdat_fast.compile_targets: the accelerator descriptions it ships and the
compile it shares (compiling for a GPU or a TPU is the accel tier's,
``tests/accel``; here the description files and a CPU compile)."""
from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import pytest

from cdat_fast import compile_targets


@pytest.mark.parametrize("name,gib", [("h100", 80), ("h200", 141)])
def test_gpu_descriptions_ship_with_the_package(name, gib):
  text = compile_targets.gpu_target_config(name)
  assert "gpu_device_info" in text
  assert "cuda_compute_capability" in text
  memory = int(re.search(r"device_memory_size:\s*(\d+)", text).group(1))
  assert abs(memory / 1e9 - gib * 1.0) / gib < 0.1


def test_an_unknown_gpu_is_refused_by_name():
  with pytest.raises(ValueError, match="name 'a100'"):
    compile_targets.gpu_target_config("a100")


def test_compile_for_a_device_and_a_target():
  device = jax.devices("cpu")[0]
  compiled, seconds = compile_targets.compile_for(
      device, lambda x, y: x @ y, (jnp.ones((8, 4)), jnp.ones((4, 2))))
  assert seconds >= 0
  assert compiled.memory_analysis().output_size_in_bytes == 8 * 2 * 4
  target = compile_targets.Target("cpu", device, 0, {})
  compiled, _ = compile_targets.compile_for(
      target, jnp.sin, (jax.ShapeDtypeStruct((3,), jnp.float32),))
  assert "sine" in compiled.as_text()
