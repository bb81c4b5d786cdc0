"""Compiled memory and a roofline estimate of CDAT steps, from H100 programs.

Compile-time estimates only (nothing runs): each step is compiled for an H100
(sm_90, ``cdat_fast.compile_targets.gpu_target("h100")``) from a CPU host,
and ``compiled.as_text()`` is read kernel by kernel (``cdat_fast.hlo``). A
kernel is every instruction of a non-fused computation that launches work:
each fusion, custom call (cuBLAS gemms, the Pallas/Triton kernels), dot,
convolution, copy, reduce, etc. (parameters, constants, bitcasts, tuples
and get-tuple-elements are free). Per kernel:

- bytes = sizes of its operands + its results (each read or written once;
  an upper bound where a fusion reads a slice, a lower one where a tile is
  re-read).
- FLOPs: a dot is 2·(result elements)·(contraction size), also inside
  fusions; a cuBLAS gemm custom call the same from its
  ``lhs_contracting_dimensions``. Pallas kernels, from their shapes:
  ``dense_jet`` (x, W, dx, dW, ddx → y, dy, ddy): 5 matmuls with every
  tangent present, y = xW, dy = dx·W + x·dW, ddy = ddx·W + 2·dx·dW, each
  2·M·K·N; with some absent (e.g. the first layer, whose input is data),
  1 + (tangent operands) + (1 if dx and dW are both there);
  ``attention_jet`` (9 inputs of B×H×T×D): scores s = qkᵀ and their first
  and second jets take 1 + 2 + 3 = 6 matmuls, the output p·v and its jets
  6 more: 12·2·B·H·T²·D, halved for causal masks (NanoLM);
  ``activation_jet`` 30 FLOPs and ``layer_norm_jet`` 40 FLOPs per output
  element (memory-bound either way). Elementwise fusions count 0 FLOPs.
- time = max(FLOPs / peak, bytes / bandwidth) at H200 ceilings: 4.3e12 B/s;
  peak 790e12 FLOP/s for bf16 dots, and for float32 dots (every model here)
  the TF32 tensor-core rate an H100 SXM lists, 495e12 FLOP/s (XLA's default
  float32 matmul precision on Hopper uses TF32); also reported at the
  non-tensor float32 rate, 67e12.

Summed per program. Kernels inside while loops are counted once per trip
where XLA records ``known_trip_count`` (the MLP steps have none: checked);
both branches of a conditional are counted.
Temporary memory: ``compiled.memory_analysis().temp_size_in_bytes``.

Run (about 5-10 min on the 2-core host):

  JAX_PLATFORMS=cpu XLA_FLAGS=--xla_gpu_enable_triton_gemm=false \\
    build/accel-venv/bin/python bench/roofline.py --models mlp,nanolm \\
    --rows 256,1024,2048[,4096] [--kinds] [--json FILE]
  ... --layers   # one layer's jet, fused vs XLA's jvp-of-jvp
  ... --layers --layer-dtypes f32,bf16   # every layer in each dtype (ids
      # of the non-f32 dense, gelu and attention rows end in the dtype)
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import pathlib
import re
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

from cdat_fast import compile_targets, hlo  # noqa: E402
from layers import causal_attention, jet, layer_norm  # noqa: E402

PEAK_BF16 = 790e12
PEAK_F32 = 495e12  # TF32 tensor cores, H100 SXM
PEAK_F32_SIMT = 67e12
BANDWIDTH = 4.3e12
ELEM_FLOPS = {"activation_jet": 30, "layer_norm_jet": 40}
FREE = {"parameter", "constant", "bitcast", "get-tuple-element", "tuple",
        "while", "call", "conditional", "after-all", "partition-id",
        "replica-id", "opt-barrier"}


@dataclasses.dataclass
class Instr:
  """An HLO instruction with its result's arrays (``[(dtype, dims)]``)."""
  name: str
  opcode: str
  result: list
  operands: list  # names
  line: str


def _bytes(shapes) -> int:
  return sum(hlo.DTYPE_BYTES[d] * math.prod(s) for d, s in shapes)


def parse(module: hlo.Module):
  """{computation: [Instr]} of a module read by ``cdat_fast.hlo``."""
  return {name: [Instr(i.name, i.opcode, hlo.arrays(i.shape),
                       list(i.operands), i.line) for i in instrs]
          for name, instrs in module.computations.items()}


