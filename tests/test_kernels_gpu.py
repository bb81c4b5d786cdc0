"""The fused kernels compiled on a GPU against their references.

Triton for every kernel; Mosaic GPU (``gpu_backend="mosaic_gpu"``,
kernels/mosaic_gpu.py) for the kernels that have it, skipped with the
reason where Pallas has no Mosaic GPU or the GPU is older than sm_90.
Skipped (reported) where JAX sees no GPU; the same checks run in interpret
mode on the CPU in test_dense_jet.py, test_activation_jet.py and
test_layer_norm_jet.py and test_attention_jet.py, and tests/accel compiles
the kernels for an H100 from a CPU host (no device, nothing run).
bench/gpu_kernels.py (bash bench/device_check.sh) checks them at the
compile tier's sizes too and times them.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cdat_fast.kernels import (activation_jet, activation_jet_reference,
                               attention_jet, attention_jet_reference,
                               dense_jet, dense_jet_reference, layer_norm_jet,
                               layer_norm_jet_reference)

pytestmark = pytest.mark.gpu

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


def _backend(name):
  """``name`` as a parameter, Mosaic GPU skipped where it cannot run."""
  if name == "triton":
    return name

  def marks():
    why = _mosaic_gpu_missing() if any(
        d.platform == "gpu" for d in _devices()) else "no GPU"
    return [pytest.mark.skipif(why is not None, reason=f"mosaic_gpu: {why}")]
  return pytest.param(name, marks=marks(), id=name)


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


def test_layer_norm_jet_compiled():
  args = _normal(2, [(300, 129), (129,), (129,), (300, 129), (129,), (129,),
                     (300, 129)])
  out = jax.jit(lambda *a: layer_norm_jet(*a, interpret=False))(*args)
  _close(out, layer_norm_jet_reference(*args), 1e-3)


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


def test_attention_jet_compiled_bf16():
  args = _normal(4, [(2, 2, 200, 128)] * 9, jnp.bfloat16)
  out = jax.jit(lambda *a: attention_jet(*a, causal=True))(*args)
  ref = jax.jit(lambda *a: attention_jet_reference(
      *(x.astype(jnp.float32) for x in a), causal=True))(*args)
  _close(out, ref, 1e-1)


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
