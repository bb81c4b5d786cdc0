"""The stock-flax transformer examples (``examples/``), linen and nnx.

Each example trains in each mode and its loss goes down: from the command
line on a generated text (forward-only curvature with
``jax.nn.dot_product_attention``), and through its train step on one batch
(the other modes). With ``cdat_fast.nn.dot_product_attention`` the exact CDAT
step runs the fused ``attention_jet`` once per block and measures the
curvature that ``jax.nn.dot_product_attention`` gives the same model; the
forward-only mode trains through an attention with no forward-mode rule at
all; and the models are causal (nnx's ``is_causal`` is given at the call,
where a ``functools.partial`` would be overridden).
"""
from __future__ import annotations

import functools
import importlib.util
import pathlib
import sys

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cdat_fast import estimators

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"
SIZES = dict(width=16, depth=1, num_heads=2, max_len=8)
VOCAB, BATCH = 13, 16


def _load(flavour: str):
  """``examples/stock_transformer_<flavour>.py`` as a module (not a package)."""
  name = f"stock_transformer_{flavour}"
  if str(EXAMPLES) not in sys.path:  # its shared module, shakespeare_lm
    sys.path.insert(0, str(EXAMPLES))
  spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  sys.modules[name] = module  # flax's dataclasses look their module up
  spec.loader.exec_module(module)
  return module


@pytest.fixture(scope="module", params=("linen", "nnx"))
def example(request):
  return _load(request.param)


def _is_nnx(example) -> bool:
  return example.__name__.endswith("nnx")


def _tokens(seed: int, shape=(BATCH, SIZES["max_len"] + 1)) -> jax.Array:
  return jnp.asarray(np.random.default_rng(seed).integers(0, VOCAB, shape),
                     jnp.int32)


def _batch(seed: int = 0) -> dict[str, jax.Array]:
  t = _tokens(seed)
  return {"x": t[:, :-1], "y": t[:, 1:]}


def _model(example, attention_fn, **sizes):
  """``(model, params)`` of the example's model, seed 0 (nnx: no params)."""
  sizes = {**SIZES, **sizes}
  if _is_nnx(example):
    return example.Transformer(VOCAB, **sizes, attention_fn=attention_fn,
                               rngs=nnx.Rngs(0)), None
  return (example.Transformer(VOCAB, **sizes, attention_fn=attention_fn),
          _linen_params(example.__name__, sizes["depth"]))


@functools.lru_cache(maxsize=None)
def _linen_params(name: str, depth: int):
  """The linen model's initial parameters (the attention has none): one
  compilation of ``init`` per depth."""
  model = sys.modules[name].Transformer(VOCAB, **{**SIZES, "depth": depth})
  return jax.jit(model.init)(jax.random.key(0), _batch()["x"])


def _step(example, attention_fn, mode, **sizes):
  """The example's train step and its state: ``train_step(*state, batch)``."""
  model, params = _model(example, attention_fn, **sizes)
  optimizer = example.make_optimizer(mode, learning_rate=1e-2)
  if _is_nnx(example):
    return example.make_train_step(mode), [
        model, nnx.Optimizer(model, optimizer, wrt=nnx.Param)]
  return (example.make_train_step(model, optimizer, mode),
          [params, optimizer.init(params)])


def _trainer(example, attention_fn, mode):
  """``step(batch) -> (loss, optimizer state)`` of the example's train step."""
  train_step, state = _step(example, attention_fn, mode)

  def step(batch):
    if _is_nnx(example):  # updates the model and the optimizer in place
      return train_step(*state, batch), nnx.as_pure(state[1].opt_state)
    state[0], state[1], loss = train_step(*state, batch)
    return loss, state[1]

  return step


def _train(step, steps: int = 12):
  """Losses and CDAT's learning rates of ``steps`` steps on one batch."""
  results = [step(_batch()) for _ in range(steps)]
  losses = np.array([float(loss) for loss, _ in results])
  rates = np.array([float(optax.tree.get(s, "learning_rate", default=np.nan))
                    for _, s in results])
  return losses, rates


def _assert_trains(losses, rates=None, drop=0.15):
  assert np.all(np.isfinite(losses)) and losses[-1] < losses[0] - drop, losses
  if rates is not None:
    assert np.all(np.isfinite(rates)) and np.all(rates > 0), rates


def _write_text(path: pathlib.Path, seed: int = 0) -> pathlib.Path:
  """A generated text of short words: learnable in a few steps."""
  words = ["to", "be", "or", "not", "that", "is", "the", "question", "tis",
           "nobler", "in", "mind"]
  rng = np.random.default_rng(seed)
  lines = [" ".join(rng.choice(words, 8)) for _ in range(600)]
  path.write_text("\n".join(lines) + "\n")
  return path


