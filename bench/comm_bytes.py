"""Communication of a sharded CDAT step against its base optimizer's step.

Compiles one training step per optimizer on a mesh of fake CPU devices (an
MLP, FSDP + data parallel by default), reads the collectives in the compiled
HLO (all-reduce, all-gather, reduce-scatter, all-to-all, collective-permute)
and sums their operands' bytes per device and step. Rows:

* ``base``: the base optimizer's step (``optax.sgd`` / ``optax.adam``);
* ``base + jvp²``: the base step plus a bare jvp-of-jvp along its update, the
  communication CDAT cannot avoid;
* ``cdat``: ``cdat_fast.cdat(base)`` through :func:`make_train_step`;
* with ``--ravel-free-vdot``, also ``cdat, ravel-free vdot``: the same with
  optax's tree vdot patched (in this process only) to contract without
  flattening, to measure what the flattening costs.

Usage::

  python bench/comm_bytes.py                      # data=4,fsdp=2, 8 devices
  python bench/comm_bytes.py --mesh data=8 --ravel-free-vdot
"""
from __future__ import annotations

import argparse
import os
import sys


def _parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--mesh", default="data=4,fsdp=2")
  parser.add_argument("--devices", type=int, default=8,
                      help="fake CPU devices (XLA_FLAGS)")
  parser.add_argument("--widths", default="256,512,512,10",
                      help="MLP layer widths, input first")
  parser.add_argument("--batch", type=int, default=512)
  parser.add_argument("--ravel-free-vdot", action="store_true",
                      help="add rows with optax's tree vdot patched")
  return parser.parse_args(argv)


ARGS = _parse_args(sys.argv[1:]) if __name__ == "__main__" else None
if ARGS is not None:
  os.environ["XLA_FLAGS"] = " ".join(
      [f for f in os.environ.get("XLA_FLAGS", "").split()
       if not f.startswith("--xla_force_host_platform_device_count")]
      + [f"--xla_force_host_platform_device_count={ARGS.devices}"])
  os.environ.setdefault("JAX_PLATFORMS", "cpu")

# pylint: disable=g-import-not-at-top,wrong-import-position
import jax
import jax.numpy as jnp
import numpy as np
import optax

import cdat_fast
from cdat_fast import hlo, sharding
from cdat_fast.curvature import directional_derivatives

KINDS = hlo.COLLECTIVES
SHORT = hlo.SHORT_NAMES


def mlp(widths, seed=0):
  keys = jax.random.split(jax.random.PRNGKey(seed), len(widths) - 1)
  return {f"dense{i}": {
      "w": np.asarray(jax.random.normal(k, (a, b)) / np.sqrt(a)),
      "b": np.zeros((b,), np.float32)}
          for i, (k, a, b) in enumerate(zip(keys, widths[:-1], widths[1:]))}


def loss_fn(params, batch):
  h = batch["x"]
  n = len(params)
  for i in range(n):
    h = h @ params[f"dense{i}"]["w"] + params[f"dense{i}"]["b"]
    if i < n - 1:
      h = jax.nn.relu(h)
  logp = jax.nn.log_softmax(h)
  return -jnp.mean(jnp.take_along_axis(logp, batch["y"][:, None], axis=1))


def jvp2_body(optimizer):
  """The step body base step + a bare jvp-of-jvp along its update ``u``."""
  def body(params, opt_state, batch):
    loss, grads = jax.value_and_grad(loss_fn)(params, batch)
    u, opt_state = optimizer.update(grads, opt_state, params)
    _, slope, curv = directional_derivatives(
        lambda p: loss_fn(p, batch), params, u)
    u = jax.tree.map(lambda x: x * (slope / curv), u)
    return optax.apply_updates(params, u), opt_state, loss
  return body


def measure(optimizer, mesh, params, batch, jvp2=False) -> dict:
  step = sharding.make_train_step(
      loss_fn, optimizer, mesh, body=jvp2_body(optimizer) if jvp2 else None)
  p = sharding.shard_params(params, mesh)
  text = step.lower(p, step.init(p), sharding.shard_batch(batch, mesh)
                    ).compile().as_text()
  return hlo.hlo_collectives(text)


