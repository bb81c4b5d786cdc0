"""Multi-device checks of the tuners, run in subprocesses by test_sharding.py.

The default test process sees one CPU device; these checks need several, so
they run in a fresh interpreter with ``XLA_FLAGS=
--xla_force_host_platform_device_count=N`` (set here before JAX starts) and
print one JSON object on the last line of stdout.

Usage::

  python tests/sharding_checks.py tuners [I/N]  # 8 devices, every tuner
                                                # (or every N-th from I)
  python tests/sharding_checks.py kernels       # fused kernels in shard_map
  python tests/sharding_checks.py fused         # a fused model's CDAT step,
                                                # kernels partitioned by rows
  python tests/sharding_checks.py multiprocess  # 2 processes × 4 devices
  python tests/sharding_checks.py xla_repro     # an XLA:CPU miscompile
  python tests/sharding_checks.py resume_mesh   # checkpoint data=8, resume
                                                # on data=2,fsdp=2 / 1 device
  python tests/sharding_checks.py worker ID PORT SPEC...  # (internal)
"""
from __future__ import annotations

import inspect
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import traceback


def _set_device_count(n: int) -> None:
  """Fakes ``n`` CPU devices; LLVM optimisation off, halving compile times."""
  flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
           if not f.startswith(("--xla_force_host_platform_device_count",
                                "--xla_backend_optimization_level"))]
  flags.append(f"--xla_force_host_platform_device_count={n}")
  flags.append("--xla_backend_optimization_level=0")
  os.environ["XLA_FLAGS"] = " ".join(flags)
  os.environ["JAX_PLATFORMS"] = "cpu"


if __name__ == "__main__":
  _set_device_count(4 if sys.argv[1:2] == ["worker"] else 8)

# pylint: disable=g-import-not-at-top,wrong-import-position
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

import cdat_fast
from cdat_fast import sharding
from cdat_fast.curvature import directional_derivatives

STEPS = 3
MESHES = ("data=4,fsdp=2", "data=8")
# A model axis for the CDAT variants (paired with fsdp only: on a mesh with
# all three axes > 1 XLA:CPU miscompiles a plain gradient, see `xla_repro`).
MODEL_MESH = "fsdp=4,model=2"
WITH_MODEL_MESH = ("cdat_exact", "cdat_adam_ema", "cdat_gauss_newton")
# Lanczos is a variant of the sharpness rule, run where its reshapes matter.
ONLY_FIRST_MESH = ("sharpness_rule_lanczos",)


def meshes_for(name: str) -> tuple[str, ...]:
  """The mesh specs tuner ``name`` is checked on."""
  if name in ONLY_FIRST_MESH:
    return MESHES[:1]
  return MESHES + ((MODEL_MESH,) if name in WITH_MODEL_MESH else ())
BATCH = 64
WIDTHS = (16, 32, 32, 8)


# ----------------------------------------------------------------------------
# A small tanh MLP with a squared loss, split as model and loss for
# Gauss-Newton.


def init_params(seed: int = 0) -> dict:
  keys = jax.random.split(jax.random.PRNGKey(seed), len(WIDTHS) - 1)
  params = {}
  for i, (k, n_in, n_out) in enumerate(zip(keys, WIDTHS[:-1], WIDTHS[1:])):
    params[f"dense{i}"] = {
        "w": np.asarray(jax.random.normal(k, (n_in, n_out)) / np.sqrt(n_in)),
        "b": np.full((n_out,), 0.01 * (i + 1), np.float32)}
  return params


def make_batches(steps: int = STEPS, seed: int = 1) -> list[dict]:
  rng = np.random.default_rng(seed)
  teacher = rng.normal(size=(WIDTHS[0], WIDTHS[-1])).astype(np.float32)
  out = []
  for _ in range(steps):
    x = rng.normal(size=(BATCH, WIDTHS[0])).astype(np.float32)
    y = np.sin(x @ teacher).astype(np.float32)
    out.append({"x": x, "y": y})
  return out


def model_fn(params, batch):
  h = batch["x"]
  n = len(params)
  for i in range(n):
    layer = params[f"dense{i}"]
    h = h @ layer["w"] + layer["b"]
    if i < n - 1:
      h = jnp.tanh(h)
  return h


def output_loss(outputs, batch):
  return 0.5 * jnp.mean(jnp.sum((outputs - batch["y"]) ** 2, axis=-1))


def loss_fn(params, batch):
  return output_loss(model_fn(params, batch), batch)


