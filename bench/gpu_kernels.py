#!/usr/bin/env python
"""The fused jet kernels on a GPU: correctness per backend, time beside the roofline.

One run, sized for one lent device call (``bash bench/device_check.sh``)::

  python bench/gpu_kernels.py --budget 330 --json OUT/gpu_kernels.json \\
      --markdown OUT/gpu_kernels.md
  python bench/gpu_kernels.py --dry-run --json /tmp/g.json   # CPU, seconds

Sections, each a list of cases, run in this order under one time budget:

``correctness``
  Every kernel (``dense_jet``, ``activation_jet``, ``layer_norm_jet``,
  ``attention_jet``) compiled for the GPU with each GPU backend it has
  (``triton``; ``mosaic_gpu`` where the kernel takes ``gpu_backend=``, today
  dense_jet and activation_jet) against its pure-jnp reference, at the
  compile tier's sizes (``tests/accel/compile_cases.py``: rows up to 8192,
  widths 256-4096, head dims 64 and 128, T up to 8192, causal and not) and
  awkward small ones, f32 and bf16. The error is per output
  ``max|fused - ref| / max|ref|`` (the worst of y, dy, ddy); a case fails
  above its tolerance, on a non-finite value, or when it does not compile
  or run. One backend's failure is recorded and the run goes on.
``layers``
  One layer's jet at the sizes of ``bench/roofline.py --layers`` (dense
  8192x1024->4096, 8192x4096->1024, 2048x256->256, gelu 8192x4096,
  causal attention 2x8x2048x64 and 16x8x1024x32, layer_norm 1024x1024 and
  4096x1024; then the bf16 versions the roofline can also estimate):
  fused-triton, fused-mosaic_gpu (where the kernel has it) and XLA's
  jvp-of-jvp compiled in one process and timed in interleaved repeats
  (median, min, max, spread; TFLOP/s and GB/s of the fused kernel's work,
  counted as bench/roofline.py does), beside the roofline estimate of
  bench/RESULTS.md ("The roofline estimate", "One layer's jet").
``models``
  One training step of bench/roofline.py's ``model_step`` (MLP
  784->1024x3->10 at batch T = 1024, 4096; the paper's NanoLM at batch 16,
  sequence T = 256, 1024; f32, then bf16 while time is left): base, exact
  (``cdat(sgd(1))``) and sub16_gn steps, fused layers and XLA's, timed
  interleaved per (model, T, dtype), as ratios over base beside the
  roofline's ratios.

Budget (``--budget SECONDS``, counted from the script's start): each section
gets a share of the time left when it starts (``--shares``, default
0.3/0.25/0.45; unused time passes on); a case starts only if its estimated
cost (the last measured cost of a case of its kind, else a guess) fits
before the section's deadline, and timing rounds stop at it (3 at least),
so the run ends near the budget; every case not run is listed under
``skipped`` with the reason. Within a section the cases run by priority: a
non-dividing size of every kernel in both dtypes first, kernels in turn,
so a cut section still covers each kernel and backend. The JSON file is
rewritten after every case and names the case in flight
(``meta.in_progress``); ``--hard-limit SECONDS`` arms a watchdog that, should
a case still run then, marks the JSON ``aborted``, prints the tables and
the Python stacks and exits 3 (device_check.sh's ``timeout`` is the
backstop), so a run stopped from outside keeps what it measured.

Expected on an H200 at device_check.sh's default (budget about 345 s),
from the compile times the tier and bench/roofline.py measured on the
2-core host (the device's host compiles no slower): correctness about
100 s, which covers the priority-0 cases (every kernel at a non-dividing
size, both dtypes, both backends: about 50 s) and roughly half the rest;
layers about 85 s, the 10 estimated layers (about 6 s each: three
compiles, 9 timing rounds) then some bf16 ones; models about 160 s, the f32
groups (MLP about 20 s each; NanoLM 60-70 s each, mostly compiling XLA's
exact step), bf16 groups only with time left. ``skipped`` says what did
not fit.

Times are per call of one compiled program, calls issued back to back;
``meta.dispatch_floor_us`` is that of a trivial program, and a time under
twice it is marked ``dispatch_bound`` (the host, not the GPU, set it: the
2048x256->256 dense layer's roofline is 3 µs).

``--dry-run``: the same plumbing on CPU at tiny sizes with Pallas'
interpreter (about 15 s on 2 cores; tests/test_gpu_kernels_script.py);
Mosaic GPU is recorded as skipped (it has no interpreter and needs an
sm_90 GPU); models are shrunk (``models.get_model`` wrapped). Times
measured in a dry run mean nothing. ``--inject-failure`` gives the first
correctness case a wrong reference (to see a failure reported).

Exit status 1 when a correctness check fails or a kernel or step does not
compile or run; 3 when aborted at ``--hard-limit``; 0 otherwise (also
without a GPU and without ``--dry-run``: it says so and measures nothing).
Works on JAX 0.10 and 0.11; nothing Triton-only is
imported here (the kernels guard their own imports).
"""

from __future__ import annotations

import time

_T0 = time.perf_counter()

import argparse  # noqa: E402
import faulthandler  # noqa: E402
import functools  # noqa: E402
import importlib.util  # noqa: E402
import inspect  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import traceback  # noqa: E402
import warnings  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

_BENCH = os.path.dirname(os.path.abspath(__file__))
_REPO = os.path.dirname(_BENCH)
HIGHEST = jax.lax.Precision.HIGHEST
BACKENDS = ("triton", "mosaic_gpu")
DTYPES = {"f32": jnp.float32, "bf16": jnp.bfloat16}

# ---------------------------------------------------------------------------
# The roofline's estimates (bench/RESULTS.md; H100 programs, H200 ceilings).
# ---------------------------------------------------------------------------

# layer id (bench/roofline.py layer_cases) -> (fused µs, XLA jvp-of-jvp µs).
ROOFLINE_LAYERS_US = {
    "dense 8192x1024->4096": (694.1, 787.8),
    "dense 8192x4096->1024": (694.1, 717.5),
    "dense 2048x256->256": (3.0, 15.6),
    "gelu 8192x4096": (187.3, 187.3),
    "attention causal 2x8x2048x64": (104.1, 1885.6),
    "attention causal 16x8x1024x32": (104.1, 3758.8),
    "layer_norm 1024x1024 f32": (5.9, 8.8),
    "layer_norm 4096x1024 f32": (23.4, 35.1),
    "layer_norm 1024x1024 bf16": (2.9, 4.4),
    "layer_norm 4096x1024 bf16": (11.7, 17.6),
}

# (model, T, dtype, layers) -> {mode: roofline µs}; ratios over "base".
# bench/RESULTS.md "CDAT steps of two models" (the code these runs measure;
# XLA's exact NanoLM rows from an earlier compile, within 0.2%).
ROOFLINE_STEPS_US = {
    ("mlp", 1024, "f32", "fused"): dict(base=64.6, exact=139.7, sub16_gn=87.2),
    ("mlp", 1024, "f32", "xla"): dict(base=64.6, exact=143.0, sub16_gn=87.2),
    ("mlp", 4096, "f32", "fused"): dict(base=224.2, exact=508.3,
                                        sub16_gn=258.6),
    ("mlp", 4096, "f32", "xla"): dict(base=224.2, exact=511.0, sub16_gn=258.6),
    ("nanolm", 256, "f32", "fused"): dict(base=1306.3, exact=2070.2,
                                          sub16_gn=1511.2),
    ("nanolm", 256, "f32", "xla"): dict(base=1307.4, exact=4805.5,
                                        sub16_gn=1512.5),
    ("nanolm", 1024, "f32", "fused"): dict(base=11400.3, exact=14599.0,
                                           sub16_gn=12587.4),
    ("nanolm", 1024, "f32", "xla"): dict(base=11405.9, exact=41698.8,
                                         sub16_gn=12593.1),
    ("mlp", 1024, "bf16", "fused"): dict(base=38.1, exact=82.0, sub16_gn=53.3),
    ("mlp", 1024, "bf16", "xla"): dict(base=38.1, exact=83.8, sub16_gn=53.3),
    ("mlp", 4096, "bf16", "fused"): dict(base=130.2, exact=297.6,
                                         sub16_gn=151.3),
    ("mlp", 4096, "bf16", "xla"): dict(base=130.2, exact=297.6,
                                       sub16_gn=151.3),
    ("nanolm", 256, "bf16", "fused"): dict(base=715.0, exact=1137.8,
                                           sub16_gn=860.6),
    ("nanolm", 256, "bf16", "xla"): dict(base=715.6, exact=1941.3,
                                         sub16_gn=861.0),
    ("nanolm", 1024, "bf16", "fused"): dict(base=5793.2, exact=7563.9,
                                            sub16_gn=6435.0),
    ("nanolm", 1024, "bf16", "xla"): dict(base=5796.0, exact=15884.4,
                                          sub16_gn=6437.7),
}

