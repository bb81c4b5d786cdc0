#!/usr/bin/env python
"""Checks and times the fused jet kernels on a GPU against XLA's jvp-of-jvp.

Run on a machine with a GPU and JAX with CUDA (0.10 or later)::

  python bench/gpu_kernels.py            # full run, about 2-4 minutes
  python bench/gpu_kernels.py --budget 120

The repository must be importable: ``pip install -e . --no-deps``, or
``bash bench/device_check.sh`` (this script and the compiled-kernel tests,
with the package put on ``PYTHONPATH``, logs to ``$OUT``). Nothing beyond JAX
is needed for the kernels; the model sections need flax and optax.

1. Correctness: ``dense_jet``, ``activation_jet``, ``layer_norm_jet``,
   ``attention_jet``
   compiled on the GPU (``interpret=False``) against their pure-jnp references
   at awkward sizes, f32 at ``precision=HIGHEST`` (tight), f32 at default
   precision (TF32, loose) and bf16 (loose).
2. Timing: each kernel against XLA's jvp-of-jvp of the plain layer along one
   direction (the CDAT structure: the weights' second-order tangent is zero),
   at 128 / 1024 / 8192 tokens, d = 1024 / 4096, bf16 and f32. The table
   shows milliseconds, the speed-up ``xla / fused``, achieved TFLOP/s (dense:
   5 matmuls of ``2·tokens·d·d``) and GB/s (every input read once, every
   output written once).
3. A small sweep of dense_jet block sizes, and (with flax) an MLP's uᵀHu by
   jvp-of-jvp with ``cdat_fast.nn`` layers vs plain ``flax.linen``, a
   pre-LN transformer block fused vs XLA, and a whole CDAT step on the
   paper's NanoLM (``models.NanoLM(fused=True)`` vs flax's layers) with its
   cost relative to the base step.

On a machine without a GPU it says so and exits 0. Exit status 1 when a
correctness check fails or a kernel does not compile.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _import_kernels():
  """``cdat_fast.kernels`` if installed, else ``kernels/`` from the repo."""
  try:
    from cdat_fast import kernels  # pylint: disable=g-import-not-at-top
    return kernels
  except Exception:  # pylint: disable=broad-except
    if _REPO not in sys.path:
      sys.path.insert(0, _REPO)
    import kernels  # pylint: disable=g-import-not-at-top
    sys.modules.setdefault("cdat_fast.kernels", kernels)
    return kernels


class Bench:
  """Holds the run's options, deadline and failures."""

  def __init__(self, args):
    self.args = args
    self.start = time.perf_counter()
    self.failures = []
    self.skipped = 0

  def out_of_time(self) -> bool:
    if time.perf_counter() - self.start > self.args.budget:
      self.skipped += 1
      return True
    return False


def _time(fn, *args, min_time=0.05, repeats=5):
  """Median seconds per call of a compiled ``fn`` (compiles first)."""
  jax.block_until_ready(fn(*args))
  t0 = time.perf_counter()
  jax.block_until_ready(fn(*args))
  once = max(time.perf_counter() - t0, 1e-6)
  inner = int(min(200, max(1, min_time / once)))
  samples = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    for _ in range(inner):
      out = fn(*args)
    jax.block_until_ready(out)
    samples.append((time.perf_counter() - t0) / inner)
  return statistics.median(samples)


def _randn(key, shape, dtype, scale=1.0):
  return (scale * jax.random.normal(key, shape, jnp.float32)).astype(dtype)


def _rel_err(actual, expected) -> float:
  err, ref = 0.0, 0.0
  for a, e in zip(actual, expected):
    a = np.asarray(a, np.float32)
    e = np.asarray(e, np.float32)
    err = max(err, float(np.max(np.abs(a - e))) if a.size else 0.0)
    ref = max(ref, float(np.max(np.abs(e))) if e.size else 0.0)
  return err / max(ref, 1e-30)


