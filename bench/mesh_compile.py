#!/usr/bin/env python
"""Sharded CDAT steps compiled for GPU and TPU meshes from a CPU host.

For each target (8 H100 in one host, 2 hosts x 4 H100, a TPU v5e 4x4 slice,
and 8 fake CPU devices for comparison) and each of its meshes (data
parallel, FSDP), compiles ahead of time (XLA deviceless AOT, see
``docs/accelerators.md``) one training step per variant
through :func:`cdat_fast.sharding.make_train_step`, and reads per device:

* the compiled memory (``memory_analysis()``: arguments, temporaries);
* the collectives by kind, with the bytes of their operands
  (:func:`cdat_fast.hlo.hlo_collectives`), each TPU async collective
  once (libtpu copies it into every fusion it overlaps with:
  :func:`cdat_fast.hlo.merge_async_copies`; ``async_copies`` counts the copies dropped,
  ``async_copy_sent`` what they would add);
* CDAT's collectives beyond the base step's, and its non-scalar ones beyond
  those of ``base+jvp²`` (the base step plus a bare jvp-of-jvp along its
  update: what the curvature cannot avoid communicating);
* for the sub-batch estimator, whether rows move: a collective-permute,
  all-to-all or all-gather whose operand is batch-shaped (a dimension equal
  to a row count of the batch or of the sub-batch, globally or per device,
  and to no parameter dimension);
* whether the fused layers ran as kernels (custom calls) or as HLO.

Variants: ``base`` (``optax.sgd``), ``base+jvp²``, ``cdat`` (exact),
``cdat_sub<m>`` (``estimators.subbatch(1/m)``), ``base+jvp²_sub<m>`` (the
bare jvp-of-jvp on every m-th row), ``…_pinned`` (the curvature's objective
constrained to data-parallel placement: batch split, parameters and ``u``
gathered), ``cdat_gn`` (Gauss–Newton) and ``base+gn`` (a bare Gauss–Newton
form along the update, its reference).

Usage::

  python bench/mesh_compile.py                      # every target, MLP
  python bench/mesh_compile.py --targets h100x8 --models nanolm  # ~15 min
  python bench/mesh_compile.py --markdown --json out.json   # ~6 minutes
  python bench/mesh_compile.py --from-json out.json --full   # tables again

Figures are compile-time (what XLA emits for the target), not measured on
the devices. A target whose plugin (jax-cuda12-plugin, libtpu) is missing is
reported and skipped. Whole GPU models need
``XLA_FLAGS=--xla_gpu_enable_triton_gemm=false`` (set here unless given).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

CPU_DEVICES = 8


def _set_flags():
  flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")]
  flags.append(f"--xla_force_host_platform_device_count={CPU_DEVICES}")
  if not any(f.startswith("--xla_gpu_enable_triton_gemm") for f in flags):
    flags.append("--xla_gpu_enable_triton_gemm=false")
  os.environ["XLA_FLAGS"] = " ".join(flags)
  os.environ.setdefault("JAX_PLATFORMS", "cpu")


if __name__ == "__main__":
  _set_flags()

# pylint: disable=g-import-not-at-top,wrong-import-position
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

import cdat_fast
from cdat_fast import compile_targets, hlo, sharding, treemath
from cdat_fast.curvature import directional_derivatives
from cdat_fast.estimators.subbatch import every_mth_row
from cdat_fast.harness.losses import get_loss
from cdat_fast.harness.models import get_model

KINDS = hlo.COLLECTIVES
SHORT = hlo.SHORT_NAMES
ROW_MOVERS = ("all-gather", "all-to-all", "collective-permute")
# Operands of at most this many elements count as scalars (XLA packs the
# tuner's scalar all-reduces into small vectors).
SCALARS = 16

# target -> (platform, topology, mesh specs: data parallel, FSDP)
TARGETS = {
    "cpu8": ("cpu", None, ("data=8", "data=4,fsdp=2")),
    "h100x8": ("cuda", "1x1x8", ("data=8", "data=4,fsdp=2")),
    "h100x2x4": ("cuda", "2x1x4", ("data=8", "data=2,fsdp=4")),
    "v5e4x4": ("tpu", "v5e:4x4", ("data=16", "data=4,fsdp=4")),
}
LABELS = {"cpu8": "8 fake CPU devices", "h100x8": "8×H100 (1 host)",
          "h100x2x4": "2 hosts × 4 H100", "v5e4x4": "TPU v5e 4x4"}


# ----------------------------------------------------------------------------
# Devices.


def target_devices(target: str) -> list:
  """The devices of ``target`` (a topology's, or the fake CPU devices)."""
  platform, topology, _ = TARGETS[target]
  if platform == "cpu":
    devices = jax.devices("cpu")
    if len(devices) < CPU_DEVICES:
      raise RuntimeError(
          f"{len(devices)} CPU devices; run as a script (it sets XLA_FLAGS="
          f"--xla_force_host_platform_device_count={CPU_DEVICES})")
    return devices[:CPU_DEVICES]
  if platform == "cuda":
    return compile_targets.gpu_devices("h100", topology)
  return compile_targets.tpu_devices(topology)


# ----------------------------------------------------------------------------
# Models and their objective.


class Problem:
  """A model, its loss, abstract parameters and batch on a mesh."""

  def __init__(self, name: str, fused: bool, batch: int):
    self.name, self.fused, self.batch = name, fused, batch
    if name == "mlp":
      self.model = get_model("mlp", 10, features=(512, 512), fused=fused)
      self.x = jax.ShapeDtypeStruct((batch, 256), jnp.float32)
      self.y = jax.ShapeDtypeStruct((batch,), jnp.int32)
    elif name == "nanolm":
      # The paper's NanoLM (6 blocks, width 256, 8 heads), T = 64.
      self.model = get_model("nanolm-paper", 65, fused=fused)
      seq = self.model.block_size
      self.x = jax.ShapeDtypeStruct((batch, seq), jnp.int32)
      self.y = jax.ShapeDtypeStruct((batch, seq), jnp.int32)
    else:
      raise ValueError(f"model {name!r}: mlp or nanolm")
    self.per_example = get_loss("cross_entropy")
    shapes = jax.eval_shape(
        lambda: self.model.init(jax.random.PRNGKey(0),
                                jnp.zeros(self.x.shape, self.x.dtype)))
    self.params = shapes["params"]
    self.param_dims = {d for x in jax.tree.leaves(self.params)
                       for d in x.shape}
    self.num_params = sum(int(np.prod(x.shape))
                          for x in jax.tree.leaves(self.params))

  def model_fn(self, params, batch):
    return self.model.apply({"params": params}, batch["x"])

  def output_loss(self, logits, batch):
    return self.per_example(logits, batch["y"])

  def loss_fn(self, params, batch):
    return self.output_loss(self.model_fn(params, batch), batch)

  def placed(self, mesh):
    """Abstract (params, batch) with their shardings on ``mesh``."""
    params = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(
            mesh, sharding.param_spec(x.shape, mesh))), self.params)
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype,
                                     sharding=sharding.batch_sharding(mesh, 1))
             for k, v in (("x", self.x), ("y", self.y))}
    return params, batch

  def row_counts(self, mesh, m: int) -> set[int]:
    """Row counts of the batch and the sub-batch over any group of devices:
    ``B/k`` and ``B/(m k)`` for every ``k`` dividing the batch shards."""
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    return {self.batch // (j * k) for k in range(1, shards + 1)
            if shards % k == 0 for j in (1, m)} - {0}

  def param_like(self, mesh) -> set[tuple[int, ...]]:
    """Shapes of the parameters' shards, any dims split by any divisor of
    the device count, in any order, size-1 dims dropped."""
    import itertools
    n = mesh.devices.size
    divisors = [k for k in range(1, n + 1) if n % k == 0]
    out = set()
    for x in jax.tree.leaves(self.params):
      for split in itertools.product(divisors, repeat=len(x.shape)):
        shard = tuple(d // k for d, k in zip(x.shape, split) if d % k == 0)
        if len(shard) == len(x.shape):
          shard = tuple(d for d in shard if d != 1)
          out.update(itertools.permutations(shard))
    return out


# ----------------------------------------------------------------------------
# Steps.


def _jvp2_body(loss_fn, value_fn, optimizer, m=None):
  """The base step plus a bare jvp-of-jvp along its update (rows ::m)."""
  def body(params, opt_state, batch):
    loss, grads = jax.value_and_grad(loss_fn)(params, batch)
    u, opt_state = optimizer.update(grads, opt_state, params)
    sub = batch if m is None else jax.tree.map(
        lambda v: every_mth_row(v, m), batch)
    _, slope, curv = directional_derivatives(
        lambda p: value_fn(p, sub), params, u)
    u = jax.tree.map(lambda x: x * (slope / curv), u)
    return optax.apply_updates(params, u), opt_state, loss
  return body


def pinned(loss_fn, mesh):
  """The curvature's objective placed as data parallelism places it.

  Its batch (a sub-batch, for the sub-batch estimator) constrained to the
  mesh's batch sharding and its parameters to replicated: the parameters
  and, through the jvp, the direction ``u`` are all-gathered (as the
  forward gathers the weights) and the rows stay on their devices, instead
  of the placement XLA's partitioner picks for a small sub-batch.
  """
  replicated = NamedSharding(mesh, P())

  def fn(params, batch):
    batch = jax.tree.map(lambda v: jax.lax.with_sharding_constraint(
        v, sharding.batch_sharding(mesh, np.ndim(v))), batch)
    params = jax.lax.with_sharding_constraint(params, replicated)
    return loss_fn(params, batch)
  return fn


def _body(loss_fn, value_fn, optimizer):
  """:class:`sharding.TrainStep`'s step with another curvature objective."""
  def body(params, opt_state, batch):
    loss, grads = jax.value_and_grad(loss_fn)(params, batch)
    updates, opt_state = optimizer.update(
        grads, opt_state, params, value_fn=value_fn, batch=batch, value=loss)
    return optax.apply_updates(params, updates), opt_state, loss
  return body


def _gn_body(problem, optimizer):
  """The base step plus a bare Gauss–Newton form ``(Ju)ᵀ∇²ℓ (Ju)`` along
  its update: a first-order jvp of the model, the loss's Hessian on the
  outputs."""
  def body(params, opt_state, batch):
    loss, grads = jax.value_and_grad(problem.loss_fn)(params, batch)
    u, opt_state = optimizer.update(grads, opt_state, params)
    out, ju = jax.jvp(lambda p: problem.model_fn(p, batch), (params,), (u,))
    _, hju = jax.jvp(jax.grad(lambda o: problem.output_loss(o, batch)),
                     (out,), (ju,))
    slope = treemath.vdot(grads, u)
    curv = jnp.vdot(ju, hju)
    u = jax.tree.map(lambda x: x * (slope / curv), u)
    return optax.apply_updates(params, u), opt_state, loss
  return body


def make_step(problem, variant: str, mesh, m: int):
  sgd = optax.sgd(1.0)
  kwargs = {}
  pin = variant.endswith("_pinned")
  variant = variant.removesuffix("_pinned")
  loss_fn = problem.loss_fn
  value_fn = pinned(loss_fn, mesh) if pin else loss_fn
  if variant in ("base", "base+jvp²", f"base+jvp²_sub{m}", "base+gn"):
    opt = sgd
  elif variant == "cdat":
    opt = cdat_fast.cdat(sgd)
  elif variant == f"cdat_sub{m}":
    opt = cdat_fast.cdat(sgd, curvature=cdat_fast.estimators.subbatch(1 / m))
  elif variant == "cdat_gn":
    opt = cdat_fast.cdat(sgd, curvature="gauss_newton")
    kwargs = dict(model_fn=problem.model_fn, output_loss=problem.output_loss)
  else:
    raise ValueError(variant)
  opt, body = optax.with_extra_args_support(opt), None
  if variant == "base+jvp²":
    body = _jvp2_body(loss_fn, value_fn, opt)
  elif variant.startswith("base+jvp²_sub"):
    body = _jvp2_body(loss_fn, value_fn, opt, m)
  elif variant == "base+gn":
    body = _gn_body(problem, opt)
  elif pin:
    body = _body(loss_fn, value_fn, opt)
  return sharding.make_train_step(loss_fn, opt, mesh, body=body, **kwargs)


merge_async_copies = hlo.merge_async_copies


def compile_step(problem, variant, mesh, m) -> dict:
  """Compiles one step; its memory, collectives and custom calls."""
  t0 = time.perf_counter()
  step = make_step(problem, variant, mesh, m)
  params, batch = problem.placed(mesh)
  abstract = jax.eval_shape(step.optimizer.init, params)
  shardings = sharding.state_shardings(abstract, params, mesh)
  opt_state = jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
      abstract, shardings)
  options = {}
  if mesh.devices.flat[0].platform in ("gpu", "cuda"):
    # Without a device XLA's Triton gemm autotiler fails on some shapes.
    options["xla_gpu_enable_triton_gemm"] = False
  compiled = step.lower(params, opt_state, batch).compile(
      compiler_options=options)
  text = compiled.as_text()
  mem = compiled.memory_analysis()
  merged, copies = merge_async_copies(text)
  stats = hlo.hlo_collectives(merged, merge_async=False)
  raw = hlo.hlo_collectives(text, merge_async=False) if copies else stats
  return {
      "seconds": round(time.perf_counter() - t0, 1),
      "argument_bytes": int(mem.argument_size_in_bytes),
      "output_bytes": int(mem.output_size_in_bytes),
      "temp_bytes": int(mem.temp_size_in_bytes),
      "count": stats["count"], "bytes": stats["bytes"],
      "total_bytes": stats["total_bytes"],
      "sent_bytes": sum(stats["wire_bytes"].values()),
      # Lines of TPU async collectives beyond the first of each chain, and
      # what counting them too would add (the figures before they merged).
      "async_copies": copies,
      "async_copy_bytes": raw["total_bytes"] - stats["total_bytes"],
      "async_copy_sent": (sum(raw["wire_bytes"].values())
                          - sum(stats["wire_bytes"].values())),
      "unknown_groups": sum(op["wire_bytes"] is None for op in stats["ops"]),
      "non_scalar": stats["non_scalar"],
      "host_transfers": stats["host_transfers"],
      "custom_calls": hlo.custom_calls(text),
  }