# Guessed seconds of a case of each kind before one of that kind has been
# measured (compile + run + compare on the device's host), from the compile
# tier's compile times on the 2-core host (docs/accelerators.md: dense,
# activation, layer norm 0.2-0.9 s, attention 1.7-4.4 s; a fused NanoLM
# CDAT step 18-19 s) and bench/roofline.py's compile_s column.
COST_GUESS_S = {
    "correctness dense_jet": 2.0, "correctness activation_jet": 1.5,
    "correctness layer_norm_jet": 1.5, "correctness attention_jet": 5.0,
    "layers": 8.0,
    "models mlp fused base": 3.0, "models mlp fused exact": 5.0,
    "models mlp fused sub16_gn": 4.0, "models mlp xla base": 3.0,
    "models mlp xla exact": 4.0, "models mlp xla sub16_gn": 4.0,
    "models nanolm fused base": 6.0, "models nanolm fused exact": 15.0,
    "models nanolm fused sub16_gn": 8.0, "models nanolm xla base": 6.0,
    "models nanolm xla exact": 25.0, "models nanolm xla sub16_gn": 8.0,
}


def load_roofline_json(paths):
  """Adds model-step estimates from ``bench/roofline.py --json`` files."""
  for path in paths:
    rows = json.loads(open(path, encoding="utf-8").read())
    for r in rows:
      key = (r["model"], int(r["T"]), r.get("dtype", "f32"),
             "fused" if r["fused"] else "xla")
      ROOFLINE_STEPS_US.setdefault(key, {})[r["mode"]] = r["time_s"] * 1e6


# ---------------------------------------------------------------------------
# Imports of the repository's modules.
# ---------------------------------------------------------------------------


def _import_kernels():
  """``cdat_fast.kernels`` if importable, else ``kernels/`` from the repo."""
  try:
    from cdat_fast import kernels  # pylint: disable=g-import-not-at-top
    return kernels
  except Exception:  # pylint: disable=broad-except
    if _REPO not in sys.path:
      sys.path.insert(0, _REPO)
    import kernels  # pylint: disable=g-import-not-at-top
    sys.modules.setdefault("cdat_fast.kernels", kernels)
    return kernels


def _import_path(name, path):
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _import_roofline():
  """bench/roofline.py as a module, leaving ``JAX_PLATFORMS`` as it was.

  roofline.py sets ``JAX_PLATFORMS=cpu`` by default for its compile-only
  runs; JAX has read the variable already (backends are up), and it is put
  back so that nothing started from here inherits it.
  """
  before = os.environ.get("JAX_PLATFORMS")
  try:
    if _BENCH not in sys.path:
      sys.path.insert(0, _BENCH)
    import roofline  # pylint: disable=g-import-not-at-top
    return roofline
  finally:
    if before is None:
      os.environ.pop("JAX_PLATFORMS", None)
    else:
      os.environ["JAX_PLATFORMS"] = before


def _tier_sizes():
  """The compile tier's kernel sizes (tests/accel/compile_cases.py)."""
  try:
    cc = _import_path("_gpu_kernels_compile_cases",
                      os.path.join(_REPO, "tests", "accel", "compile_cases.py"))
    return cc.DENSE, cc.ACTIVATION, cc.LAYER_NORM, cc.ATTENTION
  except Exception:  # pylint: disable=broad-except  # same lists, kept here
    return ([(8192, 1024, 4096), (8192, 4096, 1024), (2048, 256, 256),
             (1000, 768, 3072)],
            [("gelu", (8192, 4096)), ("relu", (4096, 1024)),
             ("tanh", (1000, 3072)), ("silu", (2048, 256))],
            [(8192, 4096), (8192, 256), (1000, 768)],
            [(2, 8, 512, 64), (2, 8, 2048, 64), (2, 8, 512, 128),
             (1, 8, 2048, 128), (1, 4, 8192, 128)])


def accepts_backend(fn) -> bool:
  """Whether a kernel takes ``gpu_backend=`` (has a Mosaic GPU version)."""
  try:
    return "gpu_backend" in inspect.signature(fn).parameters
  except (TypeError, ValueError):
    return False


def _short(e: BaseException) -> str:
  lines = str(e).strip().splitlines()
  return f"{type(e).__name__}: {lines[0][:300] if lines else ''}"


# ---------------------------------------------------------------------------
# The run: budget, records, the JSON file.
# ---------------------------------------------------------------------------


class Run:
  """The run's options, deadlines, records and JSON file."""

  def __init__(self, args, kernels=None):
    self.args = args
    self.kernels = kernels
    self.deadline = _T0 + args.budget
    self.costs = {}  # kind -> last measured seconds
    self.section = None
    self.section_deadline = self.deadline
    self.doc = {"meta": {}, "sections": {}, "skipped": [], "failures": []}
    self.interpret = bool(args.dry_run)

  # -- time
  def now(self) -> float:
    return time.perf_counter() - _T0

  def left(self) -> float:
    return min(self.deadline, self.section_deadline) - time.perf_counter()

  def start_section(self, name, shares):
    """Opens section ``name``: its share of the time left (``shares``: the
    shares of this and the sections after it, this one first)."""
    left = self.deadline - time.perf_counter()
    share = shares[0] / sum(shares) if sum(shares) else 1.0
    self.section_deadline = time.perf_counter() + max(0.0, left) * share
    self.section = {"status": "running", "budget_s": round(left * share, 1),
                    "started_s": round(self.now(), 1), "cases": []}
    self.doc["sections"][name] = self.section
    self.section_name = name
    print(f"\n== {name} (budget {left * share:.0f} s of {max(left, 0):.0f} s "
          f"left) ==", flush=True)
    self.save()

  def end_section(self, status=None):
    s = self.section
    s["elapsed_s"] = round(self.now() - s["started_s"], 1)
    n_skip = sum(1 for r in self.doc["skipped"]
                 if r["section"] == self.section_name)
    s["status"] = status or ("partial" if n_skip else "done")
    s["n_skipped"] = n_skip
    self.section_deadline = self.deadline
    self.save()

  def skip_section(self, name, reason):
    self.doc["sections"][name] = {"status": "skipped", "reason": reason,
                                  "cases": []}
    self.doc["skipped"].append({"section": name, "id": "*", "reason": reason})
    print(f"\n== {name}: skipped ({reason}) ==", flush=True)
    self.save()

  def fits(self, kind, case_id, n=1) -> bool:
    """Whether ``n`` cases of ``kind`` fit before the deadline; if not, the
    case is recorded as skipped."""
    est = n * self.costs.get(kind, COST_GUESS_S.get(kind, 5.0)
                             * (0.05 if self.args.dry_run else 1.0))
    left = self.left()
    if est <= left:
      self.doc["meta"]["in_progress"] = f"{self.section_name}: {case_id}"
      self.save()
      return True
    self.skip(case_id, f"budget: {max(left, 0):.0f} s left, needs ~{est:.0f}"
              " s")
    return False

  def cost(self, kind, seconds):
    self.costs[kind] = seconds

  def skip(self, case_id, reason):
    self.doc["skipped"].append({"section": self.section_name, "id": case_id,
                                "reason": reason})

  def fail(self, what):
    self.doc["failures"].append(what)

  def record(self, case):
    self.section["cases"].append(case)
    self.doc["meta"]["in_progress"] = None
    self.save()

  def save(self):
    """Rewrites the JSON file (atomically: a reader never sees half)."""
    self.doc["meta"]["elapsed_s"] = round(self.now(), 1)
    path = self.args.json
    if not path:
      return
    tmp = f"{path}.{threading.get_ident()}.tmp"
    for attempt in range(3):  # The watchdog may save while main mutates.
      try:
        text = json.dumps(self.doc, indent=1, default=str)
        break
      except RuntimeError:
        if attempt == 2:
          raise
        time.sleep(0.05)
    with open(tmp, "w", encoding="utf-8") as f:
      f.write(text)
    os.replace(tmp, path)

  def arm_watchdog(self, hard_limit):
    """At ``hard_limit`` seconds from the start, should a case still run:
    marks the JSON ``aborted`` (naming the case in flight), prints the
    tables so far and the Python stacks, and exits with status 3. Only
    runs where the stuck call releases the GIL (XLA's compiles and device
    waits do); the outer ``timeout`` of device_check.sh is the backstop."""
    def fire():
      meta = self.doc["meta"]
      meta["aborted"] = (f"hard limit {hard_limit:.0f} s reached during "
                         f"{meta.get('in_progress')}")
      print(f"\nABORTED: {meta['aborted']}", flush=True)
      try:
        self.save()
        table = markdown(self.doc)
        print("\n" + table, flush=True)
        if self.args.markdown:
          with open(self.args.markdown, "w", encoding="utf-8") as f:
            f.write(table)
      except Exception:  # pylint: disable=broad-except
        traceback.print_exc()
      faulthandler.dump_traceback(all_threads=True)
      sys.stdout.flush()
      sys.stderr.flush()
      os._exit(3)
    timer = threading.Timer(max(1.0, hard_limit - self.now()), fire)
    timer.daemon = True
    timer.start()
    return timer


