"""The sharded CDAT step compiled for GPU and TPU meshes (no device present).

Targets and meshes are ``bench/mesh_compile.py``'s: 8 H100 in one host
(``data=8``, ``data=4,fsdp=2``), 2 hosts x 4 H100 (``data=8``,
``data=2,fsdp=4``, the fsdp groups inside a host) and a TPU v5e 4x4 slice
(``data=16``, ``data=4,fsdp=4``), the H100 described by
``targets/h100.txtpb``. The model is the harness's MLP (256-512-512-10,
batch 1536) with flax's layers, and with the fused layers (their kernels
partitioned by rows, ``kernels/partitioning.py``: the fused tests), and the
fused NanoLM under FSDP on the v5e (CDAT gathers what the bare jvp-of-jvp
gathers, each TPU async collective counted once:
``cdat_fast.hlo.merge_async_copies``, checked on a made-up HLO in
``tests/test_hlo.py``).

What must hold on every mesh, as ``tests/sharding_checks.py`` checks on 8
fake CPU devices: the CDAT step compiles, and its collectives beyond those of
the base step plus a bare jvp-of-jvp along the update are a few scalars (the
Gauss–Newton step's beyond a bare Gauss–Newton form). The sub-batch
estimator (``subbatch(1/8)``) moves no rows on a data-parallel mesh. On an
FSDP mesh XLA gathers the sub-batch's rows inside each fsdp group and keeps
the weights sharded (the partitioner's choice for a small batch): that must
send less than the exact curvature does, which gathers ``u``.
"""
from __future__ import annotations

import functools
import importlib.metadata
import os
import sys

import pytest

pytestmark = pytest.mark.accel

_BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), "bench")
INSTALL = "pip install '.[accel-compile]'"
M = 8  # subbatch(1/M)
VARIANTS = ("base", "base+jvp²", "cdat", f"base+jvp²_sub{M}", f"cdat_sub{M}",
            "base+gn", "cdat_gn")
# At most this many bytes of scalar all-reduces beyond the reference (the
# numerator, denominator and finiteness flags: 5 to 12 bytes observed).
SCALAR_BYTES = 64
NEEDS = {"h100x8": ("jax-cuda12-plugin", "jax-cuda12-pjrt",
                    "nvidia-cuda-nvcc-cu12"),
         "h100x2x4": ("jax-cuda12-plugin", "jax-cuda12-pjrt",
                      "nvidia-cuda-nvcc-cu12"),
         "v5e4x4": ("libtpu",)}


def _bench():
  if _BENCH not in sys.path:
    sys.path.insert(0, _BENCH)
  import mesh_compile  # pylint: disable=g-import-not-at-top
  return mesh_compile


def _meshes(kind: int) -> list[tuple[str, str]]:
  """(target, mesh spec): ``kind`` 0 data parallel, 1 FSDP."""
  return [(t, _bench().TARGETS[t][2][kind]) for t in NEEDS]


def _skip_without_plugin(target: str) -> None:
  missing = []
  for name in NEEDS[target]:
    try:
      importlib.metadata.distribution(name)
    except importlib.metadata.PackageNotFoundError:
      missing.append(name)
  if missing:
    pytest.skip(f"compiling for {target} needs {', '.join(missing)}"
                f" (not installed: {INSTALL})")


@functools.lru_cache(maxsize=None)
def _problem(fused: bool):
  return _bench().Problem("mlp", fused, 1536)


@functools.lru_cache(maxsize=None)
def _devices(target: str):
  return _bench().target_devices(target)


@functools.lru_cache(maxsize=None)
def _compiled(target: str, spec: str, fused: bool = False,
              variants: tuple[str, ...] = VARIANTS) -> dict:
  mc = _bench()
  from cdat_fast import sharding  # pylint: disable=g-import-not-at-top
  mesh = sharding.make_mesh(spec, devices=_devices(target))
  return mc.run_mesh(_problem(fused), mesh, M, list(variants))


def steps(target: str, spec: str) -> dict:
  _skip_without_plugin(target)
  out = _compiled(target, spec)
  for variant, r in out.items():
    assert "error" not in r, f"{variant}: {r['error']}"
  return out


ALL = _meshes(0) + _meshes(1)


@pytest.mark.parametrize("target,spec", ALL)
def test_cdat_adds_only_scalars_to_the_jvp_of_jvp(target, spec):
  r = steps(target, spec)["cdat"]
  assert r["host_transfers"] == []
  assert r["extra_nonscalar"] == []
  assert r["beyond_reference_bytes"] <= SCALAR_BYTES


@pytest.mark.parametrize("target,spec", ALL)
def test_gauss_newton_adds_only_scalars_to_its_form(target, spec):
  r = steps(target, spec)["cdat_gn"]
  assert r["reference"] == "base+gn"
  assert r["extra_nonscalar"] == []
  assert r["beyond_reference_bytes"] <= SCALAR_BYTES


