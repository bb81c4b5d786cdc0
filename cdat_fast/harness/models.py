"""Flax linen models used in the experiments of Roulet et al. (2024).

Every model maps a batch of inputs to logits and has no mutable state (no
batch norm, no dropout), so that ``loss(params, batch)`` is a pure function of
the parameters: the curvature-aware tuners differentiate it twice along an
update direction (``∂²f(w)[u, u]``), and a deterministic objective is what the
paper's full-batch experiments assume (appendix C.2).

Defaults are CPU sized. The paper's shapes are selectable by name through
:func:`get_model`:

=================  ==========================================================
name               model
=================  ==========================================================
``mlp``            :class:`MLP`, hidden widths (256, 256), ReLU
``mlp-3x256``      :class:`MLP`, hidden widths (256, 256, 256) (Fig. 18)
``resnet``         small :class:`ResNet`, stages (1, 1, 1), width 16, no norm
``resnet-ln``      the same with layer norm
``resnet-small``   ``resnet`` at width 8 (docs/reproduction.md's CPU runs)
``resnet18``       ResNet-18 (basic blocks (2, 2, 2, 2), width 64), no norm
``resnet34``       ResNet-34 (basic blocks (3, 4, 6, 3)), no norm (paper)
``resnet50``       ResNet-50 (bottlenecks (3, 4, 6, 3)), no norm
``resnet18-ln``    ResNet-18 with layer norm
``resnet34-ln``    ResNet-34 with layer norm
``resnet50-ln``    ResNet-50 with layer norm (paper)
``mixer``          small :class:`MLPMixer` (patch 4, width 32, 2 blocks)
``mixer-ti8``      Mixer Ti/8 (Scenic: width 192, 12 blocks, MLPs 96 / 768)
``nanolm``         small :class:`NanoLM` (2 blocks, width 64, 4 heads)
``nanolm-small``   1 block, width 32, 2 heads (docs/reproduction.md's CPU runs)
``nanolm-paper``   the optax example's NanoLM (6 blocks, width 256, 8 heads)
``vit``            small :class:`ViT` (patch 4, width 32, 2 blocks)
``vit-ti32``       ViT Ti/32 (Scenic: width 192, 12 blocks, 3 heads, MLP 768)
=================  ==========================================================

Conventions: image models take float ``[B, H, W, C]`` inputs and return
``[B, num_outputs]``; :class:`NanoLM` takes integer tokens ``[B, T]`` and
returns ``[B, T, vocab_size]``. Initialisation is Flax's default (LeCun normal
kernels, zero biases); unlike Scenic, heads are not zero-initialised, so the
initial logits (and the initial squared-loss gradient) are not degenerate.

References:
  Roulet et al., `Stepping on the Edge: Curvature Aware Learning Rate Tuners
  <https://arxiv.org/abs/2407.06183>`_, NeurIPS 2024, appendix C.2.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

_ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "relu": nn.relu,
    "gelu": nn.gelu,
    "tanh": jnp.tanh,
    "silu": nn.silu,
    "swish": nn.swish,
    "elu": nn.elu,
    "sigmoid": nn.sigmoid,
    "identity": lambda x: x,
}

_FUSED_ACTIVATIONS = ("relu", "gelu", "tanh", "silu")  # cdat_fast.nn's
_NORMS = ("none", "layer")
_STEMS = ("cifar", "imagenet")


def _check_positive_int(name: str, value: Any, owner: str) -> None:
  if not isinstance(value, int) or isinstance(value, bool) or value < 1:
    raise ValueError(
        f"{owner}: {name} must be a positive integer, got {value!r}."
    )


def _check_choice(name: str, value: Any, choices: Sequence[str], owner: str):
  if value not in choices:
    raise ValueError(
        f"{owner}: {name} must be one of {list(choices)}, got {value!r}."
    )


class MLP(nn.Module):
  """Multi-layer perceptron on flattened inputs.

  .. math::
    h_0 = \\mathrm{vec}(x), \\quad h_{i+1} = \\phi(W_i h_i + b_i), \\quad
    \\mathrm{logits} = W_L h_L + b_L.

  The paper sweeps MLPs of width 256 with ReLU on MNIST subsets (Fig. 18).

  Attributes:
    features: widths of the hidden layers, e.g. ``(256, 256)``.
    num_outputs: number of logits.
    activation: one of ``relu``, ``gelu``, ``tanh``, ``silu``, ``swish``,
      ``elu``, ``sigmoid``, ``identity``.
    fused: build the layers from :mod:`cdat_fast.nn` (same parameters,
      values and gradients), so that CDAT's jvp-of-jvp runs the fused
      kernels; activations ``relu``, ``gelu``, ``tanh``, ``silu``. Meant for
      GPU/TPU: on CPU the kernels run in Pallas' (slow) interpret mode.
  """

  features: Sequence[int] = (256, 256)
  num_outputs: int = 10
  activation: str = "relu"
  fused: bool = False

  def __post_init__(self):
    for f in self.features:
      _check_positive_int("features", f, "MLP")
    _check_positive_int("num_outputs", self.num_outputs, "MLP")
    _check_choice("activation", self.activation, list(_ACTIVATIONS), "MLP")
    if self.fused:
      _check_choice("activation", self.activation, list(_FUSED_ACTIVATIONS),
                    "MLP(fused=True)")
    super().__post_init__()

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = x.reshape((x.shape[0], -1))
    if self.fused:
      from cdat_fast import nn as jet_nn  # pylint: disable=g-import-not-at-top
      act, dense = jet_nn.jet_activation(self.activation), jet_nn.Dense
    else:
      act, dense = _ACTIVATIONS[self.activation], nn.Dense
    for f in self.features:
      x = act(dense(f)(x))
    return dense(self.num_outputs)(x)


def _norm(kind: str) -> Callable[[jax.Array], jax.Array]:
  """Returns the normalisation layer: identity or layer norm over channels."""
  if kind == "layer":
    return nn.LayerNorm()
  return lambda x: x


class ResidualBlock(nn.Module):
  """Basic ResNet block: two 3x3 convolutions and a skip connection."""

  filters: int
  strides: int = 1
  norm: str = "none"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    use_bias = self.norm == "none"
    s = (self.strides, self.strides)
    y = nn.Conv(self.filters, (3, 3), s, use_bias=use_bias)(x)
    y = nn.relu(_norm(self.norm)(y))
    y = nn.Conv(self.filters, (3, 3), use_bias=use_bias)(y)
    y = _norm(self.norm)(y)
    if x.shape != y.shape:
      x = nn.Conv(self.filters, (1, 1), s, use_bias=use_bias, name="proj")(x)
      x = _norm(self.norm)(x)
    return nn.relu(x + y)


class BottleneckBlock(nn.Module):
  """Bottleneck ResNet block: 1x1, 3x3 (strided), 1x1 with 4x expansion."""

  filters: int
  strides: int = 1
  norm: str = "none"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    use_bias = self.norm == "none"
    s = (self.strides, self.strides)
    y = nn.Conv(self.filters, (1, 1), use_bias=use_bias)(x)
    y = nn.relu(_norm(self.norm)(y))
    y = nn.Conv(self.filters, (3, 3), s, use_bias=use_bias)(y)
    y = nn.relu(_norm(self.norm)(y))
    y = nn.Conv(4 * self.filters, (1, 1), use_bias=use_bias)(y)
    y = _norm(self.norm)(y)
    if x.shape != y.shape:
      x = nn.Conv(4 * self.filters, (1, 1), s, use_bias=use_bias,
                  name="proj")(x)
      x = _norm(self.norm)(x)
    return nn.relu(x + y)


class ResNet(nn.Module):
  """ResNet (He et al., 2016) without batch norm, optionally with layer norm.

  The paper trains ResNet-34 with the batch-norm layers removed and ResNet-50
  with batch norm replaced by layer norm (appendix C.2). Here ``norm="none"``
  removes normalisation (convolutions then carry a bias) and ``norm="layer"``
  applies :class:`flax.linen.LayerNorm` over the channel axis at every place
  the standard architecture has batch norm.

  Stage ``i`` has ``width * 2**i`` filters (times 4 at the output of a
  bottleneck block) and, for ``i > 0``, starts with a stride-2 block. The
  ``imagenet`` stem is a 7x7 stride-2 convolution followed by a 3x3 stride-2
  max-pool (as in Scenic); the ``cifar`` stem is a single 3x3 stride-1
  convolution, better suited to 8x8 or 32x32 inputs. The head is a global
  average pool and a dense layer.

  Attributes:
    stage_sizes: number of blocks per stage, e.g. ``(3, 4, 6, 3)``.
    num_outputs: number of logits.
    width: filters of the stem and first stage.
    bottleneck: use bottleneck blocks (ResNet-50 and deeper).
    norm: ``"none"`` or ``"layer"``.
    stem: ``"cifar"`` or ``"imagenet"``.
  """

  stage_sizes: Sequence[int] = (1, 1, 1)
  num_outputs: int = 10
  width: int = 16
  bottleneck: bool = False
  norm: str = "none"
  stem: str = "cifar"

  def __post_init__(self):
    if not self.stage_sizes:
      raise ValueError("ResNet: stage_sizes must be non-empty.")
    for n in self.stage_sizes:
      _check_positive_int("stage_sizes", n, "ResNet")
    _check_positive_int("num_outputs", self.num_outputs, "ResNet")
    _check_positive_int("width", self.width, "ResNet")
    _check_choice("norm", self.norm, _NORMS, "ResNet")
    _check_choice("stem", self.stem, _STEMS, "ResNet")
    super().__post_init__()

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    use_bias = self.norm == "none"
    if self.stem == "imagenet":
      x = nn.Conv(self.width, (7, 7), (2, 2), use_bias=use_bias,
                  name="stem_conv")(x)
      x = nn.relu(_norm(self.norm)(x))
      x = nn.max_pool(x, (3, 3), strides=(2, 2), padding="SAME")
    else:
      x = nn.Conv(self.width, (3, 3), use_bias=use_bias, name="stem_conv")(x)
      x = nn.relu(_norm(self.norm)(x))
    block = BottleneckBlock if self.bottleneck else ResidualBlock
    for i, num_blocks in enumerate(self.stage_sizes):
      for j in range(num_blocks):
        strides = 2 if i > 0 and j == 0 else 1
        x = block(self.width * 2**i, strides, self.norm)(x)
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_outputs, name="head")(x)


class MlpBlock(nn.Module):
  """Two dense layers with a non-linearity, back to the input width."""

  mlp_dim: int
  activation: str = "gelu"
  fused: bool = False

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if self.fused:
      from cdat_fast import nn as jet_nn  # pylint: disable=g-import-not-at-top
      act, dense = jet_nn.jet_activation(self.activation), jet_nn.Dense
    else:
      act, dense = _ACTIVATIONS[self.activation], nn.Dense
    return dense(x.shape[-1])(act(dense(self.mlp_dim)(x)))


class MixerBlock(nn.Module):
  """Mixer block: token-mixing MLP then channel-mixing MLP, pre-LN, residual."""

  tokens_mlp_dim: int
  channels_mlp_dim: int
  fused: bool = False

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    lib, add, linear = _jet_lib(self.fused)
    swap = linear(lambda a: jnp.swapaxes(a, 1, 2))
    y = swap(lib.LayerNorm()(x))
    y = MlpBlock(self.tokens_mlp_dim, fused=self.fused, name="token_mixing")(y)
    x = add(x, swap(y))
    y = lib.LayerNorm()(x)
    return add(x, MlpBlock(self.channels_mlp_dim, fused=self.fused,
                           name="channel_mixing")(y))


def _jet_lib(fused: bool):
  """(layers module, add, linear wrapper): cdat_fast.nn's or plain flax."""
  if fused:
    from cdat_fast import nn as jet_nn  # pylint: disable=g-import-not-at-top
    return jet_nn, jet_nn.add, jet_nn.linear
  return nn, lambda a, b: a + b, lambda fn: fn