def _meta(run, kernels):
  """Versions, device, the backends available and why not."""
  device = jax.devices()[0]
  cc = getattr(device, "compute_capability", None)
  backend = jax.default_backend()
  lowering = kernels.lowering
  triton = {"available": True, "reason": None}
  mosaic = {"available": True, "reason": None}
  if run.args.dry_run:
    triton["reason"] = "dry run: Pallas' interpreter of the Triton version"
    mosaic = {"available": False, "reason": (
        "dry run: Mosaic GPU has no interpreter here and needs a CUDA GPU "
        f"of compute capability >= 9.0 (backend {backend})")}
  else:
    if getattr(lowering, "pltriton", None) is None:
      triton = {"available": False,
                "reason": "jax.experimental.pallas.triton not importable"}
    try:
      from cdat_fast.kernels import mosaic_gpu  # pylint: disable=g-import-not-at-top
      plgpu = mosaic_gpu.plgpu
    except Exception as e:  # pylint: disable=broad-except
      plgpu, why = None, _short(e)
    else:
      why = "jax.experimental.pallas.mosaic_gpu not importable"
    major = None
    try:
      major = int(str(cc).split(".")[0]) if cc is not None else None
    except ValueError:
      pass
    if plgpu is None:
      mosaic = {"available": False, "reason": why}
    elif device.platform != "gpu" or major is None:
      mosaic = {"available": False, "reason": (
          f"not a CUDA GPU (platform {device.platform}, no compute "
          "capability reported)")}
    elif major < 9:
      mosaic = {"available": False,
                "reason": f"compute capability {cc} < 9.0 (WGMMA)"}
  jaxlib = sys.modules.get("jaxlib")
  meta = {
      "script": "bench/gpu_kernels.py", "argv": sys.argv[1:],
      "dry_run": bool(run.args.dry_run), "interpret": run.interpret,
      "python": sys.version.split()[0], "jax": jax.__version__,
      "jaxlib": getattr(getattr(jaxlib, "version", None), "__version__",
                        None) or getattr(jaxlib, "__version__", None),
      "backend": backend, "device": str(getattr(device, "device_kind",
                                                device)),
      "compute_capability": cc, "num_devices": jax.device_count(),
      "env": {k: os.environ.get(k) for k in (
          "XLA_FLAGS", "CDAT_FAST_GPU_BACKEND", "JAX_PLATFORMS",
          "XLA_PYTHON_CLIENT_PREALLOCATE")},
      "backends": {"triton": triton, "mosaic_gpu": mosaic},
      "budget_s": run.args.budget, "shares": run.args.shares,
      "in_progress": None, "finished": False,
      "dispatch_floor_us": dispatch_floor_us(),
  }
  for name in ("flax", "optax"):
    try:
      meta[name] = __import__(name).__version__
    except Exception:  # pylint: disable=broad-except
      meta[name] = None
  return meta


# ---------------------------------------------------------------------------
# Inputs and comparison.
# ---------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnums=(1, 2))
def _device_randn(key, shape, dtype, scale):
  return (scale * jax.random.normal(key, shape, jnp.float32)).astype(dtype)


def _randn(seed, shape, dtype, scale=1.0):
  """Normal values: NumPy's for small arrays (no compile per shape),
  generated on the device for large ones."""
  shape = tuple(int(d) for d in shape)
  if math.prod(shape) >= 2**20:
    return _device_randn(jax.random.key(seed), shape, jnp.dtype(dtype),
                         float(scale))
  rng = np.random.default_rng(seed)
  a = rng.standard_normal(shape, dtype=np.float32) * np.float32(scale)
  return jnp.asarray(a).astype(dtype)


def compare(actual, expected, tol):
  """``{ok, err, per_output}`` of outputs against a reference.

  Per output: ``max|a - e| / max|e|`` in float32; ``err`` is the worst. Not
  ok when it exceeds ``tol``, when a value is not finite where the reference
  is, or when shapes or the number of outputs differ.
  """
  actual, expected = list(actual), list(expected)
  if len(actual) != len(expected):
    return {"ok": False, "err": math.inf, "per_output": [],
            "why": f"{len(actual)} outputs, reference {len(expected)}"}
  per = []
  why = None
  for i, (a, e) in enumerate(zip(actual, expected)):
    a = np.asarray(a, np.float32)
    e = np.asarray(e, np.float32)
    if a.shape != e.shape:
      per.append(math.inf)
      why = f"output {i}: shape {a.shape}, reference {e.shape}"
      continue
    if not a.size:
      per.append(0.0)
      continue
    bad = ~np.isfinite(a) & np.isfinite(e)
    if bad.any():
      per.append(math.inf)
      why = f"output {i}: {int(bad.sum())} non-finite values"
      continue
    ref = float(np.max(np.abs(e)))
    per.append(float(np.max(np.abs(a - e))) / max(ref, 1e-30))
  err = max(per) if per else 0.0
  ok = bool(err <= tol) and why is None
  out = {"ok": ok, "err": err, "per_output": per}
  if why:
    out["why"] = why
  return out


# Custom-call targets of compiled Pallas kernels, per GPU backend.
KERNEL_CALLS = {"triton": 'custom_call_target="__gpu$xla.gpu.triton"',
                "mosaic_gpu": 'custom_call_target="mosaic_gpu'}


def kernel_calls(text: str) -> dict:
  """{backend: number of its kernel custom calls} in compiled HLO text."""
  return {b: text.count(t) for b, t in KERNEL_CALLS.items()}


