"""Training harness: jitted, chunked training runs with the paper's metrics.

A run trains a model from :mod:`cdat_fast.harness.models` on a data set from
:mod:`cdat_fast.harness.data` with an optimizer from
:mod:`cdat_fast.harness.optimizers`, as a :class:`TrainConfig`
(:mod:`cdat_fast.harness.config`) says. Steps run inside ``jax.lax.scan`` over
chunks of ``log_every`` steps (cut shorter where a measurement is due), so
the host only wakes up to log; the training data enters each chunk as an
argument, and each chunk's program is compiled once and checked to fit in
memory before it runs (:mod:`cdat_fast.harness.memory`). Every step
records the loss, the learning rate, the gradient norm and (for CDAT) the
numerator and denominator; every ``sharpness_every`` steps the
(preconditioned, for RMSProp/Adam) sharpness ``λ_max`` and ``η·λ_max`` (2 is
the edge of stability) are measured by power iteration, warm-started from the
previous eigenvector.

Outputs in ``out_dir``: ``config.json``, ``metrics.jsonl`` (one line per log
point or measurement), ``history.npz`` (per-step loss and learning rate), ``summary.json``
(final loss = mean train loss over the last 5 iterates, as in the paper's
appendix C.3) and ``training.png``.

Schedule-Free (:data:`cdat_fast.harness.peers.AVERAGED`) takes its gradients
at an interpolated point but is meant to be used at the average of its
iterates: its logged training loss, test accuracy and returned parameters
are at :func:`optax.contrib.schedule_free_eval_params` (the checkpoints keep
the training state, from which that function gives them). GeN
(:data:`cdat_fast.harness.peers.FRESH_BATCH`) fits its learning rate on the
next minibatch of the chunk (the chunk's last step on its first).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from cdat_fast import treemath
from cdat_fast.curvature import preconditioner_from_state, sharpness
# TrainConfig and its JSON form live in cdat_fast.harness.config; importable
# from here as before.
from cdat_fast.harness.config import (FUSED_MODELS, TrainConfig,  # noqa: F401
                                      config_from_dict, config_to_dict)
from cdat_fast.harness.data import Dataset, batches, load_dataset
from cdat_fast.harness.errors import InputError, checked
from cdat_fast.harness.losses import (accuracy, get_loss, l2_penalty,
                                      make_loss_fn)
from cdat_fast.harness.memory import check_fits
from cdat_fast.harness.models import get_model, init_params
from cdat_fast.harness.optimizers import ADAPTIVE, build_optimizer
from cdat_fast.harness.optimizers import OptimizerConfig  # noqa: F401
from cdat_fast.harness.peers import AVERAGED, FRESH_BATCH, eval_params
from cdat_fast.tuned import TunedState


@dataclasses.dataclass
class RunResult:
  """What a run returns: the summary, the log points and per-step arrays."""
  summary: dict[str, Any]
  records: list[dict[str, Any]]
  history: dict[str, np.ndarray]
  params: Any = None


def build_model(cfg: TrainConfig, dataset: Dataset):
  overrides = {}
  if cfg.model == "mlp":
    overrides["features"] = (cfg.width,) * cfg.depth
  if cfg.fused_kernels:
    overrides["fused"] = True
  return get_model(cfg.model, dataset.num_classes, **overrides)


class BatchStream:
  """Minibatches in a seeded order that can be resumed at (epoch, position).

  Epoch ``e`` is the permutation of :func:`cdat_fast.harness.data.batches` for
  ``(seed, e)``, cut into full batches (the remainder is dropped).
  """

  def __init__(self, dataset: Dataset, batch_size: int, seed: int,
               epoch: int = 0, position: int = 0):
    n = len(dataset.x_train)
    if batch_size > n:
      raise InputError(
          f"batch_size must be at most the {n} training examples, got"
          f" {batch_size}")
    self.dataset, self.batch_size, self.seed = dataset, batch_size, seed
    self.epoch, self.position = epoch, position
    self._epoch_batches = None

  def _load_epoch(self):
    self._epoch_batches = list(batches(
        self.dataset, self.batch_size, seed=self.seed, epoch=self.epoch,
        drop_remainder=True))

  def __next__(self) -> dict[str, np.ndarray]:
    if self._epoch_batches is None:
      self._load_epoch()
    if self.position >= len(self._epoch_batches):
      self.epoch, self.position = self.epoch + 1, 0
      self._load_epoch()
    batch = self._epoch_batches[self.position]
    self.position += 1
    return batch


def _first(batch, k):
  return jax.tree.map(lambda x: x[:k], batch)


def _base_state(state):
  if isinstance(state, TunedState):
    return state.base
  return state[0]


def _json_safe(x):
  if isinstance(x, float) and not math.isfinite(x):
    return None
  return x


class Trainer:
  """Holds the compiled pieces of a run; :meth:`run` executes it."""

  def __init__(self, cfg: TrainConfig, dataset: Dataset | None = None, *,
               spectrum=None, averaged_loss: bool = True):
    """Builds the run's model, optimizer and compiled pieces.

    Args:
      cfg: the run.
      dataset: the data, if already loaded.
      spectrum: a :class:`~cdat_fast.harness.spectrum.SpectrumMonitor`.
      averaged_loss: for a tuner evaluated on averaged parameters
        (Schedule-Free, :data:`~cdat_fast.harness.peers.AVERAGED`), log the
        training loss there, one more forward pass a step; False logs it at
        the iterate (to time the optimizer alone).
    """
    cfg.validate()
    self.cfg = cfg
    # A cdat_fast.harness.spectrum.SpectrumMonitor, or None.
    self.spectrum = spectrum
    self.dataset = dataset if dataset is not None else load_dataset(
        cfg.dataset, data_dir=cfg.data_dir, subset=cfg.subset, seed=cfg.seed)
    ds = self.dataset
    if cfg.loss == "squared" and ds.kind == "text":
      raise InputError("loss must be cross_entropy for text data, got"
                       " 'squared'")
    self.model = checked(lambda: build_model(cfg, ds))
    self.loss_fn = make_loss_fn(self.model, cfg.loss, cfg.weight_decay)
    fraction = self._curvature_fraction()
    self.optimizer, self.schedule = checked(lambda: build_optimizer(
        cfg.optimizer, cfg.steps, curvature_fraction=fraction))
    self.curvature_kwargs = self._curvature_objective()
    tuner = cfg.optimizer.tuner
    self._averaged = averaged_loss and tuner in AVERAGED
    # GeN fits on a fresh minibatch: each step gets the next one as well.
    self._fresh_batch = tuner in FRESH_BATCH and cfg.batch_size is not None
    self.mesh = None
    if cfg.mesh:
      from cdat_fast.sharding import make_mesh
      self.mesh = checked(lambda: make_mesh(cfg.mesh))
    self._programs = {}  # compiled chunks by (length, batch shapes)
    self._chunk = jax.jit(self._chunk_impl, static_argnames=("length",),
                          donate_argnums=(0,))
    self._sharpness = jax.jit(self._sharpness_impl)
    self._eval = jax.jit(self._eval_impl)

  def _curvature_fraction(self) -> float | None:
    """``curvature_batch / rows per batch``: CDAT's curvature sub-batch.

    The curvature is measured on every ``m``-th example of each batch,
    ``m = rows / curvature_batch`` (:func:`cdat_fast.estimators.subbatch`),
    so that on a mesh every device measures on its own rows.
    """
    k = self.cfg.curvature_batch
    if k is None:
      return None
    rows = self.cfg.batch_size or len(self.dataset.x_train)
    if k > rows or rows % k:
      raise InputError(
          f"curvature_batch={k} must divide the batch ({rows} rows): the"
          " curvature is measured on every (rows/curvature_batch)-th example")
    return k / rows

  def _curvature_objective(self) -> dict:
    """What CDAT's ``update`` needs to measure the curvature.

    ``value_fn`` (the training loss, which takes the batch); Gauss–Newton
    gets the model and the output loss instead.
    """
    cfg = self.cfg
    if (cfg.optimizer.curvature != "gauss_newton"
        or cfg.optimizer.tuner not in ("cdat", "quadratic_greedy")):
      return dict(value_fn=self.loss_fn)
    # f = ℓ(m(w)) + μ/2‖w‖²: the model returns the parameters too, so the
    # Gauss–Newton form includes the weight decay's curvature μ‖u‖².
    model, loss_name, mu = self.model, cfg.loss, cfg.weight_decay
    per_example = get_loss(loss_name)

    def model_fn(p, batch):
      return model.apply({"params": p}, batch["x"]), p

    def output_loss(out, batch):
      logits, p = out
      return per_example(logits, batch["y"]) + l2_penalty(p, mu)

    return dict(model_fn=model_fn, loss_fn=output_loss)

  # -- compiled pieces -------------------------------------------------------

  def _learning_rate(self, state, step):
    lr = optax.tree.get(state, "learning_rate", default=None)
    if lr is None:
      return jnp.asarray(self.schedule(step), jnp.float32)
    return jnp.asarray(lr, jnp.float32)

  def eval_params(self, params, state):
    """The parameters to evaluate and return: Schedule-Free's average."""
    return eval_params(self.cfg.optimizer.tuner, state, params)

  def _step(self, carry, batch, probe=None):
    params, state, prev_u, step = carry
    value, grads = jax.value_and_grad(self.loss_fn)(params, batch)
    loss = value
    if self._averaged:  # the loss its users see: at the averaged parameters
      loss = self.loss_fn(self.eval_params(params, state), batch)
    updates, state = self.optimizer.update(
        grads, state, params, value=value,
        batch=batch if probe is None else probe, **self.curvature_kwargs)
    metrics = {
        "loss": loss.astype(jnp.float32),
        "learning_rate": self._learning_rate(state, step),
        "grad_norm": optax.tree.norm(grads).astype(jnp.float32),
    }
    for name in ("numerator", "denominator"):
      v = optax.tree.get(state, name, default=None)
      if v is not None:
        metrics[name] = jnp.asarray(v, jnp.float32)
    if self.cfg.track_alignment:
      norms = optax.tree.norm(updates) * optax.tree.norm(prev_u)
      metrics["update_cosine"] = jnp.where(
          norms > 0, treemath.vdot(updates, prev_u) / jnp.where(
              norms > 0, norms, 1.0), 0.0).astype(jnp.float32)
      prev_u = updates
    params = optax.apply_updates(params, updates)
    return (params, state, prev_u, step + 1), metrics

  def _chunk_impl(self, carry, batch, *, length):
    if self.cfg.batch_size is None:
      return jax.lax.scan(lambda c, _: self._step(c, batch), carry, None,
                          length=length)
    if self._fresh_batch:  # step i's probe: batch i + 1 (the last: the first)
      probes = jax.tree.map(lambda x: jnp.roll(x, -1, axis=0), batch)
      return jax.lax.scan(lambda c, xs: self._step(c, *xs), carry,
                          (batch, probes), length=length)
    return jax.lax.scan(self._step, carry, batch, length=length)

  def _sharpness_impl(self, params, state, batch, init):
    fn = lambda p: self.loss_fn(p, batch)
    precond = None
    if self.cfg.optimizer.base in ADAPTIVE:
      b2 = 0.999 if self.cfg.optimizer.base == "adam" else None
      precond = preconditioner_from_state(_base_state(state), b2=b2)
    return sharpness(fn, params, preconditioner=precond,
                     num_iters=self.cfg.sharpness_iters, rtol=1e-3, init=init)

  def _eval_impl(self, params, state, batch):
    params = self.eval_params(params, state)
    logits = self.model.apply({"params": params}, batch["x"])
    return accuracy(logits, batch["y"])

  # -- the run ---------------------------------------------------------------

  def _place(self, batch, stacked=False):
    """Device arrays; with a mesh, split over ``data``×``fsdp`` (axis 1 if stacked)."""
    if self.mesh is None:
      return jax.tree.map(jnp.asarray, batch)
    from jax.sharding import NamedSharding, PartitionSpec as P
    from cdat_fast.sharding import shard_batch
    if not stacked:
      return checked(lambda: shard_batch(batch, self.mesh))
    shards = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
    out = {}
    for k, x in batch.items():
      if x.shape[1] % shards:
        raise InputError(f"batch_size={x.shape[1]} is not divisible by the"
                         f" {shards} batch shards of mesh {self.cfg.mesh!r}")
      spec = P(None, ("data", "fsdp"), *([None] * (x.ndim - 2)))
      out[k] = jax.device_put(x, NamedSharding(self.mesh, spec))
    return out

  def init(self):
    cfg, ds = self.cfg, self.dataset
    key = jax.random.PRNGKey(cfg.seed)
    params = init_params(self.model, key, jnp.asarray(ds.x_train[:1]))
    if self.mesh is not None:
      from cdat_fast.sharding import shard_params, state_shardings
      params = shard_params(params, self.mesh)
      state = self.optimizer.init(params)
      state = jax.device_put(state, state_shardings(state, params, self.mesh))
    else:
      state = self.optimizer.init(params)
    prev_u = optax.tree.zeros_like(params) if cfg.track_alignment else ()
    step = jnp.zeros([], jnp.int32)
    if self.mesh is not None:
      # Replicated on the mesh: a resume restores every array with its
      # target's sharding, and a counter committed to one device cannot
      # enter the chunk beside the mesh's arrays.
      from cdat_fast.sharding import replicate
      step = replicate(step, self.mesh)
    carry = (params, state, prev_u, step)
    # Fresh buffers: the carry is donated, and init may share constants.
    return jax.tree.map(lambda x: jnp.array(x, copy=True), carry)

  def run(self, out_dir: str | os.PathLike | None = None, *,
          progress: bool = True, echo: Callable[[str], None] | None = print,
          resume: bool = False) -> RunResult:
    """Trains for ``cfg.steps`` steps, or continues a run with ``resume``.

    With ``resume``, the latest checkpoint in ``out_dir/checkpoints`` is
    restored (parameters, optimizer and tuner state, step, data order,
    sharpness warm start, metrics so far) and training continues to
    ``cfg.steps``; the result is bit-identical to an uninterrupted run on
    the same mesh. ``cfg.mesh`` may differ from the checkpoint's: the arrays
    are restored with this run's shardings and the losses then agree to
    float32 rounding.
    """
    cfg = self.cfg
    run = self._fresh_progress()
    data = self._run_data()
    checkpointer = None
    if out_dir is not None and (cfg.checkpoint_every or resume):
      from cdat_fast.harness.checkpoint import Checkpointer
      checkpointer = Checkpointer(Path(out_dir) / "checkpoints")
    if resume:
      if checkpointer is None:
        raise ValueError("resume needs the run directory (out_dir)")
      self._restore(run, checkpointer)
    if run.done < cfg.steps:  # compiled, and checked to fit, before writing
      length = self._next_length(run.done)
      self._program(length, run.carry, self._batch_like(data, length))
    writer = _Writer(out_dir, cfg, run.records if resume else None)
    t0 = time.perf_counter()
    progress = progress and sys.stderr.isatty()
    bar = tqdm(total=cfg.steps, disable=not progress, delay=3.0, leave=False,
               unit="step")
    try:
      while run.done < cfg.steps:
        length = self._next_length(run.done)
        metrics = self._train_chunk(run, data, length)
        bar.update(length)
        logged = run.done % cfg.log_every == 0 or run.done == cfg.steps
        record = self._record(run, metrics, data, length, logged)
        run.records.append(record)
        writer.record(record)
        if echo is not None and logged:
          line = self._log_line(record)
          bar.write(line) if progress else echo(line)
        if self._check_divergence(run, metrics["loss"], length):
          break
        if checkpointer is not None and cfg.checkpoint_every and (
            _crossed(run.done, length, cfg.checkpoint_every)
            or run.done == cfg.steps):
          self._save(run, checkpointer)
    finally:
      bar.close()
    summary, hist = self._summary(run, time.perf_counter() - t0)
    writer.finish(summary, hist, run.records)
    return RunResult(summary, run.records, hist,
                     self.eval_params(run.carry[0], run.carry[1]))

  # -- the pieces of a run ---------------------------------------------------

  def _next_length(self, done: int) -> int:
    """Steps from ``done`` to the next log point, measurement or the end.

    Chunks end at every multiple of ``log_every``, of ``sharpness_every``
    and of the spectrum's ``every``, so each is honoured exactly (a length
    not seen before compiles another program).
    """
    stops = [self.cfg.log_every, self.cfg.sharpness_every]
    if self.spectrum is not None:
      stops.append(self.spectrum.cfg.every)
    to_next = min(every - done % every for every in stops if every)
    return min(to_next, self.cfg.steps - done)

  def _batch_like(self, data: _RunData, length: int):
    """What :meth:`_train_chunk` passes for ``length`` steps (shapes only)."""
    if self.cfg.batch_size is None:
      return data.full
    shards = None
    out = {}
    for k, x in (("x", self.dataset.x_train), ("y", self.dataset.y_train)):
      shape = (length, self.cfg.batch_size) + x.shape[1:]
      if self.mesh is not None:
        from jax.sharding import NamedSharding, PartitionSpec as P
        shards = NamedSharding(self.mesh, P(None, ("data", "fsdp"),
                                            *([None] * (x.ndim - 1))))
      out[k] = jax.ShapeDtypeStruct(shape, x.dtype, sharding=shards)
    return out

  def _program(self, length: int, carry, batch):
    """The compiled chunk of ``length`` steps on batches shaped as ``batch``.

    Compiled once per length and batch shape; the first time, checked to
    fit in memory (:func:`cdat_fast.harness.memory.check_fits`), so a batch
    too large stops here, before anything is allocated for it.
    """
    key = (length,) + tuple((k, tuple(v.shape), str(v.dtype))
                            for k, v in sorted(batch.items()))
    program = self._programs.get(key)
    if program is None:
      program = self._chunk.lower(carry, batch, length=length).compile()
      full = self.cfg.batch_size is None
      devices = (list(self.mesh.devices.flat) if self.mesh is not None
                 else jax.devices()[:1])
      check_fits(program, devices, rows=batch["x"].shape[0 if full else 1],
                 full_batch=full)
      self._programs[key] = program
    return program

  def _fresh_progress(self) -> _Progress:
    cfg = self.cfg
    stream = (BatchStream(self.dataset, cfg.batch_size, cfg.seed)
              if cfg.batch_size is not None else None)
    return _Progress(carry=self.init(), stream=stream)

  def _run_data(self) -> _RunData:
    """The full batch (placed), the sharpness probe and the test set.

    Minibatch runs on one device place only the probe, not the training set.
    """
    ds = self.dataset
    train = {"x": ds.x_train, "y": ds.y_train}
    if self.cfg.batch_size is None or self.mesh is not None:
      full = self._place(train)
      probe = full if len(ds.x_train) <= 4096 else _first(full, 4096)
    else:
      full, probe = None, self._place(_first(train, 4096))
    test = None
    if ds.x_test is not None and len(ds.x_test):
      test = jax.tree.map(jnp.asarray, {"x": ds.x_test, "y": ds.y_test})
    return _RunData(full=full, probe=probe, test=test)

  def _restore(self, run: _Progress, checkpointer) -> None:
    """Continues ``run`` from the latest checkpoint of ``checkpointer``."""
    cfg = self.cfg
    restored = checkpointer.restore_latest(run.carry, cfg)
    run.carry, run.eigvec = restored.carry, restored.eigvec
    run.done, run.initial_loss = restored.step, restored.initial_loss
    run.records = restored.records
    run.history = {k: [v] for k, v in restored.history.items()}
    if run.stream is not None:
      run.stream = BatchStream(self.dataset, cfg.batch_size, cfg.seed,
                               *restored.stream_position)
    run.last_checkpoint = run.done

  def _save(self, run: _Progress, checkpointer) -> None:
    stream = run.stream
    checkpointer.save(
        step=run.done, carry=run.carry, eigvec=run.eigvec, cfg=self.cfg,
        initial_loss=run.initial_loss, records=run.records,
        history={k: np.concatenate(v) for k, v in run.history.items()},
        stream_position=((stream.epoch, stream.position)
                         if stream is not None else (0, 0)))
    run.last_checkpoint = run.done

  def _train_chunk(self, run: _Progress, data: _RunData,
                   length: int) -> dict[str, np.ndarray]:
    """Runs ``length`` steps; returns their metrics (one value per step)."""
    if run.stream is None:
      batch = data.full
    else:
      chunk = [next(run.stream) for _ in range(length)]
      batch = self._place({k: np.stack([b[k] for b in chunk])
                           for k in ("x", "y")}, stacked=True)
    run.carry, metrics = self._program(length, run.carry, batch)(run.carry,
                                                                 batch)
    metrics = jax.device_get(metrics)
    for k, v in metrics.items():
      run.history.setdefault(k, []).append(np.asarray(v))
    run.done += length
    if run.initial_loss is None:
      run.initial_loss = float(metrics["loss"][0])
    return metrics

  def _record(self, run: _Progress, metrics: dict[str, np.ndarray],
              data: _RunData, length: int, logged: bool = True
              ) -> dict[str, Any]:
    """A chunk's record: its last step's metrics and λ_max when due.

    At a log point (``logged``) also the test accuracy.
    """
    cfg = self.cfg
    record = {"step": run.done}
    record.update({k: float(v[-1]) for k, v in metrics.items()})
    if data.test is not None and logged:
      record["test_accuracy"] = float(self._eval(run.carry[0], run.carry[1],
                                                 data.test))
    if cfg.sharpness_every and (_crossed(run.done, length, cfg.sharpness_every)
                                or run.done == length):
      lam, run.eigvec = self._sharpness(run.carry[0], run.carry[1], data.probe,
                                        run.eigvec)
      record["sharpness"] = float(lam)
      record["eta_sharpness"] = record["learning_rate"] * float(lam)
      if cfg.track_alignment:
        u = run.carry[2]
        nu = float(optax.tree.norm(u))
        record["alignment"] = (abs(float(treemath.vdot(u, run.eigvec))) / nu
                               if nu > 0 else 0.0)
    if self.spectrum is not None:
      record.update(self.spectrum.measure(self, run.done, length, run.carry))
    return record

  def _log_line(self, record: dict) -> str:
    steps = self.cfg.steps
    line = (f"step {record['step']:>{len(str(steps))}}/{steps}"
            f"  loss {record['loss']:.5g}  lr {record['learning_rate']:.4g}")
    if "test_accuracy" in record:
      line += f"  test acc {record['test_accuracy']:.3f}"
    if "eta_sharpness" in record:
      line += f"  η·λ {record['eta_sharpness']:.3f}"
    return line

  def _check_divergence(self, run: _Progress, losses: np.ndarray,
                        length: int) -> bool:
    """Marks ``run`` diverged if a loss of the chunk is not finite or high."""
    cfg = self.cfg
    bad = ~np.isfinite(losses)
    if bad.any():
      first = run.done - length + int(np.argmax(bad))
      message = f"loss is not finite at step {first}"
    elif np.max(losses) > cfg.divergence_factor * max(run.initial_loss, 1e-30):
      message = (f"loss {float(np.max(losses)):.4g} exceeds"
                 f" {cfg.divergence_factor:g}× the initial loss"
                 f" {run.initial_loss:.4g}")
    else:
      return False
    if run.last_checkpoint is not None:
      message += f"; last good checkpoint: step {run.last_checkpoint}"
    run.status, run.message = "diverged", message
    return True

  def _summary(self, run: _Progress, seconds: float
               ) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The run's summary (final loss: mean of the last 5) and its history."""
    hist = {k: np.concatenate(v) for k, v in run.history.items()}
    losses = hist.get("loss", np.zeros(0))
    tail = losses[-5:]
    last5 = float(np.mean(tail)) if len(tail) and np.all(
        np.isfinite(tail)) else math.inf
    # A diverged run ranks last whatever its last losses were.
    final = last5 if run.status == "ok" else math.inf
    summary = {
        "status": run.status,
        "message": run.message,
        "steps": int(run.done),
        "final_loss": final,
        "last5_loss": last5,
        "initial_loss": run.initial_loss,
        "final_learning_rate": (float(hist["learning_rate"][-1]) if run.done
                                else None),
        "seconds": seconds,
        "num_skipped": int(optax.tree.get(run.carry[1], "num_skipped",
                                          default=0)),
    }
    if run.records and "test_accuracy" in run.records[-1]:
      summary["test_accuracy"] = run.records[-1]["test_accuracy"]
    return summary, hist


