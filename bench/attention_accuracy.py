#!/usr/bin/env python
"""Float32 accuracy of attention's second-order jet when ṡ has a common part.

A part of the logit tangent ṡ shared by every key (q̇ against a large mean
key, or a key bias's tangent) leaves the softmax, and so the jet, unchanged,
but E[ṡ²] - E[ṡ]² and the expanded (ṡ - a)² terms then cancel in float32.
Prints the largest error of ``(o, ȯ, ö)`` relative to each output's largest
entry, against the closed form in float64, for the fused kernel (interpret
mode), its jnp reference and XLA's jvp-of-jvp of plain attention::

  python bench/attention_accuracy.py
"""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))), "tests"))
# pylint: disable=g-import-not-at-top,wrong-import-position
from test_attention_jet import D, T, _inputs, _jet_float64, _plain, reference
from cdat_fast.kernels import attention_jet


@jax.jit
def xla_jet(*args):
  f = lambda *x: _plain(*x, True)
  inner = lambda *a: jax.jvp(f, a[:3], a[3:])
  (o, do), (_, ddo) = jax.jvp(inner, (*args[:3], *args[3:6]),
                              (*args[3:6], *args[6:]))
  return o, do, ddo


def main():
  print("| common part of k̇ | path | o | ȯ | ö |")
  print("|---|---|---|---|---|")
  for common in (0.0, 30.0, 300.0, 3000.0):
    args = [np.asarray(a) for a in _inputs(5, s=T)]
    args[4] = args[4] + common * np.random.default_rng(6).standard_normal(D)
    expected = _jet_float64(*args, causal=True)
    paths = (
        ("attention_jet", attention_jet(*args, causal=True, interpret=True,
                                        block_q=16, block_k=8)),
        ("reference", reference(*args, causal=True)),
        ("XLA jvp-of-jvp", xla_jet(*map(jnp.asarray, args))))
    for name, out in paths:
      errs = [np.abs(np.asarray(o) - e).max() / np.abs(e).max()
              for o, e in zip(out, expected)]
      print(f"| {common:g} | {name} | " + " | ".join(f"{e:.1e}" for e in errs)
            + " |")


if __name__ == "__main__":
  main()