def check(run, case_id, fused, expected, args, tol, backend, extra=None):
  """Compiles and runs ``fused(*args)`` against outputs ``expected``;
  records one case: ``ok``, ``FAIL`` (error above ``tol``, non-finite
  values, or, compiled for a GPU, no kernel of ``backend`` in the program)
  or ``error`` (did not compile or run). Returns the record."""
  rec = {"id": case_id, "backend": backend, "tol": tol, **(extra or {})}
  t0 = time.perf_counter()
  try:
    compiled, seconds, _ = _compile(fused, args)
    rec["compile_s"] = round(seconds, 2)
    calls = _calls_of(compiled)
    rec["kernel_calls"] = calls
    out = jax.block_until_ready(compiled(*args))
    rec.update(compare(out, expected, tol))
    if (not run.interpret and calls is not None
        and not calls.get(backend) and rec.get("ok")):
      rec.update(ok=False, why=f"no {backend} kernel in the compiled "
                 f"program ({calls})")
    rec["status"] = "ok" if rec["ok"] else "FAIL"
  except Exception as e:  # pylint: disable=broad-except
    rec.update(ok=False, status="error", error=_short(e))
    if run.args.verbose:
      traceback.print_exc()
  rec["seconds"] = round(time.perf_counter() - t0, 2)
  if rec["status"] != "ok":
    run.fail(f"{case_id} [{backend}]: {rec['status']} "
             f"{rec.get('error') or rec.get('why') or ''}".strip())
  err = rec.get("err")
  detail = (f"err {err:.1e} (tol {tol:.0e})" if err is not None
            else rec.get("error", ""))
  print(f"  {case_id:<52} {backend:<10} {rec['status']:<5} {detail} "
        f"[{rec['seconds']:.1f} s]", flush=True)
  run.record(rec)
  return rec


# ---------------------------------------------------------------------------
# Problems: inputs and XLA's jvp-of-jvp of each layer.
# ---------------------------------------------------------------------------


def _seeds(seed, n):
  return [seed * 1000 + i for i in range(n)]


def dense_args(m, k, n, dtype, seed=0):
  keys = _seeds(seed, 7)
  x = _randn(keys[0], (m, k), dtype)
  w = _randn(keys[1], (k, n), dtype, k ** -0.5)
  b = _randn(keys[2], (n,), dtype)
  dx = _randn(keys[3], (m, k), dtype)
  dw = _randn(keys[4], (k, n), dtype, k ** -0.5)
  db = _randn(keys[5], (n,), dtype)
  ddx = _randn(keys[6], (m, k), dtype)
  return (x, w, b, dx, dw, db, ddx)


def activation_args(shape, dtype, seed=0):
  k1, k2, k3 = _seeds(seed, 3)
  return (_randn(k1, shape, dtype, 2.0), _randn(k2, shape, dtype),
          _randn(k3, shape, dtype))


def layer_norm_args(rows, d, dtype, seed=0):
  keys = _seeds(seed, 7)
  r = lambda k, s=1.0: _randn(k, (rows, d), dtype, s)
  v = lambda k: _randn(k, (d,), dtype)
  return (r(keys[0], 2.0), (1.0 + v(keys[1])).astype(dtype), v(keys[2]),
          r(keys[3]), v(keys[4]), v(keys[5]), r(keys[6]))


def attention_args(shape, dtype, seed=0):
  keys = _seeds(seed, 9)
  return tuple(_randn(k, shape, dtype) for k in keys)


def _spec(shape, dtype):
  return jax.ShapeDtypeStruct(tuple(shape), dtype)


def _kernel_fn(kernels, name, backend, interpret, **kw):
  """The kernel ``name`` for ``backend`` (None if it has no such version)."""
  fn = getattr(kernels, name)
  if accepts_backend(fn):
    kw["gpu_backend"] = backend
  elif backend != "triton":
    return None
  return functools.partial(fn, interpret=True if interpret else None, **kw)


def correctness_cases(dry):
  """[(priority, kind, id, make_args, kernel, kernel kwargs, reference, tol,
  backends_refused)]: the kernels at the tier's and awkward sizes."""
  if dry:  # One awkward size of each kernel: the plumbing, in seconds.
    dense, act, norm, attn = [(74, 19, 53)], [("gelu", (37, 19))], [(37, 53)], [
        (1, 2, 37, 16)]
    awkward_dense, awkward_act, awkward_norm, awkward_attn = [], [], [], []
  else:
    dense, act, norm, attn = _tier_sizes()
    awkward_dense = [(74, 19, 53), (300, 1000, 700)]
    awkward_act = [(a, (111, 19)) for a in ("relu", "gelu", "tanh", "silu")]
    awkward_norm = [(74, 53), (74, 1000)]
    awkward_attn = [(2, 3, 37, 5), (1, 3, 74, 40)]
  cases = []

  def add(priority, kind, case_id, make, kernel, kw, ref, tol, refused=()):
    cases.append((priority, kind, case_id, make, kernel, kw, ref, tol,
                  tuple(refused)))

  # Priority 0: a non-dividing size of every kernel in every dtype first,
  # so that a cut section still covers each kernel and backend.
  for i, (m, k, n) in enumerate(awkward_dense + dense):
    prio = 0 if (i < len(awkward_dense) and i == 0) or m % 64 else 1
    for tag, precision, tol in (("f32", None, 2e-2), ("bf16", None, 3e-2),
                                ("f32-highest", HIGHEST, 1e-4)):
      dt = DTYPES[tag.split("-")[0]]
      add(prio if tag != "f32-highest" else 2, "dense_jet",
          f"dense_jet {m}x{k}x{n} {tag}",
          functools.partial(dense_args, m, k, n, dt), "dense_jet",
          dict(precision=precision),
          functools.partial(_dense_reference, precision=HIGHEST), tol,
          ("mosaic_gpu",) if precision is not None else ())
  m, k, n = (awkward_dense or dense)[0]
  for tag, pick in (("no bias", lambda a: a[:2] + (None,) + a[3:5] + (None,)
                     + a[6:]),
                    ("dx=ddx=None", lambda a: a[:3] + (None,) + a[4:6]
                     + (None,)))[:0 if dry else 2]:
    add(0, "dense_jet", f"dense_jet {m}x{k}x{n} f32 {tag}",
        lambda m=m, k=k, n=n, pick=pick: pick(dense_args(m, k, n,
                                                         jnp.float32)),
        "dense_jet", {}, functools.partial(_dense_reference,
                                           precision=HIGHEST), 2e-2)
  for i, (a, shape) in enumerate(awkward_act + act):
    prio = 0 if i == 0 or shape[0] % 64 else 1
    for tag, tol in (("f32", 1e-4), ("bf16", 3e-2))[:1 if dry else 2]:
      add(prio, "activation_jet", f"activation_jet {a} "
          f"{shape[0]}x{shape[1]} {tag}",
          functools.partial(activation_args, tuple(shape), DTYPES[tag]),
          "activation_jet", dict(activation=a),
          functools.partial(_activation_reference, activation=a), tol)
  for i, (rows, d) in enumerate(awkward_norm + norm):
    prio = 0 if i == 0 or rows % 64 else 1
    for tag, tol in (("f32", 1e-3), ("bf16", 5e-2))[:1 if dry else 2]:
      add(prio, "layer_norm_jet", f"layer_norm_jet {rows}x{d} {tag}",
          functools.partial(layer_norm_args, rows, d, DTYPES[tag]),
          "layer_norm_jet", {}, _layer_norm_reference, tol)
  for i, shape in enumerate(awkward_attn + attn):
    for causal in (True, False)[:1 if dry else 2]:
      prio = 0 if i == 0 and causal else 1
      for tag, tol in (("f32", 2e-2), ("bf16", 5e-2))[:1 if dry else 2]:
        mask = "causal" if causal else "full"
        add(prio, "attention_jet", f"attention_jet "
            f"{'x'.join(map(str, shape))} {mask} {tag}",
            functools.partial(attention_args, tuple(shape), DTYPES[tag]),
            "attention_jet", dict(causal=causal),
            functools.partial(_attention_reference, causal=causal), tol)
  order = {k: i for i, k in enumerate(
      ("dense_jet", "activation_jet", "layer_norm_jet", "attention_jet"))}
  # Round-robin over the kernels within each priority.
  seen = {}
  keyed = []
  for c in cases:
    seen[(c[0], c[1])] = seen.get((c[0], c[1]), 0) + 1
    keyed.append(((c[0], seen[(c[0], c[1])], order[c[1]]), c))
  return [c for _, c in sorted(keyed, key=lambda kc: kc[0])]


def _kernels():
  return sys.modules["cdat_fast.kernels"]