def test_forward_only_mode_trains_from_the_command_line(example, tmp_path):
  summary = example.main([
      "--data-dir", str(_write_text(tmp_path / "input.txt")), "--mode", "fd",
      "--steps", "16", "--batch-size", "16", "--seq-len", "8", "--width", "16",
      "--depth", "1", "--heads", "2", "--log-every", "100"])
  losses, rates = (np.array(summary[k]) for k in ("losses", "learning_rates"))
  assert np.isfinite(summary["held_out_loss"])
  # From ln(vocab) ≈ 2.9 towards the text's character statistics.
  _assert_trains(np.array([losses[:2].mean(), losses[-4:].mean()]), rates,
                 drop=0.15)
  assert len(set(rates.tolist())) > 1  # CDAT's, set at each step


@pytest.mark.parametrize("mode", ["gauss_newton", "base"])
def test_gauss_newton_and_base_modes_train(example, mode):
  step = _trainer(example, example.ATTENTION_FNS[example.ATTENTION[mode]],
                  mode)
  losses, rates = _train(step)
  _assert_trains(losses, rates if mode != "base" else None)


def _pallas_calls(fn, *args) -> list[str]:
  """Names of the pallas_call kernels in fn's jaxpr (nested ones included)."""
  names = []

  def walk(jaxpr):
    for eqn in getattr(jaxpr, "jaxpr", jaxpr).eqns:
      if eqn.primitive.name == "pallas_call":
        names.append(str(eqn.params.get("name")))
      for param in eqn.params.values():
        for sub in param if isinstance(param, (tuple, list)) else (param,):
          if hasattr(getattr(sub, "jaxpr", sub), "eqns"):
            walk(sub)

  walk(jax.make_jaxpr(fn)(*args))
  return names


def test_exact_cdat_step_runs_attention_jet_once_per_block(example):
  for attention, calls in (("cdat", ["attention_jet"] * 3), ("jax", [])):
    train_step, state = _step(example, example.ATTENTION_FNS[attention],
                              "exact", depth=3)
    assert _pallas_calls(train_step, *state, _batch()) == calls


def test_exact_mode_trains_with_jax_nn_attentions_curvature(example):
  steps = {name: _trainer(example, example.ATTENTION_FNS[name], "exact")
           for name in ("cdat", "jax")}
  first = {name: step(_batch()) for name, step in steps.items()}
  # Same start, same gradient: the same |uᵀHu| and learning rate.
  for key in ("denominator", "learning_rate"):
    got, want = (float(optax.tree.get(first[n][1], key)) for n in first)
    np.testing.assert_allclose(got, want, rtol=1e-4)
  assert float(optax.tree.get(first["cdat"][1], "denominator")) > 1e-4
  losses, rates = _train(steps["cdat"], 11)
  _assert_trains(np.concatenate([[float(first["cdat"][0])], losses]), rates)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _attention_vjp(query, key, value, is_causal):
  return jax.nn.dot_product_attention(query, key, value, is_causal=is_causal)


def _attention_vjp_fwd(query, key, value, is_causal):
  return jax.vjp(functools.partial(jax.nn.dot_product_attention,
                                   is_causal=is_causal), query, key, value)


def _attention_vjp_bwd(is_causal, vjp, cotangent):
  del is_causal
  return vjp(cotangent)


_attention_vjp.defvjp(_attention_vjp_fwd, _attention_vjp_bwd)


def reverse_only_attention(query, key, value, bias=None, mask=None, *,
                           is_causal=False, **flax_kwargs):
  """Attention with a VJP and no JVP, as cuDNN flash attention."""
  del bias, mask, flax_kwargs
  return _attention_vjp(query, key, value, is_causal)


def test_forward_only_mode_needs_no_forward_mode_rule(example):
  train_step, state = _step(example, reverse_only_attention, "exact")
  # The premise: the exact curvature cannot run through it.
  with pytest.raises(estimators.NoForwardModeError, match="finite_difference"):
    jax.make_jaxpr(train_step)(*state, _batch())
  losses, rates = _train(_trainer(example, reverse_only_attention, "fd"))
  _assert_trains(losses, rates)


def _logits(example, attention_fn, tokens):
  model, params = _model(example, attention_fn)
  if _is_nnx(example):
    return nnx.jit(lambda m, t: m(t))(model, tokens)
  return jax.jit(model.apply)(params, tokens)


@pytest.mark.parametrize("attention", ["jax", "cdat"])
def test_the_model_is_causal(example, attention):
  tokens = _tokens(0, (2, SIZES["max_len"]))
  changed = tokens.at[:, -1].set((tokens[:, -1] + 1) % VOCAB)
  logits = _logits(example, example.ATTENTION_FNS[attention],
                   jnp.concatenate([tokens, changed]))
  before, after = logits[:2], logits[2:]
  np.testing.assert_allclose(before[:, :-1], after[:, :-1], atol=1e-5)
  assert not np.allclose(before[:, -1], after[:, -1], atol=1e-3)