def _crossed(done: int, length: int, every: int) -> bool:
  """Whether the chunk ending at ``done`` passes a multiple of ``every``."""
  return done // every > (done - length) // every


class _RunData(NamedTuple):
  full: Any  # the whole training set, on the device(s); None: not placed
  probe: Any  # where the sharpness is measured (at most 4096 examples)
  test: Any  # the test set, or None


@dataclasses.dataclass
class _Progress:
  """Where a run stands: what a checkpoint saves and a resume restores."""
  carry: Any  # (params, optimizer state, previous update, step)
  stream: BatchStream | None  # minibatch order; None: full batch
  done: int = 0
  initial_loss: float | None = None
  eigvec: Any = None  # sharpness warm start
  records: list[dict[str, Any]] = dataclasses.field(default_factory=list)
  history: dict[str, list[np.ndarray]] = dataclasses.field(default_factory=dict)
  status: str = "ok"
  message: str = ""
  last_checkpoint: int | None = None

class _Writer:
  """Writes a run's files; nothing is written without an ``out_dir``."""

  def __init__(self, out_dir, cfg, records=None):
    self.dir = None if out_dir is None else Path(out_dir)
    self.cfg = cfg
    self._metrics = None
    if self.dir is not None:
      self.dir.mkdir(parents=True, exist_ok=True)
      (self.dir / "config.json").write_text(
          json.dumps(config_to_dict(cfg), indent=2, default=str) + "\n")
      self._metrics = open(self.dir / "metrics.jsonl", "w")
      for record in records or ():
        self.record(record)

  def record(self, record):
    if self._metrics is not None:
      self._metrics.write(json.dumps(
          {k: _json_safe(v) for k, v in record.items()}) + "\n")
      self._metrics.flush()

  def finish(self, summary, history, records):
    if self.dir is None:
      return
    self._metrics.close()
    np.savez(self.dir / "history.npz", **history)
    (self.dir / "summary.json").write_text(json.dumps(
        {k: _json_safe(v) for k, v in summary.items()}, indent=2) + "\n")
    from cdat_fast.harness.plots import plot_runs
    plot_runs([self.dir], self.dir / "training.png")


def train(cfg: TrainConfig, out_dir=None, **kwargs) -> RunResult:
  """Builds a :class:`Trainer` for ``cfg`` and runs it."""
  return Trainer(cfg).run(out_dir, **kwargs)
