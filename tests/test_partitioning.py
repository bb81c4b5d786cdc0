"""The fused kernels' partitioning rule under a device mesh (kernels/partitioning.py).

In-process: which dimensions each kernel call declares as rows, the Shardy
factors, the batch axes of the shard_map form, ``vmap`` (the batch axis
joins the rows) and the single-device program (no rule in it). On 8 fake
CPU devices, in a subprocess (``python tests/sharding_checks.py fused``):
a fused MLP's and a fused one-block NanoLM's CDAT steps give the values of
one device under ``data=8`` and ``data=4,fsdp=2``, with either mechanism
(custom_partitioning, used on CPU and GPU; shard_map, used on TPU, forced
here), and move no rows on the data-parallel mesh; under FSDP the MLP's
fused step moves exactly the rows its flax-layer step moves (XLA:CPU gathers
the inputs for the first layer's weight gradient). A dense_jet call
partitioned by GSPMD (Shardy off) keeps its rows. That the rule removes the
batch all-gather on GPU and compiles on TPU is checked by the compile tier
(``tests/accel/test_sharded_compile.py``).
"""
from __future__ import annotations

import collections
import json
import os
import subprocess
import sys

import jax
import jax.extend
import jax.numpy as jnp
import pytest
from jax.sharding import AbstractMesh

from cdat_fast import kernels
from cdat_fast import sharding
from cdat_fast.kernels import partitioning

TOL = 1e-5
CHECKS = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                      "sharding_checks.py")


def _kernel_eqns(fn, *args):
  """The per_platform_kernel equations of ``fn``'s jaxpr, nested ones too."""
  out = []

  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == "per_platform_kernel":
        out.append(eqn)
      for value in eqn.params.values():
        for v in value if isinstance(value, (tuple, list)) else (value,):
          if isinstance(v, jax.extend.core.ClosedJaxpr):
            walk(v.jaxpr)
          elif isinstance(v, jax.extend.core.Jaxpr):
            walk(v)

  walk(jax.make_jaxpr(fn)(*args).jaxpr)
  return out


def test_batch_axes_and_mesh_convention():
  assert partitioning.BATCH_AXES == sharding.BATCH_AXES
  mesh = AbstractMesh((4, 2, 1), sharding.AXES)
  assert partitioning.batch_axes(mesh, 16) == ("data", "fsdp")
  assert partitioning.batch_axes(mesh, 4) == ("data",)  # 8 does not divide 4
  assert partitioning.batch_axes(mesh, 3) == ()
  assert partitioning.batch_axes(AbstractMesh((1, 1, 8), sharding.AXES),
                                 16) == ()


def test_row_spec_needs_shared_leading_dims():
  a = jax.ShapeDtypeStruct((4, 3, 8), jnp.float32)
  w = jax.ShapeDtypeStruct((8, 5), jnp.float32)
  y = jax.ShapeDtypeStruct((4, 3, 5), jnp.float32)
  spec = partitioning.row_spec([a, w], [True, False], 2, [y])
  assert spec == partitioning.RowSpec(2, (True, False))
  assert partitioning.row_spec([a, w], [True, False], 0, [y]) is None
  assert partitioning.row_spec([a, w], [False, False], 1, [y]) is None
  other = jax.ShapeDtypeStruct((2, 3, 5), jnp.float32)
  assert partitioning.row_spec([a, w], [True, False], 1, [other]) is None


def test_shardy_factors_replicate_all_but_rows():
  x = jax.ShapeDtypeStruct((4, 3, 8), jnp.float32)
  w = jax.ShapeDtypeStruct((8, 5), jnp.float32)
  b = jax.ShapeDtypeStruct((5,), jnp.float32)
  y = jax.ShapeDtypeStruct((4, 3, 5), jnp.float32)
  spec = partitioning.RowSpec(2, (True, False, False))
  # pylint: disable-next=protected-access
  ins, outs, replicated = partitioning._factors(spec, [x, w, b], [y, y])
  assert ins[0][:2] == ("r0", "r1") and outs[0][:2] == outs[1][:2] == (
      "r0", "r1")
  assert not {"r0", "r1"} & set(ins[1] + ins[2])
  everything = {f for m in ins + outs for f in m}
  assert set(replicated) == everything - {"r0", "r1"}
  # pylint: disable-next=protected-access
  assert partitioning._sdy_rule(spec, [x, w, b], [y, y]) is not None