def _elements(shape: str) -> int:
  dims = [int(d) for d in shape.split("[")[1].rstrip("]").split(",") if d]
  return int(np.prod(dims)) if dims else 1


def nonscalar_extra(a: dict, ref: dict) -> list:
  """Collective operands of ``a`` not in ``ref`` (a multiset), over
  ``SCALARS`` elements: XLA's GPU and TPU combiners pack a few scalar
  all-reduces into one small vector (``f32[2]``, ``pred[2]``)."""
  left = list(map(tuple, ref["non_scalar"]))
  extra = []
  for item in map(tuple, a["non_scalar"]):
    if item in left:
      left.remove(item)
    elif _elements(item[1]) > SCALARS:
      extra.append(list(item))
  return extra


def batch_shaped(r: dict, rows: set[int], params: set, kinds) -> list:
  """Collectives of ``kinds`` whose operand is batch-shaped: its leading dim
  a row count of the batch or the sub-batch (over some group of devices),
  its shape no parameter shard's (XLA packs the parameters' collectives into
  flat vectors: those have one dim and count as parameters)."""
  out = []
  for kind, shape in r["non_scalar"]:
    dims = [int(d) for d in shape.split("[")[1].rstrip("]").split(",") if d]
    squeezed = tuple(d for d in dims if d != 1)
    if (kind in kinds and len(squeezed) >= 2 and dims[0] in rows
        and squeezed not in params):
      out.append([kind, shape])
  return out