@pytest.mark.parametrize("target,spec", _meshes(0))
def test_subbatch_moves_no_rows_on_a_data_parallel_mesh(target, spec):
  out = steps(target, spec)
  sub = out[f"cdat_sub{M}"]
  assert sub["moved_rows"] == [] and sub["activation_reductions"] == []
  assert sub["extra_nonscalar"] == []
  # Nothing but scalars beyond the base step's gradient all-reduce.
  assert sub["sent_bytes"] - out["base"]["sent_bytes"] <= SCALAR_BYTES


@pytest.mark.parametrize("target,spec", _meshes(1))
def test_subbatch_on_fsdp_sends_less_than_exact_curvature(target, spec):
  out = steps(target, spec)
  sub, exact = out[f"cdat_sub{M}"], out["cdat"]
  assert sub["extra_nonscalar"] == []
  if _bench().TARGETS[target][0] == "tpu":
    # The TPU compiler gathers u in bf16 (the matmuls' default precision)
    # for the exact curvature: +600,596 B over the base step against the
    # sub-batch's +678,939 (its rows and activations move), counted with
    # async collectives once (cdat_fast.hlo.merge_async_copies).
    assert sub["sent_bytes"] < 1.25 * exact["sent_bytes"]
  else:
    assert sub["sent_bytes"] < exact["sent_bytes"]
  # What moves is the sub-batch's rows (M times fewer than the batch's).
  rows = {int(shape.split("[")[1].split(",")[0])
          for _, shape in sub["moved_rows"]}
  assert rows and max(rows) <= 1536 // M


# The fused MLP's kernels in a CDAT step: 3 Dense and 2 ReLU jets.
FUSED_KERNELS = 5


@functools.lru_cache(maxsize=None)
def fused_steps(target: str, spec: str) -> dict:
  _skip_without_plugin(target)
  out = _compiled(target, spec, True, ("base", "base+jvp²", "cdat"))
  for variant, r in out.items():
    assert "error" not in r, f"{variant}: {r['error']}"
  return out


@pytest.mark.parametrize("target,spec", ALL)
def test_fused_cdat_step_keeps_rows_on_every_mesh(target, spec):
  # Each device runs the kernels on its own rows (kernels/partitioning.py):
  # no collective moves activations, on GPU (custom_partitioning) and TPU
  # (shard_map; Mosaic kernels are not partitioned automatically).
  r = fused_steps(target, spec)["cdat"]
  assert r["kernels"] == FUSED_KERNELS
  assert r["moved_rows"] == [] and r["activation_reductions"] == []
  assert r["extra_nonscalar"] == []
  assert r["beyond_reference_bytes"] <= SCALAR_BYTES


@pytest.mark.parametrize("target,spec", _meshes(0))
def test_fused_cdat_step_on_a_data_parallel_mesh_sends_only_scalars(target,
                                                                    spec):
  # Before the rule, XLA all-gathered the batch to every GPU (+1.38 MB per
  # step on 8 H100) and the TPU step did not compile.
  out = fused_steps(target, spec)
  assert out["cdat"]["sent_bytes"] - out["base"]["sent_bytes"] <= SCALAR_BYTES


@functools.lru_cache(maxsize=None)
def _nanolm():
  return _bench().Problem("nanolm", True, 64)


def test_fused_nanolm_cdat_on_v5e_fsdp_gathers_what_the_jvp_of_jvp_gathers():
  # The fused NanoLM (62 Mosaic kernels in shard_map, kernels/partitioning.py)
  # under FSDP on the v5e: the CDAT step's collectives are the bare
  # jvp-of-jvp's (each weight and u gathered once, for the kernels) and the
  # packed finiteness flags, one f32 per parameter leaf. Before async
  # collectives were counted once, CDAT seemed to send +5,424,340 operand
  # bytes more: libtpu had overlapped 3 more of the same gathers.
  target, spec = "v5e4x4", "data=4,fsdp=4"
  _skip_without_plugin(target)
  mc = _bench()
  from cdat_fast import sharding  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  problem = _nanolm()
  mesh = sharding.make_mesh(spec, devices=_devices(target))
  ref, cdat = (mc.compile_step(problem, v, mesh, M)
               for v in ("base+jvp²", "cdat"))
  assert cdat["count"]["all-gather"] == ref["count"]["all-gather"]
  assert cdat["bytes"]["all-gather"] == ref["bytes"]["all-gather"]
  leaves = len(jax.tree.leaves(problem.params))
  assert cdat["total_bytes"] - ref["total_bytes"] <= 4 * leaves + SCALAR_BYTES
  assert all(kind == "all-reduce" for kind, _ in mc.nonscalar_extra(cdat, ref))