# ---------------------------------------------------------------------------
# Problems: inputs, fused call, XLA baseline, work.
# ---------------------------------------------------------------------------


def dense_problem(k, tokens, d_in, d_out, dtype, seed=0):
  keys = jax.random.split(jax.random.key(seed), 7)
  x = _randn(keys[0], (tokens, d_in), dtype)
  w = _randn(keys[1], (d_in, d_out), dtype, d_in ** -0.5)
  b = _randn(keys[2], (d_out,), dtype)
  dx = _randn(keys[3], (tokens, d_in), dtype)
  dw = _randn(keys[4], (d_in, d_out), dtype, d_in ** -0.5)
  db = _randn(keys[5], (d_out,), dtype)
  ddx = _randn(keys[6], (tokens, d_in), dtype)
  return (x, w, b, dx, dw, db, ddx)


def dense_xla(x, w, b, dx, dw, db, ddx, precision=None):
  """XLA's jvp-of-jvp of ``x @ w + b`` along one direction (dw, db fixed)."""
  plain = lambda x, w, b: jnp.matmul(x, w, precision=precision) + b
  first = lambda x, w, b, dx: jax.jvp(plain, (x, w, b), (dx, dw, db))
  (y, dy), (_, ddy) = jax.jvp(first, (x, w, b, dx), (dx, dw, db, ddx))
  return y, dy, ddy


def activation_problem(tokens, d, dtype, seed=0):
  k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
  return (_randn(k1, (tokens, d), dtype, 2.0), _randn(k2, (tokens, d), dtype),
          _randn(k3, (tokens, d), dtype))


def activation_xla(x, dx, ddx, *, activation, kernels):
  f = kernels.ACTIVATIONS[activation]
  first = lambda x, dx: jax.jvp(f, (x,), (dx,))
  (y, dy), (_, ddy) = jax.jvp(first, (x, dx), (dx, ddx))
  return y, dy, ddy


def layer_norm_problem(tokens, d, dtype, seed=0):
  keys = jax.random.split(jax.random.key(seed), 7)
  rows = lambda k, s=1.0: _randn(k, (tokens, d), dtype, s)
  vec = lambda k: _randn(k, (d,), jnp.float32)
  return (rows(keys[0], 2.0), 1.0 + vec(keys[1]), vec(keys[2]), rows(keys[3]),
          vec(keys[4]), vec(keys[5]), rows(keys[6]))


def layer_norm_xla(x, scale, bias, dx, dscale, dbias, ddx, *, epsilon=1e-6):
  """XLA's jvp-of-jvp of the plain formula (float32 statistics, like flax)."""

  def plain(x, scale, bias):
    x32 = x.astype(jnp.float32)
    mean = x32.mean(-1, keepdims=True)
    var = jnp.square(x32 - mean).mean(-1, keepdims=True)
    return ((x32 - mean) * jax.lax.rsqrt(var + epsilon) * scale
            + bias).astype(x.dtype)

  first = lambda x, s, b, dx: jax.jvp(plain, (x, s, b), (dx, dscale, dbias))
  (y, dy), (_, ddy) = jax.jvp(first, (x, scale, bias, dx),
                              (dx, dscale, dbias, ddx))
  return y, dy, ddy


def attention_problem(heads, tokens, d, dtype, seed=0):
  keys = jax.random.split(jax.random.key(seed), 9)
  shape = (heads, tokens, d)
  return tuple(_randn(k, shape, dtype) for k in keys)


def attention_xla(q, k, v, dq, dk, dv, ddq, ddk, ddv, *, causal=True):
  """XLA's jvp-of-jvp of plain softmax attention (float32 softmax)."""

  def plain(q, k, v):
    s = jnp.einsum("htd,hsd->hts", q, k,
                   preferred_element_type=jnp.float32) / q.shape[-1] ** 0.5
    if causal:
      s = jnp.where(jnp.tril(jnp.ones(s.shape[-2:], bool)), s, -jnp.inf)
    p = jax.nn.softmax(s, -1).astype(v.dtype)
    return jnp.einsum("hts,hsd->htd", p, v)

  first = lambda *a: jax.jvp(plain, a[:3], a[3:])
  (y, dy), (_, ddy) = jax.jvp(first, (q, k, v, dq, dk, dv),
                              (dq, dk, dv, ddq, ddk, ddv))
  return y, dy, ddy