def kernel_calls(calls: dict) -> int:
  """Custom calls that are Pallas kernels (Triton, Mosaic GPU or TPU), of
  ``{target: count}`` (``cdat_fast.hlo.custom_calls``)."""
  keys = hlo.KERNEL_TARGETS.values()
  return sum(n for t, n in calls.items() if any(k in t.lower() for k in keys))


# ----------------------------------------------------------------------------
# The run.


def reference_of(variant: str, m: int) -> str:
  """What a variant's collectives are compared with beyond the base step."""
  pin = "_pinned" if variant.endswith("_pinned") else ""
  if variant.startswith(("cdat_sub", "base+jvp²_sub")):
    return f"base+jvp²_sub{m}{pin}"
  if variant == "cdat_gn":
    return "base+gn"
  return "base+jvp²"


def run_mesh(problem, mesh, m, variants) -> dict:
  out = {}
  for variant in variants:
    try:
      out[variant] = compile_step(problem, variant, mesh, m)
    except Exception as e:  # pylint: disable=broad-except
      out[variant] = {"error": f"{type(e).__name__}: "
                               f"{str(e).strip().splitlines()[0][:400]}",
                      "traceback": traceback.format_exc(limit=6)}
  base = out.get("base")
  rows, params = problem.row_counts(mesh, m), problem.param_like(mesh)
  for variant, r in out.items():
    if "error" in r:
      continue
    r["moved_rows"] = batch_shaped(r, rows, params, ROW_MOVERS)
    r["activation_reductions"] = batch_shaped(
        r, rows, params, ("all-reduce", "reduce-scatter"))
    r["kernels"] = kernel_calls(r["custom_calls"])
    if not base or "error" in base:
      continue
    r["extra_bytes"] = r["total_bytes"] - base["total_bytes"]
    r["extra_sent"] = r["sent_bytes"] - base["sent_bytes"]
    reference = out.get(reference_of(variant, m))
    if variant.startswith("cdat") and reference and "error" not in reference:
      r["reference"] = reference_of(variant, m)
      r["extra_nonscalar"] = nonscalar_extra(r, reference)
      r["beyond_reference_bytes"] = r["total_bytes"] - reference["total_bytes"]
  return out