def _patchify(x: jax.Array, patch_size: int, hidden_dim: int,
              fused: bool = False) -> jax.Array:
  """Non-overlapping patch embedding ``[B, H, W, C] -> [B, N, hidden_dim]``.

  A strided convolution (parameters ``stem/kernel (p, p, C, hidden_dim)``
  and ``stem/bias``). ``fused``: the same parameters applied as a dense layer
  of :mod:`cdat_fast.nn` to the image cut into flattened ``(p, p, C)``
  patches (what the convolution computes), so that the fused jet chain
  starts at the stem.
  """
  if x.shape[1] < patch_size or x.shape[2] < patch_size:
    raise ValueError(
        f"patch_size={patch_size} is larger than the input image "
        f"{x.shape[1]}x{x.shape[2]}."
    )
  p = (patch_size, patch_size)
  if fused:
    from cdat_fast import nn as jet_nn  # pylint: disable=g-import-not-at-top
    b, h, w, c = x.shape
    h, w = h // patch_size, w // patch_size
    x = x[:, :h * patch_size, :w * patch_size]  # VALID: drop the remainder
    x = x.reshape(b, h, patch_size, w, patch_size, c).transpose(
        0, 1, 3, 2, 4, 5).reshape(b, h * w, patch_size * patch_size * c)
    # pylint: disable-next=protected-access
    return jet_nn._HeadsDense(in_shape=p + (c,), features=(hidden_dim,),
                              name="stem")(x)
  x = nn.Conv(hidden_dim, p, strides=p, padding="VALID", name="stem")(x)
  return x.reshape((x.shape[0], -1, hidden_dim))