# ----------------------------------------------------------------------------
# The tuners under test.


def _has_cheap_modes() -> bool:
  return "curvature" in inspect.signature(cdat_fast.cdat).parameters


def tuners() -> dict:
  """name -> (factory, needs model_fn/output_loss)."""
  sgd = lambda: optax.sgd(1.0)  # pylint: disable=unnecessary-lambda-assignment
  table = {
      "cdat_exact": (lambda: cdat_fast.cdat(sgd(), scale=2.0), False),
      "quadratic_greedy": (lambda: cdat_fast.quadratic_greedy(sgd()), False),
      "cdat_adam_ema": (lambda: cdat_fast.cdat(optax.adam(1.0), scale=2.0,
                                               ema=0.9), False),
      "backtracking_linesearch": (
          lambda: cdat_fast.backtracking_linesearch(sgd()), False),
      "polyak": (lambda: cdat_fast.polyak(sgd(), max_learning_rate=100.0),
                 False),
      "hypergradient": (lambda: cdat_fast.hypergradient(
          sgd(), learning_rate=0.1, beta=0.1), False),
      # rtol=0: a fixed number of iterations. A data-dependent stop can end
      # one iteration apart when summation orders differ across devices.
      "sharpness_rule": (lambda: cdat_fast.sharpness_rule(
          sgd(), scale=2.0, num_iters=20, rtol=0.0), False),
      "sharpness_rule_lanczos": (lambda: cdat_fast.sharpness_rule(
          sgd(), scale=2.0, method="lanczos", num_iters=8), False),
  }
  if _has_cheap_modes():
    table.update({
        "cdat_secant": (lambda: cdat_fast.cdat(sgd(), curvature="secant"),
                        False),
        "cdat_gauss_newton": (lambda: cdat_fast.cdat(
            sgd(), curvature="gauss_newton"), True),
        # every=2 over 3 steps: a measured, a held and a measured step.
        "cdat_every2": (lambda: cdat_fast.cdat(sgd(), every=2), False),
        "cdat_subbatch": (lambda: cdat_fast.cdat(
            sgd(), curvature=cdat_fast.estimators.subbatch(1 / 4)), False),
    })
  return table


# ----------------------------------------------------------------------------
# Running a few steps on a mesh.


def _rel(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  den = np.linalg.norm(b)
  num = np.linalg.norm(a - b)
  return float(num / den) if den > 0 else float(num)


def _tree_rel(a, b) -> float:
  la = np.concatenate([np.ravel(x) for x in jax.tree.leaves(a)])
  lb = np.concatenate([np.ravel(x) for x in jax.tree.leaves(b)])
  return _rel(la, lb)


def _same_shardings(tree, shardings) -> bool:
  return all(
      x.sharding.is_equivalent_to(s, x.ndim)
      for x, s in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings)))


def _make_step(name, mesh):
  make, gauss_newton = tuners()[name]
  kwargs = dict(model_fn=model_fn, output_loss=output_loss) if gauss_newton \
      else {}
  return sharding.make_train_step(loss_fn, make(), mesh, **kwargs)


def run_steps(name: str, mesh, steps: int = STEPS, free: bool = False) -> dict:
  """``steps`` sharded steps of tuner ``name``; η, losses, final parameters.

  Inside the loop transfers are disallowed (``jax.transfer_guard``): a step
  that implicitly moved data between host and devices would raise.
  """
  step = _make_step(name, mesh)
  params = sharding.shard_params(init_params(), mesh)
  in_shardings = jax.tree.map(lambda x: x.sharding, params)
  opt_state = step.init(params)
  state_in = jax.tree.map(lambda x: x.sharding, opt_state)
  batches = [sharding.shard_batch(b, mesh) for b in make_batches(steps)]
  free_ok = None
  if free:
    # Unconstrained jit: do the tuners, left to XLA's propagation, keep the
    # parameters' shardings?
    out = jax.jit(step.body)(params, opt_state, batches[0])
    free_ok = _same_shardings(out[0], in_shardings)
  etas, losses = [], []
  with jax.transfer_guard("disallow"):
    for batch in batches:
      params, opt_state, loss = step(params, opt_state, batch)
      etas.append(optax.tree.get(opt_state, "learning_rate"))
      losses.append(loss)
  return {
      "eta": [float(e) for e in etas],
      "loss": [float(v) for v in losses],
      "params": jax.tree.map(np.asarray, params),
      "params_sharding_kept": _same_shardings(params, in_shardings),
      "state_sharding_kept": _same_shardings(opt_state, state_in),
      "free_sharding_kept": free_ok,
  }