def _mib(n: int) -> str:
  return f"{n / 2**20:.2f}"


def _n(items) -> str:
  return str(len(items)) if items else "none"


def table(results: dict, label) -> str:
  """Markdown: one row per (mesh, variant) of one target and model."""
  head = ("| mesh | step | temp MiB | args MiB | operand bytes | sent bytes | "
          + " | ".join(f"{SHORT[k]} n / bytes" for k in KINDS)
          + " | sent over base | non-scalar beyond jvp² | rows moved |"
          " activations reduced | kernels |")
  lines = [f"**{label}**", "", head, "|" + "---|" * (11 + len(KINDS))]
  for spec, steps in results.items():
    for variant, r in steps.items():
      if "error" in r:
        lines.append(f"| {spec} | {variant} | not compiled: {r['error']} |")
        continue
      cells = [f"{r['count'][k]} / {r['bytes'][k]:,}" for k in KINDS]
      extra = r.get("extra_nonscalar")
      lines.append(
          f"| {spec} | {variant} | {_mib(r['temp_bytes'])} |"
          f" {_mib(r['argument_bytes'])} | {r['total_bytes']:,} |"
          f" {r['sent_bytes']:,} | " + " | ".join(cells) + " |"
          f" {r.get('extra_sent', 0):+,} |"
          f" {'—' if extra is None else _n(extra)} |"
          f" {_n(r['moved_rows'])} | {_n(r['activation_reductions'])} |"
          f" {r['kernels']} |")
  return "\n".join(lines)