@pytest.mark.parametrize("kernel,args,rows", [
    ("dense_jet", ((2, 6, 8), (8, 4), (4,), (2, 6, 8), (8, 4), (4,),
                   (2, 6, 8)), (2, (True, False, False, True, False, False,
                                    True))),
    ("layer_norm_jet", ((2, 6, 8), (8,), (8,), (2, 6, 8), (8,), (8,),
                        (2, 6, 8)), (2, (True, False, False, True, False,
                                         False, True))),
    ("activation_jet", ((2, 6, 8), (2, 6, 8), (2, 6, 8)), (3, (True,) * 3)),
    ("attention_jet", ((2, 3, 8, 4),) * 9, (2, (True,) * 9)),
])
def test_each_kernel_declares_its_rows(kernel, args, rows):
  values = [jnp.ones(s, jnp.float32) for s in args]
  fn = getattr(kernels, kernel)
  kwargs = {"activation": "gelu"} if kernel == "activation_jet" else {}
  eqns = _kernel_eqns(lambda *a: fn(*a, **kwargs), *values)
  assert len(eqns) == 1
  assert eqns[0].params["rows"] == partitioning.RowSpec(*rows)


def test_vmap_adds_a_row_dimension():
  x = jnp.ones((3, 5, 8))
  w = jnp.ones((8, 4))
  fn = jax.vmap(lambda x: kernels.dense_jet(x, w, None, x, None, None, None))
  eqns = _kernel_eqns(fn, x)
  assert [e.params["rows"] for e in eqns] == [
      partitioning.RowSpec(2, (True, False, True))]
  want = jax.vmap(lambda x: kernels.dense_jet_reference(
      x, w, None, x, None, None, None))(x)
  for g, r in zip(fn(x), want):
    assert jnp.allclose(g, r, rtol=1e-5, atol=1e-5)


def test_one_device_program_has_no_rule():
  x, w = jnp.ones((16, 8)), jnp.ones((8, 4))
  text = jax.jit(lambda x, w: kernels.dense_jet(
      x, w, None, x, None, None, None)).lower(x, w).as_text()
  assert "CustomSPMDPartitioning" not in text
  assert "manual_computation" not in text


# ----------------------------------------------------------------------------
# 8 devices, in a subprocess.


@pytest.fixture(scope="module")
def fused():
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, CHECKS, "fused"], env=env,
                        capture_output=True, text=True, timeout=600,
                        check=False)
  if proc.returncode != 0:
    pytest.fail(f"sharding_checks.py fused failed ({proc.returncode}):\n"
                f"{proc.stderr[-4000:]}")
  return json.loads(proc.stdout.strip().splitlines()[-1])


STEPS = [f"{model} {mechanism} {spec}" for model in ("mlp", "nanolm")
         for mechanism in ("custom_partitioning", "shard_map")
         for spec in ("data=8", "data=4,fsdp=2")]


@pytest.mark.multidevice
@pytest.mark.parametrize("key", STEPS)
def test_sharded_fused_step_matches_one_device(fused, key):
  r = fused[key]
  assert r["loss_rel"] < TOL and r["eta_rel"] < TOL and r["params_rel"] < TOL
  # Every kernel lowering went through the rule; none on one device.
  assert r["wrapped"] > 0
  assert fused[f"{key.split()[0]} one device"]["wrapped"] == 0


@pytest.mark.multidevice
@pytest.mark.parametrize("key", [k for k in STEPS if k.endswith("data=8")])
def test_data_parallel_fused_step_moves_no_rows(fused, key):
  assert fused[key]["moved_rows"] == []


@pytest.mark.multidevice
@pytest.mark.parametrize("mechanism", ["custom_partitioning", "shard_map"])
def test_fsdp_fused_mlp_moves_the_rows_flax_moves(fused, mechanism):
  moved = fused[f"mlp {mechanism} data=4,fsdp=2"]["moved_rows"]
  flax = fused["mlp flax data=4,fsdp=2"]["moved_rows"]
  count = collections.Counter(map(tuple, moved))
  assert count == collections.Counter(map(tuple, flax))


@pytest.mark.multidevice
def test_gspmd_partitions_by_rows(fused):
  r = fused["gspmd dense_jet"]
  assert r["rel"] < TOL and r["rows_kept"] and r["moved_rows"] == []