# ---------------------------------------------------------------------------
# 1. Correctness.
# ---------------------------------------------------------------------------


def check(bench, kernels, name, fused, reference, args, tol):
  try:
    err = _rel_err(jax.jit(fused)(*args), jax.jit(reference)(*args))
  except Exception as e:  # pylint: disable=broad-except
    bench.failures.append(f"{name}: {type(e).__name__}")
    print(f"  {name:<44} ERROR {type(e).__name__}: {str(e).splitlines()[0]}")
    if bench.args.verbose:
      traceback.print_exc()
    return
  ok = err <= tol
  if not ok:
    bench.failures.append(name)
  print(f"  {name:<44} {'ok  ' if ok else 'FAIL'} max|err|/max|ref| = "
        f"{err:.2e} (tol {tol:.0e})")


def correctness(bench, kernels, interpret):
  print("\n== correctness (compiled vs reference) ==")
  highest = jax.lax.Precision.HIGHEST
  for tokens, d_in, d_out in ((2 * 37, 19, 53), (300, 1000, 700)):
    for dtype, precision, tol in ((jnp.float32, highest, 1e-5),
                                  (jnp.float32, None, 1e-2),
                                  (jnp.bfloat16, None, 3e-2)):
      args = dense_problem(kernels, tokens, d_in, d_out, dtype)
      tag = "f32-highest" if precision else jnp.dtype(dtype).name
      check(bench, kernels, f"dense_jet {tokens}x{d_in}x{d_out} {tag}",
            functools.partial(kernels.dense_jet, precision=precision,
                              interpret=interpret),
            functools.partial(kernels.dense_jet_reference,
                              precision=precision), args, tol)
    # b, db absent; dx absent (first layer).
    args = list(dense_problem(kernels, tokens, d_in, d_out, jnp.float32))
    no_bias = args[:2] + [None] + args[3:5] + [None] + args[6:]
    first_layer = args[:3] + [None] + args[4:6] + [None]
    for tag, a in (("no bias", no_bias), ("dx=ddx=None", first_layer)):
      check(bench, kernels, f"dense_jet {tokens}x{d_in}x{d_out} f32 {tag}",
            functools.partial(kernels.dense_jet, precision=highest,
                              interpret=interpret),
            functools.partial(kernels.dense_jet_reference, precision=highest),
            a, 1e-5)
  for activation in sorted(kernels.ACTIVATIONS):
    for dtype, tol in ((jnp.float32, 1e-4), (jnp.bfloat16, 3e-2)):
      args = activation_problem(3 * 37, 19, dtype)
      check(bench, kernels,
            f"activation_jet {activation} 111x19 {jnp.dtype(dtype).name}",
            functools.partial(kernels.activation_jet, activation=activation,
                              interpret=interpret),
            functools.partial(kernels.activation_jet_reference,
                              activation=activation), args, tol)
  for d in (53, 1000):
    for dtype, tol in ((jnp.float32, 1e-4), (jnp.bfloat16, 5e-2)):
      args = layer_norm_problem(2 * 37, d, dtype)
      check(bench, kernels, f"layer_norm_jet 74x{d} {jnp.dtype(dtype).name}",
            functools.partial(kernels.layer_norm_jet, interpret=interpret),
            kernels.layer_norm_jet_reference, args, tol)
  for causal in (False, True):
    for dtype, tol in ((jnp.float32, 1e-2), (jnp.bfloat16, 5e-2)):
      args = attention_problem(3, 2 * 37, 40, dtype)
      check(bench, kernels, f"attention_jet 3x74x40 causal={causal} "
            f"{jnp.dtype(dtype).name}",
            functools.partial(kernels.attention_jet, causal=causal,
                              interpret=interpret),
            functools.partial(kernels.attention_jet_reference, causal=causal),
            args, tol)