def _dot_flops(instr: Instr, shapes) -> float:
  dims = re.search(r"lhs_contracting_dims=\{([0-9,]*)\}", instr.line)
  lhs = shapes.get(instr.operands[0]) if instr.operands else None
  if not dims or not lhs:
    return 0.0
  k = math.prod(lhs[0][1][int(i)] for i in dims.group(1).split(",") if i)
  return 2.0 * math.prod(instr.result[0][1]) * k


def _gemm_flops(instr: Instr, shapes) -> float:
  dims = re.search(r'"lhs_contracting_dimensions":\[([^\]]*)\]', instr.line)
  lhs = shapes.get(instr.operands[0])
  if not dims or not lhs:
    return 0.0
  k = math.prod(lhs[0][1][int(i.strip('" '))] for i in dims.group(1).split(",")
                if i.strip('" '))
  return 2.0 * math.prod(instr.result[0][1]) * k


def _pallas_flops(instr: Instr, shapes, causal: bool) -> tuple[str, float]:
  name = re.search(r'op_name="([^"]*)"', instr.line)
  name = name.group(1) if name else ""
  ops = [shapes[o][0] for o in instr.operands if o in shapes]
  if "dense_jet" in name:
    # Operands: x, w, then those of dx, dw, ddx present, then the biases.
    (m, k), (_, n) = ops[0][1], ops[1][1]
    tangents = [s for _, s in ops[2:] if len(s) == 2 and s[0] != 1]
    both = len(tangents) == 3 or (
        len(tangents) == 2 and (tangents[0] == (m, k) and tangents[1] == (k, n)))
    matmuls = 1 + len(tangents) + both
    return "dense_jet", matmuls * 2.0 * m * k * n
  if "attention_jet" in name:
    *bh, t, d = ops[0][1]
    return "attention_jet", (12 * 2.0 * math.prod(bh) * t * t * d
                             * (0.5 if causal else 1.0))
  for kind, per in ELEM_FLOPS.items():
    if kind in name:
      return kind, per * sum(math.prod(s) for _, s in instr.result)
  return "pallas?", 0.0


@dataclasses.dataclass
class Program:
  kernels: int = 0
  pallas: int = 0
  flops: float = 0.0
  bytes: float = 0.0
  time_s: float = 0.0  # bf16/TF32 tensor peak
  time_simt_s: float = 0.0  # float32 dots at the non-tensor peak
  floor_flops_s: float = 0.0
  floor_bytes_s: float = 0.0
  temp_bytes: int = 0
  compile_s: float = 0.0
  by_kind: dict = dataclasses.field(default_factory=dict)


def roofline(text: str, causal: bool = False) -> Program:
  module = hlo.computations(text)
  comps = parse(module)
  shapes = {i.name: i.result for instrs in comps.values() for i in instrs}
  # Multiplicities: entry 1, loop bodies × known trip count.
  mult = hlo.multiplicities(module)
  prog = Program()
  for comp, m in mult.items():
    for i in comps.get(comp, []):
      if i.opcode in FREE:
        continue
      nbytes = _bytes(i.result) + sum(_bytes(shapes.get(o, []))
                                      for o in i.operands)
      kind, flops, bf16 = i.opcode, 0.0, False
      if i.opcode == "fusion":
        for callee in re.findall(r"calls=%?([\w.\-]+)", i.line):
          for j in comps.get(callee, []):
            if j.opcode in ("dot", "convolution"):
              flops += _dot_flops(j, shapes)
              bf16 |= j.result[0][0] == "bf16"
        kind = "fusion (dot)" if flops else "fusion"
      elif i.opcode == "dot":
        flops = _dot_flops(i, shapes)
        bf16 = i.result[0][0] == "bf16"
      elif i.opcode == "custom-call":
        if hlo.kernel_calls(i.line)["triton"]:
          kind, flops = _pallas_flops(i, shapes, causal)
          prog.pallas += m
        elif "cublas" in i.line and "gemm" in i.line:
          kind, flops = "cublas gemm", _gemm_flops(i, shapes)
          bf16 = i.result[0][0] == "bf16"
        else:
          kind = "custom-call"
        if kind not in ("cublas gemm",) and i.result and i.result[0][0] == "bf16":
          bf16 = True
      peak = PEAK_BF16 if bf16 else PEAK_F32
      t_f, t_b = flops / peak, nbytes / BANDWIDTH
      t_simt = max(flops / (PEAK_BF16 if bf16 else PEAK_F32_SIMT), t_b)
      prog.kernels += m
      prog.flops += m * flops
      prog.bytes += m * nbytes
      prog.time_s += m * max(t_f, t_b)
      prog.time_simt_s += m * t_simt
      prog.floor_flops_s += m * t_f
      prog.floor_bytes_s += m * t_b
      k = prog.by_kind.setdefault(kind, [0, 0.0, 0.0, 0.0])
      k[0] += m
      k[1] += m * flops
      k[2] += m * nbytes
      k[3] += m * max(t_f, t_b)
  return prog


