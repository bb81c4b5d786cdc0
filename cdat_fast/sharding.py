"""Sharded and multi-process execution: device meshes, placement, a jitted step.

The tuners are sharding-transparent: every one of them works leaf by leaf on
the parameter pytree and reduces to scalars (``gᵀu``, ``uᵀHu``, norms), so
under ``jax.jit`` with sharded inputs XLA partitions them like the base
optimizer and adds only scalar all-reduces. This module holds what a training
script needs around them:

* :func:`make_mesh` builds a mesh with the axes ``data`` (data parallel: the
  batch is split, parameters are replicated), ``fsdp`` (fully sharded data
  parallel: the batch *and* the parameters are split) and ``model`` (a second
  parameter dimension is split), from a spec such as ``"data=4,fsdp=2"``;
* :func:`shard_params`, :func:`shard_batch` and :func:`replicate` place
  pytrees on it;
* :func:`make_train_step` returns a jitted step
  ``(params, opt_state, batch) -> (params, opt_state, loss)`` whose parameters
  and optimizer state keep their shardings;
* :func:`init_distributed` starts a multi-process run
  (``jax.distributed.initialize``) from arguments or environment variables.

In a multi-process run (one process per host, or several on one host) every
process executes the same program: the mesh covers all processes' devices,
parameters are built identically on each process and placed with
:func:`shard_params`, and each process hands :func:`shard_batch` its own part
of the global batch (see ``docs/distributed.md``).
"""
from __future__ import annotations

import math
import os
import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
import optax
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
# Optimizer state shardings and the train step.


def _leaf_sharding(x, mesh):
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
    params_shardings = jax.tree.map(lambda x: _leaf_sharding(x, mesh), params)
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


class TrainStep:
  """A jitted sharded step ``(params, opt_state, batch) -> (..., loss)``.

  Built by :func:`make_train_step`. The first call with a given structure
  fixes the shardings: the parameters' own (``NamedSharding`` on the mesh,
  e.g. from :func:`shard_params`), the optimizer state's derived from them
  (:func:`state_shardings`), the batch's from :func:`shard_batch`, and the
  loss replicated; outputs are constrained to the same shardings.
  """

  def __init__(self, loss_fn, optimizer, mesh, *, model_fn=None,
               output_loss=None, donate=False):
    if (model_fn is None) != (output_loss is None):
      raise ValueError(
          "make_train_step: give both model_fn and output_loss, or neither")
    self.loss_fn = loss_fn
    self.model_fn = model_fn
    self.output_loss = output_loss
    self.optimizer = optax.with_extra_args_support(optimizer)
    self.mesh = mesh
    self.donate = donate
    self._cache: dict[Any, Any] = {}

  def _step(self, params, opt_state, batch):
    """The step's body, unjitted: ``(params, opt_state, batch) -> (...)``."""
    loss_fn, model_fn, output_loss = (self.loss_fn, self.model_fn,
                                      self.output_loss)

    def value_fn(p, batch):
      return loss_fn(p, batch)

    extra = {}
    if model_fn is not None:
      extra["model_fn"] = lambda p, batch: model_fn(p, batch)
      extra["loss_fn"] = lambda outputs, batch: output_loss(outputs, batch)
    loss, grads = jax.value_and_grad(loss_fn)(params, batch)
    updates, opt_state = self.optimizer.update(
        grads, opt_state, params, value_fn=value_fn, batch=batch, value=loss,
        **extra)
    return optax.apply_updates(params, updates), opt_state, loss

  def shardings(self, params, opt_state, batch):
    """``(in_shardings, out_shardings)`` used for these arguments."""
    p = jax.tree.map(lambda x: _leaf_sharding(x, self.mesh), params)
    s = state_shardings(opt_state, params, self.mesh, p)
    b = jax.tree.map(lambda x: batch_sharding(self.mesh, np.ndim(x)), batch)
    return (p, s, b), (p, s, NamedSharding(self.mesh, P()))

  def jitted(self, params, opt_state, batch):
    """The ``jax.jit``-wrapped step for these arguments' structure (cached)."""
    ins, outs = self.shardings(params, opt_state, batch)
    key = (jax.tree.structure(params), jax.tree.structure(opt_state),
           jax.tree.structure(batch), tuple(jax.tree.leaves(ins)))
    fn = self._cache.get(key)
    if fn is None:
      fn = jax.jit(self._step, in_shardings=ins, out_shardings=outs,
                   donate_argnums=(0, 1) if self.donate else ())
      self._cache[key] = fn
    return fn

  def __call__(self, params, opt_state, batch):
    return self.jitted(params, opt_state, batch)(params, opt_state, batch)

  def lower(self, params, opt_state, batch):
    """``jax.jit(...).lower`` of the step, e.g. to read its compiled HLO."""
    return self.jitted(params, opt_state, batch).lower(params, opt_state, batch)

  def init(self, params):
    """``optimizer.init(params)`` placed with :func:`state_shardings`."""
    abstract = jax.eval_shape(self.optimizer.init, params)
    shardings = state_shardings(abstract, params, self.mesh)
    return jax.jit(self.optimizer.init, out_shardings=shardings)(params)