def _nonscalar_extra(cdat_hlo: dict, ref_hlo: dict) -> list:
  """Non-scalar collective operands of ``cdat_hlo`` not in ``ref_hlo``."""
  left = list(ref_hlo["non_scalar"])
  extra = []
  for item in cdat_hlo["non_scalar"]:
    if item in left:
      left.remove(item)
    else:
      extra.append(item)
  return extra


def _lowered_text(step, mesh) -> str:
  params = sharding.shard_params(init_params(), mesh)
  opt_state = step.init(params)
  batch = sharding.shard_batch(make_batches(1)[0], mesh)
  return step.lower(params, opt_state, batch).compile().as_text()


def hlo_checks(mesh) -> dict:
  """Host transfers and collectives of one compiled CDAT step.

  The reference is the base step plus a bare jvp-of-jvp along its update:
  what CDAT must communicate. Anything non-scalar beyond it is overhead.
  """
  cdat_step = _make_step("cdat_exact", mesh)
  cdat_hlo = sharding.hlo_collectives(_lowered_text(cdat_step, mesh))

  sgd = optax.sgd(1.0)

  def ref_body(params, opt_state, batch):
    loss, grads = jax.value_and_grad(loss_fn)(params, batch)
    u, opt_state = sgd.update(grads, opt_state, params)
    _, slope, curv = directional_derivatives(
        lambda p: loss_fn(p, batch), params, u)
    u = jax.tree.map(lambda x: x * (slope / curv), u)
    return optax.apply_updates(params, u), opt_state, loss

  ref_step = sharding.make_train_step(loss_fn, sgd, mesh, body=ref_body)
  ref_hlo = sharding.hlo_collectives(_lowered_text(ref_step, mesh))
  return {
      "callbacks": cdat_hlo["callbacks"],
      "host_transfers": cdat_hlo["host_transfers"],
      "collective_count": cdat_hlo["count"],
      "collective_bytes": cdat_hlo["total_bytes"],
      "reference_bytes": ref_hlo["total_bytes"],
      "extra_nonscalar": _nonscalar_extra(cdat_hlo, ref_hlo),
  }


def subbatch_checks(spec: str = "data=8", m: int = 4) -> dict:
  """Where the sub-batch estimator's rows live on a data-parallel mesh.

  The rows it selects from a batch split over the devices, per device:
  how many, and whether they all come from that device's own rows; and the
  non-scalar collectives of a compiled CDAT step with the sub-batch
  curvature beyond those of the plain base step (the gradient's
  all-reduce): rows moved between devices would show up there.
  """
  from cdat_fast.estimators.subbatch import every_mth_row  # pylint: disable=g-import-not-at-top
  mesh = sharding.make_mesh(spec)
  batch = sharding.shard_batch(make_batches(1)[0], mesh)
  x = batch["x"]
  rows = jax.jit(lambda v: every_mth_row(v, m))(x)
  own = {s.device: np.asarray(s.data) for s in x.addressable_shards}
  per_device, from_own_rows = [], []
  for shard in rows.addressable_shards:
    got = np.asarray(shard.data)
    per_device.append(int(got.shape[0]))
    mine = own[shard.device]
    from_own_rows.append(bool(all(
        any(np.array_equal(r, q) for q in mine) for r in got)))
  make = lambda: cdat_fast.cdat(
      optax.sgd(1.0), curvature=cdat_fast.estimators.subbatch(1 / m))
  step = sharding.make_train_step(loss_fn, make(), mesh)
  base = sharding.make_train_step(loss_fn, optax.sgd(0.1), mesh)
  sub_hlo = sharding.hlo_collectives(_lowered_text(step, mesh))
  base_hlo = sharding.hlo_collectives(_lowered_text(base, mesh))
  return {
      "rows_per_device": per_device,
      "rows_from_own_device": from_own_rows,
      "selected_rows": int(rows.shape[0]),
      "collective_count": sub_hlo["count"],
      "extra_nonscalar": _nonscalar_extra(sub_hlo, base_hlo),
      "host_transfers": sub_hlo["host_transfers"],
  }


