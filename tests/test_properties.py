"""Property tests of the tuner rules (hypothesis).

η ≥ 0 and finite, and the parameters finite, for any finite input (zeros and
denormals included); σ = 1 reaches the line minimum on random quadratics;
bf16 parameters keep float32 state.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from hypothesis import given, settings, strategies as st

import cdat_fast

DIM = 3
finite32 = st.floats(min_value=-1e4, max_value=1e4, allow_nan=False,
                     allow_infinity=False, width=32, allow_subnormal=True)
vec = st.lists(finite32, min_size=DIM, max_size=DIM)
tiny = st.sampled_from([0.0, 1e-45, -1e-45, 1e-38, 1e-30, 1.0])


def _objective(w, a, b, c):
  """A cubic-plus-quadratic with arbitrary (possibly zero or denormal) terms."""
  return jnp.sum(a * w ** 2) + jnp.sum(b * w) + jnp.sum(c * w ** 3)


OPTS = {
    "cdat": cdat_fast.cdat(optax.sgd(1.0)),
    "cdat_ema_eps": cdat_fast.cdat(optax.adam(1.0), ema=0.9, eps=1e-8),
    "linesearch": cdat_fast.backtracking_linesearch(optax.sgd(1.0),
                                                    max_steps=30),
    "polyak": cdat_fast.polyak(optax.sgd(1.0), max_learning_rate=100.0),
    "hypergradient": cdat_fast.hypergradient(optax.sgd(1.0),
                                             learning_rate=0.1, beta=0.5),
}


@functools.lru_cache(maxsize=None)
def _step(name):
  opt = OPTS[name]

  @jax.jit
  def step(w, a, b, c):
    f = functools.partial(_objective, a=a, b=b, c=c)
    state = opt.init(w)
    out = []
    for _ in range(2):
      g = jax.grad(f)(w)
      u, state = opt.update(g, state, w, value_fn=f)
      w = optax.apply_updates(w, u)
      out.append(optax.tree.get(state, "learning_rate"))
    return w, jnp.stack(out)

  return step


def _arrays(*xs):
  return [jnp.asarray(x, jnp.float32) for x in xs]


@settings(max_examples=40, deadline=None)
@given(w=vec, a=vec, b=vec, c=st.lists(tiny, min_size=DIM, max_size=DIM),
       name=st.sampled_from(sorted(OPTS)))
def test_learning_rate_nonnegative_and_parameters_finite(w, a, b, c, name):
  w, a, b, c = _arrays(w, a, b, c)
  new_w, etas = _step(name)(w, a, b, c)
  assert np.all(np.isfinite(np.asarray(etas))), etas
  assert np.all(np.asarray(etas) >= 0), etas
  assert np.all(np.isfinite(np.asarray(new_w))), new_w


@settings(max_examples=25, deadline=None)
@given(w=st.lists(tiny, min_size=DIM, max_size=DIM),
       a=st.lists(tiny, min_size=DIM, max_size=DIM),
       b=st.lists(tiny, min_size=DIM, max_size=DIM))
def test_zeros_and_denormals(w, a, b):
  w, a, b = _arrays(w, a, b)
  new_w, etas = _step("cdat")(w, a, b, jnp.zeros(DIM))
  assert np.all(np.isfinite(np.asarray(new_w)))
  assert np.all(np.isfinite(np.asarray(etas))) and np.all(np.asarray(etas) >= 0)


@jax.jit
def _greedy_step(q, diag, w, w_star):
  a = (q * diag) @ q.T
  f = lambda v: 0.5 * (v - w_star) @ a @ (v - w_star)
  opt = cdat_fast.quadratic_greedy(optax.sgd(1.0))
  u, _ = opt.update(jax.grad(f)(w), opt.init(w), w, value_fn=f)
  return optax.apply_updates(w, u), a


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31 - 1),
       cond=st.floats(min_value=1.0, max_value=1e3))
def test_quadratic_greedy_reaches_line_minimum(seed, cond):
  rng = np.random.default_rng(seed)
  q, _ = np.linalg.qr(rng.standard_normal((DIM, DIM)))
  diag = np.geomspace(1.0, cond, DIM)
  w, w_star = rng.standard_normal(DIM), rng.standard_normal(DIM)
  new_w, a = _greedy_step(*_arrays(q, diag, w, w_star))
  a64 = (q * diag) @ q.T
  g = a64 @ (w - w_star)
  if g @ g < 1e-6:
    return
  # The directional derivative along g vanishes at the new point.
  slope = (a64 @ (np.asarray(new_w, np.float64) - w_star)) @ g
  assert abs(slope) <= 1e-3 * (g @ g) * max(1.0, cond / 10)


@settings(max_examples=10, deadline=None)
@given(w=vec)
def test_bf16_parameters_keep_float32_state(w):
  wb = jnp.asarray(w, jnp.bfloat16)
  f = lambda v: jnp.sum(v.astype(jnp.float32) ** 2) + 1.0
  opt = cdat_fast.cdat(optax.sgd(1.0), ema=0.5)
  state = opt.init(wb)
  u, state = opt.update(jax.grad(f)(wb), state, wb, value_fn=f)
  assert optax.tree.get(state, "learning_rate").dtype == jnp.float32
  assert u.dtype == jnp.bfloat16
  assert np.all(np.isfinite(np.asarray(optax.apply_updates(wb, u),
                                       np.float32)))
