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

This is the public module; the code lives in :mod:`cdat_fast.meshes`
(meshes, placement, multiple processes) and :mod:`cdat_fast.sharded_step`
(the step). The readers of compiled programs that the sharding tests and
benchmarks use (:func:`~cdat_fast.hlo.hlo_collectives`,
:func:`~cdat_fast.hlo.merge_async_copies`, ``COLLECTIVES``,
``HOST_TRANSFER_OPS``) are in :mod:`cdat_fast.hlo` and stay importable from
here.
"""
from __future__ import annotations

from cdat_fast.hlo import (  # noqa: F401  (importable from here)
    COLLECTIVES, HOST_TRANSFER_OPS, hlo_collectives, merge_async_copies)
from cdat_fast import meshes as _meshes
from cdat_fast.meshes import (batch_sharding, init_distributed, make_mesh,
                              param_shardings, param_spec, parse_mesh_spec,
                              replicate, shard_batch, shard_params,
                              state_shardings)
from cdat_fast.sharded_step import TrainStep, make_train_step

#: Mesh axes, outermost first. ``model`` is innermost so that its (most
#: frequent) collectives run between neighbouring devices.
AXES = _meshes.AXES
#: The axes the batch's leading dimension is split over.
BATCH_AXES = _meshes.BATCH_AXES

__all__ = [
    "AXES", "BATCH_AXES", "parse_mesh_spec", "make_mesh", "param_spec",
    "param_shardings", "shard_params", "replicate", "batch_sharding",
    "shard_batch", "state_shardings", "TrainStep", "make_train_step",
    "init_distributed",
]