class MLPMixer(nn.Module):
  """MLP-Mixer (Tolstikhin et al., 2021), without dropout or stochastic depth.

  Patches of ``patch_size`` x ``patch_size`` are embedded linearly into
  ``hidden_dim`` channels, go through ``num_blocks`` :class:`MixerBlock`, a
  final layer norm, a mean over tokens and a dense head. The paper's Mixer
  Ti/8 is ``patch_size=8, hidden_dim=192, num_blocks=12, tokens_mlp_dim=96,
  channels_mlp_dim=768`` (Scenic's ``imagenet_augreg_mixer_config``).

  Attributes:
    num_outputs: number of logits.
    patch_size: side of the square patches.
    hidden_dim: channels per token.
    num_blocks: number of mixer blocks.
    tokens_mlp_dim: hidden width of the token-mixing MLP.
    channels_mlp_dim: hidden width of the channel-mixing MLP.
    fused: build the model from :mod:`cdat_fast.nn` (same parameters,
      values and gradients), so that CDAT's jvp-of-jvp runs the fused
      kernels from the stem to the head (the token transposes and the mean
      over tokens through :func:`cdat_fast.nn.linear`). For GPU/TPU.
  """

  num_outputs: int = 10
  patch_size: int = 4
  hidden_dim: int = 32
  num_blocks: int = 2
  tokens_mlp_dim: int = 16
  channels_mlp_dim: int = 64
  fused: bool = False

  def __post_init__(self):
    for name in ("num_outputs", "patch_size", "hidden_dim", "num_blocks",
                 "tokens_mlp_dim", "channels_mlp_dim"):
      _check_positive_int(name, getattr(self, name), "MLPMixer")
    super().__post_init__()

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    lib, _, linear = _jet_lib(self.fused)
    x = _patchify(x, self.patch_size, self.hidden_dim, self.fused)
    for _ in range(self.num_blocks):
      x = MixerBlock(self.tokens_mlp_dim, self.channels_mlp_dim,
                     fused=self.fused)(x)
    x = lib.LayerNorm(name="pre_head_norm")(x)
    x = linear(lambda a: jnp.mean(a, axis=1))(x)
    return lib.Dense(self.num_outputs, name="head")(x)


