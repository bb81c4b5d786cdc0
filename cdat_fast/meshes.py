"""Device meshes, placement of pytrees on them, and multi-process starts.

The placement half of :mod:`cdat_fast.sharding` (which re-exports all of
it, the public names users import):

* :func:`make_mesh` builds a mesh with the axes ``data`` (data parallel: the
  batch is split, parameters are replicated), ``fsdp`` (fully sharded data
  parallel: the batch *and* the parameters are split) and ``model`` (a second
  parameter dimension is split), from a spec such as ``"data=4,fsdp=2"``;
* :func:`param_spec`, :func:`shard_params`, :func:`shard_batch`,
  :func:`replicate` and :func:`state_shardings` say where each leaf of the
  parameters, a batch and an optimizer state goes, and place them;
* :func:`init_distributed` starts a multi-process run
  (``jax.distributed.initialize``) from arguments or environment variables.
"""
from __future__ import annotations

import math
import os
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

PyTree = Any

#: Mesh axes, outermost first. ``model`` is innermost so that its (most
#: frequent) collectives run between neighbouring devices.
AXES = ("data", "fsdp", "model")
#: The axes the batch's leading dimension is split over.
BATCH_AXES = ("data", "fsdp")


# ----------------------------------------------------------------------------
# Meshes.


def parse_mesh_spec(spec: str) -> dict[str, int]:
  """Parses ``"data=4,fsdp=2"`` into ``{"data": 4, "fsdp": 2}``.

  Axis names are ``data``, ``fsdp`` and ``model``; each may appear once. A
  size of ``-1`` (at most one axis) means "all the remaining devices" and is
  resolved by :func:`make_mesh`. An empty spec is ``{}``.

  Raises:
    ValueError: naming ``mesh``, on an unknown or repeated axis, a size that
      is not a positive integer (or -1), or a malformed entry.
  """
  if not isinstance(spec, str):
    raise TypeError(f"mesh spec must be a string, got {type(spec).__name__}")
  sizes: dict[str, int] = {}
  for entry in spec.replace(" ", "").split(","):
    if not entry:
      continue
    name, sep, value = entry.partition("=")
    if not sep:
      raise ValueError(
          f"mesh {spec!r}: entry {entry!r} is not of the form axis=size"
          f" (axes {', '.join(AXES)}), e.g. 'data=4,fsdp=2'")
    try:
      size = int(value)
    except ValueError:
      raise ValueError(
          f"mesh {spec!r}: size of axis {name!r} must be an integer,"
          f" got {value!r}") from None
    sizes = _add_axis(sizes, name, size, spec)
  return sizes


def _add_axis(sizes, name, size, spec):
  if name not in AXES:
    raise ValueError(
        f"mesh {spec!r}: unknown axis {name!r}; axes are {', '.join(AXES)}")
  if name in sizes:
    raise ValueError(f"mesh {spec!r}: axis {name!r} is given twice")
  if isinstance(size, bool) or not isinstance(size, (int, np.integer)):
    raise ValueError(
        f"mesh {spec!r}: size of axis {name!r} must be an integer,"
        f" got {size!r}")
  if size < 1 and size != -1:
    raise ValueError(
        f"mesh {spec!r}: size of axis {name!r} must be >= 1 (or -1 for the"
        f" remaining devices), got {size}")
  return {**sizes, name: int(size)}


def _spec_str(sizes: Mapping[str, int]) -> str:
  return ",".join(f"{k}={v}" for k, v in sizes.items())