def _dense_reference(*a, precision):
  return _kernels().dense_jet_reference(*a, precision=precision)


def _activation_reference(*a, activation):
  return _kernels().activation_jet_reference(*a, activation=activation)


def _layer_norm_reference(*a):
  return _kernels().layer_norm_jet_reference(*a)


def _attention_reference(*a, causal):
  return _kernels().attention_jet_reference(*a, causal=causal,
                                            precision=HIGHEST)


def correctness(run, kernels):
  cases = correctness_cases(run.args.dry_run)
  backends = run.doc["meta"]["backends"]
  injected = run.args.inject_failure
  for prio, kind, case_id, make, kname, kw, ref, tol, refused in cases:
    if run.args.only and not any(o in case_id for o in run.args.only):
      continue
    present = []
    for b in BACKENDS:
      fused = _kernel_fn(kernels, kname, b, run.interpret, **kw)
      if fused is None:
        present.append((b, None, f"{kname} has no {b} version"))
      elif b in refused:
        present.append((b, None, f"{b} refuses these options ({kw})"))
      elif not backends[b]["available"]:
        present.append((b, None, backends[b]["reason"]))
      else:
        present.append((b, fused, None))
    n_run = sum(1 for _, f, _ in present if f is not None)
    if not n_run:
      for b, _, why in present:
        run.record({"id": case_id, "backend": b, "status": "n/a",
                    "reason": why, "priority": prio})
      continue
    if not run.fits(f"correctness {kind}", case_id, n_run):
      continue
    t0 = time.perf_counter()
    extra = {"kernel": kname, "priority": prio}
    try:
      args = make()
      reference = ref
      if injected:
        injected = False
        extra["injected_wrong_reference"] = True
        reference = lambda *a, ref=ref: tuple(  # noqa: E731
            o * 1.25 + 1.0 for o in ref(*a))
      expected = jax.block_until_ready(jax.jit(reference)(*args))
    except Exception as e:  # pylint: disable=broad-except
      run.record({"id": case_id, "backend": "reference", "status": "error",
                  "error": _short(e), **extra})
      run.fail(f"{case_id} [reference]: {_short(e)}")
      print(f"  {case_id:<52} reference ERROR {_short(e)}", flush=True)
      continue
    for b, fused, why in present:
      if fused is None:
        status = "skipped" if why == backends[b]["reason"] else "n/a"
        run.record({"id": case_id, "backend": b, "status": status,
                    "reason": why, **extra})
        continue
      check(run, case_id, fused, expected, args, tol, b, extra)
    del args, expected
    run.cost(f"correctness {kind}", (time.perf_counter() - t0) / n_run)


# ---------------------------------------------------------------------------
# Timing: interleaved repeats in one process.
# ---------------------------------------------------------------------------


def _calls_of(compiled):
  try:
    return kernel_calls(compiled.as_text())
  except Exception:  # pylint: disable=broad-except
    return None


def _compile(fn, args):
  """(compiled callable, compile seconds, temp bytes or None)."""
  t0 = time.perf_counter()
  compiled = jax.jit(fn).lower(*args).compile()
  seconds = time.perf_counter() - t0
  temp = None
  try:
    temp = int(compiled.memory_analysis().temp_size_in_bytes)
  except Exception:  # pylint: disable=broad-except
    pass
  return compiled, seconds, temp


def _compile_and_run(run, records, name, label, build):
  """Runs ``build()`` (-> compiled, args, compile s, temp bytes) once.

  Records under ``records[name]`` its status, compile time, temporaries and
  kernel calls; a failure is recorded (``run.fail``) and gives None, else
  ``(outputs, (compiled, args))``.
  """
  try:
    compiled, args, seconds, temp = build()
    outputs = jax.block_until_ready(compiled(*args))
  except Exception as e:  # pylint: disable=broad-except
    records[name] = {"status": "error", "error": _short(e)}
    run.fail(f"{label} [{name}]: {_short(e)}")
    if run.args.verbose:
      traceback.print_exc()
    return None
  records[name] = {"status": "ok", "compile_s": round(seconds, 2),
                   "temp_bytes": temp, "kernel_calls": _calls_of(compiled)}
  return outputs, (compiled, args)


def measure(programs, repeats, min_sample_s, deadline):
  """Interleaved timing of compiled programs on their arguments.

  ``programs``: {name: (callable, args)}. Each is run once (warm), its calls
  per sample chosen so a sample takes about ``min_sample_s``; then
  ``repeats`` rounds, each timing one sample of every program, the order
  rotated per round. Stops early (fewer rounds) at ``deadline``
  (perf_counter). Returns {name: {median_us, min_us, max_us, spread,
  samples, inner}} in µs per call; spread is (max - min) / median.
  """
  inner = {}
  for name, (fn, args) in programs.items():
    jax.block_until_ready(fn(*args))
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    once = max(time.perf_counter() - t0, 1e-7)
    inner[name] = int(min(1000, max(1, min_sample_s / once)))
  samples = {name: [] for name in programs}
  names = list(programs)
  for r in range(repeats):
    if r >= 3 and time.perf_counter() > deadline:
      break
    for name in names[r % len(names):] + names[:r % len(names)]:
      fn, args = programs[name]
      n = inner[name]
      t0 = time.perf_counter()
      for _ in range(n):
        out = fn(*args)
      jax.block_until_ready(out)
      samples[name].append((time.perf_counter() - t0) / n * 1e6)
  result = {}
  for name, s in samples.items():
    med = statistics.median(s)
    result[name] = {"median_us": med, "min_us": min(s), "max_us": max(s),
                    "spread": (max(s) - min(s)) / med if med else None,
                    "samples": len(s), "inner": inner[name]}
  return result


def dispatch_floor_us():
  """µs per call of a trivial jitted op: below it a time is dispatch."""
  f = jax.jit(lambda x: x + 1)
  x = jnp.zeros((8,), jnp.float32)
  return measure({"floor": (f, (x,))}, 5, 0.02, math.inf)["floor"][
      "median_us"]


def _materialize(tree, seed=0, int_bound=10):
  """Arrays for a pytree of ShapeDtypeStructs: normal floats (kernels and
  embeddings scaled by fan-in, biases 0, scales 1), integers in
  ``[0, int_bound)``."""
  leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
  out = []
  for i, (path, spec) in enumerate(leaves):
    k = seed * 1000 + i
    name = jax.tree_util.keystr(path).lower()
    shape, dtype = tuple(spec.shape), spec.dtype
    if jnp.issubdtype(dtype, jnp.integer):
      a = jnp.asarray(np.random.default_rng(k).integers(0, int_bound, shape),
                      dtype)
    elif "bias" in name:
      a = jnp.zeros(shape, dtype)
    elif "scale" in name:
      a = jnp.ones(shape, dtype)
    elif ("kernel" in name or "embedding" in name) and len(shape) >= 2:
      fan_in = math.prod(shape[:-1]) if "kernel" in name else shape[-1]
      a = _randn(k, shape, dtype, fan_in ** -0.5)
    else:
      a = _randn(k, shape, dtype)
    out.append(a)
  return jax.tree_util.tree_unflatten(treedef, out)


def _rel_diff(a_tree, b_tree) -> float:
  """Worst ``max|a - b| / max|b|`` over the float leaves of two pytrees."""
  worst = 0.0
  for a, b in zip(jax.tree.leaves(a_tree), jax.tree.leaves(b_tree)):
    a, b = np.asarray(a), np.asarray(b)
    if not np.issubdtype(b.dtype, np.floating) and b.dtype.kind != "V":
      continue
    a, b = a.astype(np.float32), b.astype(np.float32)
    if not np.all(np.isfinite(a)) or not np.all(np.isfinite(b)):
      return math.inf
    worst = max(worst, float(np.max(np.abs(a - b), initial=0.0))
                / max(float(np.max(np.abs(b), initial=0.0)), 1e-30))
  return worst


def _fmt_us(us):
  return "-" if us is None else (f"{us:.1f}" if us < 1e4 else f"{us:.0f}")


# ---------------------------------------------------------------------------
# 2. Layers.
# ---------------------------------------------------------------------------

