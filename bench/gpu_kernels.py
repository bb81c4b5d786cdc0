#!/usr/bin/env python
"""Times the fused jet kernels and fused CDAT steps on a GPU, side by side.

  python bench/gpu_kernels.py [--sections layers,steps] [--dtypes f32,bf16] \\
      [--modes base,exact,sub16_gn] [--only TEXT,...] [--rounds 9] \\
      [--markdown FILE]
  python bench/gpu_kernels.py --interpret   # tiny sizes, Pallas' interpreter

``layers``: each fused kernel (``triton``; ``mosaic_gpu`` where it takes
``gpu_backend=``) at bench/roofline.py's layer sizes against XLA's jvp of a
jvp of the plain layer. ``steps``: a training step of an MLP (784->1024x3->10,
1024 and 4096 rows) and the paper's NanoLM (batch 16, T = 256 and 1024) in
modes ``base`` (SGD), ``exact`` (``cdat(sgd(1))``) and ``sub16_gn``
(``subbatch(1/16, inner=gauss_newton())``), fused layers and XLA's, against
XLA's base step. Each group is compiled (failures reported, the rest timed),
then timed by bench/common.py's ``side_by_side``: interleaved rounds, each
round's time over the base's; a round calls each program about 20 ms of the
base's worth, so small kernels are not timed as dispatch. The tables (µs
per call, median per-round ratio and its range) are rewritten after each
group, so an outer ``timeout`` keeps what was measured. Read them beside
bench/roofline.py's model; the kernels' numbers are checked by the ``gpu``
tests of tests/test_kernels_gpu.py (``bash bench/device_check.sh`` runs
both). Exit status 1 when a program does not compile or run, else 0 (also
without a GPU and ``--interpret``: it says so and measures nothing).
"""
from __future__ import annotations

import argparse
import functools
import inspect
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import optax

import cdat_fast
from cdat_fast import estimators, kernels
from cdat_fast.harness import models
from common import markdown_table, platform_line, side_by_side
from layers import causal_attention, jet, layer_norm

DTYPES = {"f32": jnp.float32, "bf16": jnp.bfloat16}
MODES = ("base", "exact", "sub16_gn")
# (model, rows): the MLP's batch, NanoLM's sequence length T (batch 16).
STEP_GROUPS = (("mlp", 1024), ("nanolm", 256), ("mlp", 4096), ("nanolm", 1024))
# --interpret: (rows divided by, tiny model) per model.
TINY_STEPS = {"mlp": (64, dict(features=(32, 32))),
              "nanolm": (32, dict(num_layers=1, num_heads=2, head_size=8,
                                  embed_size=16))}
HEADERS = {"layers": ("layer", "dtype", "impl", "µs per call",
                      "÷ XLA (min-max)"),
           "steps": ("model", "rows", "dtype", "step", "ms per step",
                     "÷ XLA base step (min-max)", "XLA ÷ fused")}


def layer_cases(tiny: bool) -> dict:
  """{id: (kernel, kernel kwargs, plain layer, primal shapes, k)}: the
  kernel takes primals, tangents and second tangents of the first k."""
  x = lambda shape: "x".join(map(str, shape))  # noqa: E731
  cases = {}
  for m, k, n in [(64, 32, 48)] if tiny else [
      (8192, 1024, 4096), (8192, 4096, 1024), (2048, 256, 256)]:
    cases[f"dense {m}x{k}->{n}"] = ("dense_jet", {}, lambda x, w, b: x @ w + b,
                                    [(m, k), (k, n), (n,)], 1)
  for shape in [(64, 256)] if tiny else [(8192, 4096)]:
    cases[f"gelu {x(shape)}"] = ("activation_jet", {"activation": "gelu"},
                                 jax.nn.gelu, [shape], 1)
  for shape in [(1, 2, 64, 16)] if tiny else [(2, 8, 2048, 64),
                                              (16, 8, 1024, 32)]:
    cases[f"attention causal {x(shape)}"] = (
        "attention_jet", {"causal": True}, causal_attention, [shape] * 3, 3)
  for rows, d in [(32, 128)] if tiny else [(1024, 1024), (4096, 1024)]:
    cases[f"layer_norm {rows}x{d}"] = ("layer_norm_jet", {}, layer_norm,
                                       [(rows, d), (d,), (d,)], 1)
  return cases


