"""How the Pallas kernels are lowered: chosen per platform, at lowering time.

A kernel is built for a :class:`Target`: the tiles and kernel body it suits
(``"triton"``: power-of-two tiles, the contraction looped inside the kernel;
``"tpu"``: Mosaic TPU's ``(8, 128)``-divisible blocks, the contraction as a
sequential grid axis) and whether Pallas' interpreter runs it. With
``interpret=None`` (the default) :func:`per_platform` stages the call out as
one equation with a lowering rule per platform (``mlir.register_lowering``'s
``platform=``, what ``jax.lax.platform_dependent`` also rests on), which
builds the version of the platform being lowered for: the interpreter (with
the Triton tiles, so CPU results are those of earlier versions) on CPU,
Triton on CUDA and ROCm, Mosaic TPU on TPU. The equation's ``jaxpr``
parameter is the CPU version, so a jaxpr shows one ``pallas_call`` per
kernel call. So ``jax.jit(f).lower(...)`` for an H100 or a TPU
topology from a CPU host, or ``jax.export`` for ``platforms=["cuda"]``, gets
the real kernels; deciding from ``jax.default_backend()`` would give it the
host's choice.

The ``interpret=`` argument of every kernel overrides the choice: ``True``
runs the interpreter on every platform, ``False`` compiles on every
platform (on CPU that fails in Pallas: "Only interpret mode is supported"),
and a ``jax.experimental.pallas.tpu.InterpretParams`` runs the TPU version
under Pallas' TPU interpreter (how the tests check the TPU tiles on CPU).

Since JAX 0.10 the GPU lowering of ``pallas_call`` without compiler
parameters is Mosaic GPU (``jax_pallas_use_mosaic_gpu``), a different
programming model (warpgroup matmuls, explicit memory spaces) that these
block kernels are not written for; the Triton compiler parameters select
the Triton lowering. JAX 0.11 deprecates the Pallas Triton backend: each
lowering warns (``DeprecationWarning``, id ``jax-pallas-triton``; an error
only where that deprecation is accelerated). Until it is removed the kernels
keep this path; the way forward is a Mosaic GPU port (``plgpu.kernel``) or
the official Triton bindings through jax-triton (the optional ``gpu``
extra).

The Mosaic GPU versions of ``dense_jet`` and ``activation_jet``
(:mod:`.mosaic_gpu`) are built for CUDA when asked for: the kernels'
``gpu_backend="mosaic_gpu"``, or ``CDAT_FAST_GPU_BACKEND=mosaic_gpu`` in the
environment when a call is traced (:func:`gpu_backend`); the default stays
Triton while it compiles.
"""
from __future__ import annotations

import os
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.extend
from jax.interpreters import batching
from jax.interpreters import mlir

from . import partitioning

try:
  from jax.experimental.pallas import triton as pltriton
except ImportError:  # pragma: no cover - depends on the jaxlib build.
  pltriton = None

try:
  from jax.experimental.pallas import tpu as pltpu
except ImportError:  # pragma: no cover - depends on the jax build.
  pltpu = None

TRITON = "triton"
TPU = "tpu"
MOSAIC_GPU = "mosaic_gpu"
GPU_BACKENDS = (TRITON, MOSAIC_GPU)
GPU_BACKEND_ENV = "CDAT_FAST_GPU_BACKEND"


def gpu_backend(choice: str | None = None) -> str:
  """The CUDA version to build: ``choice``, else ``$CDAT_FAST_GPU_BACKEND``,
  else ``"triton"`` (or ``"mosaic_gpu"`` where Pallas has no Triton)."""
  if choice is None:
    choice = os.environ.get(GPU_BACKEND_ENV) or (
        TRITON if pltriton is not None else MOSAIC_GPU)
  if choice not in GPU_BACKENDS:
    raise ValueError(f"gpu_backend must be one of {GPU_BACKENDS}, got "
                     f"{choice!r}")
  return choice


class Target(NamedTuple):
  """What one version of a kernel is built for.

  Attributes:
    kind: ``"triton"``, ``"tpu"`` or ``"mosaic_gpu"``: the tiles and kernel
      body.
    interpret: False to compile; True or a Pallas ``InterpretParams`` to run
      Pallas' interpreter (passed as ``pallas_call``'s ``interpret=``).
  """
  kind: str
  interpret: Any


def next_power_of_2(n: int) -> int:
  return 1 << max(0, (int(n) - 1).bit_length())