_DRY_LAYER_SHAPES = {"dense": ((64, 32), (32, 48)), "gelu": (64, 256),
                     "attention": (1, 2, 64, 16), "layer_norm": (32, 128)}


def _layer_kernel(layer_id):
  if layer_id.startswith("dense"):
    return "dense_jet", {}
  if layer_id.startswith("gelu"):
    return "activation_jet", dict(activation="gelu")
  if layer_id.startswith("attention"):
    return "attention_jet", dict(causal="causal" in layer_id)
  if layer_id.startswith("layer_norm"):
    return "layer_norm_jet", {}
  raise ValueError(layer_id)


def _dry_specs(layer_id, specs):
  """Tiny versions of a layer's argument specs, same dtypes and structure."""
  dt = specs[0].dtype
  if layer_id.startswith("dense"):
    (m, k), (_, n) = _DRY_LAYER_SHAPES["dense"]
    x, w, b = _spec((m, k), dt), _spec((k, n), dt), _spec((n,), dt)
    return (x, w, b, x, w, b, x)
  if layer_id.startswith("gelu"):
    return (_spec(_DRY_LAYER_SHAPES["gelu"], dt),) * 3
  if layer_id.startswith("attention"):
    return (_spec(_DRY_LAYER_SHAPES["attention"], dt),) * 9
  rows, d = _DRY_LAYER_SHAPES["layer_norm"]
  x, v = _spec((rows, d), dt), _spec((d,), dt)
  return (x, v, v, x, v, v, x)


def _layer_list(run):
  """[(id, roofline id, xla fn, specs)], the estimated ones first."""
  source = "bench/roofline.py layer_cases"
  dtypes = ("f32", "bf16")
  cases = _import_roofline().layer_cases(dtypes)
  run.section["xla_source"] = source
  out = []
  for layer_id, (_, xla, specs, _) in cases.items():
    shapes = specs
    shown = layer_id
    if run.args.dry_run:
      shapes = _dry_specs(layer_id, specs)
      shown = f"{layer_id} [dry: {'x'.join(map(str, shapes[0].shape))}]"
    out.append((shown, layer_id, xla, shapes))
  kinds = ("dense", "gelu", "attention", "layer_norm")
  kind = lambda c: [c[1].startswith(k) for k in kinds].index(True)  # noqa: E731
  out.sort(key=lambda c: (c[1] not in ROOFLINE_LAYERS_US, kind(c)))
  if run.args.dry_run:  # One of each kernel: the plumbing, in seconds.
    firsts = {}
    for c in out:
      firsts.setdefault(kind(c), c)
    out = list(firsts.values())
  return out


def layer_work(layer_id, specs):
  """(FLOPs, bytes) of one layer's fused jet, bench/roofline.py's way:
  dense 5 matmuls of 2·M·K·N, attention 12·2·B·H·T²·D (halved causal),
  gelu 30 and layer norm 40 FLOPs per element; bytes every input read and
  the three outputs written once."""
  x = specs[0]
  item = jnp.dtype(x.dtype).itemsize
  read = sum(math.prod(s.shape) * jnp.dtype(s.dtype).itemsize for s in specs)
  if layer_id.startswith("dense"):
    (m, k), n = x.shape, specs[1].shape[1]
    return 5 * 2.0 * m * k * n, read + 3 * m * n * item
  out = 3 * math.prod(x.shape) * item
  if layer_id.startswith("attention"):
    *bh, t, d = x.shape
    flops = 12 * 2.0 * math.prod(bh) * t * t * d
    return flops * (0.5 if "causal" in layer_id else 1.0), read + out
  per = 30 if layer_id.startswith("gelu") else 40  # per output element
  return per * 3.0 * math.prod(x.shape), read + out


def layers(run, kernels):
  backends = run.doc["meta"]["backends"]
  repeats = 3 if run.args.dry_run else run.args.repeats
  min_sample = 0.001 if run.args.dry_run else 0.02
  for shown, layer_id, xla, specs in _layer_list(run):
    if run.args.only and not any(o in layer_id for o in run.args.only):
      continue
    if not run.fits("layers", shown):
      continue
    t0 = time.perf_counter()
    kname, kw = _layer_kernel(layer_id)
    rec = {"id": shown, "roofline_id": layer_id, "kernel": kname,
           "shapes": [list(s.shape) for s in specs],
           "dtype": str(specs[0].dtype), "impls": {}}
    est = ROOFLINE_LAYERS_US.get(layer_id)
    rec["roofline_us"] = ({"fused": est[0], "xla": est[1]} if est else None)
    flops, nbytes = layer_work(layer_id, specs)
    rec.update(flops=flops, bytes=nbytes)
    args = _materialize(specs)
    impls = {}
    for b in BACKENDS:
      name = f"fused-{b}"
      fn = _kernel_fn(kernels, kname, b, run.interpret, **kw)
      if fn is None:
        rec["impls"][name] = {"status": "n/a",
                              "reason": f"{kname} has no {b} version"}
      elif not backends[b]["available"]:
        rec["impls"][name] = {"status": "skipped",
                              "reason": backends[b]["reason"]}
      else:
        impls[name] = fn
    impls["xla"] = xla
    programs, outputs = {}, {}
    for name, fn in impls.items():
      def build(fn=fn):
        compiled, seconds, temp = _compile(fn, args)
        return compiled, args, seconds, temp
      done = _compile_and_run(run, rec["impls"], name, f"layers {shown}",
                              build)
      if done is not None:
        outputs[name], programs[name] = done
    if "xla" in outputs:
      for name in outputs:
        if name != "xla":
          rec["impls"][name]["rel_diff_vs_xla"] = compare(
              outputs[name], outputs["xla"], math.inf)["err"]
    del outputs
    if programs:
      timed = measure(programs, repeats, min_sample,
                      min(run.deadline, run.section_deadline))
      for name, t in timed.items():
        rec["impls"][name].update(t)
    order = [f"fused-{b}" for b in BACKENDS] + ["xla"]
    rec["impls"] = {k: rec["impls"][k] for k in order if k in rec["impls"]}
    xla_t = rec["impls"].get("xla", {}).get("median_us")
    for name, r in rec["impls"].items():
      med = r.get("median_us")
      if med is None:
        continue
      floor = run.doc["meta"].get("dispatch_floor_us", 0.0)
      r["dispatch_bound"] = med < 2 * floor
      # The fused kernel's work over this time (XLA's moves more bytes).
      r["tflops"] = flops / med / 1e6
      r["gbps"] = nbytes / med / 1e3
      if est:
        r["measured_over_roofline"] = med / (est[1] if name == "xla"
                                             else est[0])
      if xla_t and name != "xla":
        r["xla_over_this"] = xla_t / med
    run.record(rec)
    cells = []
    for name in ("fused-triton", "fused-mosaic_gpu", "xla"):
      r = rec["impls"].get(name, {})
      cells.append(f"{name} {_fmt_us(r.get('median_us'))}" if "median_us" in r
                   else f"{name} {r.get('status', '-')}")
    print(f"  {shown:<44} µs: " + ", ".join(cells)
          + (f"; roofline {est[0]:.1f} / {est[1]:.1f}" if est else ""),
          flush=True)
    run.cost("layers", time.perf_counter() - t0)
    del args, programs


# ---------------------------------------------------------------------------
# 3. Model steps.
# ---------------------------------------------------------------------------

MODES = ("base", "exact", "sub16_gn")
# Order within a (model, T, dtype) group: the fused step's ratios first,
# then XLA's exact for the fused/XLA comparison, then the sub-batch.
_STEP_ORDER = (("fused", "base"), ("fused", "exact"), ("xla", "base"),
               ("xla", "exact"), ("fused", "sub16_gn"), ("xla", "sub16_gn"))
# Dry run: the real builder on shrunk models, T shrunk too.
_DRY_OVERRIDES = {"mlp": dict(features=(32, 32)),
                  "nanolm-paper": dict(num_layers=1, num_heads=2, head_size=8,
                                       embed_size=16)}