def check_tuners(shard: int = 0, num_shards: int = 1) -> dict:
  """Tuners ``shard::num_shards`` on their meshes against one device."""
  names = list(tuners())[shard::num_shards]
  meshes = {spec: sharding.make_mesh(spec) for spec in MESHES + (MODEL_MESH,)}
  one = sharding.make_mesh("data=1")
  results = {}
  for name in names:
    t0 = time.perf_counter()
    entry = {}
    try:
      ref = run_steps(name, one)
      for spec in meshes_for(name):
        free = spec == MESHES[0] and name not in ONLY_FIRST_MESH
        out = run_steps(name, meshes[spec], free=free)
        entry[spec] = {
            "eta_rel": max(abs(a - b) / max(abs(b), 1e-30)
                           for a, b in zip(out["eta"], ref["eta"])),
            "loss_rel": max(abs(a - b) / max(abs(b), 1e-30)
                            for a, b in zip(out["loss"], ref["loss"])),
            "params_rel": _tree_rel(out["params"], ref["params"]),
            "params_sharding_kept": out["params_sharding_kept"],
            "state_sharding_kept": out["state_sharding_kept"],
            "free_sharding_kept": out["free_sharding_kept"],
            "eta": out["eta"],
        }
      entry["reference_eta"] = ref["eta"]
    except Exception:  # pylint: disable=broad-except
      entry = {"error": traceback.format_exc(limit=8)}
    entry["seconds"] = round(time.perf_counter() - t0, 2)
    results[name] = entry
  missing = [] if _has_cheap_modes() else [
      "cdat curvature='secant'", "cdat curvature='gauss_newton'",
      "cdat every=k"]
  out = {"device_count": jax.device_count(), "tuners": results,
         "missing": missing}
  if shard == 0:
    out["hlo"] = hlo_checks(meshes[MESHES[0]])
  else:
    out["subbatch"] = subbatch_checks()
  return out


# ----------------------------------------------------------------------------
# A checkpoint written under one mesh, resumed under another.

RESUME_FROM = "data=8"
RESUME_ON = ("data=8", "data=2,fsdp=2", None)  # None: one device
RESUME_STEPS, RESUME_AT = 6, 3


def check_resume_mesh() -> dict:
  """The harness checkpointed under ``data=8`` and resumed on other meshes.

  A minibatch run (batch 32, CDAT on Adam with an EMA, the sharpness warm
  start) of ``RESUME_STEPS`` steps, uninterrupted on ``data=8``, against the
  same run stopped at ``RESUME_AT`` and resumed from its checkpoint on each
  of ``RESUME_ON``. Reports, per mesh: whether the restored arrays equal the
  saved ones bit for bit and carry the new mesh's shardings, whether the
  losses and learning rates equal the uninterrupted run's bit for bit, and
  their largest relative differences (the steps after the resume reduce in
  another order on another mesh).
  """
  # pylint: disable=g-import-not-at-top
  import shutil
  from cdat_fast.harness.checkpoint import Checkpointer
  from cdat_fast.harness.data import load_dataset
  from cdat_fast.harness.optimizers import OptimizerConfig
  from cdat_fast.harness.train import TrainConfig, Trainer
  dataset = load_dataset("digits", subset=96, seed=0)
  kw = dict(dataset="digits", subset=96, width=16, depth=1, log_every=3,
            checkpoint_every=RESUME_AT, batch_size=32, sharpness_every=3,
            optimizer=OptimizerConfig(base="adam", ema=0.9))

  def run(out, steps, mesh, resume=False):
    cfg = TrainConfig(**kw, steps=steps, mesh=mesh)
    return Trainer(cfg, dataset=dataset).run(out, progress=False, echo=None,
                                             resume=resume)

  def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-30)))

  out = {"from": RESUME_FROM, "steps": RESUME_STEPS, "at": RESUME_AT}
  with tempfile.TemporaryDirectory() as tmp:
    whole = run(f"{tmp}/whole", RESUME_STEPS, RESUME_FROM)
    part = run(f"{tmp}/part", RESUME_AT, RESUME_FROM)
    saved = jax.tree.map(np.asarray, part.params)
    for mesh in RESUME_ON:
      name = mesh or "one device"
      shutil.copytree(f"{tmp}/part", f"{tmp}/{name}")
      trainer = Trainer(TrainConfig(**kw, steps=RESUME_STEPS, mesh=mesh),
                        dataset=dataset)
      restored = Checkpointer(f"{tmp}/{name}/checkpoints").restore_latest(
          trainer.init(), trainer.cfg).carry
      want = (sharding.param_shardings(saved, trainer.mesh)
              if trainer.mesh is not None else None)
      resumed = run(f"{tmp}/{name}", RESUME_STEPS, mesh, resume=True)
      h, w = resumed.history, whole.history
      out[name] = {
          "restored_equal": all(np.array_equal(np.asarray(a), b) for a, b in
                                zip(jax.tree.leaves(restored[0]),
                                    jax.tree.leaves(saved))),
          "restored_shardings": want is None or _same_shardings(restored[0],
                                                                want),
          "loss_equal": bool(np.array_equal(h["loss"], w["loss"])),
          "lr_equal": bool(np.array_equal(h["learning_rate"],
                                          w["learning_rate"])),
          "before_equal": bool(np.array_equal(h["loss"][:RESUME_AT],
                                              w["loss"][:RESUME_AT])),
          "loss_rel": rel(h["loss"], w["loss"]),
          "lr_rel": rel(h["learning_rate"], w["learning_rate"]),
          "params_rel": _tree_rel(jax.tree.map(np.asarray, resumed.params),
                                  jax.tree.map(np.asarray, whole.params)),
          "steps": resumed.summary["steps"],
      }
  return out


