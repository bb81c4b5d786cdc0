"""What the compile-for-accelerators tier compiles, and how (tests/accel).

Each case is a function and the shapes of its arguments. :func:`compile_for`
lowers it for one device of an accelerator topology described on this host
(no device present), compiles it with the accelerator's compiler and reads
the result: the number of Pallas kernels compiled as kernels (custom calls
``__gpu$xla.gpu.triton`` on GPU, ``tpu_custom_call`` on TPU, counted by
``cdat_fast.hlo.kernel_calls``; a kernel left to Pallas' interpreter would
be plain HLO and count nothing), the compiled memory and the compile time.

Sizes: the kernels at realistic sizes (rows up to 8192, widths 256-4096,
head dimensions 64 and 128, sequences up to 2048 and one of 8192, float32
and bfloat16, causal and not); a CDAT step (value, gradient, the exact curvature by
jvp-of-jvp, the update) of each fused model of ``cdat_fast.harness.models``
at the paper's widths, with NanoLM at its full depth and the vision models
cut to 4 blocks to keep the tier's compile time in budget.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

from cdat_fast import compile_targets, hlo

DTYPES = {"f32": jnp.float32, "bf16": jnp.bfloat16}


@dataclasses.dataclass
class Compiled:
  """What one compile gave."""
  kernels: int  # kernel custom calls in the compiled program
  temp_bytes: int  # temporaries (memory_analysis)
  total_bytes: int  # arguments + outputs + temporaries - aliased
  seconds: float  # lowering and compiling


def compile_for(device, fn: Callable[..., Any], args,
                compiler_options: dict[str, Any] | None = None) -> Compiled:
  """Compiles ``fn`` for ``device`` with arguments shaped like ``args``.

  Args:
    device: a device of a ``jax.experimental.topologies`` topology.
    fn: the function to compile.
    args: pytrees of arrays or ``jax.ShapeDtypeStruct`` (only shapes and
      dtypes matter); placed on ``device``.
    compiler_options: XLA options for this compile.
  """
  compiled, seconds = compile_targets.compile_for(device, fn, args,
                                                  compiler_options or {})
  calls = hlo.kernel_calls(compiled.as_text())
  kernels = calls["tpu"] if device.platform == "tpu" else calls["triton"]
  memory = compiled.memory_analysis()
  total = (memory.argument_size_in_bytes + memory.output_size_in_bytes +
           memory.temp_size_in_bytes - memory.alias_size_in_bytes)
  return Compiled(kernels, memory.temp_size_in_bytes, total, seconds)


def _spec(shape, dtype):
  return jax.ShapeDtypeStruct(tuple(shape), dtype)


# ---------------------------------------------------------------------------
# The kernels, each with all its inputs present (every product computed).

# (rows, in features, out features): a transformer's MLP in and out, a
# small layer, awkward rows with a 768 -> 3072 projection.
DENSE = [(8192, 1024, 4096), (8192, 4096, 1024), (2048, 256, 256),
         (1000, 768, 3072)]
# (activation, shape)
ACTIVATION = [("gelu", (8192, 4096)), ("relu", (4096, 1024)),
              ("tanh", (1000, 3072)), ("silu", (2048, 256))]
# (rows, features)
LAYER_NORM = [(8192, 4096), (8192, 256), (1000, 768)]
# (batch, heads, T, head dimension); each causal and not. T=8192: the TPU
# version streams keys through VMEM (whole key blocks stopped fitting its
# 16 MiB of scoped VMEM past T=2048 at head dimension 128 in float32).
ATTENTION = [(2, 8, 512, 64), (2, 8, 2048, 64), (2, 8, 512, 128),
             (1, 8, 2048, 128), (1, 4, 8192, 128)]


def kernel_cases():
  """``{id: (fn, args)}`` of every kernel case."""
  from cdat_fast import kernels  # pylint: disable=g-import-not-at-top
  cases = {}
  for dname, dtype in DTYPES.items():
    for m, k, n in DENSE:
      x, w, b = _spec((m, k), dtype), _spec((k, n), dtype), _spec((n,), dtype)
      cases[f"dense_jet-{m}x{k}x{n}-{dname}"] = (
          kernels.dense_jet, (x, w, b, x, w, b, x))
    for act, shape in ACTIVATION:
      x = _spec(shape, dtype)
      cases[f"activation_jet-{act}-{shape[0]}x{shape[1]}-{dname}"] = (
          lambda *a, act=act: kernels.activation_jet(*a, activation=act),
          (x, x, x))
    for rows, n in LAYER_NORM:
      x, v = _spec((rows, n), dtype), _spec((n,), dtype)
      cases[f"layer_norm_jet-{rows}x{n}-{dname}"] = (
          kernels.layer_norm_jet, (x, v, v, x, v, v, x))
    for b, h, t, d in ATTENTION:
      for causal in (False, True):
        x = _spec((b, h, t, d), dtype)
        mask = "causal" if causal else "full"
        cases[f"attention_jet-{b}x{h}x{t}x{d}-{mask}-{dname}"] = (
            lambda *a, causal=causal: kernels.attention_jet(*a,
                                                            causal=causal),
            (x,) * 9)
  return cases


# ---------------------------------------------------------------------------
# A CDAT step of each fused model.

# name -> (registry name, overrides, input shape, kernels). Every fused
# layer takes one kernel in the curvature's jet: Dense -> dense_jet,
# LayerNorm -> layer_norm_jet, an activation -> activation_jet, attention
# -> attention_jet (MultiHeadAttention: 4 dense_jet + 1 attention_jet);
# Embed and the residual adds take none. Attention's values and gradients
# take 3 more where flash attention applies (float32 here, so Pallas: a
# forward kernel and two backward kernels on an H100 and on a TPU; the
# sequence a multiple of 128).
MODELS = {
    # 3 hidden layers of 1024 on MNIST-sized inputs: 4 Dense + 3 relu.
    "mlp": ("mlp", dict(features=(1024, 1024, 1024)), (256, 28, 28, 1),
            lambda c: 2 * len(c["features"]) + 1),
    # The paper's NanoLM (6 blocks, width 256, 8 heads of 4) at T=1024:
    # per block 2 LayerNorm + attention (5, and 3 flash) + Dense, relu,
    # Dense; then ln_f and the head.
    "nanolm-paper-T1024": (
        "nanolm-paper", dict(block_size=1024), (8, 1024),
        lambda c: 13 * 6 + 2),
    # ViT Ti/16 widths (192, 3 heads of 64, MLP 768), 4 blocks, 224x224:
    # stem, per block 2 LayerNorm + attention (5) + Dense, gelu, Dense;
    # then encoder_norm and the head (197 tokens: XLA's attention).
    "vit-ti16-4blocks": (
        "vit-ti32", dict(patch_size=16, num_layers=4), (8, 224, 224, 3),
        lambda c: 10 * c["num_layers"] + 3),
    # Mixer Ti/8 widths (192, token MLP 96, channel MLP 768, 784 tokens),
    # 4 blocks: stem, per block 2 LayerNorm + 2 x (Dense, gelu, Dense);
    # then pre_head_norm and the head.
    "mixer-ti8-4blocks": (
        "mixer-ti8", dict(num_blocks=4), (8, 224, 224, 3),
        lambda c: 8 * c["num_blocks"] + 3),
}


def cdat_step_case(name: str):
  """``(step, args, expected kernels)`` for a CDAT step of ``MODELS[name]``.

  ``step(params, state, inputs, labels)`` is one step of
  ``cdat_fast.cdat(optax.sgd(1.0))`` on the mean softmax cross-entropy of
  ``models.get_model(..., fused=True)``, returning the new parameters and
  state; ``args`` are their shapes (float32 parameters).
  """
  import optax  # pylint: disable=g-import-not-at-top
  import cdat_fast  # pylint: disable=g-import-not-at-top
  from cdat_fast.harness import models  # pylint: disable=g-import-not-at-top
  registry_name, overrides, shape, count = MODELS[name]
  language = registry_name.startswith("nanolm")
  model = models.get_model(registry_name, 65 if language else 10, fused=True,
                           **overrides)
  if language:
    inputs, labels = _spec(shape, jnp.int32), _spec(shape, jnp.int32)
  else:
    inputs, labels = _spec(shape, jnp.float32), _spec(shape[:1], jnp.int32)
  params = jax.eval_shape(
      lambda x: models.init_params(model, jax.random.key(0), x), inputs)
  opt = cdat_fast.cdat(optax.sgd(1.0))
  state = jax.eval_shape(opt.init, params)

  def step(params, state, inputs, labels):
    def loss(p):
      logits = model.apply({"params": p}, inputs)
      return optax.softmax_cross_entropy_with_integer_labels(
          logits, labels).mean()
    value, grad = jax.value_and_grad(loss)(params)
    updates, state = opt.update(grad, state, params, value_fn=loss,
                                value=value)
    return optax.apply_updates(params, updates), state

  config = {f.name: getattr(model, f.name)
            for f in dataclasses.fields(model) if f.name not in
            ("parent", "name")}
  return step, (params, state, inputs, labels), count(config)


def step_pair(name: str, shape: tuple[int, ...], curvature: str = "exact"):
  """``(base_step, cdat_step, args)`` on the fused model ``MODELS[name]``.

  ``shape``: the inputs' (images ``(rows, H, W, C)``, tokens
  ``(sequences, T)``). ``base_step``: value, gradient and SGD;
  ``cdat_step``: the same through ``cdat_fast.cdat(optax.sgd(1.0))`` with
  ``curvature`` ``"exact"`` (one jet of every fused layer) or
  ``"sub16_gn"`` (Gauss-Newton on every 16th row). Both take
  ``(params, state, inputs, labels)``.
  """
  import optax  # pylint: disable=g-import-not-at-top
  import cdat_fast  # pylint: disable=g-import-not-at-top
  from cdat_fast import estimators  # pylint: disable=g-import-not-at-top
  from cdat_fast.harness import models  # pylint: disable=g-import-not-at-top
  registry_name, overrides, _, _ = MODELS[name]
  language = registry_name.startswith("nanolm")
  model = models.get_model(registry_name, 65 if language else 10, fused=True,
                           **overrides)
  if language:
    inputs = labels = _spec(shape, jnp.int32)
  else:
    inputs, labels = _spec(shape, jnp.float32), _spec(shape[:1], jnp.int32)
  params = jax.eval_shape(
      lambda x: models.init_params(model, jax.random.key(0), x), inputs)
  opt = cdat_fast.cdat(optax.sgd(1.0), curvature=(
      "exact" if curvature == "exact" else
      estimators.subbatch(1 / 16, inner=estimators.gauss_newton())))
  state = jax.eval_shape(opt.init, params)
  model_fn = lambda p, batch: model.apply({"params": p}, batch["x"])
  loss_fn = lambda z, batch: (
      optax.softmax_cross_entropy_with_integer_labels(z, batch["y"]).mean())
  value_fn = lambda p, batch: loss_fn(model_fn(p, batch), batch)
  functions = (dict(value_fn=value_fn) if curvature == "exact"
               else dict(model_fn=model_fn, loss_fn=loss_fn))

  def base_step(params, state, inputs, labels):
    grad = jax.grad(value_fn)(params, {"x": inputs, "y": labels})
    return jax.tree.map(lambda w, g: w - 0.1 * g, params, grad), state

  def cdat_step(params, state, inputs, labels):
    batch = {"x": inputs, "y": labels}
    value, grad = jax.value_and_grad(value_fn)(params, batch)
    updates, state = opt.update(grad, state, params, value=value,
                                batch=batch, **functions)
    return optax.apply_updates(params, updates), state

  return base_step, cdat_step, (params, state, inputs, labels)


# ---------------------------------------------------------------------------
# Flash attention in a stock model: cdat_fast.nn.dot_product_attention
# against the flash attention a production model runs (cuDNN and Pallas'
# mha on an H100, Pallas' flash attention on a TPU).

# One causal attention layer: batch, heads, head dimension, bfloat16.
ATTENTION_LAYER = (4, 8, 64)


def _production_attention(kind: str):
  """``attention(q, k, v)`` of ``(B, T, H, D)`` arrays, causal, by ``kind``:
  ``"ours"`` (``cdat_fast.nn.dot_product_attention``), ``"cudnn"``,
  ``"pallas_mha"`` (Pallas' GPU flash attention) or ``"pallas_tpu"``
  (Pallas' TPU flash attention, heads first)."""
  import functools  # pylint: disable=g-import-not-at-top
  from cdat_fast import nn as jet_nn  # pylint: disable=g-import-not-at-top
  if kind == "ours":
    return functools.partial(jet_nn.dot_product_attention, is_causal=True)
  if kind == "cudnn":
    return functools.partial(jax.nn.dot_product_attention, is_causal=True,
                             implementation="cudnn")
  if kind == "pallas_mha":
    from jax.experimental.pallas.ops.gpu import attention  # pylint: disable=g-import-not-at-top
    return lambda q, k, v: attention.mha(
        q, k, v, None, sm_scale=q.shape[-1] ** -0.5, causal=True)
  from jax.experimental.pallas.ops.tpu import flash_attention  # pylint: disable=g-import-not-at-top
  swap = lambda a: jnp.swapaxes(a, 1, 2)
  return lambda q, k, v: swap(flash_attention.flash_attention(
      swap(q), swap(k), swap(v), causal=True, sm_scale=q.shape[-1] ** -0.5))


def attention_layer_steps(kind: str, t: int):
  """``(base_step, cdat_step, args)`` of one attention layer whose inputs
  ``(q, k, v)`` are the parameters: ``base_step`` is the value and
  gradient of ``Σ o²``, ``cdat_step`` also the exact curvature along
  ``u = -g`` and the step (``cdat_step`` only for ``kind="ours"``)."""
  from cdat_fast.curvature import directional_derivatives  # pylint: disable=g-import-not-at-top
  attention = _production_attention(kind)
  b, h, d = ATTENTION_LAYER
  loss = lambda w: jnp.sum(attention(*w).astype(jnp.float32) ** 2)

  def base_step(q, k, v):
    return jax.value_and_grad(loss)((q, k, v))

  def cdat_step(q, k, v):
    _, grad = jax.value_and_grad(loss)((q, k, v))
    u = jax.tree.map(jnp.negative, grad)
    _, slope, curvature = directional_derivatives(loss, (q, k, v), u)
    eta = 2 * jnp.maximum(-slope, 0) / jnp.abs(curvature)
    return jax.tree.map(lambda w, d: w + eta.astype(w.dtype) * d, (q, k, v),
                        u)

  spec = _spec((b, t, h, d), jnp.bfloat16)
  return base_step, cdat_step, (spec, spec, spec)


def _stock_block(attention_fn, vocab: int, width: int, heads: int):
  """A stock ``flax.linen`` LM block: token embedding, a pre-norm causal
  ``MultiHeadDotProductAttention`` taking ``attention_fn``, a gelu MLP and
  a head, computing in bfloat16."""
  import flax.linen as fnn  # pylint: disable=g-import-not-at-top
  bf16 = jnp.bfloat16

  class Block(fnn.Module):
    @fnn.compact
    def __call__(self, tokens):
      x = fnn.Embed(vocab, width, dtype=bf16)(tokens)
      if attention_fn is not None:
        x = x + fnn.MultiHeadDotProductAttention(
            num_heads=heads, dtype=bf16, attention_fn=attention_fn)(
                fnn.LayerNorm(dtype=bf16)(x))
      y = fnn.gelu(fnn.Dense(4 * width, dtype=bf16)(
          fnn.LayerNorm(dtype=bf16)(x)))
      x = x + fnn.Dense(width, dtype=bf16)(y)
      return fnn.Dense(vocab, dtype=bf16)(fnn.LayerNorm(dtype=bf16)(x))

  return Block()


def stock_block_steps(attention: str | None, t: int, curvature: str = "exact"):
  """``(base_step, cdat_step, args)`` of :func:`_stock_block` at the sizes
  of ``ATTENTION_LAYER`` (vocabulary 64), with attention ``attention``
  (a kind of :func:`_production_attention`, None for no attention layer).

  ``cdat_step`` runs ``cdat_fast.cdat(optax.adam(1.0), ema=0.9)`` with
  ``curvature`` ``"exact"`` or ``"sub_fd"`` (forward-only curvature,
  :func:`cdat_fast.estimators.finite_difference`, on one sequence of the
  batch). The base step is Adam's with the same attention.
  """
  import optax  # pylint: disable=g-import-not-at-top
  import cdat_fast  # pylint: disable=g-import-not-at-top
  from cdat_fast import estimators  # pylint: disable=g-import-not-at-top
  b, h, d = ATTENTION_LAYER
  model = _stock_block(None if attention is None else
                       _production_attention(attention), 64, h * d, h)
  tokens = _spec((b, t), jnp.int32)
  params = jax.eval_shape(model.init, jax.random.key(0), tokens)

  def value_fn(p, tokens):
    logits = model.apply(p, tokens).astype(jnp.float32)
    return optax.softmax_cross_entropy_with_integer_labels(
        logits[:, :-1], tokens[:, 1:]).mean()

  opt = cdat_fast.cdat(optax.adam(1.0), ema=0.9, curvature=(
      "exact" if curvature == "exact" else
      estimators.subbatch(1 / b, inner=estimators.finite_difference())))
  base = optax.adam(1e-3)
  state = jax.eval_shape(opt.init, params)
  base_state = jax.eval_shape(base.init, params)

  def base_step(params, state, tokens):
    grad = jax.grad(value_fn)(params, tokens)
    updates, state = base.update(grad, state, params)
    return optax.apply_updates(params, updates), state

  def cdat_step(params, state, tokens):
    value, grad = jax.value_and_grad(value_fn)(params, tokens)
    updates, state = opt.update(grad, state, params, value=value,
                                value_fn=value_fn, tokens=tokens)
    return optax.apply_updates(params, updates), state

  return (base_step, (params, base_state, tokens),
          cdat_step, (params, state, tokens))