def compile_program(fn, args, target):
  """(compiled, seconds) of ``fn`` for ``target`` (a ``Target`` of
  ``cdat_fast.compile_targets``)."""
  return compile_targets.compile_for(target, fn, args)


def _spec(shape, dtype):
  return jax.ShapeDtypeStruct(tuple(shape), dtype)


def model_step(model_name: str, fused: bool, rows: int, mode: str,
               dtype=jnp.float32):
  """(step, args, causal): one step of ``mode`` on a model.

  ``mlp``: 3 hidden layers of 1024 (the tier's), batch ``rows`` of 28×28;
  ``nanolm``: the paper's NanoLM (6 blocks, width 256) at T = ``rows``,
  batch 16 (the sub-batch takes 1 sequence). ``mode``: ``base`` (value,
  gradient, SGD), ``exact``
  (``cdat(sgd(1))``, jvp-of-jvp), ``sub16_gn``
  (``subbatch(1/16, inner=gauss_newton())``). ``dtype``: of the
  parameters and the MLP's inputs (the layers compute in the dtype of
  their inputs and parameters, so bf16 makes every matmul and activation
  bf16; the loss is taken on the bf16 logits).
  """
  import cdat_fast  # pylint: disable=g-import-not-at-top
  from cdat_fast import estimators  # pylint: disable=g-import-not-at-top
  from cdat_fast.harness import models  # pylint: disable=g-import-not-at-top
  if model_name == "mlp":
    model = models.get_model("mlp", 10, fused=fused,
                             features=(1024, 1024, 1024))
    inputs = _spec((rows, 28, 28, 1), dtype)
    labels = _spec((rows,), jnp.int32)
  else:
    model = models.get_model("nanolm-paper", 65, fused=fused,
                             block_size=rows)
    inputs = labels = _spec((16, rows), jnp.int32)
  params = jax.eval_shape(
      lambda x: models.init_params(model, jax.random.key(0), x), inputs)
  params = jax.tree.map(lambda a: _spec(a.shape, dtype)
                        if jnp.issubdtype(a.dtype, jnp.floating) else a,
                        params)
  model_fn = lambda p, batch: model.apply({"params": p}, batch["x"])
  loss_fn = lambda z, batch: optax.softmax_cross_entropy_with_integer_labels(
      z, batch["y"]).mean()
  loss = lambda p, batch: loss_fn(model_fn(p, batch), batch)
  if mode == "base":
    def step(p, s, x, y):
      batch = {"x": x, "y": y}
      v, g = jax.value_and_grad(loss)(p, batch)
      return jax.tree.map(lambda w, d: (w - 0.1 * d).astype(w.dtype), p,
                          g), s, v
    return step, (params, (), inputs, labels), model_name == "nanolm"
  curvature = ("exact" if mode == "exact" else estimators.subbatch(
      1 / 16, inner=estimators.gauss_newton()))
  opt = cdat_fast.cdat(optax.sgd(1.0), curvature=curvature)
  state = jax.eval_shape(opt.init, params)

  def step(p, s, x, y):
    batch = {"x": x, "y": y}
    v, g = jax.value_and_grad(loss)(p, batch)
    if mode == "exact":
      objective = dict(value_fn=loss, batch=batch)
    else:
      objective = dict(model_fn=model_fn, loss_fn=loss_fn, batch=batch)
    u, s = opt.update(g, s, p, value=v, **objective)
    return optax.apply_updates(p, u), s, v
  return step, (params, state, inputs, labels), model_name == "nanolm"