def round_up(n: int, m: int) -> int:
  return -(-int(n) // m) * m


def check_interpret(interpret: Any) -> Any:
  """``interpret=`` as a static argument: None, a bool or InterpretParams."""
  if interpret is None or isinstance(interpret, bool):
    return interpret
  if pltpu is not None and isinstance(interpret, pltpu.InterpretParams):
    return interpret
  if interpret in (0, 1):
    return bool(interpret)
  raise ValueError("interpret must be None, a bool or a "
                   f"pallas.tpu.InterpretParams, got {interpret!r}")


class _Versions:
  """A kernel's versions: ``make(platform)`` is its function of the flat
  operands there. A primitive parameter (hashable by identity) that jaxpr
  walkers do not descend into; its repr is the kernel's name."""

  def __init__(self, name: str, make: Callable[[str], Callable[..., Any]]):
    self.name = name
    self.make = make

  def __repr__(self) -> str:
    return self.name


# One equation per kernel call whose lowering is chosen per platform: the
# parameter ``jaxpr`` is the CPU version (what jaxpr walkers and abstract
# evaluation see), ``versions`` builds the others when they are lowered, and
# ``rows`` (a partitioning.RowSpec or None) says which dimensions are rows,
# the rule of the call under a device mesh (kernels/partitioning.py).
_kernel_p = jax.extend.core.Primitive("per_platform_kernel")
_kernel_p.multiple_results = True
try:  # The rule's custom_partitioning needs the devices while lowering.
  from jax._src import dispatch as _dispatch  # pylint: disable=g-import-not-at-top
  _dispatch.prim_requires_devices_during_lowering.add(_kernel_p)
except (ImportError, AttributeError):  # pragma: no cover - jax internals.
  pass


@_kernel_p.def_abstract_eval
def _kernel_abstract_eval(*avals, jaxpr, versions, rows):
  del avals, versions, rows
  return jaxpr.out_avals


@_kernel_p.def_impl
def _kernel_impl(*args, jaxpr, versions, rows):
  # Outside jit (jax.disable_jit()): the version of the default backend.
  del rows
  platform = jax.default_backend()
  if platform == "cpu":
    return jax.extend.core.jaxpr_as_fun(jaxpr)(*args)
  return versions.make("cuda" if platform == "gpu" else platform)(*args)


def _kernel_lowering(platform: str):
  def rule(ctx, *args, jaxpr, versions, rows):
    fn = (jax.extend.core.jaxpr_as_fun(jaxpr) if platform == "cpu"
          else versions.make(platform))
    if rows is None or not partitioning.partitioned_context(ctx):
      return mlir.lower_fun(fn, multiple_results=True)(ctx, *args)

    def call(*flat):  # The whole call, should XLA not partition it.
      return list(_kernel_p.bind(*flat, jaxpr=jaxpr, versions=versions,
                                 rows=None))

    def call_local(*flat):  # One device's rows, with a plain kernel call.
      return list(_bind(versions, flat))

    return partitioning.lower(ctx, args, rows, call, call_local, platform)
  return rule


for _platform in ("cpu", "cuda", "rocm", "tpu"):
  mlir.register_lowering(_kernel_p, _kernel_lowering(_platform),
                         platform=_platform)


def _bind(versions: _Versions, args, rows: Any = None) -> list[jax.Array]:
  """Binds the kernel equation; ``rows``: per flat operand whether it is a
  row operand, and how many leading dimensions are rows (or None)."""
  avals = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in args]
  jaxpr = jax.make_jaxpr(versions.make("cpu"))(*avals)
  spec = None if rows is None else partitioning.row_spec(
      avals, rows[0], rows[1], jaxpr.out_avals)
  return _kernel_p.bind(*args, jaxpr=jaxpr, versions=versions, rows=spec)


def _batched_rows(rows, dims):
  """The row spec of the vmapped call, its operands' batch axis moved first:
  one more row dimension where exactly the row operands are batched."""
  if rows is None or any((d is not None) != r for d, r in zip(dims, rows.rows)):
    return None
  return (rows.rows, rows.batch_ndim + 1)


def _kernel_batching(args, dims, *, jaxpr, versions, rows):
  del jaxpr
  size = next(a.shape[d] for a, d in zip(args, dims) if d is not None)
  new_rows = _batched_rows(rows, dims)
  if new_rows is not None:  # Batch axes first: they join the rows.
    args = [a if d is None else jax.numpy.moveaxis(a, d, 0)
            for a, d in zip(args, dims)]
    dims = [None if d is None else 0 for d in dims]
  in_axes = tuple(dims)

  def make(platform):
    return jax.vmap(versions.make(platform), in_axes=in_axes, axis_size=size)

  outs = _bind(_Versions(versions.name, make), args, new_rows)
  return outs, [0] * len(outs)