class EncoderBlock(nn.Module):
  """Pre-LN transformer encoder block: self-attention then a GELU MLP."""

  num_heads: int
  mlp_dim: int
  fused: bool = False

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    lib, add, _ = _jet_lib(self.fused)
    y = lib.LayerNorm()(x)
    if self.fused:  # flax's parameter names, cdat_fast.nn's layer
      y = lib.MultiHeadAttention(
          num_heads=self.num_heads, name="MultiHeadDotProductAttention_0")(y)
    else:
      y = nn.MultiHeadDotProductAttention(num_heads=self.num_heads)(y, y)
    x = add(x, y)
    y = lib.LayerNorm()(x)
    return add(x, MlpBlock(self.mlp_dim, fused=self.fused)(y))


class ViT(nn.Module):
  """Vision Transformer (Dosovitskiy et al., 2020) with a class token.

  Non-overlapping patches are embedded linearly, a learned class token is
  prepended and learned position embeddings added; ``num_layers`` pre-LN
  :class:`EncoderBlock` follow, then a layer norm and a dense head on the class
  token. No dropout. The paper's ViT Ti/32 is ``patch_size=32,
  hidden_dim=192, num_layers=12, num_heads=3, mlp_dim=768`` (Scenic's
  ``imagenet_augreg_vit_config``).

  Attributes:
    num_outputs: number of logits.
    patch_size: side of the square patches.
    hidden_dim: token width (divisible by ``num_heads``).
    num_layers: number of encoder blocks.
    num_heads: attention heads.
    mlp_dim: hidden width of the MLP in each block.
    fused: build the model from :mod:`cdat_fast.nn` (same parameters,
      values and gradients), so that CDAT's jvp-of-jvp runs the fused
      kernels from the stem to the head (class token, position embeddings
      and the class-token slice through :func:`cdat_fast.nn.linear` and
      :func:`cdat_fast.nn.add`). For GPU/TPU.
  """

  num_outputs: int = 10
  patch_size: int = 4
  hidden_dim: int = 32
  num_layers: int = 2
  num_heads: int = 2
  mlp_dim: int = 64
  fused: bool = False

  def __post_init__(self):
    for name in ("num_outputs", "patch_size", "hidden_dim", "num_layers",
                 "num_heads", "mlp_dim"):
      _check_positive_int(name, getattr(self, name), "ViT")
    if self.hidden_dim % self.num_heads:
      raise ValueError(
          f"ViT: hidden_dim={self.hidden_dim} must be divisible by "
          f"num_heads={self.num_heads}."
      )
    super().__post_init__()

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    lib, add, linear = _jet_lib(self.fused)
    x = _patchify(x, self.patch_size, self.hidden_dim, self.fused)
    b, n, c = x.shape
    cls = self.param("cls", nn.initializers.zeros, (1, 1, c), x.dtype)
    x = linear(lambda t, a: jnp.concatenate(
        [jnp.broadcast_to(t, (b, 1, c)), a], axis=1))(cls, x)
    pos = self.param("pos_embedding", nn.initializers.normal(stddev=0.02),
                     (1, n + 1, c), x.dtype)
    x = add(x, pos)
    for _ in range(self.num_layers):
      x = EncoderBlock(self.num_heads, self.mlp_dim, fused=self.fused)(x)
    x = lib.LayerNorm(name="encoder_norm")(x)
    return lib.Dense(self.num_outputs, name="head")(
        linear(lambda a: a[:, 0])(x))