def make_train_step(
    loss_fn: Callable[[PyTree, PyTree], jax.Array],
    optimizer: optax.GradientTransformation,
    mesh: Mesh,
    *,
    model_fn: Callable[[PyTree, PyTree], PyTree] | None = None,
    output_loss: Callable[[PyTree, PyTree], jax.Array] | None = None,
    donate: bool = False,
) -> TrainStep:
  """A jitted, sharded training step for any optimizer or tuner.

  The step computes ``loss, grads = value_and_grad(loss_fn)(params, batch)``,
  then ``optimizer.update(grads, opt_state, params, value_fn=loss_fn,
  batch=batch, value=loss)`` (a plain optax optimizer ignores the extra
  arguments) and applies the updates.

  Args:
    loss_fn: ``loss_fn(params, batch) -> scalar``.
    optimizer: a tuner such as ``cdat_fast.cdat(optax.adam(1.0))``, or any
      optax transformation.
    mesh: from :func:`make_mesh`.
    model_fn: optional ``model_fn(params, batch) -> outputs``, with
      ``output_loss(outputs, batch) -> scalar`` such that ``loss_fn(params,
      batch) == output_loss(model_fn(params, batch), batch)``; passed to the
      update as ``model_fn=`` and ``loss_fn=``, which
      ``cdat(..., curvature="gauss_newton")`` needs.
    output_loss: see ``model_fn``.
    donate: donate the parameters' and optimizer state's buffers to the
      step (saves memory; the inputs become unusable).

  Returns:
    A :class:`TrainStep`: ``step(params, opt_state, batch) -> (params,
    opt_state, loss)``; ``step.init(params)`` returns the placed optimizer
    state and ``step.lower(...)`` the lowered computation.

  Examples:
    >>> mesh = make_mesh("data=4,fsdp=2")  # doctest: +SKIP
    >>> params = shard_params(params, mesh)  # doctest: +SKIP
    >>> step = make_train_step(loss_fn, cdat_fast.cdat(optax.sgd(1.0)), mesh)
    >>> opt_state = step.init(params)  # doctest: +SKIP
    >>> batch = shard_batch(batch, mesh)  # doctest: +SKIP
    >>> params, opt_state, loss = step(params, opt_state, batch)  # doctest: +SKIP
  """
  return TrainStep(loss_fn, optimizer, mesh, model_fn=model_fn,
                   output_loss=output_loss, donate=donate)


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


# ----------------------------------------------------------------------------
# Diagnostics.

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all",
               "collective-permute")
HOST_TRANSFER_OPS = ("send", "recv", "send-done", "recv-done", "infeed",
                     "outfeed")
_DTYPE_BYTES = {
    "pred": 1, "s2": 1, "u2": 1, "s4": 1, "u4": 1, "s8": 1, "u8": 1,
    "f8e4m3fn": 1, "f8e5m2": 1, "f8e4m3": 1, "f8e3m4": 1, "f8e4m3b11fnuz": 1,
    "f8e4m3fnuz": 1, "f8e5m2fnuz": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2,
    "f32": 4, "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8, "c64": 8,
    "c128": 16}