# ----------------------------------------------------------------------------
# An XLA problem found on the way.


def xla_repro() -> dict:
  """Wrong gradient from plain ``jax.grad`` on a (2, 2, 2) mesh (XLA:CPU).

  Weights ``P("fsdp", "model")``, batch ``P(("data", "fsdp"))``, a tanh layer
  and a squared error against sharded targets: the first weight's gradient is
  off by O(1). Meshes with one of the three axes of size 1 are correct, and
  so is this mesh with a replicated batch. No tuner is involved.
  """
  mesh = sharding.make_mesh("data=2,fsdp=2,model=2")
  rng = np.random.default_rng(0)
  x = rng.normal(size=(64, 32)).astype(np.float32)
  y = rng.normal(size=(64, 8)).astype(np.float32)
  w1 = (rng.normal(size=(32, 32)) / 6).astype(np.float32)
  w2 = (rng.normal(size=(32, 8)) / 6).astype(np.float32)

  def loss(w, x, y):
    return jnp.mean((jnp.tanh(x @ w[0]) @ w[1] - y) ** 2)

  ref = jax.grad(loss)((w1, w2), x, y)
  def put(a, spec):
    return jax.device_put(a, NamedSharding(mesh, spec))

  ws, xs = P("fsdp", "model"), P(("data", "fsdp"))
  got = jax.jit(jax.grad(loss))((put(w1, ws), put(w2, ws)), put(x, xs),
                                put(y, xs))
  return {"grad_rel": [_rel(g, r) for g, r in zip(got, ref)],
          "jax": jax.__version__}


# ----------------------------------------------------------------------------
# Fused kernels under shard_map.


def _first_line(err: Exception) -> str:
  return f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"


def check_kernels() -> dict:
  """Fused jet kernels inside ``jax.shard_map`` on 8 devices, interpret mode.

  Each device runs the kernel on its block (rows over ``data``, output
  columns over ``model``); the assembled result must match the reference on
  the full arrays. ``check_vma=False`` is needed: with JAX's default
  ``check_vma=True`` a ``pallas_call`` needs ``manual_axis_type`` on its
  ``out_shape`` and Pallas' interpreter then fails on its own loop carry
  (recorded as ``vma_error``).
  """
  try:
    # pylint: disable-next=g-import-not-at-top
    from cdat_fast.kernels import (activation_jet, activation_jet_reference,
                                   dense_jet, dense_jet_reference)
  except ImportError as e:
    return {"dense_jet": {"missing": str(e)}}
  mesh = sharding.make_mesh("data=4,model=2")
  keys = jax.random.split(jax.random.PRNGKey(3), 7)
  m, k, n = 64, 32, 48
  x, dx, ddx = (jax.random.normal(keys[i], (m, k)) for i in range(3))
  w, dw = (jax.random.normal(keys[i], (k, n)) / np.sqrt(k) for i in (3, 4))
  b, db = (jax.random.normal(keys[i], (n,)) for i in (5, 6))
  rows, cols, vec = P("data", None), P(None, "model"), P("model")
  out_spec = P("data", "model")
  cases = {
      "dense_jet": (
          lambda *a: dense_jet(*a, interpret=True, block_m=16, block_n=16,
                               block_k=16),
          (x, w, b, dx, dw, db, ddx), (rows, cols, vec, rows, cols, vec, rows),
          dense_jet_reference(x, w, b, dx, dw, db, ddx)),
      "activation_jet": (
          lambda *a: activation_jet(*a, activation="tanh", interpret=True),
          (w, dw, w), (cols,) * 3,
          activation_jet_reference(w, dw, w, activation="tanh")),
  }
  out = {}
  for name, (fn, args, specs, want) in cases.items():
    placed = [jax.device_put(a, NamedSharding(mesh, s))
              for a, s in zip(args, specs)]
    outs = out_spec if name == "dense_jet" else cols
    entry = {}
    try:
      jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=specs,
                            out_specs=(outs,) * 3))(*placed)
      entry["vma_error"] = None
    except Exception as e:  # pylint: disable=broad-except
      entry["vma_error"] = _first_line(e)
    try:
      got = jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=specs,
                                  out_specs=(outs,) * 3, check_vma=False))(
                                      *placed)
      entry["rel"] = max(_rel(g, r) for g, r in zip(got, want))
      entry["sharding_kept"] = all(
          g.sharding.is_equivalent_to(NamedSharding(mesh, outs), 2)
          for g in got)
    except Exception:  # pylint: disable=broad-except
      entry["error"] = traceback.format_exc(limit=8)
    out[name] = entry
  return out


