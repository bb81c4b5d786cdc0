"""The fused kernels compiled on a GPU against their references.

Triton for every kernel; Mosaic GPU (``gpu_backend="mosaic_gpu"``,
kernels/mosaic_gpu.py) for the kernels that have it, skipped with the
reason where Pallas has no Mosaic GPU or the GPU is older than sm_90.
Every test marked ``gpu`` is skipped (reported) where JAX sees no GPU.

Two kinds of check. Small awkward shapes, compiled HLO and fused models
(``test_*_compiled``). The kernels at the compile tier's sizes
(``tests/accel/compile_cases.py``: rows up to 8192, widths 256-4096, head
dimensions 64 and 128, T up to 8192, causal and not) and a few that divide
no tile, in float32 and bfloat16 (``test_*_at_size``): per output
``max|fused - ref| / max|ref|`` in float32, the worst of y, dy, ddy within
the dtype's tolerance, every value finite, the backend's kernel in the
compiled program. The ``*_at_size`` bodies also run in the default suite,
unmarked, at one small size in Pallas' interpreter on the CPU, so that the
checks themselves are exercised. More interpret-mode checks are in
test_dense_jet.py, test_activation_jet.py, test_layer_norm_jet.py and
test_attention_jet.py; tests/accel compiles the kernels for an H100 from a
CPU host (no device, nothing run). ``bash bench/device_check.sh`` runs the
``gpu`` tests here on a lent GPU, then bench/gpu_kernels.py's timings.
"""
import functools
import importlib.util
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cdat_fast.kernels import (activation_jet, activation_jet_reference,
                               attention_jet, attention_jet_reference,
                               dense_jet, dense_jet_reference, layer_norm_jet,
                               layer_norm_jet_reference)

gpu = pytest.mark.gpu

# Custom-call targets of each GPU backend's kernels in compiled HLO.
CALLS = {"triton": 'custom_call_target="__gpu$xla.gpu.triton"',
         "mosaic_gpu": 'custom_call_target="mosaic_gpu'}


def _mosaic_gpu_missing():
  """Why Mosaic GPU cannot run here, or None."""
  try:
    from cdat_fast.kernels import mosaic_gpu  # pylint: disable=g-import-not-at-top
  except Exception as e:  # pylint: disable=broad-except
    return f"kernels.mosaic_gpu: {type(e).__name__}: {e}"
  if mosaic_gpu.plgpu is None:
    return "jax.experimental.pallas.mosaic_gpu is not importable"
  try:
    device = jax.devices()[0]
  except RuntimeError:
    return "no device"
  cc = getattr(device, "compute_capability", None)
  try:
    major = int(str(cc).split(".")[0])
  except ValueError:
    return f"no CUDA compute capability ({device.platform})"
  if major < 9:
    return f"compute capability {cc} < 9.0 (WGMMA)"
  return None


def _backend_marks(name):
  """Marks of a test of backend ``name``: Mosaic GPU skipped where it cannot
  run."""
  if name != "mosaic_gpu":
    return []
  why = _mosaic_gpu_missing() if any(
      d.platform == "gpu" for d in _devices()) else "no GPU"
  return [pytest.mark.skipif(why is not None, reason=f"mosaic_gpu: {why}")]


def _backend(name):
  """``name`` as a parameter, Mosaic GPU skipped where it cannot run."""
  return pytest.param(name, marks=_backend_marks(name), id=name)


def _devices():
  try:
    return jax.devices()
  except RuntimeError:
    return []


BACKENDS = [_backend("triton"), _backend("mosaic_gpu")]


def _compiled(fn, *args):
  """(outputs, compiled HLO text) of ``jax.jit(fn)``."""
  compiled = jax.jit(fn).lower(*args).compile()
  return compiled(*args), compiled.as_text()