batching.primitive_batchers[_kernel_p] = _kernel_batching


def _flat_rows(args, rows):
  """``rows`` (one flag per argument) per flat leaf of ``args``."""
  if rows is None:
    return None
  flags, batch_ndim = rows
  flat = []
  for arg, flag in zip(args, flags):
    flat += [flag] * len(jax.tree.leaves(arg))
  return (tuple(flat), batch_ndim)


def per_platform(build: Callable[[Target], Callable[..., tuple]],
                 interpret: Any, *args: Any, name: str,
                 rows: tuple[Sequence[bool], int] | None = None,
                 cuda: str = TRITON) -> tuple:
  """``build(target)(*args)`` for the target of the platform lowered for.

  With ``interpret=None`` or False the call is one equation whose lowering
  rule builds the version of the platform being lowered for (CPU: the
  interpreter, or with False Pallas' refusal; CUDA, ROCm: Triton; TPU:
  Mosaic TPU). ``True`` and ``InterpretParams`` run the interpreted
  version directly.

  Args:
    build: returns the kernel's function of ``args`` for a :class:`Target`;
      it returns a tuple of arrays, of the same shapes and dtypes for
      every target.
    interpret: the kernel's ``interpret=`` (see the module docstring).
    *args: arrays, or None for absent inputs.
    name: the kernel's name, shown in jaxprs.
    rows: ``(flags, n)``: per argument whether it is a row operand, and how
      many leading dimensions of the row operands and of every result are
      rows (the same in all). Under a device mesh the call is then
      partitioned by rows, the rest replicated
      (:mod:`.partitioning`); None: no rule (XLA decides).
    cuda: the kind built for CUDA (``"triton"`` or ``"mosaic_gpu"``).

  Returns:
    The outputs of the version for the platform, a tuple.
  """
  if interpret is True:
    return tuple(build(Target(TRITON, True))(*args))
  if interpret is not None and interpret is not False:  # InterpretParams
    return tuple(build(Target(TPU, interpret))(*args))
  targets = {"cpu": Target(TRITON, interpret is None),
             "cuda": Target(cuda, False), "rocm": Target(TRITON, False),
             "tpu": Target(TPU, False)}
  leaves, in_tree = jax.tree.flatten(args)

  def make(platform):
    fn = build(targets[platform])
    return lambda *flat: list(fn(*jax.tree.unflatten(in_tree, flat)))

  return tuple(_bind(_Versions(name, make), leaves, _flat_rows(args, rows)))


def compiler_params(target: Target, *, num_warps: int | None = None,
                    num_stages: int | None = None,
                    dimension_semantics: tuple[str, ...] | None = None,
                    vmem_limit_bytes: int | None = None):
  """Pallas compiler parameters for ``target``.

  Triton's (``num_warps``, ``num_stages``) for a compiled Triton version,
  Mosaic TPU's (``dimension_semantics``, ``vmem_limit_bytes``) for a TPU
  version (also under the TPU interpreter, which reads the semantics), and
  None in plain interpret mode.
  """
  if target.kind == TPU:
    if pltpu is None:  # pragma: no cover - depends on the jax build.
      return None
    kwargs = {}
    if dimension_semantics is not None:
      kwargs["dimension_semantics"] = dimension_semantics
    if vmem_limit_bytes is not None:
      kwargs["vmem_limit_bytes"] = vmem_limit_bytes
    return pltpu.CompilerParams(**kwargs)
  if target.interpret is not False or pltriton is None:
    return None
  kwargs = {"num_warps": num_warps}
  if num_stages is not None:
    kwargs["num_stages"] = num_stages
  return pltriton.CompilerParams(**kwargs)


def tpu_vmem(shape: tuple[int, ...], dtype) -> Any:
  """A VMEM scratch buffer for a TPU version's ``scratch_shapes``."""
  return pltpu.VMEM(shape, dtype)


def sublanes(dtype) -> int:
  """Rows of one Mosaic TPU vector tile: 8 for 32-bit types, 16 for 16-bit."""
  return 8 * max(1, 4 // jax.numpy.dtype(dtype).itemsize)