# ----------------------------------------------------------------------------
# The fused layers' kernels partitioned by rows (kernels/partitioning.py).

FUSED_MESHES = ("data=8", "data=4,fsdp=2")
FUSED_BATCH, FUSED_T, FUSED_VOCAB = 16, 8, 17
# Moving rows: collectives that carry activations between devices.
ROW_MOVERS = ("all-gather", "all-to-all", "collective-permute")


def _fused_problem(name: str, fused: bool = True):
  """A small harness model (``nanolm``: one block, so Dense, LayerNorm, relu
  and attention kernels; ``mlp``: Dense and relu), its loss, parameters and
  two batches."""
  from cdat_fast.harness.models import get_model  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(5)
  if name == "nanolm":
    model = get_model("nanolm", FUSED_VOCAB, num_layers=1, num_heads=2,
                      head_size=8, embed_size=16, block_size=FUSED_T,
                      fused=fused)
    batches = [{k: rng.integers(0, FUSED_VOCAB, (FUSED_BATCH, FUSED_T),
                                dtype=np.int32) for k in ("x", "y")}
               for _ in range(2)]
  else:
    model = get_model("mlp", FUSED_VOCAB, features=(32, 32), fused=fused)
    batches = [{"x": rng.normal(size=(FUSED_BATCH, 24)).astype(np.float32),
                "y": rng.integers(0, FUSED_VOCAB, FUSED_BATCH, dtype=np.int32)}
               for _ in range(2)]
  params = model.init(jax.random.PRNGKey(0), batches[0]["x"])["params"]

  def loss(p, batch):
    logits = model.apply({"params": p}, batch["x"])
    return optax.softmax_cross_entropy_with_integer_labels(
        logits, batch["y"]).mean()
  return loss, jax.tree.map(np.asarray, params), batches


def _moved_rows(text: str, params) -> list:
  """Row-moving collectives whose operand is no parameter (shard) shape."""
  shapes = {tuple(d for d in x.shape if d != 1)
            for x in jax.tree.leaves(params)}
  out = []
  for kind, shape in sharding.hlo_collectives(text)["non_scalar"]:
    dims = tuple(int(d) for d in shape.split("[")[1].rstrip("]").split(",")
                 if d)
    squeezed = tuple(d for d in dims if d != 1)
    whole = any(len(p) == len(squeezed) and all(
        q % d == 0 for q, d in zip(p, squeezed)) for p in shapes)
    if kind in ROW_MOVERS and len(squeezed) >= 2 and not whole:
      out.append([kind, shape])
  return sorted(out)


def _fused_run(loss, params, batches, mesh, steps: int = 2) -> dict:
  """``steps`` CDAT steps on ``mesh``: losses, η, parameters, the lowered
  and the compiled program."""
  step = sharding.make_train_step(loss, cdat_fast.cdat(optax.sgd(1.0)), mesh)
  params = sharding.shard_params(params, mesh)
  opt_state = step.init(params)
  placed = [sharding.shard_batch(b, mesh) for b in batches[:steps]]
  lowered = step.lower(params, opt_state, placed[0])
  losses, etas = [], []
  for batch in placed:
    params, opt_state, value = step(params, opt_state, batch)
    losses.append(float(value))
    etas.append(float(optax.tree.get(opt_state, "learning_rate")))
  return {"loss": losses, "eta": etas,
          "params": jax.tree.map(np.asarray, params),
          "lowered": lowered.as_text(), "text": lowered.compile().as_text()}