LAYER_DTYPES = {"f32": jnp.float32, "bf16": jnp.bfloat16}


def layer_cases(dtypes=None):
  """{id: (fused fn, XLA fn, args, causal)}: one layer's jet, fused kernel
  vs XLA's jvp-of-jvp, every tangent present.

  ``dtypes`` (tags of ``LAYER_DTYPES``): the inputs' and parameters' dtype
  of every layer (the kernels and XLA's jet compute in it). ``None``, the
  default, keeps the original set: float32 except the layer norm rows,
  which are float32 and bfloat16. Ids of the dense, gelu and attention rows
  end in the dtype's tag unless it is f32 (the original ids); the layer
  norm ids always do.
  """
  from cdat_fast import kernels  # pylint: disable=g-import-not-at-top
  norm_tags = ("f32", "bf16") if dtypes is None else tuple(dtypes)
  tags = ("f32",) if dtypes is None else tuple(dtypes)
  cases = {}
  # layer_norm_jet (x, scale, bias, dx, dscale, dbias, ddx): rows T, width
  # 1024; XLA's version is the same formula's jvp-of-jvp, in the inputs'
  # dtype (the outer tangent repeats the inner one and moves dx by ddx).
  for tag in norm_tags:
    dtype = LAYER_DTYPES[tag]
    for t in (1024, 4096):
      x, v = _spec((t, 1024), dtype), _spec((1024,), dtype)
      cases[f"layer_norm {t}x1024 {tag}"] = (
          kernels.layer_norm_jet, jet(layer_norm, 3, 1),
          (x, v, v, x, v, v, x), False)
  for tag in tags:
    dtype, sfx = LAYER_DTYPES[tag], ("" if tag == "f32" else f" {tag}")
    for m, k, n in [(8192, 1024, 4096), (8192, 4096, 1024), (2048, 256, 256)]:
      x, w, b = (_spec((m, k), dtype), _spec((k, n), dtype),
                 _spec((n,), dtype))
      cases[f"dense {m}x{k}->{n}{sfx}"] = (
          kernels.dense_jet, jet(lambda x, w, b: x @ w + b, 3, 1),
          (x, w, b, x, w, b, x), False)
  for tag in tags:
    dtype, sfx = LAYER_DTYPES[tag], ("" if tag == "f32" else f" {tag}")
    x = _spec((8192, 4096), dtype)
    cases[f"gelu 8192x4096{sfx}"] = (
        lambda *a: kernels.activation_jet(*a, activation="gelu"),
        jet(jax.nn.gelu, 1, 1), (x, x, x), False)
  for tag in tags:
    dtype, sfx = LAYER_DTYPES[tag], ("" if tag == "f32" else f" {tag}")
    for b, h, t, d in [(2, 8, 2048, 64), (16, 8, 1024, 32)]:
      x = _spec((b, h, t, d), dtype)
      cases[f"attention causal {b}x{h}x{t}x{d}{sfx}"] = (
          lambda *a: kernels.attention_jet(*a, causal=True),
          jet(causal_attention, 3, 3), (x,) * 9, True)
  return cases