def make_mesh(
    spec: str | Mapping[str, int] | Mesh | None = None,
    *,
    devices: Sequence[jax.Device] | None = None,
) -> Mesh:
  """A mesh with axes ``("data", "fsdp", "model")`` from a spec.

  Args:
    spec: ``"data=4,fsdp=2"``, ``{"data": 4, "fsdp": 2}``, None (all devices
      on ``data``) or a ready :class:`jax.sharding.Mesh` (returned as is).
      Missing axes have size 1; one axis may be ``-1``, the remaining devices.
    devices: the devices to use; default ``jax.devices()`` (all processes'
      devices in a multi-process run).

  Returns:
    A ``Mesh`` over all three axes (``AxisType.Auto``: XLA propagates the
    shardings of inputs through the step). If the spec's product is smaller
    than the number of devices, the first devices are used (single process
    only).

  Raises:
    ValueError: naming ``mesh``, if the spec is malformed, needs more devices
      than there are, or (in a multi-process run) leaves some devices out.
  """
  if isinstance(spec, Mesh):
    return spec
  if spec is None:
    sizes: dict[str, int] = {"data": -1}
  elif isinstance(spec, str):
    sizes = parse_mesh_spec(spec) or {"data": -1}
  elif isinstance(spec, Mapping):
    sizes = {}
    for name, size in spec.items():
      sizes = _add_axis(sizes, name, size, dict(spec))
    sizes = sizes or {"data": -1}
  else:
    raise TypeError(
        "mesh spec must be a string like 'data=4,fsdp=2', a dict or a Mesh,"
        f" got {type(spec).__name__}")
  devices = list(jax.devices() if devices is None else devices)
  n = len(devices)
  text = _spec_str(sizes)
  fill = [k for k, v in sizes.items() if v == -1]
  if len(fill) > 1:
    raise ValueError(f"mesh {text!r}: at most one axis may be -1, got {fill}")
  known = math.prod(v for v in sizes.values() if v != -1)
  if fill:
    if n % known:
      raise ValueError(
          f"mesh {text!r}: {n} devices are not divisible by the other axes'"
          f" product {known}, so axis {fill[0]!r} cannot take the rest")
    sizes[fill[0]] = n // known
  shape = tuple(sizes.get(a, 1) for a in AXES)
  need = math.prod(shape)
  if need > n:
    raise ValueError(
        f"mesh {_spec_str(sizes)!r} needs {need} devices but only {n} are"
        " available; make the product of the axis sizes at most the device"
        " count (on CPU, more devices can be faked with XLA_FLAGS="
        "--xla_force_host_platform_device_count=N)")
  if need < n and jax.process_count() > 1:
    raise ValueError(
        f"mesh {_spec_str(sizes)!r} uses {need} of the {n} devices of a"
        f" {jax.process_count()}-process run; a multi-process mesh must use"
        " every device")
  if min(shape) > 1 and devices[0].platform == "cpu":
    warnings.warn(
        f"mesh {_spec_str(sizes)!r}: on XLA:CPU (jax {jax.__version__}) a"
        " mesh with data, fsdp and model all > 1 can compute wrong gradients"
        " (tests/sharding_checks.py xla_repro); prefer two of the three axes",
        RuntimeWarning, stacklevel=2)
  return jax.make_mesh(shape, AXES, axis_types=(AxisType.Auto,) * len(AXES),
                       devices=devices[:need])


def _axis_size(mesh: Mesh, name: str) -> int:
  return int(mesh.shape[name]) if name in mesh.shape else 1


# ----------------------------------------------------------------------------
# Placement.


def param_spec(shape: Sequence[int], mesh: Mesh) -> P:
  """The partition spec :func:`shard_params` gives an array of ``shape``.

  ``fsdp`` goes on the largest dimension divisible by its size (the first on
  a tie); ``model``, if larger than 1, on the largest other dimension
  divisible by its size (the last on a tie). Dimensions that no axis divides
  are replicated; ``data`` never shards parameters.
  """
  spec: list[str | None] = [None] * len(shape)
  for name, prefer_last in (("fsdp", False), ("model", True)):
    size = _axis_size(mesh, name)
    if size == 1:
      continue
    dims = [i for i, d in enumerate(shape)
            if spec[i] is None and d >= size and d % size == 0]
    if dims:
      key = (lambda i: (shape[i], i)) if prefer_last else (
          lambda i: (shape[i], -i))
      spec[max(dims, key=key)] = name
  while spec and spec[-1] is None:
    spec.pop()
  return P(*spec)


def param_shardings(params: PyTree, mesh: Mesh) -> PyTree:
  """``NamedSharding`` for every leaf of ``params`` (see :func:`param_spec`)."""
  return jax.tree.map(
      lambda x: NamedSharding(mesh, param_spec(np.shape(x), mesh)), params)


def shard_params(params: PyTree, mesh: Mesh) -> PyTree:
  """FSDP placement: split over ``fsdp`` (and ``model``), else replicated.

  In a multi-process run every process must pass the same values (build them
  from the same seed).
  """
  return jax.device_put(params, param_shardings(params, mesh))


def replicate(x: PyTree, mesh: Mesh) -> PyTree:
  """A full copy of every leaf of ``x`` on every device of ``mesh``.

  In a multi-process run every process must pass the same values.
  """
  return jax.device_put(x, NamedSharding(mesh, P()))


def batch_sharding(mesh: Mesh, ndim: int = 1) -> NamedSharding:
  """Leading dimension over ``("data", "fsdp")``; scalars replicated."""
  return NamedSharding(mesh, P(BATCH_AXES) if ndim else P())


def shard_batch(batch: PyTree, mesh: Mesh) -> PyTree:
  """Splits every leaf's leading dimension over the ``data`` and ``fsdp`` axes.

  ``batch`` is this process's part of the global batch: all of it in a
  single-process run; in a multi-process run each process passes its own
  rows and the global batch is their concatenation in process order (built
  with ``jax.make_array_from_process_local_data``). Scalars are replicated.

  Raises:
    ValueError: naming ``batch``, if a leading dimension is not divisible by
      the number of batch shards on this process.
  """
  shards = _axis_size(mesh, "data") * _axis_size(mesh, "fsdp")
  local_shards = _local_batch_shards(mesh)
  leaves, treedef = jax.tree_util.tree_flatten_with_path(batch)
  out = []
  for path, x in leaves:
    sharding = batch_sharding(mesh, np.ndim(x))
    if np.ndim(x) and np.shape(x)[0] % local_shards:
      raise ValueError(
          f"batch{jax.tree_util.keystr(path)}: leading dimension"
          f" {np.shape(x)[0]} is not divisible by the {local_shards} batch"
          f" shards (data×fsdp = {shards}) held by this process")
    if jax.process_count() == 1:
      out.append(jax.device_put(x, sharding))
    else:
      out.append(jax.make_array_from_process_local_data(sharding,
                                                        np.asarray(x)))
  return jax.tree_util.tree_unflatten(treedef, out)