def _fused_entry(problem, ref, mesh, mark) -> dict:
  loss, params, batches = problem
  run = _fused_run(loss, params, batches, mesh)
  return {"moved_rows": _moved_rows(run["text"], params),
          "wrapped": run["lowered"].count(mark),
          "loss_rel": _rel(run["loss"], ref["loss"]),
          "eta_rel": _rel(run["eta"], ref["eta"]),
          "params_rel": _tree_rel(run["params"], ref["params"])}


def _gspmd_dense() -> dict:
  """dense_jet with rows over ``data=4,fsdp=2`` and its weight over
  ``fsdp``, partitioned by GSPMD (Shardy off): the rule's GSPMD callbacks."""
  from cdat_fast.kernels import dense_jet, dense_jet_reference  # pylint: disable=g-import-not-at-top
  mesh = sharding.make_mesh("data=4,fsdp=2")
  keys = jax.random.split(jax.random.PRNGKey(4), 4)
  x, dx = (jax.random.normal(k, (64, 32)) for k in keys[:2])
  w, dw = (jax.random.normal(k, (32, 48)) for k in keys[2:])
  rows = NamedSharding(mesh, P(sharding.BATCH_AXES))
  cols = NamedSharding(mesh, P(None, "fsdp"))
  args = [jax.device_put(a, s) for a, s in
          ((x, rows), (w, cols), (dx, rows), (dw, cols))]
  fn = jax.jit(lambda x, w, dx, dw: dense_jet(x, w, None, dx, dw, None, None))
  previous = jax.config.jax_use_shardy_partitioner
  jax.config.update("jax_use_shardy_partitioner", False)
  try:
    got = fn(*args)
    text = fn.lower(*args).compile().as_text()
  finally:
    jax.config.update("jax_use_shardy_partitioner", previous)
  want = dense_jet_reference(x, w, None, dx, dw, None, None)
  return {"rel": max(_rel(g, r) for g, r in zip(got, want)),
          "moved_rows": _moved_rows(text, {"w": w}),
          "rows_kept": all(g.sharding.is_equivalent_to(rows, 2) for g in got)}


def check_fused() -> dict:
  """Fused models' CDAT steps on 8 devices against one device.

  Per model, mechanism (custom_partitioning, CPU's and GPU's; shard_map,
  TPU's, forced on CPU here) and mesh: relative differences of the losses,
  learning rates and parameters after two steps; the row-moving collectives
  of the compiled step; how many kernel lowerings the program wraps in the
  mechanism (``CustomSPMDPartitioning`` calls, or ``shard_map``'s manual
  computations; 0 on one device). ``flax``: the row-moving collectives of
  the model's step with flax's layers (XLA:CPU gathers the MLP's inputs
  over ``fsdp`` for the first layer's gradient; under FSDP it reshuffles
  NanoLM's attention activations).
  """
  from cdat_fast.kernels import partitioning  # pylint: disable=g-import-not-at-top
  marks = {"custom_partitioning": "CustomSPMDPartitioning",
           "shard_map": "sdy.manual_computation"}
  out: dict = {"gspmd dense_jet": _gspmd_dense()}
  for name in ("mlp", "nanolm"):
    problem = _fused_problem(name)
    ref = _fused_run(*problem, sharding.make_mesh("data=1"))
    out[f"{name} one device"] = {"wrapped": sum(
        ref["lowered"].count(m) for m in marks.values())}
    for mechanism, mark in marks.items():
      partitioning.MECHANISM["cpu"] = mechanism
      for spec in FUSED_MESHES:
        out[f"{name} {mechanism} {spec}"] = _fused_entry(
            problem, ref, sharding.make_mesh(spec), mark)
    partitioning.MECHANISM["cpu"] = "custom_partitioning"
    flax_loss, params, batches = _fused_problem(name, fused=False)
    for spec in FUSED_MESHES:
      run = _fused_run(flax_loss, params, batches, sharding.make_mesh(spec),
                       1)
      out[f"{name} flax {spec}"] = {
          "moved_rows": _moved_rows(run["text"], params)}
  return out