class NanoLM(nn.Module):
  """Character-level causal transformer, the optax ``nanolm`` example.

  Token embeddings plus learned position embeddings, ``num_layers`` blocks of

  .. math::
    x \\leftarrow x + \\mathrm{MHA}(\\mathrm{LN}(x)), \\quad
    x \\leftarrow x + W_2\\, \\mathrm{relu}(W_1 \\mathrm{LN}(x)),

  with causal masking and a 4x-wide MLP, then a final layer norm and a dense
  layer to ``vocab_size`` logits per position. As in the optax example,
  ``head_size`` is the *total* query/key/value width of the attention (so each
  head has ``head_size // num_heads`` features) and the attention output is
  projected back to ``embed_size``. The paper uses the example's sizes
  (6 blocks, embedding 256, 8 heads, head_size 32, block size 64) without
  dropout (appendix C.2).

  Attributes:
    vocab_size: number of characters (logits per position).
    num_layers: number of transformer blocks.
    num_heads: attention heads.
    head_size: total query/key/value width (divisible by ``num_heads``).
    embed_size: residual stream width.
    block_size: maximal sequence length (size of the position table).
    fused: build the model from :mod:`cdat_fast.nn` (same parameter tree and
      initial values, same values and gradients), so that CDAT's jvp-of-jvp
      runs the fused kernels end to end: embeddings, residual adds, layer
      norms, attention, the MLP and the head. Meant for GPU/TPU: on CPU the
      kernels run in Pallas' (slow) interpret mode.
  """

  vocab_size: int = 65
  num_layers: int = 2
  num_heads: int = 4
  head_size: int = 16
  embed_size: int = 64
  block_size: int = 64
  fused: bool = False

  def __post_init__(self):
    for name in ("vocab_size", "num_layers", "num_heads", "head_size",
                 "embed_size", "block_size"):
      _check_positive_int(name, getattr(self, name), "NanoLM")
    if self.head_size % self.num_heads:
      raise ValueError(
          f"NanoLM: head_size={self.head_size} must be divisible by "
          f"num_heads={self.num_heads}."
      )
    super().__post_init__()

  @nn.compact
  def __call__(self, tokens: jax.Array) -> jax.Array:
    seq_len = tokens.shape[1]
    if seq_len > self.block_size:
      raise ValueError(
          f"NanoLM: sequence length {seq_len} exceeds block_size="
          f"{self.block_size}."
      )
    lib, add, _ = _jet_lib(self.fused)
    if self.fused:
      def attn(name):
        return lambda y: lib.MultiHeadAttention(
            num_heads=self.num_heads, qkv_features=self.head_size,
            out_features=self.embed_size, causal=True, name=name)(y)
    else:
      # One [1, 1, T, T] mask, broadcast over the batch: no mask per example
      # to build and hold ([B, 1, T, T]).
      mask = nn.make_causal_mask(tokens[:1])

      def attn(name):
        return lambda y: nn.MultiHeadDotProductAttention(
            num_heads=self.num_heads, qkv_features=self.head_size,
            out_features=self.embed_size, name=name)(y, y, mask=mask)

    x = lib.Embed(self.vocab_size, self.embed_size, name="embed")(tokens)
    x = add(x, lib.Embed(self.block_size, self.embed_size, name="pos_embed")(
        jnp.arange(seq_len)))
    for i in range(self.num_layers):
      y = lib.LayerNorm(name=f"ln_1_{i}")(x)
      x = add(x, attn(f"attn_{i}")(y))
      y = lib.LayerNorm(name=f"ln_2_{i}")(x)
      y = lib.relu(lib.Dense(4 * self.embed_size, name=f"mlp_fc_{i}")(y))
      x = add(x, lib.Dense(self.embed_size, name=f"mlp_proj_{i}")(y))
    x = lib.LayerNorm(name="ln_f")(x)
    return lib.Dense(self.vocab_size, name="head")(x)