def layers(target, only=None, dtypes=None):
  print("| layer | impl | kernels | GFLOP | GB | roofline µs | temp MiB |")
  print("|---|---|---:|---:|---:|---:|---:|")
  for name, (fused, xla, args, causal) in layer_cases(dtypes).items():
    if only and not any(o in name for o in only.split(",")):
      continue
    for impl, fn, call_args in (("fused", fused, args),
                                ("XLA jvp-of-jvp", xla, args)):
      compiled, _ = compile_program(fn, call_args, target)
      prog = roofline(compiled.as_text(), causal)
      temp = compiled.memory_analysis().temp_size_in_bytes
      print(f"| {name} | {impl} | {prog.kernels} | {prog.flops / 1e9:.1f} | "
            f"{prog.bytes / 1e9:.3f} | {prog.time_s * 1e6:.1f} | "
            f"{temp / 2**20:.1f} |", flush=True)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--models", default="mlp")
  parser.add_argument("--rows", default="256,1024,2048")
  parser.add_argument("--modes", default="base,exact,sub16_gn")
  parser.add_argument("--fused", default="1,0")
  parser.add_argument("--json", default=None)
  parser.add_argument("--kinds", action="store_true",
                      help="print the per-kernel-kind breakdown")
  parser.add_argument("--layers", action="store_true",
                      help="one layer's jet, fused vs XLA, instead")
  parser.add_argument("--only", default=None,
                      help="with --layers: comma-separated substrings of "
                      "the layer ids to run (e.g. layer_norm)")
  parser.add_argument("--layer-dtypes", default=None,
                      help="with --layers: comma-separated dtypes (f32,bf16) "
                      "of every layer; default: the original set (f32, and "
                      "f32 and bf16 for layer_norm)")
  parser.add_argument("--markdown", action="store_true",
                      help="end with the model-step table in Markdown")
  parser.add_argument("--dtypes", default="f32",
                      help="parameter/input dtypes of the model steps: "
                      "f32,bf16")
  args = parser.parse_args(argv)
  target = compile_targets.gpu_target("h100")
  if args.layers:
    layers(target, args.only,
           args.layer_dtypes.split(",") if args.layer_dtypes else None)
    return
  rows_out = []
  grid = [(model_name, int(rows), tag)
          for model_name in args.models.split(",")
          for rows in args.rows.split(",")
          for tag in args.dtypes.split(",")]
  for model_name, rows, tag in grid:
    dtype = {"f32": jnp.float32, "bf16": jnp.bfloat16}[tag]
    for fused in [bool(int(f)) for f in args.fused.split(",")]:
      for mode in args.modes.split(","):
        step, step_args, causal = model_step(model_name, fused, rows, mode,
                                             dtype)
        compiled, seconds = compile_program(step, step_args, target)
        prog = roofline(compiled.as_text(), causal)
        prog.temp_bytes = compiled.memory_analysis().temp_size_in_bytes
        prog.compile_s = seconds
        r = dict(model=model_name, T=rows, dtype=tag, fused=fused,
                 mode=mode,
                 **dataclasses.asdict(prog))
        rows_out.append(r)
        print(f"{model_name:6} T={rows:<5} {tag:4} fused={int(fused)} "
              f"{mode:8} "
              f"kernels={prog.kernels:4d} pallas={prog.pallas:3d} "
              f"GFLOP={prog.flops / 1e9:9.2f} GB={prog.bytes / 1e9:7.3f} "
              f"roofline_us={prog.time_s * 1e6:9.1f} "
              f"simt_us={prog.time_simt_s * 1e6:9.1f} "
              f"temp_MiB={prog.temp_bytes / 2**20:8.1f} "
              f"compile_s={seconds:5.1f}", flush=True)
        if args.kinds:
          for k, (n, f, b, t) in sorted(prog.by_kind.items()):
            print(f"    {k:16} n={n:4d} GFLOP={f / 1e9:9.2f} "
                  f"GB={b / 1e9:7.3f} us={t * 1e6:9.1f}")
        if args.json:
          pathlib.Path(args.json).write_text(json.dumps(rows_out, indent=1))
  if args.markdown:
    markdown(rows_out)


def markdown(rows_out):
  """The model-step table; ratios over the base step of the same model, T,
  dtype and layers."""
  base = {(r["model"], r["T"], r["dtype"], r["fused"]): r
          for r in rows_out if r["mode"] == "base"}
  print("| model | T | dtype | layers | step | kernels (Pallas) | GFLOP | "
        "HBM GB | roofline µs | temp MiB | time / base | temp / base | "
        "compile s |")
  print("|---|---:|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
  for r in rows_out:
    b = base.get((r["model"], r["T"], r["dtype"], r["fused"]))
    ratio = lambda key: (f"{r[key] / b[key]:.2f}" if b and b[key] else "-")
    print(f"| {r['model']} | {r['T']} | {r['dtype']} | "
          f"{'fused' if r['fused'] else 'XLA'} | {r['mode']} | "
          f"{r['kernels']} ({r['pallas']}) | {r['flops'] / 1e9:.1f} | "
          f"{r['bytes'] / 1e9:.3f} | {r['time_s'] * 1e6:.1f} | "
          f"{r['temp_bytes'] / 2**20:.1f} | {ratio('time_s')} | "
          f"{ratio('temp_bytes')} | {r['compile_s']:.1f} |")


if __name__ == "__main__":
  main()