# ----------------------------------------------------------------------------
# Two processes on localhost.

MP_SPECS = ("data=8", "data=4,fsdp=2")
MP_TUNER = "cdat_exact"


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def worker(process_id: int, port: int, specs: list[str]) -> dict:
  """One of two processes: a few data-parallel CDAT steps per mesh."""
  sharding.init_distributed(f"127.0.0.1:{port}", 2, process_id,
                            initialization_timeout=60)
  # pylint: disable-next=g-import-not-at-top
  from jax.experimental import multihost_utils
  out = {"process_index": jax.process_index(),
         "process_count": jax.process_count(),
         "device_count": jax.device_count(),
         "local_device_count": jax.local_device_count()}
  half = BATCH // 2
  for spec in specs:
    mesh = sharding.make_mesh(spec)
    step = _make_step(MP_TUNER, mesh)
    params = sharding.shard_params(init_params(), mesh)
    opt_state = step.init(params)
    etas, losses = [], []
    for batch in make_batches():
      local = jax.tree.map(
          lambda a: a[process_id * half:(process_id + 1) * half], batch)
      params, opt_state, loss = step(params, opt_state,
                                     sharding.shard_batch(local, mesh))
      etas.append(float(optax.tree.get(opt_state, "learning_rate")))
      losses.append(float(loss))
    full = multihost_utils.process_allgather(params, tiled=True)
    out[spec] = {"eta": etas, "loss": losses,
                 "params": jax.tree.map(lambda a: np.asarray(a).tolist(), full)}
  return out


def check_multiprocess(timeout: float = 150.0) -> dict:
  """Launches 2 workers (4 CPU devices each), compares with one device."""
  port = _free_port()
  env = dict(os.environ)
  procs, files = [], []
  here = os.path.abspath(__file__)
  try:
    for i in range(2):
      f = tempfile.TemporaryFile(mode="w+")
      files.append(f)
      procs.append(subprocess.Popen(
          [sys.executable, here, "worker", str(i), str(port), *MP_SPECS],
          stdout=f, stderr=subprocess.STDOUT, env=env, text=True))
    # The single-process, single-device reference, while the workers start.
    one = sharding.make_mesh("data=1")
    ref = run_steps(MP_TUNER, one)
    deadline = time.monotonic() + timeout
    codes = []
    for p in procs:
      codes.append(p.wait(timeout=max(1.0, deadline - time.monotonic())))
  except subprocess.TimeoutExpired:
    codes = None
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  logs = []
  for f in files:
    f.seek(0)
    logs.append(f.read())
    f.close()
  if codes is None or any(codes):
    return {"ok": False, "codes": codes,
            "logs": [log[-3000:] for log in logs]}
  outs = [json.loads(log.strip().splitlines()[-1]) for log in logs]
  result = {"ok": True, "process_counts": [o["process_count"] for o in outs],
            "device_counts": [o["device_count"] for o in outs]}
  for spec in MP_SPECS:
    a, b = outs[0][spec], outs[1][spec]
    result[spec] = {
        "eta_rel": max(abs(x - y) / abs(y) for x, y in zip(a["eta"],
                                                           ref["eta"])),
        "loss_rel": max(abs(x - y) / abs(y) for x, y in zip(a["loss"],
                                                            ref["loss"])),
        "params_rel": _tree_rel(a["params"], ref["params"]),
        "processes_agree": a["eta"] == b["eta"] and a["loss"] == b["loss"],
        "eta": a["eta"], "reference_eta": ref["eta"],
    }
  return result


def main(argv: list[str]) -> None:
  mode = argv[0] if argv else "tuners"
  t0 = time.perf_counter()
  if mode == "tuners":
    shard, num = (int(v) for v in (argv[1] if len(argv) > 1 else "0/1").split(
        "/"))
    out = check_tuners(shard, num)
  elif mode == "xla_repro":
    out = xla_repro()
  elif mode == "kernels":
    out = check_kernels()
  elif mode == "fused":
    out = check_fused()
  elif mode == "multiprocess":
    out = check_multiprocess()
  elif mode == "resume_mesh":
    out = check_resume_mesh()
  elif mode == "worker":
    out = worker(int(argv[1]), int(argv[2]), argv[3:])
  else:
    raise SystemExit(f"unknown mode {mode!r}; see the module docstring")
  out["seconds"] = round(time.perf_counter() - t0, 2)
  print(json.dumps(out))


if __name__ == "__main__":
  main(sys.argv[1:])
