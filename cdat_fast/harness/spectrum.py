"""The Hessian spectrum of a run, on a fixed subset of its data, in chunks.

Every ``every`` steps (``cdat-fast train --spectrum-every N``) the functions of
:mod:`cdat_fast.diagnostics` are evaluated at the current parameters on a
fixed, seeded subset of ``subset`` training examples (``--spectrum-subset``):
the top-``k`` eigenvalues of the Hessian by Lanczos, its trace by Hutchinson
and its spectral density by stochastic Lanczos quadrature, preconditioned by
RMSProp/Adam's ``√ν̂ + ε`` as the sharpness is. The objective on the subset,

.. math::
  f_S(w) = \\sum_c \\frac{|B_c|}{|S|} f(w; B_c),

is summed over chunks ``B_c`` of ``chunk`` examples (``--spectrum-chunk``; the
last chunk may be smaller) by ``jax.lax.scan`` with each chunk's loss under
``jax.checkpoint``, so that a Hessian-vector product or a second directional
derivative holds one chunk's activations at a time, not the subset's; since
the training loss ``f(w; B)`` is a mean over ``B`` plus the weight decay, the
weighted sum is exactly the loss on the whole subset, and so are its
derivatives. The same probes (a fixed key) are used at every measurement.

Results: each measured log record of ``metrics.jsonl`` gets
``top_eigenvalues`` (a list, descending), ``hessian_trace`` and
``hessian_trace_stderr``; ``spectrum.jsonl`` in the run directory gets one
line per measurement with those and the density's nodes and weights
(``[probes, iters]`` lists) and the settings.
"""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from cdat_fast import checks, diagnostics
from cdat_fast.curvature import preconditioner_from_state
from cdat_fast.harness.data import Dataset, take_subset
from cdat_fast.harness.errors import InputError, checked
from cdat_fast.harness.optimizers import ADAPTIVE
from cdat_fast.tuned import TunedState


@dataclasses.dataclass(frozen=True)
class SpectrumConfig:
  """What to measure, how often and on how much data.

  Attributes:
    every: measure every ``every`` steps (and at the first log point); 0
      never.
    subset: examples of the fixed subset (at most the training set); None:
      the whole training set up to 1024 examples.
    chunk: examples per chunk.
    top_k: number of top eigenvalues (0: none).
    iters: Lanczos steps, for the top eigenvalues and per density probe.
    density_probes: probes of the spectral density (0: none).
    trace_probes: Hutchinson probes of the trace (0: none).
    seed: seed of the subset and of the probes.
  """
  every: int = 0
  subset: int | None = None
  chunk: int = 256
  top_k: int = 5
  iters: int = 64
  density_probes: int = 4
  trace_probes: int = 32
  seed: int = 0

  def validate(self) -> None:
    """Checks every field by its flag's name (``spectrum_`` + the field).

    Raises:
      InputError: naming the field and what was wrong.
    """
    checked(self._validate)

  def _validate(self) -> None:
    for name in ("every", "top_k", "density_probes", "trace_probes", "seed"):
      checks.check_int(f"spectrum_{name}", getattr(self, name), low=0)
    for name in ("chunk", "iters"):
      checks.check_int(f"spectrum_{name}", getattr(self, name), low=1)
    if self.subset is not None:
      checks.check_int("spectrum_subset", self.subset, low=1)
    if self.top_k > self.iters:
      raise ValueError(f"spectrum_top_k must be at most spectrum_iters "
                       f"({self.iters}), got {self.top_k}")


class Chunks(NamedTuple):
  """A subset of examples cut into chunks (a pytree: pass it to a jit).

  Attributes:
    stacked: the full chunks, ``{"x": [n, chunk, ...], "y": [n, chunk, ...]}``,
      or None when the subset is smaller than one chunk.
    rest: the last, smaller chunk, or None.
  """
  stacked: dict | None
  rest: dict | None

  @property
  def size(self) -> int:
    """The number of examples."""
    full = 0 if self.stacked is None else math.prod(
        self.stacked["y"].shape[:2])
    return full + (0 if self.rest is None else len(self.rest["y"]))


def make_chunks(x: np.ndarray, y: np.ndarray, chunk: int) -> Chunks:
  """Cuts ``(x, y)`` into chunks of ``chunk`` examples, in order."""
  checks.check_int("chunk", chunk, low=1)
  n = len(x)
  if n == 0 or len(y) != n:
    raise ValueError(f"make_chunks: {n} inputs and {len(y)} targets")
  full = n // chunk
  stacked = rest = None
  if full:
    stacked = {"x": jnp.asarray(x[:full * chunk].reshape(
        (full, chunk) + x.shape[1:])), "y": jnp.asarray(
            y[:full * chunk].reshape((full, chunk) + y.shape[1:]))}
  if n % chunk:
    rest = {"x": jnp.asarray(x[full * chunk:]),
            "y": jnp.asarray(y[full * chunk:])}
  return Chunks(stacked, rest)


def chunked_objective(loss_fn: Callable[[Any, dict], jax.Array],
                      chunks: Chunks) -> Callable[[Any], jax.Array]:
  """``w ↦ Σ_c (|B_c| / |S|) loss_fn(w, B_c)``, one chunk in memory at a time.

  ``jax.lax.scan`` over the full chunks, each chunk's loss under
  ``jax.checkpoint`` (reverse mode recomputes it instead of keeping its
  activations), plus the smaller last chunk.

  Args:
    loss_fn: ``loss_fn(params, batch)``, a mean over the batch (plus terms
      that do not depend on it, such as weight decay).
    chunks: from :func:`make_chunks`.

  Returns:
    The objective on the whole subset, a function of the parameters.
  """
  remat = jax.checkpoint(loss_fn)

  def fn(params):
    total = jnp.zeros([], jnp.float32)
    if chunks.stacked is not None:
      size = chunks.stacked["y"].shape[1]
      acc, _ = jax.lax.scan(
          lambda a, batch: (a + remat(params, batch), None),
          jnp.zeros([], jnp.float32), chunks.stacked)
      total = total + acc * (size / chunks.size)
    if chunks.rest is not None:
      total = total + remat(params, chunks.rest) * (
          len(chunks.rest["y"]) / chunks.size)
    return total

  return fn


