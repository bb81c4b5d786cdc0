"""How a kernel call is partitioned under a device mesh: rows split, the rest whole.

Every fused kernel is a function of rows: :func:`~.dense_jet`,
:func:`~.layer_norm_jet` and :func:`~.activation_jet` map each row
(token) of their row operands ``x, ẋ, ẍ`` of shape ``(*rows, features)`` to
the same row of ``(y, ẏ, ÿ)``; :func:`~.attention_jet` maps each
``(batch, head)`` slice of ``q, k, v`` and their tangents, of shape
``(*rows, T, D)``, to the same slice. The weights (``W``, ``Ẇ``, biases,
LayerNorm's scale and bias) enter every row whole. So, for a mesh axis set
``A`` that splits the row dimensions into blocks :math:`R_1, \\dots, R_n`,

.. math::

  \\operatorname{kernel}(x, W)[R_i] = \\operatorname{kernel}(x[R_i], W)

and each device can run the kernel on its own rows with the whole weights.
That is the rule given to XLA for every kernel call (``rows`` below): the
row dimensions are *passthrough* (the results' rows are sharded as the row
operands' are, and nothing moves); every other dimension, the features,
contraction, sequence and head dimensions, and every dimension of the
weights, *needs replication* (a weight sharded over FSDP's ``fsdp`` axis is
all-gathered to the kernel; the rows stay where they are). The activation
jet is elementwise and declares every dimension a row dimension. No kernel
reduces over rows (there are no backward kernels: reverse mode goes through
the plain formulas, see :mod:`cdat_fast.nn`), so no rule needs a ``psum``.

Mechanism, per platform (:data:`MECHANISM`), applied when the kernel
equation is lowered for more than one device (``kernels/lowering.py`` calls
:func:`lower`); on one device, or inside a ``shard_map`` that is manual over
every axis, the kernel is lowered as before. The jaxpr and ``vmap`` are the
same either way.

* GPU (and CPU): ``jax.experimental.custom_partitioning``. The rule is given
  as a Shardy ``SdyShardingRule`` (JAX's default partitioner: row factors
  passthrough, all others ``need_replication``) and as GSPMD callbacks
  (``infer_sharding_from_operands``, ``propagate_user_sharding``) where
  Shardy is off; XLA's SPMD partitioner then calls :func:`_partition`, which
  takes the row axes from the row operands' shardings as propagated, fixes
  the operand and result shardings above, and lowers the kernel for the
  per-device shapes (the Triton version on GPU). It follows whatever axes
  the rows are split over and needs no mesh in context (``TrainStep`` and
  ``bench/mesh_compile.py`` pass shardings, not a context mesh).
* TPU: a ``shard_map`` over the program's mesh (the mesh of its
  ``NamedSharding`` objects, on its devices), the first row dimension split
  over the axes of :data:`BATCH_AXES` present (``data``, ``fsdp``: the axes
  ``cdat_fast.sharding`` splits batches over; fewer where they do not
  divide it, none: replicated), every other dimension replicated. libtpu
  does not call back into Python for custom_partitioning (compiled for a
  v5e topology: "Custom emitter for CustomSPMDPartitioning not found", as
  on TPU devices, jax-ml/jax#38196), and Mosaic refuses to be partitioned
  automatically; inside the ``shard_map`` every axis is manual and the
  Mosaic kernel runs on each device's rows. Rows split over other axes than
  those are resharded to them at the kernel.
"""
from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple, Sequence

import jax
from jax.experimental.custom_partitioning import custom_partitioning
from jax.interpreters import mlir
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import numpy as np

try:  # The rule's Shardy form (jax >= 0.5).
  from jax.experimental.custom_partitioning import SdyShardingRule
except ImportError:  # pragma: no cover - depends on the jax version.
  SdyShardingRule = None

__all__ = ["BATCH_AXES", "MECHANISM", "RowSpec", "batch_axes", "lower",
           "partitioned_context", "row_spec"]

# The mesh axes that split a batch's rows: cdat_fast.sharding's convention
# (its BATCH_AXES; the shard_map rule splits rows over those present).
BATCH_AXES = ("data", "fsdp")
# How each platform's kernel calls are partitioned: custom_partitioning
# (rows as the operands have them) where the compiler calls back into
# Python for it; a shard_map over BATCH_AXES on TPU, where it does not
# (jax-ml/jax#38196: "Custom emitter for CustomSPMDPartitioning not found").
MECHANISM = {"cpu": "custom_partitioning", "cuda": "custom_partitioning",
             "rocm": "custom_partitioning", "tpu": "shard_map"}