def _resnet_config(stages, bottleneck, norm):
  return dict(stage_sizes=stages, width=64, bottleneck=bottleneck, norm=norm,
              stem="imagenet")


_R18, _R34 = (2, 2, 2, 2), (3, 4, 6, 3)

# name -> (model class, keyword arguments; num_outputs is added by get_model)
_REGISTRY: dict[str, tuple[type[nn.Module], dict[str, Any]]] = {
    "mlp": (MLP, {}),
    "mlp-3x256": (MLP, dict(features=(256, 256, 256))),
    "resnet": (ResNet, dict(norm="none")),
    "resnet-ln": (ResNet, dict(norm="layer")),
    "resnet-small": (ResNet, dict(norm="none", width=8)),
    "resnet18": (ResNet, _resnet_config(_R18, False, "none")),
    "resnet34": (ResNet, _resnet_config(_R34, False, "none")),
    "resnet50": (ResNet, _resnet_config(_R34, True, "none")),
    "resnet18-ln": (ResNet, _resnet_config(_R18, False, "layer")),
    "resnet34-ln": (ResNet, _resnet_config(_R34, False, "layer")),
    "resnet50-ln": (ResNet, _resnet_config(_R34, True, "layer")),
    "mixer": (MLPMixer, {}),
    "mixer-ti8": (MLPMixer, dict(patch_size=8, hidden_dim=192, num_blocks=12,
                                 tokens_mlp_dim=96, channels_mlp_dim=768)),
    "nanolm": (NanoLM, {}),
    "nanolm-small": (NanoLM, dict(num_layers=1, num_heads=2, head_size=16,
                                  embed_size=32, block_size=64)),
    "nanolm-paper": (NanoLM, dict(num_layers=6, num_heads=8, head_size=32,
                                  embed_size=256, block_size=64)),
    "vit": (ViT, {}),
    "vit-ti32": (ViT, dict(patch_size=32, hidden_dim=192, num_layers=12,
                           num_heads=3, mlp_dim=768)),
}