def _kinds(r: dict) -> str:
  """``AR 2·0.80M, AG 1·0.80M``: count and operand MB per kind present."""
  return ", ".join(f"{SHORT[k]} {r['count'][k]}·{r['bytes'][k] / 1e6:.2f}M"
                   for k in KINDS if r["count"][k])


def _moves(r: dict) -> str:
  if "error" in r:
    return "—"
  items = sorted({f"{SHORT[k]} {shape}" for k, shape in r["moved_rows"]})
  return "none" if not items else "; ".join(items)


def compact_table(results: dict, m: int) -> str:
  """Markdown: one row per (target, model, mesh), CDAT against its base."""
  head = ("| target | model | mesh | base: temp MiB, sent, collectives |"
          " CDAT: temp MiB, sent, collectives | jvp² sends (of base) |"
          " CDAT beyond jvp² | rows moved by CDAT |"
          f" sub/{m}: sent over base | sub/{m}: rows moved |"
          " GN: sent over base |")
  lines = [head, "|" + "---|" * 10]
  for (target, model), meshes in results.items():
    for spec, steps in meshes.items():
      base, ref, cdat = (steps.get(v, {}) for v in ("base", "base+jvp²",
                                                    "cdat"))
      if not base or "error" in base:
        continue
      cell = lambda r: (f"{_mib(r['temp_bytes'])}, {r['sent_bytes']:,},"
                        f" {_kinds(r)}")
      if "error" in cdat or "error" in ref:
        err = (cdat.get("error") or ref.get("error"))[:120]
        lines.append(f"| {LABELS[target]} | {model} | {spec} | {cell(base)} |"
                     f" not compiled: {err} | | | | | | |")
        continue
      own = ref["sent_bytes"] - base["sent_bytes"]
      beyond = (f"{cdat['beyond_reference_bytes']:+,} B,"
                f" {_n(cdat['extra_nonscalar'])} non-scalar")
      sub = steps.get(f"cdat_sub{m}", {"error": 1})
      gn = steps.get("cdat_gn", {"error": 1})
      lines.append(
          f"| {LABELS[target]} | {model} | {spec} | {cell(base)} |"
          f" {cell(cdat)} | {own:+,} ({own / base['sent_bytes']:+.0%}) |"
          f" {beyond} | {_moves(cdat)} |"
          f" {'—' if 'error' in sub else format(sub['extra_sent'], '+,')} |"
          f" {_moves(sub)} |"
          f" {'—' if 'error' in gn else format(gn['extra_sent'], '+,')} |")
  return "\n".join(lines)