def evaluate_spectrum(fn: Callable[[Any], jax.Array], params: Any,
                      cfg: SpectrumConfig, key: jax.Array,
                      preconditioner: Any = None) -> dict[str, Any]:
  """The diagnostics of ``cfg`` for ``fn`` at ``params`` (traceable).

  Returns:
    ``{"top_eigenvalues": [k], "hessian_trace": (), "hessian_trace_stderr":
    (), "density_nodes": [probes, m], "density_weights": [probes, m]}``,
    without the entries whose count in ``cfg`` is 0.
  """
  k_top, k_density, k_trace = jax.random.split(key, 3)
  out = {}
  if cfg.top_k:
    out["top_eigenvalues"] = diagnostics.top_eigenvalues(
        fn, params, cfg.top_k, key=k_top, num_iters=cfg.iters,
        preconditioner=preconditioner).eigenvalues
  if cfg.trace_probes:
    trace = diagnostics.hessian_trace(
        fn, params, key=k_trace, num_probes=cfg.trace_probes,
        preconditioner=preconditioner)
    out["hessian_trace"] = trace.estimate
    out["hessian_trace_stderr"] = trace.stderr
  if cfg.density_probes:
    density = diagnostics.spectral_density(
        fn, params, key=k_density, num_probes=cfg.density_probes,
        num_iters=cfg.iters, preconditioner=preconditioner)
    out["density_nodes"] = density.nodes
    out["density_weights"] = density.weights
  return out


def _finite_list(x) -> Any:
  """A JSON-safe (nested) list or float: non-finite values become None."""
  x = np.asarray(x, np.float64)
  if x.ndim == 0:
    return float(x) if math.isfinite(x) else None
  return [_finite_list(v) for v in x]


def _preconditioner(train_cfg, state):
  """RMSProp/Adam's ``√ν̂ + ε`` from the optimizer state, as the sharpness."""
  base = train_cfg.optimizer.base
  if base not in ADAPTIVE:
    return None
  base_state = state.base if isinstance(state, TunedState) else state[0]
  return preconditioner_from_state(base_state,
                                   b2=0.999 if base == "adam" else None)


class SpectrumMonitor:
  """Measures the diagnostics of :class:`SpectrumConfig` during a run.

  Pass it to :class:`cdat_fast.harness.train.Trainer` (``spectrum=``); at
  every log record the trainer calls :meth:`measure`. The subset and the
  measurement are prepared by :meth:`prepare` or on the first call.

  Args:
    cfg: what to measure.
    out_dir: the run directory, where ``spectrum.jsonl`` is written; None
      writes nothing.
    append: add to an existing ``spectrum.jsonl`` (a resumed run) instead of
      starting it afresh.
  """

  def __init__(self, cfg: SpectrumConfig, out_dir=None, *,
               append: bool = False):
    cfg.validate()
    self.cfg = cfg
    self.path = None if out_dir is None else Path(out_dir) / "spectrum.jsonl"
    self._append = append
    self._measure = None
    self._chunks = None

  def due(self, done: int, length: int) -> bool:
    """Whether the chunk of ``length`` steps ending at ``done`` is measured."""
    every = self.cfg.every
    return bool(every) and (done // every > (done - length) // every
                            or done == length)

  def prepare(self, trainer) -> None:
    """Draws the subset from ``trainer``'s data and builds the measurement.

    Raises:
      InputError: if the subset is larger than the training set.
    """
    ds: Dataset = trainer.dataset
    n = len(ds.x_train)
    size = min(n, 1024) if self.cfg.subset is None else self.cfg.subset
    if size > n:
      raise InputError(f"spectrum_subset must be at most the {n} training"
                       f" examples, got {size}")
    sub = take_subset(ds, size, seed=self.cfg.seed)
    self._chunks = make_chunks(sub.x_train, sub.y_train, self.cfg.chunk)
    cfg, train_cfg, loss_fn = self.cfg, trainer.cfg, trainer.loss_fn

    def measure(params, state, chunks):
      fn = chunked_objective(loss_fn, chunks)
      return evaluate_spectrum(fn, params, cfg, jax.random.key(cfg.seed),
                               _preconditioner(train_cfg, state))

    self._measure = jax.jit(measure)

  def measure(self, trainer, done: int, length: int, carry) -> dict[str, Any]:
    """The record entries for the chunk ending at step ``done`` (or {})."""
    if not self.due(done, length):
      return {}
    if self._measure is None:
      self.prepare(trainer)
    params, state = carry[0], carry[1]
    out = jax.device_get(self._measure(params, state, self._chunks))
    out = {k: _finite_list(v) for k, v in out.items()}
    if self.path is not None:
      line = {"step": done, **out,
              "settings": dataclasses.asdict(self.cfg)}
      self.path.parent.mkdir(parents=True, exist_ok=True)
      # A fresh run starts the file at its first measurement.
      with open(self.path, "a" if self._append else "w") as f:
        f.write(json.dumps(line) + "\n")
      self._append = True
    return {k: v for k, v in out.items() if not k.startswith("density_")}