MODEL_NAMES: tuple[str, ...] = tuple(_REGISTRY)

# The sequence models, for text data (``[B, T]`` ids, ``[B, T]`` targets).
TEXT_MODELS: tuple[str, ...] = tuple(
    name for name, (cls, _) in _REGISTRY.items() if cls is NanoLM)


def get_model(name: str, num_outputs: int, **overrides: Any) -> nn.Module:
  """Builds a model by name.

  Args:
    name: one of :data:`MODEL_NAMES` (see the module docstring).
    num_outputs: number of logits; the vocabulary size for ``nanolm*``.
    **overrides: attributes replacing the named configuration's, e.g.
      ``get_model("resnet", 10, width=8, stage_sizes=(1, 1))``.

  Returns:
    An unbound :class:`flax.linen.Module`.

  Raises:
    ValueError: for an unknown name, an attribute the model does not have, or
      an invalid attribute value.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> model = get_model("mlp", 10, features=(32,))
    >>> params = init_params(model, jax.random.key(0), jnp.zeros((1, 8, 8, 1)))
    >>> model.apply({"params": params}, jnp.zeros((4, 8, 8, 1))).shape
    (4, 10)
  """
  if name not in _REGISTRY:
    raise ValueError(
        f"Unknown model {name!r}; valid names are: {', '.join(MODEL_NAMES)}."
    )
  cls, config = _REGISTRY[name]
  fields = set(cls.__dataclass_fields__) - {"parent", "name"}
  unknown = sorted(set(overrides) - fields)
  if unknown:
    raise ValueError(
        f"Model {name!r} ({cls.__name__}) has no attribute(s) {unknown}; "
        f"valid attributes are: {sorted(fields)}."
    )
  output_field = "vocab_size" if cls is NanoLM else "num_outputs"
  kwargs = {**config, output_field: num_outputs, **overrides}
  return cls(**kwargs)


def init_params(model: nn.Module, key: jax.Array, x: jax.Array) -> Any:
  """Initialises a model on a sample input and returns its ``params`` tree.

  Args:
    model: a model from this module.
    key: a PRNG key.
    x: a sample input batch (only its shape and dtype matter).

  Returns:
    The parameter pytree, to be applied as ``model.apply({"params": p}, x)``.
  """
  return model.init(key, x)["params"]