def layer_programs(case, dtype, interpret):
  """{name: (fn, args)} of one layer: each fused version and ``xla``."""
  kernel, kw, plain, primals, k = case
  shapes = primals * 2 + primals[:k]
  keys = jax.random.split(jax.random.key(0), len(shapes))
  args = [jax.random.normal(key, s, jnp.float32).astype(dtype)
          for key, s in zip(keys, shapes)]
  fn = getattr(kernels, kernel)
  several = "gpu_backend" in inspect.signature(fn).parameters
  fns = {f"fused-{b}": (functools.partial(
      fn, interpret=interpret or None, **kw,
      **({"gpu_backend": b} if several else {})), args)
         for b in (["triton", "mosaic_gpu"] if several and not interpret
                   else ["triton"])}
  return {**fns, "xla": (jet(plain, len(primals), k), args)}


def model_step(name, fused, rows, mode, dtype, tiny):
  """(step, args): one training step of ``mode`` (``MODES``) on a model."""
  kx, ky, kp = jax.random.split(jax.random.key(1), 3)
  over = TINY_STEPS[name][1] if tiny else {}
  if name == "mlp":
    model = models.get_model("mlp", 10, fused=fused,
                             **{"features": (1024,) * 3, **over})
    x = jax.random.normal(kx, (rows, 28, 28, 1), dtype)
    y = jax.random.randint(ky, (rows,), 0, 10)
  else:
    model = models.get_model("nanolm-paper", 65, fused=fused,
                             block_size=rows, **over)
    x, y = (jax.random.randint(key, (16, rows), 0, 65) for key in (kx, ky))
  params = jax.tree.map(lambda a: a.astype(dtype) if jnp.issubdtype(
      a.dtype, jnp.floating) else a, models.init_params(model, kp, x))
  xent = optax.softmax_cross_entropy_with_integer_labels
  model_fn = lambda p, batch: model.apply({"params": p}, batch["x"])  # noqa
  loss_fn = lambda z, batch: xent(z, batch["y"]).mean()  # noqa: E731
  loss = lambda p, batch: loss_fn(model_fn(p, batch), batch)  # noqa: E731
  opt = optax.sgd(0.1) if mode == "base" else cdat_fast.cdat(
      optax.sgd(1.0), curvature="exact" if mode == "exact" else
      estimators.subbatch(1 / 16, inner=estimators.gauss_newton()))
  objective = {"base": {}, "exact": dict(value_fn=loss)}.get(
      mode, dict(model_fn=model_fn, loss_fn=loss_fn))

  def step(p, s, x, y):
    batch = {"x": x, "y": y}
    v, g = jax.value_and_grad(loss)(p, batch)
    extra = {} if mode == "base" else dict(value=v, batch=batch, **objective)
    u, s = opt.update(g, s, p, **extra)
    return optax.apply_updates(p, u), s, v
  return step, (params, opt.init(params), x, y)


def compile_group(label, fns, failures):
  """{name: (compiled, args)} of the ``fns`` ({name: (fn, args)}) that
  compile and run; the others are reported and added to ``failures``."""
  programs = {}
  for name, (fn, args) in fns.items():
    try:
      compiled = jax.jit(fn).lower(*args).compile()
      jax.block_until_ready(compiled(*args))
      programs[name] = compiled, args
    except Exception as e:  # pylint: disable=broad-except
      why = f"{type(e).__name__}: {(str(e).strip() or '-').splitlines()[0]}"
      failures.append(f"{label} [{name}]: {why[:300]}")
      print(f"  {label} [{name}]: did not compile or run: {why[:300]}")
  return programs


def time_group(programs, base, rounds, target_s=0.02):
  """{name: Timing} in seconds per call: a round calls each program
  ``inner`` times, ``inner`` making about ``target_s`` of the base."""
  start = time.perf_counter()
  jax.block_until_ready(programs[base][0](*programs[base][1]))
  inner = int(min(1000, max(1, target_s / (time.perf_counter() - start))))

  def loop(program, args):
    def run():
      for _ in range(inner):
        out = program(*args)
      jax.block_until_ready(out)
    return run
  timings = side_by_side({n: loop(*p) for n, p in programs.items()},
                         base=base, rounds=rounds)
  return {n: t._replace(seconds=[s / inner for s in t.seconds])
          for n, t in timings.items()}