def _normal(seed, shapes, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  return [jnp.asarray(rng.standard_normal(s), jnp.float32).astype(dtype)
          for s in shapes]


def _close(actual, expected, tol):
  for a, e in zip(actual, expected):
    assert a.shape == e.shape
    np.testing.assert_allclose(np.asarray(a, np.float32),
                               np.asarray(e, np.float32), rtol=tol, atol=tol)


@gpu
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rows, k, n", [(74, 19, 53), (1024, 512, 384)])
@pytest.mark.parametrize("dtype, tol", [(jnp.float32, 2e-2), (jnp.bfloat16,
                                                               1e-1)])
def test_dense_jet_compiled(rows, k, n, dtype, tol, backend):
  # f32 tolerance allows TF32 matmuls on the GPU (Mosaic GPU: always TF32).
  args = _normal(rows + k, [(rows, k), (k, n), (n,), (rows, k), (k, n), (n,),
                            (rows, k)], dtype)
  out, text = _compiled(lambda *a: dense_jet(*a, interpret=False,
                                             gpu_backend=backend), *args)
  assert text.count(CALLS[backend]) == 1
  _close(out, jax.jit(dense_jet_reference)(*args), tol * np.sqrt(k))


@gpu
@pytest.mark.parametrize("backend", BACKENDS)
def test_dense_jet_compiled_absent_tangents(backend):
  # No biases; then the first layer (dx = ddx = None).
  x, w, dx, dw, ddx = _normal(6, [(200, 96), (96, 80), (200, 96), (96, 80),
                                  (200, 96)])
  for args in ((x, w, None, dx, dw, None, ddx), (x, w, None, None, dw, None,
                                                 None)):
    out, _ = _compiled(lambda *a: dense_jet(*a, interpret=False,
                                            gpu_backend=backend), *args)
    _close(out, jax.jit(dense_jet_reference)(*args), 2e-2 * np.sqrt(96))


@gpu
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("activation", ["relu", "gelu", "tanh", "silu"])
def test_activation_jet_compiled(activation, backend):
  x, dx, ddx = _normal(1, [(300, 129)] * 3)
  out, text = _compiled(lambda *a: activation_jet(
      *a, activation=activation, interpret=False, gpu_backend=backend),
                        x, dx, ddx)
  assert text.count(CALLS[backend]) == 1
  _close(out, activation_jet_reference(x, dx, ddx, activation=activation),
         1e-4)


@gpu
def test_layer_norm_jet_compiled():
  args = _normal(2, [(300, 129), (129,), (129,), (300, 129), (129,), (129,),
                     (300, 129)])
  out = jax.jit(lambda *a: layer_norm_jet(*a, interpret=False))(*args)
  _close(out, layer_norm_jet_reference(*args), 1e-3)


@gpu
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("t, d", [(37, 5), (300, 64), (300, 128)])
def test_attention_jet_compiled(causal, t, d):
  # Short rows and 5 features: padded to Triton's minimum 16-wide tiles.
  # 64 and 128 features in float32: tiles shrunk to fit shared memory.
  args = _normal(3 + t, [(2, 3, t, d)] * 9)
  out = jax.jit(lambda *a: attention_jet(*a, causal=causal,
                                         interpret=False))(*args)
  ref = jax.jit(lambda *a: attention_jet_reference(*a, causal=causal))(*args)
  _close(out, ref, 2e-2)  # TF32 matmuls.


@gpu
def test_attention_jet_compiled_bf16():
  args = _normal(4, [(2, 2, 200, 128)] * 9, jnp.bfloat16)
  out = jax.jit(lambda *a: attention_jet(*a, causal=True))(*args)
  ref = jax.jit(lambda *a: attention_jet_reference(
      *(x.astype(jnp.float32) for x in a), causal=True))(*args)
  _close(out, ref, 1e-1)


@gpu
def test_default_lowering_is_the_triton_kernel(monkeypatch):
  # interpret=None on a GPU: one Triton kernel per call, no interpreter.
  monkeypatch.delenv("CDAT_FAST_GPU_BACKEND", raising=False)
  x, w = _normal(5, [(256, 128), (128, 64)])
  fn = jax.jit(lambda x, w: dense_jet(x, w, None, x, w, None, x))
  text = fn.lower(x, w).compile().as_text()
  assert text.count('custom_call_target="__gpu$xla.gpu.triton"') == 1
  _close(fn(x, w), dense_jet_reference(x, w, None, x, w, None, x), 2e-2)


_GPU_MODELS = {
    "nanolm": (dict(vocab_size=65, num_layers=2, num_heads=4, head_size=64,
                    embed_size=64, block_size=64),
               lambda rng: jnp.asarray(rng.integers(0, 65, (4, 40)))),
    "vit": (dict(num_outputs=10, patch_size=4, hidden_dim=64, num_layers=2,
                 num_heads=4, mlp_dim=128),
            lambda rng: jnp.asarray(rng.standard_normal((4, 32, 32, 3)),
                                    jnp.float32)),
    "mixer": (dict(num_outputs=10, patch_size=4, hidden_dim=64, num_blocks=2,
                   tokens_mlp_dim=32, channels_mlp_dim=128),
              lambda rng: jnp.asarray(rng.standard_normal((4, 32, 32, 3)),
                                      jnp.float32)),
}


@gpu
@pytest.mark.parametrize("name", sorted(_GPU_MODELS))
def test_fused_model_cdat_quadratic_form_compiled(name):
  """models.*(fused=True) on the GPU: uᵀHu as flax's layers give it."""
  from cdat_fast.harness import models  # pylint: disable=g-import-not-at-top
  kwargs, make_input = _GPU_MODELS[name]
  x = make_input(np.random.default_rng(0))
  cls = models.get_model(name, 10).__class__
  plain, fused = cls(**kwargs), cls(fused=True, **kwargs)
  params = models.init_params(plain, jax.random.key(0), x)
  u = jax.tree.map(lambda p: 0.1 * jnp.ones_like(p), params)

  def quad(model):
    f = lambda p: jnp.mean(jnp.sin(model.apply({"params": p}, x)))
    return jax.jit(lambda p, u: jax.jvp(
        lambda q: jax.jvp(f, (q,), (u,))[1], (p,), (u,)))

  # TF32 matmuls on both sides (the f32 tolerance of the kernel tests).
  _close(quad(fused)(params, u), quad(plain)(params, u), 2e-2)


# ---------------------------------------------------------------------------
# The kernels at the compile tier's sizes (on the CPU: one small size each,
# in Pallas' interpreter).


def _tier():
  """tests/accel/compile_cases.py, whose kernel sizes the tier compiles."""
  if "compile_cases" in sys.modules:  # the tier's tests imported it
    return sys.modules["compile_cases"]
  path = pathlib.Path(__file__).resolve().parent / "accel" / "compile_cases.py"
  spec = importlib.util.spec_from_file_location("compile_cases", path)
  module = importlib.util.module_from_spec(spec)
  sys.modules["compile_cases"] = module
  spec.loader.exec_module(module)
  return module


TIER = _tier()
DTYPES = {"f32": jnp.float32, "bf16": jnp.bfloat16}
HIGHEST = jax.lax.Precision.HIGHEST


def _id(size):
  if isinstance(size[0], str):  # (activation, shape)
    return f"{size[0]}-{_id(size[1])}"
  return "x".join(map(str, size))


def _sized(gpu_sizes, tags, cpu_size, cpu_tag, backends=("triton",)):
  """Parameters (size, backend, dtype tag): each GPU size with each backend
  and tag, marked ``gpu``; ``cpu_size`` in Pallas' interpreter (backend
  "interpret") with one tag, to keep the default suite short."""
  params = [pytest.param(size, b, tag, marks=[gpu, *_backend_marks(b)],
                         id=f"{b}-{_id(size)}-{tag}")
            for size in gpu_sizes for b in backends for tag in tags]
  return params + [pytest.param(cpu_size, "interpret", cpu_tag,
                                id=f"interpret-{_id(cpu_size)}-{cpu_tag}")]


def _kernel(fn, backend, **kw):
  """``fn`` for ``backend``: "interpret" (Pallas' interpreter, any device)
  or a GPU backend (``gpu_backend=`` of the kernels that have several)."""
  if backend == "interpret":
    return functools.partial(fn, interpret=True, **kw)
  if fn in (dense_jet, activation_jet):
    kw["gpu_backend"] = backend
  return functools.partial(fn, interpret=False, **kw)


def _random(seed, shapes, dtype, scales=None):
  """Normal arrays made on the device (the tier's sizes are large)."""
  keys = jax.random.split(jax.random.key(seed), len(shapes))
  scales = scales or [1.0] * len(shapes)
  return [(s * jax.random.normal(key, shape, jnp.float32)).astype(dtype)
          for key, shape, s in zip(keys, shapes, scales)]


def _check_at_size(fn, reference, args, tol, backend):
  """``fn(*args)`` compiled against ``reference`` on the same values in f32.

  Per output ``max|fused - ref| / max|ref|``; the worst of y, dy, ddy must be
  within ``tol`` and every value finite; compiled for a GPU, the program
  must hold the backend's kernel (not XLA's fallback or the interpreter).
  """
  out, text = _compiled(fn, *args)
  if backend != "interpret":
    assert text.count(CALLS[backend]) >= 1, f"no {backend} kernel compiled"
  f32 = [None if a is None else a.astype(jnp.float32) for a in args]
  expected = jax.jit(reference)(*f32)
  assert len(out) == len(expected) == 3
  errors = []
  for name, a, e in zip(("y", "dy", "ddy"), out, expected):
    assert a.shape == e.shape, (name, a.shape, e.shape)
    a, e = a.astype(jnp.float32), e.astype(jnp.float32)
    bad = int(jnp.sum(~jnp.isfinite(a)))
    assert not bad, f"{name}: {bad} non-finite values"
    scale = max(float(jnp.max(jnp.abs(e))), 1e-30)
    errors.append(float(jnp.max(jnp.abs(a - e))) / scale)
  assert max(errors) <= tol, f"relative errors (y, dy, ddy) {errors} > {tol}"


# Tolerances of max|fused - ref| / max|ref| by kernel and dtype. Dense f32:
# TF32 matmuls on the GPU (Mosaic GPU: always TF32); "f32-highest":
# precision=HIGHEST, which only the Triton version takes.
DENSE_TOL = {"f32": 2e-2, "bf16": 3e-2, "f32-highest": 1e-4}
ACTIVATION_TOL = {"f32": 1e-4, "bf16": 3e-2}
LAYER_NORM_TOL = {"f32": 1e-3, "bf16": 5e-2}
ATTENTION_TOL = {"f32": 2e-2, "bf16": 5e-2}


@pytest.mark.parametrize("size, backend, tag", _sized(
    TIER.DENSE + [(300, 1000, 700)], sorted(DENSE_TOL), (74, 19, 53),
    "f32-highest", ("triton", "mosaic_gpu")))
def test_dense_jet_at_size(size, backend, tag):
  if tag == "f32-highest" and backend == "mosaic_gpu":
    pytest.skip("mosaic_gpu: TF32 only, no precision=HIGHEST")
  m, k, n = size
  args = _random(m + k + n, [(m, k), (k, n), (n,), (m, k), (k, n), (n,),
                             (m, k)], DTYPES[tag.split("-")[0]],
                 [1.0, k**-0.5, 1.0, 1.0, k**-0.5, 1.0, 1.0])
  precision = HIGHEST if tag == "f32-highest" else None
  _check_at_size(_kernel(dense_jet, backend, precision=precision),
                 functools.partial(dense_jet_reference, precision=HIGHEST),
                 args, DENSE_TOL[tag], backend)


@pytest.mark.parametrize("case, backend, tag", _sized(
    TIER.ACTIVATION + [(a, (111, 19)) for a in ("relu", "gelu", "tanh",
                                                 "silu")],
    sorted(ACTIVATION_TOL), ("gelu", (37, 19)), "f32",
    ("triton", "mosaic_gpu")))
def test_activation_jet_at_size(case, backend, tag):
  activation, shape = case
  args = _random(sum(shape), [shape] * 3, DTYPES[tag], [2.0, 1.0, 1.0])
  _check_at_size(_kernel(activation_jet, backend, activation=activation),
                 functools.partial(activation_jet_reference,
                                   activation=activation),
                 args, ACTIVATION_TOL[tag], backend)


@pytest.mark.parametrize("size, backend, tag", _sized(
    TIER.LAYER_NORM + [(74, 53), (74, 1000)], sorted(LAYER_NORM_TOL),
    (37, 53), "bf16"))
def test_layer_norm_jet_at_size(size, backend, tag):
  rows, d = size
  x, scale, bias, dx, dscale, dbias, ddx = _random(
      rows + d, [(rows, d), (d,), (d,), (rows, d), (d,), (d,), (rows, d)],
      jnp.float32, [2.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0])
  args = [a.astype(DTYPES[tag]) for a in (x, 1.0 + scale, bias, dx, dscale,
                                          dbias, ddx)]
  _check_at_size(_kernel(layer_norm_jet, backend), layer_norm_jet_reference,
                 args, LAYER_NORM_TOL[tag], backend)


@pytest.mark.parametrize("shape, backend, tag", _sized(
    TIER.ATTENTION + [(1, 3, 74, 40)], sorted(ATTENTION_TOL), (1, 2, 37, 16),
    "f32"))
@pytest.mark.parametrize("causal", [True, False])
def test_attention_jet_at_size(shape, backend, tag, causal):
  args = _random(sum(shape), [shape] * 9, DTYPES[tag])
  _check_at_size(_kernel(attention_jet, backend, causal=causal),
                 functools.partial(attention_jet_reference, causal=causal,
                                   precision=HIGHEST),
                 args, ATTENTION_TOL[tag], backend)
