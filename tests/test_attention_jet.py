"""Tests for kernels/attention_jet.py: the Pallas kernel vs the closed-form
reference, and the reference vs jvp-of-jvp of plain softmax attention."""

import jax
import jax.numpy as jnp
from jax.experimental.pallas import tpu as pltpu
import numpy as np
import pytest

from cdat_fast.kernels import attention_jet
from cdat_fast.kernels import attention_jet_reference as _reference

reference = jax.jit(_reference, static_argnames=("scale", "causal",
                                                 "precision"))

LEAD, T, D, DV = (2, 3), 37, 20, 13  # 37 queries: padded, masked keys.
NAMES = ("q", "k", "v", "dq", "dk", "dv", "ddq", "ddk", "ddv")


def _inputs(seed, s=T, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  shape = {"q": LEAD + (T, D), "k": LEAD + (s, D), "v": LEAD + (s, DV)}
  args = [rng.standard_normal(shape[n[-1]]) for n in NAMES]
  args[0] = 2.0 * args[0]  # Peaked softmax rows: the max shift matters.
  return [jnp.asarray(a, jnp.float32).astype(dtype) for a in args]


def _plain(q, k, v, causal, scale=None):
  c = 1.0 / np.sqrt(q.shape[-1]) if scale is None else scale
  s = c * jnp.einsum("...td,...sd->...ts", q, k)
  if causal:
    s = jnp.where(jnp.tril(jnp.ones(s.shape[-2:], bool)), s, -jnp.inf)
  return jnp.einsum("...ts,...sd->...td", jax.nn.softmax(s, -1), v)


def _assert_close(actual, expected, rtol=2e-5, atol=2e-5):
  for a, e in zip(actual, expected):
    assert a.shape == e.shape and a.dtype == e.dtype
    np.testing.assert_allclose(np.asarray(a, np.float32),
                               np.asarray(e, np.float32), rtol=rtol, atol=atol)


@pytest.mark.parametrize("causal", [False, True])
def test_reference_is_the_jet_of_attention(causal):
  """(o, ȯ, ö) = jvp of (x ↦ jvp(attn, x, ẋ)) at (x, ẋ) along (ẋ, ẍ)."""
  args = _inputs(0, s=T if causal else 45)
  primals, first, second = args[:3], args[3:6], args[6:]
  f = lambda *x: _plain(*x, causal)

  @jax.jit
  def jet(p, t1, t2):
    inner = lambda *a: jax.jvp(f, a[:3], a[3:])
    (o, do), (_, ddo) = jax.jvp(inner, (*p, *t1), (*t1, *t2))
    return o, do, ddo

  expected = jet(primals, first, second)
  _assert_close(reference(*args, causal=causal), expected, 1e-5, 1e-5)
  assert float(jnp.abs(expected[2]).max()) > 1.0  # A non-trivial ö.


@pytest.mark.parametrize("causal,s,blocks", [
    (False, 45, (16, 16)),  # Keys padded 45 -> 48 and masked.
    (False, 45, (64, 32)),  # Blocks larger than the sequence: clipped.
    (True, T, (16, 8)),  # Causal: key loop stops at the query block.
])
def test_kernel_matches_reference(causal, s, blocks):
  args = _inputs(1, s=s)
  out = attention_jet(*args, causal=causal, interpret=True, block_q=blocks[0],
                      block_k=blocks[1])
  _assert_close(out, reference(*args, causal=causal))


def test_absent_tangents_are_zero_and_scale_is_used():
  args = _inputs(2, s=45)
  absent = ("dk", "ddq", "ddv")
  given = [None if n in absent else a for n, a in zip(NAMES, args)]
  zeros = [jnp.zeros_like(a) if n in absent else a
           for n, a in zip(NAMES, args)]
  out = attention_jet(*given, scale=0.3, interpret=True, block_q=16,
                      block_k=16)
  _assert_close(out, reference(*zeros, scale=0.3))
  default = reference(*zeros)
  assert float(jnp.abs(out[0] - default[0]).max()) > 1e-2


def test_bfloat16_inputs_accumulate_in_float32():
  args = _inputs(3, dtype=jnp.bfloat16)
  out = attention_jet(*args, causal=True, interpret=True, block_q=16,
                      block_k=16)
  ref = reference(*[a.astype(jnp.float32) for a in args], causal=True)
  assert all(o.dtype == jnp.bfloat16 for o in out)
  _assert_close([o.astype(jnp.float32) for o in out], ref, 3e-2, 3e-2)


def test_jvp_through_the_kernel_matches_the_reference():
  args = _inputs(4, s=45)
  tangent = _inputs(5, s=45)
  kernel = lambda *a: attention_jet(*a, interpret=True, block_q=16,
                                    block_k=16)
  _, t_kernel = jax.jit(lambda a, t: jax.jvp(kernel, a, t))(args, tangent)
  _, t_ref = jax.jit(lambda a, t: jax.jvp(_reference, a, t))(args, tangent)
  _assert_close(t_kernel, t_ref, 1e-4, 1e-4)


@pytest.mark.parametrize("change,match", [
    (lambda a: a.__setitem__(4, a[4][..., :5, :]), "dk must have shape"),
    (lambda a: a.__setitem__(1, a[1][..., :7]), "k must have q's feature"),
    (lambda a: a.__setitem__(2, a[2][..., :5, :]), "v must have k's length"),
])
def test_bad_shapes_name_the_argument(change, match):
  args = _inputs(6, s=45)
  change(args)
  with pytest.raises(ValueError, match=match):
    attention_jet(*args, interpret=True)


def test_bad_options_are_rejected():
  args = _inputs(7, s=45)
  with pytest.raises(ValueError, match="causal"):
    attention_jet(*args, causal=True, interpret=True)
  with pytest.raises(ValueError, match="block_q must be a power of two"):
    attention_jet(*_inputs(7), block_q=24, interpret=True)


def _jet_float64(q, k, v, dq, dk, dv, ddq, ddk, ddv, causal):
  """The closed-form jet in float64 numpy, centred two-pass sums."""
  q, k, v, dq, dk, dv, ddq, ddk, ddv = (
      np.asarray(a, np.float64) for a in (q, k, v, dq, dk, dv, ddq, ddk, ddv))
  c = 1.0 / np.sqrt(q.shape[-1])
  qk = lambda a, b: np.einsum("...td,...sd->...ts", a, b)
  pv = lambda p, b: np.einsum("...ts,...sd->...td", p, b)
  s, ds = c * qk(q, k), c * (qk(dq, k) + qk(q, dk))
  dds = c * (qk(ddq, k) + 2.0 * qk(dq, dk) + qk(q, ddk))
  if causal:
    mask = np.tril(np.ones(s.shape[-2:], bool))
    s, ds, dds = np.where(mask, s, -np.inf), ds * mask, dds * mask
  p = np.exp(s - s.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  expect = lambda z: np.sum(p * z, -1, keepdims=True)
  centred = ds - expect(ds)
  dp = p * centred
  ddp = p * (centred ** 2 + dds - expect(centred ** 2) - expect(dds))
  return pv(p, v), pv(dp, v) + pv(p, dv), pv(ddp, v) + 2 * pv(dp, dv) + pv(
      p, ddv)


@pytest.mark.parametrize("common", [0.0, 300.0])
def test_common_logit_tangent_does_not_cancel(common):
  """ṡ with a large part common to every key (k̇ along a shared direction,
  as a key bias's tangent gives; q̇ against a large mean key does the same):
  the softmax ignores it, so the jet does, and in float32 it must not make
  (ṡ - a)² cancel. Measured at common=300: ö off by 4.5e-5 of its scale
  (kernel) and 7e-5 (reference), against 8.6e-2 and 5e-2 with E[ṡ²] - a²
  expanded unshifted; XLA's jvp-of-jvp of plain attention: 7.6e-2."""
  args = [np.asarray(a) for a in _inputs(5, s=T)]
  args[4] = args[4] + common * np.random.default_rng(6).standard_normal(D)
  expected = _jet_float64(*args, causal=True)
  scale = [float(np.abs(e).max()) for e in expected]
  for out in (attention_jet(*args, causal=True, interpret=True, block_q=16,
                            block_k=8),
              reference(*args, causal=True)):
    for o, e, sc in zip(out, expected, scale):
      np.testing.assert_allclose(np.asarray(o), e, rtol=0, atol=3e-4 * sc)


@pytest.mark.parametrize("platform, calls", [("cpu", 0), ("cuda", 1),
                                             ("tpu", 1)])
def test_lowered_for_the_platform_lowered_for(platform, calls, kernel_calls):
  fn = lambda *a: attention_jet(*a, causal=True)
  assert kernel_calls(fn, *_inputs(9), platform=platform) == calls


@pytest.mark.parametrize("causal, s, blocks", [
    (False, 45, (16, 16)),  # 3 query blocks x 3 key blocks, keys padded.
    (True, T, (32, 16)),  # Key blocks past a query block's end skipped.
    (True, T, (16, 32)),  # Query blocks within one key block.
])
def test_tpu_version_matches_reference(causal, s, blocks):
  # The TPU version, keys streamed a block at a time (grid axis 2) with the
  # online sums in VMEM scratch, under Pallas' TPU interpreter.
  args = [a[:1, :2] for a in _inputs(10, s=s)]  # 2 heads: the grid is slow.
  out = attention_jet(*args, causal=causal, block_q=blocks[0],
                      block_k=blocks[1], interpret=pltpu.InterpretParams())
  _assert_close(out, reference(*args, causal=causal), 1e-4, 1e-4)


@pytest.mark.parametrize("t, blocks, platform", [
    (32, (16, 8), None),  # Read in place: 2 query blocks, 4 key blocks.
    (T, (16, 16), None),  # Padded tiles: transposed to heads first.
    (32, (16, 16), pltpu.InterpretParams()),  # TPU version: heads first.
])
def test_sequence_major_layout_is_the_heads_first_jet(t, blocks, platform):
  # (B, T, H, D), jax.nn.dot_product_attention's layout: the same jet as on
  # the heads-first arrays, and the reference agrees.
  heads_first = [a[:, :, :t] for a in _inputs(11, s=T)]
  seq = [jnp.swapaxes(a, 1, 2) for a in heads_first]
  out = attention_jet(*seq, causal=True, block_q=blocks[0], block_k=blocks[1],
                      layout="sequence_major", interpret=platform)
  expected = reference(*heads_first, causal=True)
  _assert_close([jnp.swapaxes(o, 1, 2) for o in out], expected, 1e-4, 1e-4)
  _assert_close(_reference(*seq, causal=True, layout="sequence_major"),
                [jnp.swapaxes(e, 1, 2) for e in expected], 1e-5, 1e-5)


def test_sequence_major_layout_needs_four_dimensions():
  args = [a[0] for a in _inputs(12)]
  with pytest.raises(ValueError, match="sequence_major"):
    attention_jet(*args, layout="sequence_major")
  with pytest.raises(ValueError, match="layout"):
    attention_jet(*args, layout="bthd")