def _ratio(t):
  return f"{t.median_ratio:.2f} ({t.ratio_range[0]:.2f}-{t.ratio_range[1]:.2f})"


def groups(args):
  """[(section, label, cells, make, base)]; ``make()`` gives the programs."""
  out = []
  for section in args.sections:
    for dtype in args.dtypes:
      if section == "layers":
        out += [(section, f"{layer} {dtype}", [layer, dtype], functools.partial(
            layer_programs, case, DTYPES[dtype], args.interpret), "xla")
                for layer, case in layer_cases(args.interpret).items()]
      for model, rows in STEP_GROUPS if section == "steps" else ():
        run_rows = rows // TINY_STEPS[model][0] if args.interpret else rows
        make = lambda m=model, r=run_rows, d=DTYPES[dtype]: {  # noqa: E731
            f"{kind} {mode}": model_step(m, kind == "fused", r, mode, d,
                                         args.interpret)
            for kind in ("fused", "xla") for mode in args.modes}
        out.append((section, f"{model} {rows} {dtype}",
                    [model, str(run_rows), dtype], make, "xla base"))
  return [g for g in out if not args.only or any(o in g[1] for o in args.only)]


def run(args, tables, failures):
  """Compiles and times each group, adding its rows to ``tables``."""
  for section, label, cells, make, base in groups(args):
    programs = compile_group(label, make(), failures)
    if base not in programs:
      continue
    timings = time_group(programs, base, args.rounds)
    for name, t in timings.items():
      row = cells + [name, f"{t.median * 1e6:.1f}", _ratio(t)]
      if section == "steps":
        row[-2] = f"{t.median * 1e3:.3f}"
        xla = timings.get(name.replace("fused", "xla"))
        row.append("-" if xla is None or xla is t else "%.2f" % (
            statistics.median(a / b for a, b in zip(xla.ratios, t.ratios))))
      tables[section].append(row)
      print("  " + " | ".join(row), flush=True)
    write(args, tables)


def write(args, tables) -> str:
  """The tables in Markdown, also written to ``--markdown``."""
  lines = [f"bench/gpu_kernels.py: {platform_line()} "
           f"({jax.devices()[0].device_kind}), {args.rounds} rounds"
           + (", interpret mode: times mean nothing" if args.interpret
              else ""), ""]
  for section, rows in tables.items():
    if rows:
      align = "lll" + "r" * (len(HEADERS[section]) - 3)
      lines += [markdown_table(HEADERS[section], rows, align=align), ""]
  if args.markdown:
    with open(args.markdown, "w", encoding="utf-8") as f:
      f.write("\n".join(lines))
  return "\n".join(lines)


def _names(valid):
  """An argparse type: a comma-separated list of names from ``valid``."""
  def parse(text):
    names = [v for v in text.split(",") if v]
    if not names or set(names) - set(valid):
      raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated "
                                       f"list of {list(valid)}")
    return names
  return parse


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--sections", type=_names(HEADERS), default="layers,steps")
  p.add_argument("--dtypes", type=_names(DTYPES), default="f32,bf16")
  p.add_argument("--modes", type=_names(MODES), default=",".join(MODES))
  p.add_argument("--only", default="",
                 help="comma-separated substrings of the groups to run")
  p.add_argument("--rounds", type=int, default=9)
  p.add_argument("--markdown", default=None)
  p.add_argument("--interpret", action="store_true",
                 help="tiny sizes in Pallas' interpreter (any backend)")
  args = p.parse_args(argv)
  if "base" not in args.modes:
    p.error("--modes: base is needed (the steps' base)")
  if args.rounds < 1:
    p.error(f"--rounds must be at least 1, got {args.rounds}")
  args.only = [o for o in args.only.split(",") if o]
  return args


def main(argv=None) -> int:
  args = parse_args(argv)
  if jax.default_backend() != "gpu" and not args.interpret:
    print(f"bench/gpu_kernels.py needs a GPU; JAX's backend is "
          f"{jax.default_backend()!r}. Nothing measured (--interpret runs "
          "the code at tiny sizes).")
    return 0
  print(platform_line(), jax.devices()[0].device_kind, flush=True)
  tables, failures = {"layers": [], "steps": []}, []
  run(args, tables, failures)
  print("\n" + write(args, tables))
  if failures:
    print("FAILED: " + "; ".join(failures))
  return 1 if failures else 0


if __name__ == "__main__":
  sys.exit(main())