def _ravel_free_vdot():
  """Patches optax's per-leaf vdot to contract all axes without a reshape."""
  # pylint: disable-next=import-outside-toplevel
  from optax.tree_utils import _tree_math

  def vdot(a, b, precision=jax.lax.Precision.HIGHEST):
    if jnp.iscomplexobj(a):
      a = jnp.conj(a)
    return jnp.tensordot(a, b, a.ndim, precision=precision)

  _tree_math._vdot = vdot  # pylint: disable=protected-access


def table(rows: list[tuple[str, dict]]) -> str:
  head = ("| step | bytes/step | " + " | ".join(
      f"{SHORT[k]} n / bytes" for k in KINDS) + " |")
  lines = [head, "|" + "---|" * (2 + len(KINDS))]
  for name, s in rows:
    cells = [f"{s['count'][k]} / {s['bytes'][k]:,}" for k in KINDS]
    lines.append(f"| {name} | {s['total_bytes']:,} | " + " | ".join(cells)
                 + " |")
  return "\n".join(lines)


def main(args) -> None:
  widths = tuple(int(w) for w in args.widths.split(","))
  mesh = sharding.make_mesh(args.mesh)
  params = mlp(widths)
  rng = np.random.default_rng(0)
  batch = {"x": rng.normal(size=(args.batch, widths[0])).astype(np.float32),
           "y": rng.integers(0, widths[-1], size=(args.batch,)).astype(
               np.int32)}
  n_params = sum(np.size(x) for x in jax.tree.leaves(params))
  specs = {jax.tree_util.keystr(path): str(s.spec) for path, s in
           jax.tree_util.tree_flatten_with_path(
               sharding.param_shardings(params, mesh))[0]}
  rows = []
  for base_name, base in (("sgd", lambda: optax.sgd(1.0)),
                          ("adam", lambda: optax.adam(1.0))):
    ema = 0.9 if base_name == "adam" else 0.0
    rows.append((f"{base_name}", measure(base(), mesh, params, batch)))
    rows.append((f"{base_name} + jvp²",
                 measure(base(), mesh, params, batch, jvp2=True)))
    rows.append((f"cdat({base_name}{', ema=0.9' if ema else ''})",
                 measure(cdat_fast.cdat(base(), ema=ema), mesh, params,
                         batch)))
  if args.ravel_free_vdot:
    _ravel_free_vdot()
    for base_name, base in (("sgd", lambda: optax.sgd(1.0)),
                            ("adam", lambda: optax.adam(1.0))):
      ema = 0.9 if base_name == "adam" else 0.0
      rows.append((f"cdat({base_name}{', ema=0.9' if ema else ''}),"
                   " ravel-free vdot",
                   measure(cdat_fast.cdat(base(), ema=ema), mesh, params,
                           batch)))
  print(f"mesh {args.mesh} on {jax.device_count()} {jax.default_backend()}"
        f" devices; MLP {widths}, {n_params:,} parameters"
        f" ({4 * n_params:,} bytes), batch {args.batch}; jax"
        f" {jax.__version__}, optax {optax.__version__}")
  print("parameter shardings: " + ", ".join(
      f"{k} {v}" for k, v in specs.items()))
  print()
  print(table(rows))
  print()
  by_name = dict(rows)
  for base_name, cdat_name in (("sgd", "cdat(sgd)"),
                               ("adam", "cdat(adam, ema=0.9)")):
    extra = by_name[cdat_name]["total_bytes"] - by_name[base_name][
        "total_bytes"]
    ref = by_name[f"{base_name} + jvp²"]["total_bytes"] - by_name[base_name][
        "total_bytes"]
    print(f"{cdat_name}: +{extra:,} bytes/step over {base_name}"
          f" ({extra / by_name[base_name]['total_bytes']:.2f}×);"
          f" the jvp² alone adds {ref:,}")


if __name__ == "__main__":
  main(ARGS)