# ---------------------------------------------------------------------------
# 2. Timing.
# ---------------------------------------------------------------------------

_HEADER = (f"  {'kernel':<22}{'tokens':>7}{'d':>6} {'dtype':<9}"
           f"{'fused ms':>10}{'xla ms':>9}{'xla/fused':>10}"
           f"{'fused TF/s':>11}{'xla TF/s':>9}"
           f"{'fused GB/s':>11}{'xla GB/s':>9}")


def time_row(bench, name, tokens, d, dtype, fused, xla, args, flops, nbytes):
  if bench.out_of_time():
    return
  label = f"  {name:<22}{tokens:>7}{d:>6} {jnp.dtype(dtype).name:<9}"
  try:
    t_fused = _time(jax.jit(fused), *args)
  except Exception as e:  # pylint: disable=broad-except
    bench.failures.append(f"{name} {tokens}x{d}: {type(e).__name__}")
    print(f"{label}fused ERROR {type(e).__name__}: {str(e).splitlines()[0]}")
    return
  t_xla = _time(jax.jit(xla), *args)
  tf = lambda t: f"{flops / t / 1e12:>9.1f}" if flops else f"{'-':>9}"
  print(f"{label}{t_fused * 1e3:>10.3f}{t_xla * 1e3:>9.3f}"
        f"{t_xla / t_fused:>10.2f}{tf(t_fused):>11}{tf(t_xla):>9}"
        f"{nbytes / t_fused / 1e9:>11.0f}{nbytes / t_xla / 1e9:>9.0f}")


def timing(bench, kernels, interpret, tokens_list, d_list, dtypes):
  print("\n== timing: fused kernel vs XLA jvp-of-jvp (median of 5) ==")
  print(_HEADER)
  for dtype in dtypes:
    item = jnp.dtype(dtype).itemsize
    for d in d_list:
      for tokens in tokens_list:
        args = dense_problem(kernels, tokens, d, d, dtype)
        time_row(bench, "dense_jet", tokens, d, dtype,
                 functools.partial(kernels.dense_jet, interpret=interpret),
                 dense_xla, args, flops=5 * 2 * tokens * d * d,
                 nbytes=item * (3 * tokens * d + 2 * d * d + 2 * d
                                + 3 * tokens * d))
  for dtype in dtypes:
    item = jnp.dtype(dtype).itemsize
    for activation in ("relu", "gelu"):
      for tokens in tokens_list[1:]:
        d = d_list[-1]
        args = activation_problem(tokens, d, dtype)
        time_row(bench, f"activation_jet {activation}", tokens, d, dtype,
                 functools.partial(kernels.activation_jet,
                                   activation=activation,
                                   interpret=interpret),
                 functools.partial(activation_xla, activation=activation,
                                   kernels=kernels),
                 args, flops=0, nbytes=item * 6 * tokens * d)
  for dtype in dtypes:
    item = jnp.dtype(dtype).itemsize
    for d in d_list:
      for tokens in tokens_list[1:]:
        args = layer_norm_problem(tokens, d, dtype)
        time_row(bench, "layer_norm_jet", tokens, d, dtype,
                 functools.partial(kernels.layer_norm_jet,
                                   interpret=interpret),
                 layer_norm_xla, args, flops=0,
                 nbytes=item * 6 * tokens * d)
  # Causal attention, 8 heads of 64 features: 13 matmuls per key block (2
  # for attention itself), half of them skipped by the causal mask; bytes:
  # 9 inputs and 3 outputs of (heads, tokens, 64) each.
  for dtype in dtypes:
    item = jnp.dtype(dtype).itemsize
    for tokens in tokens_list[1:]:
      heads, d = 8, 64
      args = attention_problem(heads, tokens, d, dtype)
      time_row(bench, "attention_jet causal", tokens, d, dtype,
               functools.partial(kernels.attention_jet, causal=True,
                                 interpret=interpret),
               attention_xla, args,
               flops=13 * 2 * heads * tokens * tokens * d // 2,
               nbytes=item * 12 * heads * tokens * d)


