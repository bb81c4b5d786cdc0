"""Tests for cdat_fast.harness.models and cdat_fast.harness.losses."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cdat_fast.harness import losses
from cdat_fast.harness import models

# The "rbg" PRNG compiles far faster on CPU than threefry for the many small
# kernel shapes of an init, which keeps these tests quick.
_KEY = jax.random.key(0, impl="rbg")
_IMAGE = jnp.linspace(0.0, 1.0, 2 * 8 * 8 * 1).reshape(2, 8, 8, 1)
_TOKENS = jnp.array([[1, 2, 3, 4, 5, 6], [0, 6, 5, 4, 3, 2]], jnp.int32)

# (registry name, tiny overrides, input, expected output shape)
_TINY = [
    ("mlp", dict(features=(8, 8)), _IMAGE, (2, 10)),
    ("resnet", dict(width=4, stage_sizes=(1, 1)), _IMAGE, (2, 10)),
    ("resnet-ln", dict(width=4, stage_sizes=(1, 1)), _IMAGE, (2, 10)),
    ("resnet", dict(width=2, stage_sizes=(1, 1), bottleneck=True,
                    stem="imagenet"), _IMAGE, (2, 10)),
    ("mixer", dict(hidden_dim=8, num_blocks=1, tokens_mlp_dim=4,
                   channels_mlp_dim=8), _IMAGE, (2, 10)),
    ("vit", dict(hidden_dim=8, num_layers=1, num_heads=2, mlp_dim=8),
     _IMAGE, (2, 10)),
]
# NanoLM's shape, finiteness and causality are checked in one compile below.


def _init_apply(model, *inputs):
  """Initialises on inputs[0] and applies to every input, in one jit."""

  def f(key):
    params = models.init_params(model, key, inputs[0])
    return [model.apply({"params": params}, x) for x in inputs]

  outs = jax.jit(f)(_KEY)
  return outs[0] if len(inputs) == 1 else outs


@pytest.mark.parametrize(
    "name,overrides,x,shape", _TINY,
    ids=[f"{n}-{i}" for i, (n, *_) in enumerate(_TINY)])
def test_tiny_model_output_shape_and_finite(name, overrides, x, shape):
  model = models.get_model(name, 10, **overrides)
  out = _init_apply(model, x)
  assert out.shape == shape
  assert bool(jnp.all(jnp.isfinite(out)))
  # Different inputs give different outputs (the model is not constant).
  assert not np.allclose(out[0], out[1])


def _num_params(name, num_outputs, x, **overrides):
  model = models.get_model(name, num_outputs, **overrides)
  shapes = jax.eval_shape(
      lambda: models.init_params(model, _KEY, x))
  return sum(int(np.prod(a.shape)) for a in jax.tree.leaves(shapes))


@pytest.mark.parametrize("name,num_outputs,x,overrides,expected", [
    # Published counts: torchvision's ResNets (their batch-norm affine
    # parameters are as many as our layer-norm ones), timm's
    # vit_tiny_patch16_224, Mixer-B/16 (59.88M), and the optax nanolm
    # example's printed total.
    ("resnet18-ln", 1000, (1, 224, 224, 3), {}, 11_689_512),
    ("resnet34-ln", 1000, (1, 224, 224, 3), {}, 21_797_672),
    ("resnet50-ln", 1000, (1, 224, 224, 3), {}, 25_557_032),
    ("vit-ti32", 1000, (1, 224, 224, 3), dict(patch_size=16), 5_717_416),
    ("mixer-ti8", 1000, (1, 224, 224, 3),
     dict(patch_size=16, hidden_dim=768, num_blocks=12, tokens_mlp_dim=384,
          channels_mlp_dim=3072), 59_880_472),
    ("nanolm-paper", 65, (1, 64), {}, 3_408_513),
])
def test_paper_sized_configs_match_published_parameter_counts(
    name, num_outputs, x, overrides, expected):
  dtype = jnp.int32 if name.startswith("nanolm") else jnp.float32
  x = jnp.zeros(x, dtype)
  assert _num_params(name, num_outputs, x, **overrides) == expected


def test_no_norm_resnet_drops_norm_parameters():
  x = jnp.zeros((1, 224, 224, 3))
  # Without norm the convolutions carry biases instead; the stem, every
  # conv and projection of ResNet-34 lose LN's 2 parameters per channel and
  # gain 1 bias per channel.
  with_ln = _num_params("resnet34-ln", 1000, x)
  without = _num_params("resnet34", 1000, x)
  assert without < with_ln


def test_registry_builds_every_name():
  for name in models.MODEL_NAMES:
    model = models.get_model(name, 7)
    attr = "vocab_size" if name.startswith("nanolm") else "num_outputs"
    assert getattr(model, attr) == 7


def test_unknown_model_name_lists_valid_names():
  with pytest.raises(ValueError, match="resnet5") as err:
    models.get_model("resnet5", 10)
  for name in ("mlp", "resnet-ln", "mixer", "nanolm", "vit"):
    assert name in str(err.value)


def test_unknown_override_and_bad_values_raise():
  with pytest.raises(ValueError, match="depth"):
    models.get_model("mlp", 10, depth=3)
  with pytest.raises(ValueError, match="norm"):
    models.get_model("resnet", 10, norm="batch")
  with pytest.raises(ValueError, match="activation"):
    models.MLP(activation="bogus")
  with pytest.raises(ValueError, match="num_heads"):
    models.ViT(hidden_dim=10, num_heads=3)


def test_nanolm_output_shape_and_causality():
  model = models.get_model("nanolm", 10, num_layers=1, num_heads=2,
                           head_size=4, embed_size=8, block_size=8)
  changed = _TOKENS.at[:, -1].set(9)
  out, out_changed = _init_apply(model, _TOKENS, changed)
  assert out.shape == (2, 6, 10)
  assert bool(jnp.all(jnp.isfinite(out)))
  assert not np.allclose(out[0], out[1])
  # Changing the last token changes only the last position's logits.
  np.testing.assert_allclose(out[:, :-1], out_changed[:, :-1], atol=1e-6)
  assert not np.allclose(out[:, -1], out_changed[:, -1])


# ---------------------------------------------------------------------------
# Losses.


def test_squared_loss_hand_computed():
  logits = jnp.array([[1.0, 2.0, 0.0], [0.0, 0.0, 1.0]])
  labels = jnp.array([1, 2])
  # Example 0: 0.5 * ((1-0)^2 + (2-1)^2 + 0) = 1; example 1: 0. Mean 0.5.
  assert float(jax.jit(losses.squared_loss)(logits, labels)) == pytest.approx(
      0.5)


def test_squared_loss_sequence_matches_numpy():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 3, 4)).astype(np.float32)
  labels = rng.integers(0, 4, size=(2, 3))
  onehot = np.eye(4)[labels]
  expected = np.mean(0.5 * np.sum((logits - onehot) ** 2, axis=-1))
  got = jax.jit(losses.squared_loss)(jnp.asarray(logits), jnp.asarray(labels))
  assert float(got) == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("shape", [(5, 4), (2, 3, 6)])
def test_cross_entropy_matches_numpy(shape):
  rng = np.random.default_rng(1)
  logits = rng.normal(size=shape) * 3
  labels = rng.integers(0, shape[-1], size=shape[:-1])
  m = logits.max(-1, keepdims=True)
  lse = np.log(np.exp(logits - m).sum(-1)) + m[..., 0]
  picked = np.take_along_axis(logits, labels[..., None], -1)[..., 0]
  expected = np.mean(lse - picked)
  got = jax.jit(losses.cross_entropy_loss)(
      jnp.asarray(logits, jnp.float32), jnp.asarray(labels))
  assert float(got) == pytest.approx(expected, rel=1e-5)


def test_cross_entropy_of_uniform_logits_is_log_k():
  got = jax.jit(losses.cross_entropy_loss)(
      jnp.zeros((3, 7)), jnp.array([0, 3, 6]))
  assert float(got) == pytest.approx(np.log(7), rel=1e-6)


def test_accuracy_hand_computed():
  logits = jnp.array([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]])
  labels = jnp.array([1, 1, 1, 0])
  assert float(jax.jit(losses.accuracy)(logits, labels)) == pytest.approx(0.75)


def test_l2_penalty_hand_computed():
  params = {"a": jnp.array([1.0, 2.0]), "b": {"c": jnp.array([[3.0]])}}
  # 0.5 * 0.1 * (1 + 4 + 9) = 0.7
  assert float(losses.l2_penalty(params, 0.1)) == pytest.approx(0.7)
  assert float(losses.l2_penalty(params, 0.0)) == 0.0


def test_make_loss_fn_combines_loss_and_weight_decay():
  model = models.MLP(features=(4,), num_outputs=3)
  x = jnp.arange(10.0).reshape(2, 5) / 10
  y = jnp.array([2, 0])
  params = models.init_params(model, _KEY, x)
  logits = np.asarray(model.apply({"params": params}, x))
  sq = np.sum(np.concatenate(
      [np.ravel(np.asarray(p)) for p in jax.tree.leaves(params)]) ** 2)
  onehot = np.eye(3)[np.asarray(y)]
  expected = np.mean(0.5 * np.sum((logits - onehot) ** 2, -1)) + 0.5 * 1e-2 * sq
  loss_fn = losses.make_loss_fn(model, "squared", weight_decay=1e-2)
  value, grads = jax.jit(jax.value_and_grad(loss_fn))(params, {"x": x, "y": y})
  assert float(value) == pytest.approx(expected, rel=1e-5)
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
  no_wd = losses.make_loss_fn(model, "cross_entropy", weight_decay=0.0)
  assert float(jax.jit(no_wd)(params, {"x": x, "y": y})) > 0


def test_make_loss_fn_rejects_unknown_loss_and_negative_decay():
  model = models.MLP(features=(4,), num_outputs=3)
  with pytest.raises(ValueError, match="hinge"):
    losses.make_loss_fn(model, "hinge")
  with pytest.raises(ValueError, match="weight_decay"):
    losses.make_loss_fn(model, "squared", weight_decay=-1.0)


def test_fused_mlp_is_the_mlp_with_fused_cdat_curvature():
  """MLP(fused=True): same tree, values and CDAT step; the kernels run."""
  import optax  # pylint: disable=g-import-not-at-top
  import cdat_fast  # pylint: disable=g-import-not-at-top
  x = jnp.asarray(np.random.default_rng(0).standard_normal((6, 8, 8, 1)),
                  jnp.float32)
  y = jnp.arange(6) % 10
  plain = models.MLP(features=(12, 9), activation="gelu")
  fused = models.MLP(features=(12, 9), activation="gelu", fused=True)
  params = models.init_params(plain, jax.random.key(0), x)
  assert (jax.tree.structure(params) ==
          jax.tree.structure(models.init_params(fused, jax.random.key(0), x)))
  opt = cdat_fast.cdat(optax.sgd(1.0))

  def step(model):
    f = lambda p: losses.squared_loss(model.apply({"params": p}, x), y)
    g = jax.grad(f)(params)
    return opt.update(g, opt.init(params), params, value_fn=f)[0]

  np.testing.assert_allclose(
      jax.flatten_util.ravel_pytree(jax.jit(lambda: step(fused))())[0],
      jax.flatten_util.ravel_pytree(jax.jit(lambda: step(plain))())[0],
      rtol=1e-4, atol=1e-7)
  jaxpr = str(jax.make_jaxpr(lambda: step(fused))())
  assert "dense_jet" in jaxpr and "activation_jet_gelu" in jaxpr
  assert "dense_jet" not in str(jax.make_jaxpr(lambda: step(plain))())
  with pytest.raises(ValueError, match="MLP\\(fused=True\\): activation"):
    models.MLP(activation="elu", fused=True)