_DRY_T = {("mlp", 1024): 16, ("mlp", 4096): 32, ("nanolm", 256): 8,
          ("nanolm", 1024): 16}


class _ShrunkModels:
  """Wraps ``models.get_model`` so the builder's models are tiny (dry run)."""

  def __enter__(self):
    from cdat_fast.harness import models  # pylint: disable=g-import-not-at-top
    self.models, self.original = models, models.get_model

    def get_model(name, num_outputs, **overrides):
      return self.original(name, num_outputs,
                           **{**overrides, **_DRY_OVERRIDES.get(name, {})})
    models.get_model = get_model
    return self

  def __exit__(self, *exc):
    self.models.get_model = self.original


def _init_state(mode, params):
  """The optimizer state ``model_step``'s step starts from."""
  if mode == "base":
    return ()
  import optax  # pylint: disable=g-import-not-at-top
  import cdat_fast  # pylint: disable=g-import-not-at-top
  from cdat_fast import estimators  # pylint: disable=g-import-not-at-top
  curvature = ("exact" if mode == "exact" else estimators.subbatch(
      1 / 16, inner=estimators.gauss_newton()))
  return cdat_fast.cdat(optax.sgd(1.0), curvature=curvature).init(params)


def _same_structure(tree, specs) -> bool:
  if jax.tree.structure(tree) != jax.tree.structure(specs):
    return False
  return all(tuple(a.shape) == tuple(s.shape) and a.dtype == s.dtype
             for a, s in zip(jax.tree.leaves(tree), jax.tree.leaves(specs)))


def _model_groups(args):
  """[(model, T, dtype, modes)] in the order they run."""
  steps = [s for s in _STEP_ORDER if s[1] in args.modes]
  if args.dry_run:  # Every mode once, both layer kinds, both models: seconds.
    return [("mlp", 1024, "f32", [s for s in steps if s[0] == "fused"
                                  or s[1] == "exact"]),
            ("nanolm", 256, "f32", [s for s in steps if s == ("xla",
                                                                "base")])]
  return [(model, t, tag, steps) for tag in args.model_dtypes
          for model, t in (("mlp", 1024), ("nanolm", 256), ("mlp", 4096),
                           ("nanolm", 1024))]


def _step_program(model_step, model, layers_kind, mode, tag, rows, dry,
                  step_args):
  """(compiled step, its arguments, compile s, temp bytes) of one model
  step; the arguments are made once per (mode, dtype) and shared by the
  fused and XLA steps (same parameters and batch)."""
  if dry:
    with _ShrunkModels():
      step, specs, _ = model_step(model, layers_kind == "fused", rows, mode,
                                  DTYPES[tag])
  else:
    step, specs, _ = model_step(model, layers_kind == "fused", rows, mode,
                                DTYPES[tag])
  key = (mode, tag)
  if key not in step_args:
    bound = 10 if model == "mlp" else 65
    params = _materialize(specs[0], seed=1, int_bound=bound)
    inputs = _materialize(specs[2:], seed=2, int_bound=bound)
    state = _init_state(mode, params)
    if not _same_structure(state, specs[1]):
      raise ValueError(f"the {mode} state made here does not match "
                       "model_step's (update _init_state)")
    step_args[key] = (params, state) + tuple(inputs)
  args = step_args[key]
  compiled, seconds, temp = _compile(step, args)
  return compiled, args, seconds, temp


def _step_ratios(rec, model, t_roof, tag):
  """Adds ratios over base, the roofline's, and XLA / fused to ``rec``."""
  steps = rec["steps"]
  for layers_kind in ("fused", "xla"):
    est = ROOFLINE_STEPS_US.get((model, t_roof, tag, layers_kind), {})
    base = steps.get(f"{layers_kind} base", {}).get("median_us")
    for mode in MODES:
      r = steps.get(f"{layers_kind} {mode}")
      if r is None:
        continue
      r["roofline_us"] = est.get(mode)
      if est.get(mode) and est.get("base"):
        r["roofline_over_base"] = est[mode] / est["base"]
      med = r.get("median_us")
      if med is not None and base:
        r["over_base"] = med / base
      if med is not None and est.get(mode):
        r["measured_over_roofline"] = med / est[mode]
  for mode in MODES:
    f = steps.get(f"fused {mode}", {}).get("median_us")
    x = steps.get(f"xla {mode}", {}).get("median_us")
    if f and x:
      steps[f"fused {mode}"]["xla_over_fused"] = x / f


def _print_group(rec):
  line = []
  for name, r in rec["steps"].items():
    if "median_us" in r:
      ratios = [f"{r['over_base']:.2f}x base"] if r.get("over_base") else []
      if r.get("roofline_over_base"):
        ratios.append(f"roofline {r['roofline_over_base']:.2f}x")
      line.append(f"{name} {r['median_us'] / 1e3:.3f} ms"
                  + (f" ({', '.join(ratios)})" if ratios else ""))
    else:
      line.append(f"{name} {r['status']}")
  print(f"  {rec['id']}: " + "; ".join(line), flush=True)


def models_section(run):
  """Per (model, T, dtype): every step compiled, then timed interleaved."""
  try:
    model_step = _import_roofline().model_step
  except Exception as e:  # pylint: disable=broad-except
    run.skip("*", f"bench/roofline.py model_step not importable: {_short(e)}")
    print(f"  skipped: bench/roofline.py not importable ({_short(e)})")
    return
  dry = run.args.dry_run
  repeats = 3 if dry else run.args.repeats
  min_sample = 0.001 if dry else 0.05
  for model, t_roof, tag, modes in _model_groups(run.args):
    rows = _DRY_T.get((model, t_roof), 8) if dry else t_roof
    group = f"{model} T={t_roof} {tag}" + (f" [dry: T={rows}]" if dry else "")
    if run.args.only and not any(o in group for o in run.args.only):
      continue
    rec = {"id": group, "model": model, "T": t_roof, "T_run": rows,
           "dtype": tag, "steps": {}}
    programs, outputs, step_args = {}, {}, {}
    t_group = time.perf_counter()
    for layers_kind, mode in modes:
      name = f"{layers_kind} {mode}"
      kind = f"models {model} {layers_kind} {mode}"
      if not run.fits(kind, f"{group}: {name}"):
        rec["steps"][name] = {"status": "skipped", "reason": "budget"}
        continue
      t0 = time.perf_counter()
      done = _compile_and_run(
          run, rec["steps"], name, f"models {group}",
          lambda: _step_program(model_step, model, layers_kind, mode, tag,
                                rows, dry, step_args))
      if done is not None:
        outputs[name], programs[name] = done
      run.cost(kind, time.perf_counter() - t0)
    for mode in MODES:
      f, x = outputs.get(f"fused {mode}"), outputs.get(f"xla {mode}")
      if f is not None and x is not None:
        rec["steps"][f"fused {mode}"]["rel_diff_vs_xla"] = _rel_diff(f, x)
    del outputs
    if programs:
      timed = measure(programs, repeats, min_sample,
                      min(run.deadline, run.section_deadline))
      for name, tm in timed.items():
        rec["steps"][name].update(tm)
    _step_ratios(rec, model, t_roof, tag)
    floor = run.doc["meta"].get("dispatch_floor_us", 0.0)
    for r in rec["steps"].values():
      if "median_us" in r:
        r["dispatch_bound"] = r["median_us"] < 2 * floor
    rec["seconds"] = round(time.perf_counter() - t_group, 1)
    run.record(rec)
    _print_group(rec)


# ---------------------------------------------------------------------------
# Summary tables.
# ---------------------------------------------------------------------------