def block_sweep(bench, kernels, interpret, tokens, d, dtype):
  print(f"\n== dense_jet block sizes at {tokens} tokens, d={d}, "
        f"{jnp.dtype(dtype).name} ==")
  args = dense_problem(kernels, tokens, d, d, dtype)
  flops = 5 * 2 * tokens * d * d
  for bm, bn, bk, warps in ((64, 64, 32, 4), (64, 128, 32, 4),
                            (128, 64, 32, 8), (128, 128, 32, 8),
                            (128, 128, 64, 8)):
    if bench.out_of_time():
      return
    fn = functools.partial(kernels.dense_jet, interpret=interpret, block_m=bm,
                           block_n=bn, block_k=bk, num_warps=warps)
    try:
      t = _time(jax.jit(fn), *args)
      print(f"  block_m={bm:<4} block_n={bn:<4} block_k={bk:<3} "
            f"num_warps={warps}: {t * 1e3:8.3f} ms {flops / t / 1e12:7.1f} "
            "TFLOP/s")
    except Exception as e:  # pylint: disable=broad-except
      print(f"  block_m={bm:<4} block_n={bn:<4} block_k={bk:<3} "
            f"num_warps={warps}: ERROR {type(e).__name__}: "
            f"{str(e).splitlines()[0]}")


def _compare_models(bench, label, jet_model, ref_model, x, ref_name):
  """Times uᵀHu by jvp-of-jvp of a model against a reference, one line."""
  params = jax.jit(ref_model.init)(jax.random.key(1), x)
  u = jax.tree.map(lambda p: 0.01 * jnp.ones_like(p), params)

  def quad(model):
    f = lambda p: jnp.mean(jnp.square(model.apply(p, x).astype(jnp.float32)))
    return jax.jit(lambda p, u: jax.jvp(
        lambda q: jax.jvp(f, (q,), (u,))[1], (p,), (u,)))

  try:
    q_jet, q_ref = quad(jet_model), quad(ref_model)
    err = _rel_err(q_jet(params, u), q_ref(params, u))
    t_jet, t_ref = _time(q_jet, params, u), _time(q_ref, params, u)
    print(f"  {label:<13} fused {t_jet * 1e3:8.3f} ms  {ref_name} "
          f"{t_ref * 1e3:8.3f} ms  {ref_name}/fused {t_ref / t_jet:5.2f}  "
          f"rel.err {err:.1e}")
  except Exception as e:  # pylint: disable=broad-except
    _report_error(bench, label, e)


def _report_error(bench, label, e):
  """A failed comparison: recorded (exit status 1) and printed on one line."""
  bench.failures.append(f"{label}: {type(e).__name__}")
  print(f"  {label:<13} ERROR {type(e).__name__}: {str(e).splitlines()[0]}")


def mlp_section(bench, tokens_list, d, dtype):
  """uᵀHu of an MLP with cdat_fast.nn layers vs flax.linen (needs flax)."""
  try:
    import flax.linen as fnn  # pylint: disable=g-import-not-at-top
    from cdat_fast import nn as jet_nn  # pylint: disable=g-import-not-at-top
  except Exception as e:  # pylint: disable=broad-except
    print(f"\n== MLP section skipped ({type(e).__name__}: {e}) ==")
    return
  print(f"\n== MLP uᵀHu by jvp-of-jvp: cdat_fast.nn vs flax.linen "
        f"(4 x Dense({d}) + gelu, {jnp.dtype(dtype).name}) ==")

  def mlp(lib):
    layers = []
    for _ in range(3):
      layers += [lib.Dense(d, dtype=dtype), lib.gelu]
    return fnn.Sequential(layers + [lib.Dense(d, dtype=dtype)])

  for tokens in tokens_list:
    if bench.out_of_time():
      return
    x = _randn(jax.random.key(0), (tokens, d), dtype)
    _compare_models(bench, f"tokens={tokens}", mlp(jet_nn), mlp(fnn), x,
                    "flax")