_ARRAY_RE = re.compile(r"\b([a-z][a-z0-9]*)\[([0-9,]*)\]")
_INSTR_RE = re.compile(
    r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*?)\s+([a-z][a-z0-9\-]*)\((.*)$")


def _shape_bytes(shape: str) -> tuple[int, int]:
  """(bytes, largest rank) of an HLO shape such as ``(f32[8]{0}, f32[])``."""
  total, rank = 0, 0
  for dtype, dims in _ARRAY_RE.findall(shape):
    if dtype not in _DTYPE_BYTES:
      continue
    sizes = [int(d) for d in dims.split(",") if d]
    total += _DTYPE_BYTES[dtype] * math.prod(sizes)
    rank = max(rank, len(sizes))
  return total, rank


def _operands(rest: str) -> list[str]:
  """Operand names in ``%a, %b, ...), attrs`` (up to the closing paren)."""
  depth, end = 1, len(rest)
  for i, ch in enumerate(rest):
    depth += {"(": 1, ")": -1}.get(ch, 0)
    if depth == 0:
      end = i
      break
  names = []
  for item in re.sub(r"/\*.*?\*/", "", rest[:end]).split(","):
    item = item.strip().split()[-1] if item.strip() else ""
    if item:
      names.append(item.lstrip("%"))
  return names


_MESH_GROUPS_RE = re.compile(
    r"replica_groups=mesh\[([^\]]*)\](?:,\s*device_ids=\(\S*?\))?\s*"
    r"\{([^}]*)\}")
_LIST_GROUPS_RE = re.compile(r"replica_groups=\{\{([0-9,]*)\}")
_IOTA_GROUPS_RE = re.compile(r"replica_groups=\[([0-9,]+)\]<=")


def _group_size(line: str) -> int | None:
  """Devices per replica group of a collective's HLO line; None: unknown.

  Reads the three forms XLA prints: explicit lists ``{{0,1},{2,3}}``, iota
  ``[4,2]<=[8]`` (groups of the last size) and mesh axes
  ``mesh['axis_0'=4,'axis_1'=2] {'axis_1'}`` (the named axes' product).
  """
  m = _MESH_GROUPS_RE.search(line)
  if m:
    sizes = {k.strip().strip("'"): int(v) for k, v in
             (item.split("=") for item in m.group(1).split(",") if "=" in item)}
    names = [n.strip().strip("'") for n in m.group(2).split(",") if n.strip()]
    return math.prod(sizes.get(n, 1) for n in names)
  m = _LIST_GROUPS_RE.search(line)
  if m:
    return len([d for d in m.group(1).split(",") if d])
  m = _IOTA_GROUPS_RE.search(line)
  if m:
    return int(m.group(1).split(",")[-1])
  return None


def _wire_bytes(kind: str, nbytes: int, group: int | None) -> int | None:
  """Bytes one device sends for a collective (bandwidth-optimal algorithms).

  ``nbytes`` is the operand size per device: all-reduce ``2(g−1)/g·S``,
  all-gather ``(g−1)·S``, reduce-scatter and all-to-all ``(g−1)/g·S``,
  collective-permute ``S``.
  """
  if kind == "collective-permute":
    return nbytes
  if group is None:
    return None
  factor = {"all-reduce": 2 * (group - 1) / group,
            "all-gather": group - 1,
            "reduce-scatter": (group - 1) / group,
            "all-to-all": (group - 1) / group}[kind]
  return int(round(factor * nbytes))


_CHAIN_RE = re.compile(r'chain_id="([^"]*)"')
_LAYOUT_RE = re.compile(r"\{[^{}]*\}")
_GROUPS_RE = re.compile(r"replica_groups=(\S+(?:\s*\{[^}]*\})?)")


def merge_async_copies(hlo_text: str) -> tuple[str, int]:
  """The HLO text with one copy of each TPU async collective; how many more.

  libtpu's async collective fusion runs a collective alongside compute by
  splitting its steps over several fusions: the one that starts it, the
  ``async_collective_fusion`` continuations that compute while it
  proceeds, and the one that ends it. Each holds the whole collective
  instruction (same channel, replica groups and shapes), tagged with one
  ``frontend_attributes={chain_id="N"}``, so read line by line a chain of k
  fusions is k collectives. This keeps the first line of each chain (by
  chain id, opcode, result shape without layout and replica groups); every
  other line, including all of a program without chain ids (GPU, CPU), is
  kept as it is.
  """
  seen, out, dropped = set(), [], 0
  for line in hlo_text.splitlines():
    chain, m = _CHAIN_RE.search(line), _INSTR_RE.match(line)
    if chain and m and m.group(3).removesuffix("-start") in COLLECTIVES:
      groups = _GROUPS_RE.search(line)
      key = (chain.group(1), m.group(3), _LAYOUT_RE.sub("", m.group(2)),
             groups.group(1) if groups else None)
      if key in seen:
        dropped += 1
        continue
      seen.add(key)
    out.append(line)
  return "\n".join(out), dropped


def hlo_collectives(hlo_text: str, *, merge_async: bool = True
                    ) -> dict[str, Any]:
  """Collectives and host transfers in an HLO module's text.

  Counts every collective (``all-reduce``, ``all-gather``,
  ``reduce-scatter``, ``all-to-all``, ``collective-permute``, sync or the
  ``-start`` of an async pair) and sums the bytes of its operands, per
  device. A collective inside a loop body is counted once, and so is a TPU
  async collective whose steps libtpu spread over several fusions
  (:func:`merge_async_copies`; ``merge_async=False`` counts every line).

  Returns:
    ``{"count": {kind: n}, "bytes": {kind: b}, "total_bytes": b,
    "wire_bytes": {kind: b}, "non_scalar": [(kind, "f32[16,32]"), ...],
    "ops": [...], "host_transfers": [...], "callbacks": [...]}``:
    ``non_scalar`` lists every operand of rank ≥ 1 of a collective (a tuple
    all-reduce contributes one entry per operand); ``ops`` has one
    ``{"kind", "bytes", "group", "wire_bytes"}`` per collective, with the
    devices per replica group (None where the text does not say) and the
    bytes one device sends with bandwidth-optimal algorithms (see
    ``wire_bytes``, summed per kind where the group is known);
    ``host_transfers`` the send/recv/infeed/outfeed instructions and
    ``callbacks`` the custom calls into the host (Python callbacks).
  """
  if merge_async:
    hlo_text, _ = merge_async_copies(hlo_text)
  shapes: dict[str, str] = {}
  instrs = []
  for line in hlo_text.splitlines():
    m = _INSTR_RE.match(line)
    if not m:
      continue
    name, shape, op, rest = m.groups()
    shapes[name] = shape
    instrs.append((name, shape, op, rest, line))
  count = {k: 0 for k in COLLECTIVES}
  nbytes = {k: 0 for k in COLLECTIVES}
  wire = {k: 0 for k in COLLECTIVES}
  non_scalar, host, callbacks, ops = [], [], [], []
  for name, shape, op, rest, line in instrs:
    kind = op[:-len("-start")] if op.endswith("-start") else op
    if kind in COLLECTIVES:
      operand_shapes = " ".join(shapes.get(o, "") for o in _operands(rest))
      count[kind] += 1
      b = _shape_bytes(operand_shapes)[0]
      nbytes[kind] += b
      group = None if kind == "collective-permute" else _group_size(line)
      sent = _wire_bytes(kind, b, group)
      wire[kind] += sent or 0
      ops.append({"kind": kind, "bytes": b, "group": group,
                  "wire_bytes": sent})
      for dtype, dims in _ARRAY_RE.findall(operand_shapes):
        if dims and dtype in _DTYPE_BYTES:
          non_scalar.append((kind, f"{dtype}[{dims}]"))
    elif op in HOST_TRANSFER_OPS or "is_host_transfer=true" in line:
      host.append(name)
    elif op == "custom-call":
      target = re.search(r'custom_call_target="([^"]*)"', line)
      target = target.group(1) if target else ""
      if "callback" in target.lower() or "host" in target.lower():
        callbacks.append(target)
  return {"count": count, "bytes": nbytes,
          "total_bytes": sum(nbytes.values()), "wire_bytes": wire,
          "non_scalar": non_scalar, "ops": ops,
          "host_transfers": host, "callbacks": callbacks}
