#!/usr/bin/env python
"""Float32 accuracy of attention's second-order jet when ṡ has a common part.

A part of the logit tangent ṡ shared by every key (q̇ against a large mean
key, or a key bias's tangent) leaves the softmax, and so the jet, unchanged,
but E[ṡ²] - E[ṡ]² and the expanded (ṡ - a)² terms then cancel in float32.
Prints the largest error of ``(o, ȯ, ö)`` relative to each output's largest
entry, against the closed form in float64, for the fused kernel (interpret
mode), its jnp reference and XLA's jvp-of-jvp of plain attention (a jet with
its own second-order tangents ``(q̈, k̈, v̈)``, so not a directional
derivative of a scalar)::

  python bench/attention_accuracy.py
"""
import argparse

import jax
import jax.numpy as jnp
import numpy as np

from cdat_fast.kernels import attention_jet, attention_jet_reference

# pylint: disable=g-bad-import-order
from common import markdown_table
from layers import jet

LEAD, T, D, DV = (2, 3), 37, 20, 13  # 37 queries: padded, masked keys.
NAMES = ("q", "k", "v", "dq", "dk", "dv", "ddq", "ddk", "ddv")


def inputs(seed):
  """``(q, k, v, q̇, k̇, v̇, q̈, k̈, v̈)`` in float32, peaked softmax rows."""
  rng = np.random.default_rng(seed)
  shape = {"q": LEAD + (T, D), "k": LEAD + (T, D), "v": LEAD + (T, DV)}
  args = [rng.standard_normal(shape[n[-1]]) for n in NAMES]
  args[0] = 2.0 * args[0]
  return [np.asarray(a, np.float32) for a in args]


def plain(q, k, v, causal):
  """Softmax attention as written, ``1/√d`` scale."""
  s = jnp.einsum("...td,...sd->...ts", q, k) / np.sqrt(q.shape[-1])
  if causal:
    s = jnp.where(jnp.tril(jnp.ones(s.shape[-2:], bool)), s, -jnp.inf)
  return jnp.einsum("...ts,...sd->...td", jax.nn.softmax(s, -1), v)


def jet_float64(q, k, v, dq, dk, dv, ddq, ddk, ddv, causal):
  """The closed-form jet ``(o, ȯ, ö)`` in float64 numpy, centred sums."""
  q, k, v, dq, dk, dv, ddq, ddk, ddv = (
      np.asarray(a, np.float64) for a in (q, k, v, dq, dk, dv, ddq, ddk, ddv))
  c = 1.0 / np.sqrt(q.shape[-1])
  qk = lambda a, b: np.einsum("...td,...sd->...ts", a, b)
  pv = lambda p, b: np.einsum("...ts,...sd->...td", p, b)
  s, ds = c * qk(q, k), c * (qk(dq, k) + qk(q, dk))
  dds = c * (qk(ddq, k) + 2.0 * qk(dq, dk) + qk(q, ddk))
  if causal:
    mask = np.tril(np.ones(s.shape[-2:], bool))
    s, ds, dds = np.where(mask, s, -np.inf), ds * mask, dds * mask
  p = np.exp(s - s.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  expect = lambda z: np.sum(p * z, -1, keepdims=True)
  centred = ds - expect(ds)
  dp = p * centred
  ddp = p * (centred ** 2 + dds - expect(centred ** 2) - expect(dds))
  return pv(p, v), pv(dp, v) + pv(p, dv), pv(ddp, v) + 2 * pv(dp, dv) + pv(
      p, ddv)


xla_jet = jax.jit(jet(lambda q, k, v: plain(q, k, v, True), 3, 3))


def main(argv=None):
  argparse.ArgumentParser(description=__doc__.split("\n")[0]).parse_args(argv)
  reference = jax.jit(attention_jet_reference, static_argnames=("causal",))
  rows = []
  for common in (0.0, 30.0, 300.0, 3000.0):
    args = inputs(5)
    args[4] = args[4] + common * np.random.default_rng(6).standard_normal(D)
    expected = jet_float64(*args, causal=True)
    paths = (
        ("attention_jet", attention_jet(*args, causal=True, interpret=True,
                                        block_q=16, block_k=8)),
        ("reference", reference(*args, causal=True)),
        ("XLA jvp-of-jvp", xla_jet(*map(jnp.asarray, args))))
    for name, out in paths:
      errs = [np.abs(np.asarray(o) - e).max() / np.abs(e).max()
              for o, e in zip(out, expected)]
      rows.append([f"{common:g}", name] + [f"{e:.1e}" for e in errs])
  print(markdown_table(("common part of k̇", "path", "o", "ȯ", "ö"), rows))


if __name__ == "__main__":
  main()
