"""A layer without forward-mode autodiff: one clear error of our own.

``exact()`` and ``gauss_newton()`` differentiate the objective with
``jax.jvp``; through a ``jax.custom_vjp`` function or a primitive without a
jvp rule (cuDNN or Pallas flash attention) JAX raises a ``TypeError`` or a
``NotImplementedError``. The estimators raise
:class:`~cdat_fast.estimators.NoForwardModeError` instead, naming the
forward-only alternatives, with JAX's error as its cause.
"""
import jax
import jax.numpy as jnp
import optax
import pytest
from jax.extend.core import Primitive

import cdat_fast
from cdat_fast import estimators
from problems import tiny_net


@jax.custom_vjp
def _vjp_only_tanh(z):
  return jnp.tanh(z)


_vjp_only_tanh.defvjp(lambda z: (jnp.tanh(z), z),
                      lambda z, g: (g / jnp.cosh(z) ** 2,))

# A primitive with an implementation and a shape rule but no jvp rule, as
# cuDNN's attention ('dot_product_attention_fwd_wrapper') is to JAX.
_no_jvp = Primitive("no_jvp_for_this_test")
_no_jvp.def_impl(lambda x: x * 2.0)
_no_jvp.def_abstract_eval(lambda x: x)


def _model(layer):
  params, _, loss_fn, (x, _) = tiny_net(seed=2)

  def model_fn(p):
    return layer(x @ p["w0"] + p["b0"]) @ p["w1"]
  return params, model_fn, loss_fn


def _check(error_info, who):
  message = str(error_info.value)
  assert isinstance(error_info.value, TypeError)
  for words in (who, "forward-mode", "cdat_fast.estimators.finite_difference",
                "cdat_fast.nn.dot_product_attention", "attention_fn="):
    assert words in message, (words, message)
  cause = error_info.value.__cause__
  assert isinstance(cause, (TypeError, NotImplementedError))
  assert not isinstance(cause, estimators.NoForwardModeError)


@pytest.mark.parametrize("layer, jax_error", [
    (_vjp_only_tanh, NotImplementedError),  # jvp of jvp: 'custom_lin'
    (_no_jvp.bind, NotImplementedError)])
def test_exact_names_the_forward_only_estimators(layer, jax_error):
  params, model_fn, loss_fn = _model(layer)
  value_fn = lambda p: loss_fn(model_fn(p))
  opt = cdat_fast.cdat(optax.sgd(1.0))
  g = jax.tree.map(jnp.ones_like, params)
  with pytest.raises(estimators.NoForwardModeError) as e:
    opt.update(g, opt.init(params), params, value_fn=value_fn)
  _check(e, "estimators.exact()")
  assert isinstance(e.value.__cause__, jax_error)


def test_gauss_newton_model_fn_with_a_custom_vjp_layer():
  # A first-order jvp through custom_vjp is JAX's TypeError.
  params, model_fn, loss_fn = _model(_vjp_only_tanh)
  opt = cdat_fast.cdat(optax.sgd(1.0), curvature="gauss_newton")
  g = jax.tree.map(jnp.ones_like, params)
  with pytest.raises(estimators.NoForwardModeError) as e:
    jax.jit(lambda g, s, p: opt.update(g, s, p, model_fn=model_fn,
                                       loss_fn=loss_fn))(
                                           g, opt.init(params), params)
  _check(e, "estimators.gauss_newton()")
  assert isinstance(e.value.__cause__, TypeError)


def test_through_every_and_subbatch_and_without_a_gradient():
  params, model_fn, loss_fn = _model(_vjp_only_tanh)
  value_fn = lambda p: loss_fn(model_fn(p))
  g = jax.tree.map(jnp.ones_like, params)
  opt = cdat_fast.cdat(optax.sgd(1.0), every=3)  # exact under a lax.cond
  with pytest.raises(estimators.NoForwardModeError):
    opt.update(g, opt.init(params), params, value_fn=value_fn)
  # finite_difference itself needs no jvp, but every's held steps take the
  # slope gᵀu by a jvp when no gradient is given (scale_by_cdat in a chain,
  # without grad=): that error says to pass it.
  opt = optax.chain(optax.sgd(1.0), cdat_fast.scale_by_cdat(
      curvature=estimators.every(3, inner=estimators.finite_difference())))
  with pytest.raises(estimators.NoForwardModeError, match="grad=") as e:
    jax.jit(lambda g, s, p: opt.update(g, s, p, value_fn=value_fn))(
        g, opt.init(params), params)
  _check(e, "scale_by_cdat's slope")
  _, state = jax.jit(lambda g, s, p: opt.update(
      g, s, p, value_fn=value_fn, grad=g))(g, opt.init(params), params)
  assert int(optax.tree.get(state, "num_skipped")) == 0


def test_other_errors_pass_through_unchanged():
  params, model_fn, loss_fn = _model(jnp.tanh)

  def broken(p):
    raise TypeError("a bug in the user's value_fn")

  opt = cdat_fast.cdat(optax.sgd(1.0))
  g = jax.tree.map(jnp.ones_like, params)
  with pytest.raises(TypeError, match="a bug in the user's") as e:
    opt.update(g, opt.init(params), params, value_fn=broken)
  assert not isinstance(e.value, estimators.NoForwardModeError)
  # A model with forward mode is unaffected.
  _, state = opt.update(g, opt.init(params), params,
                        value_fn=lambda p: loss_fn(model_fn(p)))
  assert int(optax.tree.get(state, "count")) == 1