def _local_batch_shards(mesh: Mesh) -> int:
  """How many distinct batch shards this process's devices hold."""
  me = jax.process_index()
  names = list(mesh.axis_names)
  keep = [names.index(a) for a in BATCH_AXES if a in names]
  held = {tuple(idx[i] for i in keep)
          for idx, d in np.ndenumerate(mesh.devices) if d.process_index == me}
  return max(1, len(held))


# ----------------------------------------------------------------------------
# Optimizer state shardings.


def leaf_sharding(x, mesh: Mesh) -> NamedSharding:
  """``x``'s own sharding if it is a ``NamedSharding`` on ``mesh``, else
  :func:`param_spec`'s."""
  sharding = getattr(x, "sharding", None)
  if isinstance(sharding, NamedSharding) and sharding.mesh == mesh:
    return sharding
  return NamedSharding(mesh, param_spec(np.shape(x), mesh))


def state_shardings(opt_state: PyTree, params: PyTree, mesh: Mesh,
                    params_shardings: PyTree | None = None) -> PyTree:
  """Shardings of an optimizer state, derived from the parameters'.

  Every subtree of ``opt_state`` structured like ``params`` (Adam's ``mu``
  and ``nu``, a tuner's previous direction or eigenvector) takes the
  parameters' shardings; scalars (counts, learning rates, averages) are
  replicated; any other array gets :func:`param_spec`'s rule.

  Args:
    opt_state: the state, or its ``jax.eval_shape``.
    params: the parameters (arrays or ``ShapeDtypeStruct``).
    mesh: the mesh.
    params_shardings: the parameters' shardings; default: those of
      ``params`` if they are ``NamedSharding`` on ``mesh``, else the rule.
  """
  if params_shardings is None:
    params_shardings = jax.tree.map(lambda x: leaf_sharding(x, mesh), params)
  treedef = jax.tree.structure(params)
  shapes = [np.shape(x) for x in jax.tree.leaves(params)]
  replicated = NamedSharding(mesh, P())

  def like_params(node):
    if jax.tree.structure(node) != treedef:
      return False
    return [np.shape(x) for x in jax.tree.leaves(node)] == shapes

  def assign(node):
    if like_params(node):
      return params_shardings
    if not np.ndim(node):
      return replicated
    return NamedSharding(mesh, param_spec(np.shape(node), mesh))

  return jax.tree.map(assign, opt_state, is_leaf=like_params)


# ----------------------------------------------------------------------------
# Multiple processes.


def init_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    local_device_ids: Sequence[int] | None = None,
    auto: bool = False,
    initialization_timeout: int = 300,
) -> bool:
  """Starts a multi-process JAX run; a no-op for a single process.

  Arguments default to the environment variables ``JAX_COORDINATOR_ADDRESS``
  (``host:port`` of process 0), ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID`` and
  ``JAX_LOCAL_DEVICE_IDS`` (comma separated). With none of them set, nothing
  is started unless ``auto=True``, which lets ``jax.distributed.initialize``
  detect the cluster (SLURM, Open MPI, Cloud TPU, Kubernetes, ...).

  Call it first, before any other JAX call that touches devices. On CPU the
  processes' collectives use gloo (JAX's default CPU collectives).

  Returns:
    True if a multi-process run is (now) initialised, False otherwise.
  """
  if jax.distributed.is_initialized():
    return True
  env = os.environ
  coordinator_address = coordinator_address or env.get(
      "JAX_COORDINATOR_ADDRESS") or None
  if num_processes is None and env.get("JAX_NUM_PROCESSES"):
    num_processes = int(env["JAX_NUM_PROCESSES"])
  if process_id is None and env.get("JAX_PROCESS_ID"):
    process_id = int(env["JAX_PROCESS_ID"])
  if local_device_ids is None and env.get("JAX_LOCAL_DEVICE_IDS"):
    local_device_ids = [int(i) for i in env["JAX_LOCAL_DEVICE_IDS"].split(",")]
  if coordinator_address is None and not auto:
    if num_processes not in (None, 1):
      raise ValueError(
          f"init_distributed: num_processes={num_processes} needs a"
          " coordinator_address (or JAX_COORDINATOR_ADDRESS=host:port)")
    return False
  if num_processes == 1 and coordinator_address is None:
    return False
  jax.distributed.initialize(
      coordinator_address=coordinator_address, num_processes=num_processes,
      process_id=process_id, local_device_ids=local_device_ids,
      initialization_timeout=initialization_timeout)
  return True