def block_section(bench, seq_list, d, heads, dtype, batch=4):
  """uᵀHu of a pre-LN transformer block: fused cdat_fast.nn vs fused=False.

  LayerNorm, q/k/v Dense, causal attention, output Dense, residual add, then
  LayerNorm, Dense(4d), gelu, Dense, residual add (``cdat_fast.nn.add``):
  every layer of the block on the fused path, against the same layers with
  ``fused=False`` (XLA's jvp-of-jvp of the same formulas).
  """
  try:
    import flax.linen as fnn  # pylint: disable=g-import-not-at-top
    from cdat_fast import nn as jet_nn  # pylint: disable=g-import-not-at-top
  except Exception as e:  # pylint: disable=broad-except
    print(f"\n== block section skipped ({type(e).__name__}: {e}) ==")
    return
  print(f"\n== transformer block uᵀHu: fused vs XLA (batch {batch}, d={d}, "
        f"{heads} heads, {jnp.dtype(dtype).name}) ==")

  class Block(fnn.Module):
    fused: bool

    @fnn.compact
    def __call__(self, x):
      dense = lambda n: jet_nn.Dense(n, dtype=dtype, fused=self.fused)
      norm = lambda: jet_nn.LayerNorm(fused=self.fused)
      y = norm()(x)
      q, k, v = dense(d)(y), dense(d)(y), dense(d)(y)
      y = jet_nn.attention(q, k, v, num_heads=heads, causal=True,
                           fused=self.fused)
      x = jet_nn.add(x, dense(d)(y))
      y = jet_nn.jet_activation("gelu", self.fused)(dense(4 * d)(norm()(x)))
      return jet_nn.add(x, dense(d)(y))

  for seq in seq_list:
    if bench.out_of_time():
      return
    x = _randn(jax.random.key(0), (batch, seq, d), dtype)
    _compare_models(bench, f"seq={seq}", Block(fused=True), Block(fused=False),
                    x, "xla")