def markdown(doc) -> str:
  """The measured tables beside the estimates, in Markdown."""
  m = doc["meta"]
  out = [f"# bench/gpu_kernels.py on {m.get('device')} (jax {m.get('jax')}, "
         f"{m.get('backend')}{', DRY RUN: times mean nothing' if m.get('dry_run') else ''})",
         ""]
  if m.get("aborted"):
    out += [f"**ABORTED**: {m['aborted']}", ""]
  corr = doc["sections"].get("correctness", {}).get("cases", [])
  if corr:
    counts = {}
    for c in corr:
      k = (c["backend"], c["status"])
      counts[k] = counts.get(k, 0) + 1
    out.append("Correctness: " + ", ".join(
        f"{b} {s} {n}" for (b, s), n in sorted(counts.items())))
    bad = [c for c in corr if c["status"] in ("FAIL", "error")]
    for c in bad:
      out.append(f"- {c['id']} [{c['backend']}]: {c['status']} "
                 f"{c.get('err', '') if c['status'] == 'FAIL' else c.get('error', '')}")
    out.append("")
  lay = doc["sections"].get("layers", {}).get("cases", [])
  if lay:
    out += [f"Dispatch floor {m.get('dispatch_floor_us', 0):.1f} µs per call "
            "(times under twice it are marked: the host set them).", "",
            "| layer | impl | measured µs (min–max) | roofline µs | "
            "measured / roofline | XLA / this | TFLOP/s | GB/s | compile s |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for c in lay:
      est = c.get("roofline_us") or {}
      for name, r in c["impls"].items():
        if "median_us" not in r:
          out.append(f"| {c['id']} | {name} | {r.get('status')} "
                     "| | | | | | |")
          continue
        roof = est.get("xla" if name == "xla" else "fused")
        mor = r.get("measured_over_roofline")
        xot = r.get("xla_over_this")
        out.append(
            f"| {c['id']} | {name} | {_fmt_us(r['median_us'])}"
            f"{' (dispatch)' if r.get('dispatch_bound') else ''} "
            f"({_fmt_us(r['min_us'])}–{_fmt_us(r['max_us'])}) | "
            f"{_fmt_us(roof)} | {f'{mor:.2f}' if mor else '-'} | "
            f"{f'{xot:.2f}' if xot else '-'} | {r['tflops']:.1f} | "
            f"{r['gbps']:.0f} | {r.get('compile_s', '-')} |")
    out.append("")
  mod = doc["sections"].get("models", {}).get("cases", [])
  if mod:
    out += ["| model | T | dtype | step | measured ms (min–max) | "
            "measured / base | roofline / base | measured / roofline | "
            "XLA / fused | compile s |",
            "|---|---:|---|---|---:|---:|---:|---:|---:|---:|"]
    for c in mod:
      for name, r in c["steps"].items():
        t = c["T"] if not m.get("dry_run") else f"{c['T']} (ran {c['T_run']})"
        if "median_us" not in r:
          out.append(f"| {c['model']} | {t} | {c['dtype']} | {name} | "
                     f"{r.get('status')} | | | | | |")
          continue
        f2 = lambda v: f"{v:.2f}" if v else "-"  # noqa: E731
        out.append(
            f"| {c['model']} | {t} | {c['dtype']} | {name} | "
            f"{r['median_us'] / 1e3:.3f} ({r['min_us'] / 1e3:.3f}–"
            f"{r['max_us'] / 1e3:.3f}) | {f2(r.get('over_base'))} | "
            f"{f2(r.get('roofline_over_base'))} | "
            f"{f2(r.get('measured_over_roofline'))} | "
            f"{f2(r.get('xla_over_fused'))} | {r.get('compile_s', '-')} |")
    out.append("")
  if doc["skipped"]:
    out.append(f"Skipped ({len(doc['skipped'])}):")
    out += [f"- {s['section']}: {s['id']}: {s['reason']}"
            for s in doc["skipped"]]
  return "\n".join(out) + "\n"


# ---------------------------------------------------------------------------


SECTIONS = ("correctness", "layers", "models")


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--budget", type=float, default=330.0,
                 help="seconds from the start after which no case starts")
  p.add_argument("--shares", default="0.3,0.25,0.45",
                 help="shares of the time left for correctness,layers,models")
  p.add_argument("--sections", default=",".join(SECTIONS))
  p.add_argument("--only", default=None,
                 help="comma-separated substrings of the case ids to run")
  p.add_argument("--json", default=None, help="write the results here")
  p.add_argument("--markdown", default=None, help="write the tables here")
  p.add_argument("--roofline-json", default="",
                 help="comma-separated bench/roofline.py --json files whose "
                 "model-step estimates replace or extend the built-in ones")
  p.add_argument("--repeats", type=int, default=9)
  p.add_argument("--model-dtypes", default="f32,bf16")
  p.add_argument("--modes", default=",".join(MODES))
  p.add_argument("--hard-limit", type=float, default=None,
                 help="seconds from the start at which a run still going "
                 "is aborted (JSON marked, tables printed, exit 3); set it "
                 "a little below an outer timeout")
  p.add_argument("--dry-run", "--interpret", action="store_true",
                 dest="dry_run", help="CPU, Pallas' interpreter, tiny sizes")
  p.add_argument("--inject-failure", action="store_true",
                 help="give the first correctness case a wrong reference")
  p.add_argument("--verbose", action="store_true")
  args = p.parse_args(argv)
  args.shares = [float(s) for s in args.shares.split(",")]
  args.sections = [s for s in args.sections.split(",") if s]
  args.only = args.only.split(",") if args.only else None
  args.model_dtypes = [s for s in args.model_dtypes.split(",") if s]
  args.modes = [s for s in args.modes.split(",") if s]
  unknown = set(args.sections) - set(SECTIONS)
  if unknown:
    p.error(f"unknown sections {sorted(unknown)}")
  return args


def main(argv=None) -> int:
  args = parse_args(argv)
  warnings.simplefilter("once", DeprecationWarning)
  backend = jax.default_backend()
  if backend != "gpu" and not args.dry_run:
    print(f"bench/gpu_kernels.py needs a GPU; JAX's default backend is "
          f"{backend!r}. Nothing measured (--dry-run runs the plumbing).")
    return 0
  for path in [p for p in args.roofline_json.split(",") if p]:
    load_roofline_json([path])
  kernels = _import_kernels()
  run = Run(args, kernels)
  if args.hard_limit:
    run.arm_watchdog(args.hard_limit)
  run.doc["meta"] = _meta(run, kernels)
  m = run.doc["meta"]
  print(f"jax {m['jax']}, backend {m['backend']}, device {m['device']} "
        f"(cc {m['compute_capability']}); budget {args.budget:.0f} s; "
        f"dispatch floor {m['dispatch_floor_us']:.1f} µs/call")
  for b, s in m["backends"].items():
    print(f"  backend {b}: {'available' if s['available'] else 'skipped'}"
          f"{' (' + s['reason'] + ')' if s['reason'] else ''}")
  run.save()
  chosen = [s for s in SECTIONS if s in args.sections]
  shares = dict(zip(SECTIONS, args.shares))
  fns = {"correctness": lambda: correctness(run, kernels),
         "layers": lambda: layers(run, kernels),
         "models": lambda: models_section(run)}
  for i, name in enumerate(chosen):
    if run.deadline - time.perf_counter() <= 0:
      run.skip_section(name, "budget spent before the section started")
      continue
    run.start_section(name, [shares[s] for s in chosen[i:]])
    try:
      fns[name]()
      run.end_section()
    except Exception as e:  # pylint: disable=broad-except
      traceback.print_exc()
      run.fail(f"{name}: {_short(e)}")
      run.section["error"] = _short(e)
      run.end_section("error")
  for name in SECTIONS:
    if name not in chosen:
      run.doc["sections"][name] = {"status": "not selected", "cases": []}
  m["finished"] = True
  m["in_progress"] = None
  run.save()
  table = markdown(run.doc)
  print("\n" + table)
  if args.markdown:
    with open(args.markdown, "w", encoding="utf-8") as f:
      f.write(table)
  print(f"{run.now():.0f} s of {args.budget:.0f} s; {len(run.doc['skipped'])} "
        f"case(s) skipped; {len(run.doc['failures'])} failure(s)")
  if run.doc["failures"]:
    print("FAILED: " + "; ".join(run.doc["failures"]))
    return 1
  print("all checks passed")
  return 0


def now() -> float:
  return time.perf_counter() - _T0


if __name__ == "__main__":
  sys.exit(main())