class RowSpec(NamedTuple):
  """Which dimensions of a kernel call are rows (hashable, a parameter).

  Attributes:
    batch_ndim: how many leading dimensions of every row operand and of
      every result are rows; they have the same sizes in all of them.
    rows: per flat operand, whether it is a row operand (else a weight,
      replicated whole).
  """
  batch_ndim: int
  rows: tuple[bool, ...]


def row_spec(leaves: Sequence[Any], rows: Sequence[bool], batch_ndim: int,
             out_avals: Sequence[Any]) -> RowSpec | None:
  """A :class:`RowSpec`, or None where the shapes do not fit one.

  None (no partitioning rule; XLA decides, as before) when no operand is a
  row operand, ``batch_ndim`` is 0, or the row operands and the results do
  not share their first ``batch_ndim`` dimensions.
  """
  rows = tuple(bool(r) for r in rows)
  if batch_ndim <= 0 or not any(rows) or len(rows) != len(leaves):
    return None
  shapes = [tuple(a.shape) for a, r in zip(leaves, rows) if r]
  shapes += [tuple(a.shape) for a in out_avals]
  lead = shapes[0][:batch_ndim]
  if any(len(s) < batch_ndim or s[:batch_ndim] != lead for s in shapes):
    return None
  return RowSpec(int(batch_ndim), rows)


def partitioned_context(ctx: mlir.LoweringRuleContext) -> bool:
  """Whether ``ctx`` lowers for several devices under automatic partitioning.

  True for a ``jit`` over more than one device (XLA partitions the program);
  False on one device, inside ``shard_map`` (manual axes: the kernel is
  already per device there; or partly manual, where the rule is not used),
  and where no ``NamedSharding`` gives the program a mesh.
  """
  axis_context = ctx.module_context.axis_context
  num_devices = getattr(axis_context, "num_devices", None)
  devices = getattr(axis_context, "device_assignment", None)
  mesh = getattr(axis_context, "abstract_mesh", None)
  if num_devices is None or devices is None or mesh is None:
    return False  # shard_map's contexts, or no mesh in the program.
  return num_devices > 1 and len(devices) > 1 and not mesh.empty


def _concrete_mesh(ctx) -> Mesh:
  """The program's mesh over its devices (``ctx`` as
  :func:`partitioned_context` accepts it)."""
  axis_context = ctx.module_context.axis_context
  am = axis_context.abstract_mesh
  devices = np.asarray(axis_context.device_assignment, dtype=object)
  return Mesh(devices.reshape(am.axis_sizes), am.axis_names,
              axis_types=am.axis_types)


def batch_axes(mesh, rows: int) -> tuple[str, ...]:
  """The mesh axes of :data:`BATCH_AXES` that split ``rows`` rows evenly:
  those of size > 1, dropped from the last while their product does not
  divide ``rows``."""
  axes = [a for a in BATCH_AXES if a in mesh.shape and mesh.shape[a] > 1]
  while axes and rows % math.prod(mesh.shape[a] for a in axes):
    axes.pop()
  return tuple(axes)


def _lower_shard_map(ctx, args, spec: RowSpec, call_local):
  """The rule as a ``shard_map``: the first row dimension over
  :func:`batch_axes`, everything else replicated."""
  mesh = _concrete_mesh(ctx)
  in_avals, out_avals = ctx.avals_in, ctx.avals_out
  first = next(a for a, r in zip(in_avals, spec.rows) if r)
  axes = batch_axes(mesh, first.shape[0])
  lead = (axes or None,) + (None,) * (spec.batch_ndim - 1)

  def pspec(aval, is_rows):
    pad = (None,) * (len(aval.shape) - spec.batch_ndim)
    return P(*lead, *pad) if is_rows else P()

  mapped = jax.shard_map(
      lambda *a: list(call_local(*a)), mesh=mesh,
      in_specs=tuple(pspec(a, r) for a, r in zip(in_avals, spec.rows)),
      out_specs=[pspec(a, True) for a in out_avals], check_vma=False)
  return mlir.lower_fun(mapped, multiple_results=True)(ctx, *args)