def nanolm_section(bench, shapes, sizes):
  """A whole CDAT step on NanoLM: fused model vs flax's, and the base step.

  ``models.NanoLM(fused=True)`` (every layer's jvp-of-jvp through the
  kernels) against ``models.NanoLM()`` (flax's layers, XLA's jvp-of-jvp),
  same parameters; both against the base step (loss and gradient only). The
  ratios are what the cost of CDAT is in training: ``cdat/base`` for each.
  """
  try:
    import optax  # pylint: disable=g-import-not-at-top
    import cdat_fast  # pylint: disable=g-import-not-at-top
    from cdat_fast.harness import models  # pylint: disable=g-import-not-at-top
  except Exception as e:  # pylint: disable=broad-except
    print(f"\n== NanoLM section skipped ({type(e).__name__}: {e}) ==")
    return
  print(f"\n== NanoLM CDAT step (f32 params; {sizes}) ==")
  for batch, seq in shapes:
    if bench.out_of_time():
      return
    label = f"B={batch} T={seq}"
    try:
      rng = np.random.default_rng(0)
      tokens = jnp.asarray(rng.integers(0, sizes["vocab_size"], (batch, seq)))
      targets = jnp.roll(tokens, -1, axis=1)
      plain = models.NanoLM(**sizes)
      fused = models.NanoLM(fused=True, **sizes)
      params = models.init_params(plain, jax.random.key(0), tokens)
      opt = cdat_fast.cdat(optax.sgd(1.0))

      def loss(model):
        return lambda p: optax.softmax_cross_entropy_with_integer_labels(
            model.apply({"params": p}, tokens), targets).mean()

      def cdat_step(model):
        f = loss(model)

        def step(p):
          v, g = jax.value_and_grad(f)(p)
          u, state = opt.update(g, opt.init(p), p, value_fn=f, value=v)
          return optax.apply_updates(p, u), state.tuner.learning_rate
        return jax.jit(step)

      def base_step(p):
        g = jax.grad(loss(plain))(p)
        return jax.tree.map(lambda a, b: a - 0.1 * b, p, g)

      base, c_plain, c_fused = (jax.jit(base_step), cdat_step(plain),
                                cdat_step(fused))
      err = _rel_err((c_fused(params)[1],), (c_plain(params)[1],))
      t_base = _time(base, params)
      t_plain, t_fused = _time(c_plain, params), _time(c_fused, params)
      print(f"  {label:<13} base {t_base * 1e3:8.3f} ms  cdat xla "
            f"{t_plain * 1e3:8.3f} ms ({t_plain / t_base:4.2f}x)  cdat fused "
            f"{t_fused * 1e3:8.3f} ms ({t_fused / t_base:4.2f}x)  "
            f"xla/fused {t_plain / t_fused:5.2f}  eta rel.err {err:.1e}")
    except Exception as e:  # pylint: disable=broad-except
      _report_error(bench, f"nanolm {label}", e)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--budget", type=float, default=240.0,
                      help="seconds after which remaining timings are skipped")
  parser.add_argument("--cpu-smoke", action="store_true",
                      help="tiny sizes in interpret mode on CPU (tests this "
                      "script, measures nothing)")
  parser.add_argument("--verbose", action="store_true")
  args = parser.parse_args(argv)

  backend = jax.default_backend()
  if backend != "gpu" and not args.cpu_smoke:
    print(f"bench/gpu_kernels.py needs a GPU; JAX's default backend is "
          f"{backend!r}. Nothing to do.")
    return 0

  kernels = _import_kernels()
  bench = Bench(args)
  device = jax.devices()[0]
  print(f"jax {jax.__version__}, backend {backend}, device "
        f"{getattr(device, 'device_kind', device)}")
  if args.cpu_smoke:
    interpret = True
    tokens_list, d_list, dtypes = (8, 64, 128), (64, 128), (jnp.float32,)
    sweep = (64, 128, jnp.float32)
    mlp_tokens, mlp_d = (64,), 64
  else:
    interpret = False
    tokens_list, d_list = (128, 1024, 8192), (1024, 4096)
    dtypes = (jnp.bfloat16, jnp.float32)
    sweep = (1024, 4096, jnp.bfloat16)
    mlp_tokens, mlp_d = (1024, 8192), 1024

  correctness(bench, kernels, interpret)
  timing(bench, kernels, interpret, tokens_list, d_list, dtypes)
  block_sweep(bench, kernels, interpret, *sweep)
  mlp_section(bench, mlp_tokens, mlp_d, jnp.bfloat16 if not args.cpu_smoke
              else jnp.float32)
  if args.cpu_smoke:
    block_section(bench, (16,), 32, 2, jnp.float32, batch=1)
    nanolm_section(bench, ((2, 8),), dict(
        vocab_size=11, num_layers=1, num_heads=2, head_size=8, embed_size=8,
        block_size=8))
  else:
    block_section(bench, (256, 2048), 1024, 16, jnp.bfloat16)
    # The paper's NanoLM (appendix C.2: the optax example's sizes).
    nanolm_section(bench, ((32, 64), (256, 64)), dict(
        vocab_size=65, num_layers=6, num_heads=8, head_size=32,
        embed_size=256, block_size=64))

  elapsed = time.perf_counter() - bench.start
  print(f"\n{elapsed:.0f} s; {bench.skipped} timing(s) skipped for the "
        f"{args.budget:.0f} s budget.")
  if bench.failures:
    print("FAILED: " + "; ".join(bench.failures))
    return 1
  print("all correctness checks passed")
  return 0


if __name__ == "__main__":
  sys.exit(main())
