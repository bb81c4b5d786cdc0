"""Training objectives: squared loss, cross-entropy, accuracy, weight decay.

The paper trains ResNets, the MLP-Mixer and MLPs with the squared loss and
NanoLM and the ViT with cross-entropy, all with a weight decay of 1e-5
(Roulet et al., 2024, appendix C). The objective a tuner sees is

.. math::
  f(w) = \\frac{1}{n} \\sum_{i=1}^n \\ell(h(w, x_i), y_i)
         + \\frac{\\mu}{2} \\|w\\|_2^2 .

Normalisations (the paper does not state them; these are our choices):

* squared loss: half the squared Euclidean distance between the logits and the
  one-hot label, summed over classes and averaged over examples,
  :math:`\\ell(z, y) = \\tfrac12 \\|z - e_y\\|_2^2` (as in Cohen et al., 2021,
  and ``optax.l2_loss`` summed over the last axis). Averaging over classes
  instead would divide the loss, its gradient and its sharpness by the number
  of classes, and so shift every learning-rate grid by that factor.
* weight decay: :math:`\\tfrac{\\mu}{2}\\|w\\|^2` over *all* parameters
  (biases and norm scales included), so its gradient is :math:`\\mu w`, the
  decay ``optax.add_decayed_weights(mu)`` would add.

For sequence outputs ``[B, T, V]`` with labels ``[B, T]`` every loss averages
over all ``B * T`` positions.

References:
  Roulet et al., `Stepping on the Edge: Curvature Aware Learning Rate Tuners
  <https://arxiv.org/abs/2407.06183>`_, NeurIPS 2024.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax


def _check_labels(logits: jax.Array, labels: jax.Array, owner: str) -> None:
  """Raises unless ``labels`` has the shape ``logits.shape[:-1]``.

  Raises:
    ValueError: naming both shapes (e.g. an MLP's ``[B, K]`` logits for a
      text batch's ``[B, T]`` next-character labels).
  """
  if tuple(labels.shape) != tuple(logits.shape[:-1]):
    raise ValueError(
        f"{owner}: labels of shape {tuple(labels.shape)} need logits of shape"
        f" {tuple(labels.shape)} + (classes,), got {tuple(logits.shape)}; the"
        " model must output one logit vector per label (for text, a"
        " sequence model such as nanolm)")


def squared_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Squared loss against one-hot labels, averaged over examples.

  .. math::
    \\frac{1}{n} \\sum_{i=1}^n \\frac12 \\sum_{k=1}^K (z_{ik} - [y_i = k])^2 .

  Args:
    logits: ``[..., K]`` model outputs.
    labels: integer labels of shape ``logits.shape[:-1]``.

  Returns:
    A scalar.
  """
  _check_labels(logits, labels, "squared_loss")
  targets = jax.nn.one_hot(labels, logits.shape[-1], dtype=logits.dtype)
  return jnp.mean(0.5 * jnp.sum(jnp.square(logits - targets), axis=-1))


def cross_entropy_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Softmax cross-entropy with integer labels, averaged over examples.

  .. math::
    \\frac{1}{n} \\sum_{i=1}^n \\Big(\\log \\sum_k e^{z_{ik}} - z_{i y_i}\\Big).

  Args:
    logits: ``[..., K]`` model outputs (e.g. ``[B, K]`` or ``[B, T, V]``).
    labels: integer labels of shape ``logits.shape[:-1]``.

  Returns:
    A scalar.
  """
  _check_labels(logits, labels, "cross_entropy_loss")
  # log Σ_k exp(z_k) − z_y, as optax.softmax_cross_entropy_with_integer_labels
  # computes it, but selecting z_y with a squeeze rather than ``take(0)``:
  # XLA spends seconds constant-folding that take's transpose in CDAT's step,
  # at the size of the batch (17 s for Shakespeare's 70,023 blocks).
  label_logits = jnp.squeeze(
      jnp.take_along_axis(logits, labels[..., None], axis=-1), axis=-1)
  return jnp.mean(jax.nn.logsumexp(logits, axis=-1) - label_logits)


def accuracy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Fraction of examples (or positions) whose arg-max logit is the label."""
  return jnp.mean(jnp.argmax(logits, axis=-1) == labels)


def l2_penalty(params: Any, weight_decay: float) -> jax.Array:
  """Weight decay :math:`\\frac{\\mu}{2} \\|w\\|_2^2` over all parameters.

  Args:
    params: a pytree of arrays.
    weight_decay: :math:`\\mu \\ge 0`.

  Returns:
    A scalar.
  """
  return 0.5 * weight_decay * optax.tree.norm(params, squared=True)


LOSSES: dict[str, Callable[[jax.Array, jax.Array], jax.Array]] = {
    "squared": squared_loss,
    "cross_entropy": cross_entropy_loss,
}

_ALIASES = {
    "squared_loss": "squared",
    "mse": "squared",
    "cross-entropy": "cross_entropy",
    "cross_entropy_loss": "cross_entropy",
    "xent": "cross_entropy",
}


def get_loss(name: str) -> Callable[[jax.Array, jax.Array], jax.Array]:
  """Returns ``loss(logits, labels)`` by name (``squared``/``cross_entropy``).

  Raises:
    ValueError: for an unknown name, listing the valid ones.
  """
  key = _ALIASES.get(name, name)
  if key not in LOSSES:
    raise ValueError(
        f"Unknown loss {name!r}; valid names are: {', '.join(LOSSES)}."
    )
  return LOSSES[key]


def make_loss_fn(
    model: nn.Module, loss_name: str, weight_decay: float = 1e-5
) -> Callable[[Any, Mapping[str, jax.Array]], jax.Array]:
  """Builds the training objective ``f(params, batch)``.

  .. math::
    f(w; B) = \\frac{1}{|B|} \\sum_{(x, y) \\in B} \\ell(h(w, x), y)
              + \\frac{\\mu}{2} \\|w\\|_2^2 .

  Args:
    model: a Flax linen module, applied as ``model.apply({"params": p}, x)``.
    loss_name: ``"squared"`` or ``"cross_entropy"``.
    weight_decay: :math:`\\mu \\ge 0`; the paper uses 1e-5.

  Returns:
    ``loss(params, batch)`` with ``batch = {"x": inputs, "y": int labels}``.

  Raises:
    ValueError: for an unknown loss name or a negative weight decay.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from cdat_fast.harness.models import MLP, init_params
    >>> model = MLP(features=(8,), num_outputs=3)
    >>> x = jnp.ones((4, 5)); y = jnp.array([0, 1, 2, 0])
    >>> params = init_params(model, jax.random.key(0), x)
    >>> loss = make_loss_fn(model, "cross_entropy")
    >>> loss(params, {"x": x, "y": y}).shape
    ()
  """
  loss = get_loss(loss_name)
  if weight_decay < 0:
    raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}.")

  def loss_fn(params: Any, batch: Mapping[str, jax.Array]) -> jax.Array:
    logits = model.apply({"params": params}, batch["x"])
    value = loss(logits, batch["y"])
    if weight_decay:
      value = value + l2_penalty(params, weight_decay)
    return value

  return loss_fn