def _factors(spec: RowSpec, in_avals, out_avals):
  """Shardy factor names per operand and result, and the replicated ones."""
  lead = tuple(f"r{i}" for i in range(spec.batch_ndim))
  replicated = []

  def mapping(aval, is_rows, tag):
    start = spec.batch_ndim if is_rows else 0
    own = tuple(f"{tag}d{d}" for d in range(start, len(aval.shape)))
    replicated.extend(own)
    return (lead if is_rows else ()) + own

  ins = tuple(mapping(a, r, f"i{n}")
              for n, (a, r) in enumerate(zip(in_avals, spec.rows)))
  outs = tuple(mapping(a, True, f"o{n}") for n, a in enumerate(out_avals))
  return ins, outs, tuple(replicated)


def _sdy_rule(spec: RowSpec, in_avals, out_avals):
  if SdyShardingRule is None:  # pragma: no cover - depends on the jax version.
    return None
  ins, outs, replicated = _factors(spec, in_avals, out_avals)
  return SdyShardingRule(ins, outs, need_replication_factors=replicated)


def _row_axes(spec: RowSpec, shardings) -> tuple:
  """The mesh axes of the row dimensions: those of the first row operand
  whose sharding names them (None entries: not split)."""
  for sharding, is_rows in zip(shardings, spec.rows):
    if is_rows and isinstance(sharding, NamedSharding):
      axes = tuple(sharding.spec) + (None,) * spec.batch_ndim
      return axes[:spec.batch_ndim]
  return (None,) * spec.batch_ndim


def _placement(spec: RowSpec, mesh, axes, in_avals, out_avals):
  """The operand and result shardings of the rule, for row axes ``axes``."""
  def sharding(aval, is_rows):
    pad = (None,) * (len(aval.shape) - spec.batch_ndim)
    return NamedSharding(mesh, P(*axes, *pad) if is_rows else P())

  return ([sharding(a, r) for a, r in zip(in_avals, spec.rows)],
          [sharding(a, True) for a in out_avals])


def _partition(spec, in_avals, out_avals, call_local, mesh, arg_shapes,
               result_shape):
  """custom_partitioning's ``partition``: rows as the operands have them."""
  del result_shape
  axes = _row_axes(spec, [a.sharding for a in arg_shapes])
  ins, outs = _placement(spec, mesh, axes, in_avals, out_avals)
  return mesh, call_local, list(outs), tuple(ins)


def _infer(spec, in_avals, out_avals, mesh, arg_shapes, result_shape):
  """GSPMD's ``infer_sharding_from_operands``: results' rows as the rows'."""
  del result_shape
  axes = _row_axes(spec, [a.sharding for a in arg_shapes])
  return _placement(spec, mesh, axes, in_avals, out_avals)[1]


def _propagate(spec, in_avals, out_avals, mesh, user_shape):
  """GSPMD's ``propagate_user_sharding``: rows as the user's first result."""
  first = jax.tree.leaves(user_shape)[0].sharding
  axes = _row_axes(RowSpec(spec.batch_ndim, (True,)), [first])
  return _placement(spec, mesh, axes, in_avals, out_avals)[1]


def lower(ctx: mlir.LoweringRuleContext, args: Sequence[Any], spec: RowSpec,
          call: Callable[..., list], call_local: Callable[..., list],
          platform: str):
  """Lowers ``call(*args)`` with the row rule of ``spec``.

  Args:
    ctx: the kernel equation's lowering context (several devices).
    args: its MLIR operands.
    spec: the rows of the operands (:func:`row_spec`).
    call: the kernel on the global shapes, as a list (what XLA keeps if it
      does not partition, e.g. on one device).
    call_local: the kernel built for the per-device shapes it is called with
      (bound without a rule, so it lowers as a plain kernel call).
    platform: the platform lowered for; :data:`MECHANISM` says how.
  """
  if MECHANISM.get(platform, "custom_partitioning") == "shard_map":
    return _lower_shard_map(ctx, args, spec, call_local)
  in_avals, out_avals = ctx.avals_in, ctx.avals_out
  op = custom_partitioning(call)
  op.def_partition(
      partition=lambda *a: _partition(spec, in_avals, out_avals, call_local,
                                      *a),
      infer_sharding_from_operands=lambda *a: _infer(spec, in_avals,
                                                     out_avals, *a),
      propagate_user_sharding=lambda *a: _propagate(spec, in_avals,
                                                    out_avals, *a),
      sharding_rule=_sdy_rule(spec, in_avals, out_avals))
  return mlir.lower_fun(lambda *a: list(op(*a)), multiple_results=True)(
      ctx, *args)