def summary_lines(results: dict, m: int) -> list[str]:
  """The jvp-of-jvp's own collectives against the base step's, per mesh."""
  out = []
  for (target, model), meshes in results.items():
    for spec, steps in meshes.items():
      base, ref = steps.get("base", {}), steps.get("base+jvp²", {})
      cdat = steps.get("cdat", {})
      if any("error" in s or not s for s in (base, ref, cdat)):
        continue
      own = ref["sent_bytes"] - base["sent_bytes"]
      line = (f"{LABELS[target]}, {model}, {spec}: base step sends"
              f" {base['sent_bytes']:,} bytes per device; the jvp² adds"
              f" {own:+,} ({own / max(base['sent_bytes'], 1):+.0%}); CDAT"
              f" beyond it {cdat['beyond_reference_bytes']:+,} operand bytes,"
              f" non-scalar extras {_n(cdat['extra_nonscalar'])}; temp"
              f" {_mib(cdat['temp_bytes'])} MiB vs {_mib(base['temp_bytes'])}")
      for variant in (f"cdat_sub{m}", f"cdat_sub{m}_pinned", "cdat_gn"):
        r = steps.get(variant)
        if r and "error" not in r:
          line += (f"; {variant} {r['extra_sent']:+,} sent, rows moved"
                   f" {_n(r['moved_rows'])}, activations reduced"
                   f" {_n(r['activation_reductions'])}")
      out.append(line)
  return out


