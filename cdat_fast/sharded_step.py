"""A jitted training step whose parameters and optimizer state stay sharded.

:func:`make_train_step` returns a :class:`TrainStep`, a jitted
``(params, opt_state, batch) -> (params, opt_state, loss)`` on a mesh of
:mod:`cdat_fast.meshes` (re-exported by :mod:`cdat_fast.sharding`, the
public module): the parameters keep their own shardings, the optimizer
state takes the ones :func:`~cdat_fast.meshes.state_shardings` derives from
them, the batch is split over the batch axes and the loss is replicated.
The tuners are sharding-transparent (they work leaf by leaf and reduce to
scalars), so the same step serves any optimizer or tuner.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from cdat_fast.meshes import batch_sharding, leaf_sharding, state_shardings

PyTree = Any


class TrainStep:
  """A jitted sharded step ``(params, opt_state, batch) -> (..., loss)``.

  Built by :func:`make_train_step`. The first call with a given structure
  fixes the shardings: the parameters' own (``NamedSharding`` on the mesh,
  e.g. from :func:`shard_params`), the optimizer state's derived from them
  (:func:`state_shardings`), the batch's from :func:`shard_batch`, and the
  loss replicated; outputs are constrained to the same shardings.

  What runs under ``jax.jit`` is :attr:`body`: :meth:`default_body` (value,
  gradient, the optimizer's update with the objective, the new parameters)
  unless the step was built with another ``body``, e.g. a reference step
  that measures what a computation communicates.
  """

  def __init__(self, loss_fn, optimizer, mesh, *, model_fn=None,
               output_loss=None, donate=False, body=None):
    if (model_fn is None) != (output_loss is None):
      raise ValueError(
          "make_train_step: give both model_fn and output_loss, or neither")
    if body is not None and not callable(body):
      raise TypeError(
          "make_train_step: body must be a callable (params, opt_state,"
          f" batch) -> (params, opt_state, loss), got {type(body).__name__}")
    self.loss_fn = loss_fn
    self.model_fn = model_fn
    self.output_loss = output_loss
    self.optimizer = optax.with_extra_args_support(optimizer)
    self.mesh = mesh
    self.donate = donate
    self._body = self.default_body if body is None else body
    self._cache: dict[Any, Any] = {}

  @property
  def body(self) -> Callable[[PyTree, PyTree, PyTree], tuple]:
    """The step's body, unjitted: ``(params, opt_state, batch) -> (params,
    opt_state, loss)`` (fixed when the step is built)."""
    return self._body

  def default_body(self, params, opt_state, batch):
    """The training step, unjitted: ``loss, grads = value_and_grad(loss_fn)``,
    ``optimizer.update(grads, opt_state, params, value_fn=loss_fn,
    batch=batch, value=loss)`` (with ``model_fn`` and ``loss_fn=output_loss``
    where given), the updates applied; returns ``(params, opt_state, loss)``.
    """
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
    p = jax.tree.map(lambda x: leaf_sharding(x, self.mesh), params)
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
      fn = jax.jit(self._body, in_shardings=ins, out_shardings=outs,
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
    body: Callable[[PyTree, PyTree, PyTree], tuple] | None = None,
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
    body: optional ``body(params, opt_state, batch) -> (params, opt_state,
      loss)`` to run instead of :meth:`TrainStep.default_body`, with the same
      shardings (e.g. the base step plus a bare jvp-of-jvp along its update,
      to compare what it communicates with the tuner's step). It calls its
      own optimizer, whose state must be structured like ``optimizer``'s
      (``step.init`` builds it with ``optimizer``).

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
                   output_loss=output_loss, donate=donate, body=body)