def _parse_args(argv):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--targets", default=",".join(TARGETS))
  p.add_argument("--models", default="mlp",
                 help="mlp and/or nanolm (the paper's NanoLM, T=64)")
  p.add_argument("--fused", choices=("yes", "no", "both"), default="both",
                 help="the models' fused layers (cdat_fast.nn); the cpu8"
                 " target always runs the plain layers")
  p.add_argument("--batch", type=int, default=1536, help="MLP global batch")
  p.add_argument("--seqs", type=int, default=64,
                 help="NanoLM global batch (sequences of 64 tokens)")
  p.add_argument("--subbatch", type=int, default=8, help="m of subbatch(1/m)")
  p.add_argument("--variants", default=None,
                 help="comma-separated subset of the variants")
  p.add_argument("--json", default=None, help="write the results here")
  p.add_argument("--markdown", action="store_true",
                 help="one table row per target, model and mesh")
  p.add_argument("--full", action="store_true",
                 help="a table per target and model, a row per step")
  p.add_argument("--from-json", default=None,
                 help="print the tables of an earlier --json run")
  return p.parse_args(argv)


def main(argv=None) -> int:
  args = _parse_args(sys.argv[1:] if argv is None else argv)
  m = args.subbatch
  variants = ["base", "base+jvp²", "cdat", f"base+jvp²_sub{m}",
              f"cdat_sub{m}", f"base+jvp²_sub{m}_pinned",
              f"cdat_sub{m}_pinned", "base+gn", "cdat_gn"]
  if args.variants:
    variants = [v for v in variants if v in args.variants.split(",")]
  if args.from_json:
    with open(args.from_json) as f:
      results = {tuple(k.split("|")): v for k, v in json.load(f).items()}
    results = {k: v for k, v in results.items() if k[1] != "-"}
    print(compact_table(results, m) + "\n")
    if args.full:
      for (target, model), meshes in results.items():
        print(table(meshes, f"{LABELS[target]}, {model}") + "\n")
    return 0
  fused_list = {"yes": [True], "no": [False], "both": [False, True]}[args.fused]
  results, problems = {}, {}
  t_start = time.perf_counter()
  print(f"jax {jax.__version__}, optax {optax.__version__}; XLA_FLAGS="
        f"{os.environ.get('XLA_FLAGS', '')}", flush=True)
  for target in args.targets.split(","):
    try:
      devices = target_devices(target)
    except Exception as e:  # pylint: disable=broad-except
      line = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300]}"
      print(f"{target}: no devices ({line})", flush=True)
      results[(target, "-")] = {"-": {"-": {"error": f"no devices: {line}"}}}
      continue
    for model in args.models.split(","):
      for fused in ([False] if target == "cpu8" else fused_list):
        name = f"{model}{' fused' if fused else ''}"
        batch = args.batch if model == "mlp" else args.seqs
        key = (model, fused, batch)
        if key not in problems:
          problems[key] = Problem(model, fused, batch)
        problem = problems[key]
        results[(target, name)] = {}
        for spec in TARGETS[target][2]:
          t0 = time.perf_counter()
          mesh = sharding.make_mesh(spec, devices=devices)
          steps = run_mesh(problem, mesh, m, variants)
          results[(target, name)][spec] = steps
          errs = [v for v, r in steps.items() if "error" in r]
          print(f"{target} {name} {spec}: {time.perf_counter() - t0:.0f}s"
                + (f"; failed: {errs}" if errs else ""), flush=True)
          for v in errs:
            print(f"  {v}: {steps[v]['error']}", flush=True)
  print()
  if args.markdown:
    print(compact_table(results, m))
    print()
  if args.full:
    for (target, model), meshes in results.items():
      print(table(meshes, f"{LABELS[target]}, {model}"))
      print()
  for line in summary_lines(results, m):
    print(line)
  print(f"\ntotal {time.perf_counter() - t_start:.0f}s")
  if args.json:
    with open(args.json, "w") as f:
      json.dump({f"{t}|{mo}": v for (t, mo), v in results.items()}, f,
                indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
