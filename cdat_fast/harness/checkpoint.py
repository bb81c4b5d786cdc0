"""Checkpoints of training runs with orbax-checkpoint, and resuming them.

A checkpoint at step ``n`` (``checkpoints/step_<n>/``) holds, through Orbax,
the arrays of the scan carry (parameters, optimizer and tuner state, prior
update, step counter) and the sharpness warm start; beside it
``step_<n>.json`` holds what lives on the host: the data order (epoch and
position of the minibatch stream), the initial loss, the metrics records so
far, the configuration and the version of cdat-fast that wrote it
(``cdat_fast.__version__``; none: 0.1.0); ``step_<n>.npz`` the per-step
history so far. The JSON file is written last, so a checkpoint without it is
incomplete and ignored. The two newest checkpoints are kept.

Resuming requires the configuration the checkpoint was written with, except
for ``steps``, ``checkpoint_every`` and ``mesh``; anything else differing is
reported by name (:class:`CheckpointError`). The arrays are restored with the
shardings of the resuming run's own state, so a run checkpointed under one
mesh (or one device) resumes under another; its losses then agree with the
uninterrupted run's to float32 rounding (the new mesh reduces in another
order), bit for bit only on the same mesh. A checkpoint whose arrays do not fit the
current run's state (an optimizer or tuner state whose fields changed) is
reported in one line, naming the version that wrote it when it differs from
the running one.
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any, NamedTuple

import jax
import numpy as np

import cdat_fast
from cdat_fast.harness.config import config_from_dict, config_to_dict
from cdat_fast.harness.errors import InputError

RESUMABLE_CHANGES = ("steps", "checkpoint_every", "mesh")
# Written by cdat-fast 0.1.0, whose checkpoints do not record a version.
UNVERSIONED = "0.1.0"


class CheckpointError(InputError):
  """A checkpoint is missing, incomplete or from an incompatible run."""


class Restored(NamedTuple):
  step: int
  carry: Any
  eigvec: Any
  initial_loss: float | None
  records: list
  history: dict
  stream_position: tuple[int, int]


def _flatten_config(d: dict, prefix: str = "") -> dict:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flatten_config(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = list(v) if isinstance(v, tuple) else v
  return out


def config_differences(saved: dict, current: dict) -> list[str]:
  """Fields (dotted names) whose values differ, ignoring resumable ones."""
  a, b = _flatten_config(saved), _flatten_config(current)
  diffs = []
  for key in sorted(set(a) | set(b)):
    if key.split(".")[-1] in RESUMABLE_CHANGES and "." not in key:
      continue
    if a.get(key) != b.get(key):
      diffs.append(f"{key}: checkpoint {a.get(key)!r}, now {b.get(key)!r}")
  return diffs


class Checkpointer:
  """Saves and restores training checkpoints in one directory."""

  def __init__(self, directory: str | Path, keep: int = 2):
    import orbax.checkpoint as ocp
    self.dir = Path(directory).absolute()
    self.keep = keep
    self._ocp = ocp
    self._ckpt = ocp.StandardCheckpointer()

  def steps(self) -> list[int]:
    """Steps of the complete checkpoints, oldest first."""
    if not self.dir.is_dir():
      return []
    found = []
    for p in self.dir.glob("step_*.json"):
      m = re.fullmatch(r"step_(\d+)\.json", p.name)
      if m and (self.dir / f"step_{m.group(1)}").is_dir():
        found.append(int(m.group(1)))
    return sorted(found)

  def save(self, *, step: int, carry, eigvec, cfg, initial_loss, records,
           history, stream_position) -> None:
    self.dir.mkdir(parents=True, exist_ok=True)
    path = self.dir / f"step_{step}"
    if path.exists():
      shutil.rmtree(path)
    tree = {"carry": carry}
    if eigvec is not None:
      tree["eigvec"] = eigvec
    self._ckpt.save(path, tree)
    self._ckpt.wait_until_finished()
    np.savez(self.dir / f"step_{step}.npz", **history)
    meta = {"version": cdat_fast.__version__, "step": step,
            "initial_loss": initial_loss,
            "has_eigvec": eigvec is not None,
            "stream_position": list(stream_position), "records": records,
            "config": config_to_dict(cfg)}
    tmp = self.dir / f"step_{step}.json.tmp"
    tmp.write_text(json.dumps(meta, default=str))
    tmp.replace(self.dir / f"step_{step}.json")
    for old in self.steps()[:-self.keep]:
      shutil.rmtree(self.dir / f"step_{old}", ignore_errors=True)
      for suffix in (".json", ".npz"):
        (self.dir / f"step_{old}{suffix}").unlink(missing_ok=True)

  def restore_latest(self, carry_like, cfg) -> Restored:
    """Restores the newest complete checkpoint into the structure of ``carry_like``."""
    steps = self.steps()
    if not steps:
      raise CheckpointError(f"{self.dir}: no complete checkpoint to resume from")
    step = steps[-1]
    try:
      meta = json.loads((self.dir / f"step_{step}.json").read_text())
    except (OSError, ValueError) as e:
      raise CheckpointError(
          f"{self.dir}/step_{step}.json: unreadable checkpoint metadata: {e}")
    self._check_config(meta["config"], cfg)
    if step > cfg.steps:
      raise CheckpointError(
          f"{self.dir}: checkpoint is at step {step}, beyond steps={cfg.steps}")
    target = {"carry": carry_like}
    if meta["has_eigvec"]:
      target["eigvec"] = carry_like[0]
    abstract = jax.tree.map(self._ocp.utils.to_shape_dtype_struct, target)
    path = self.dir / f"step_{step}"
    written_by = meta.get("version", UNVERSIONED)
    if written_by != cdat_fast.__version__:
      mismatch = self._structure_mismatch(path, abstract)
      if mismatch:
        raise CheckpointError(self._version_message(written_by, mismatch))
    try:
      tree = self._ckpt.restore(path, abstract)
    except Exception as e:  # orbax raises many types; report one line.
      if written_by != cdat_fast.__version__:
        raise CheckpointError(self._version_message(written_by, _one_line(e)))
      raise CheckpointError(f"{path}: cannot restore checkpoint: "
                            + _one_line(e))
    try:
      with np.load(self.dir / f"step_{step}.npz") as h:
        history = {k: h[k] for k in h.files}
    except Exception as e:  # noqa: BLE001
      raise CheckpointError(f"{path}: cannot restore checkpoint: "
                            + _one_line(e))
    return Restored(step=step, carry=tree["carry"], eigvec=tree.get("eigvec"),
                    initial_loss=meta["initial_loss"], records=meta["records"],
                    history=history,
                    stream_position=tuple(meta["stream_position"]))

  def _check_config(self, saved: dict, cfg) -> None:
    """Raises unless ``saved`` is ``cfg`` up to resumable changes."""
    as_json = lambda c: json.loads(json.dumps(config_to_dict(c), default=str))
    try:  # Fields added since the checkpoint was written take their defaults.
      saved = as_json(config_from_dict(saved))
    except TypeError:  # Unknown fields: compare as written, and report them.
      pass
    diffs = config_differences(saved, as_json(cfg))
    if diffs:
      raise CheckpointError(
          f"{self.dir}: checkpoint from an incompatible configuration ("
          + "; ".join(diffs) + ")")

  def _structure_mismatch(self, path: Path, abstract) -> str | None:
    """How the arrays saved in ``path`` differ from ``abstract``'s.

    None when they fit, or when the saved structure cannot be read (restoring
    then says why).
    """
    try:
      saved = self._ckpt.metadata(path)
      saved = _array_shapes(getattr(saved, "item_metadata", saved))
    except Exception:  # noqa: BLE001 (orbax raises many types)
      return None
    return _describe_mismatch(saved, _array_shapes(abstract))

  def _version_message(self, written_by: str, why: str) -> str:
    return (f"{self.dir}: checkpoint written by cdat-fast {written_by} does not"
            f" fit cdat-fast {cdat_fast.__version__} ({why}); resume it with"
            f" cdat-fast {written_by}, or start a new run")


def _one_line(e: Exception) -> str:
  return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


def _key_name(key) -> str:
  for attr in ("key", "idx", "name"):  # DictKey, SequenceKey, GetAttrKey
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def _array_shapes(tree) -> dict[str, tuple[int, ...]]:
  """``{dotted path: shape}`` of a tree's arrays (NamedTuple fields by name)."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {".".join(_key_name(k) for k in keys): tuple(leaf.shape)
          for keys, leaf in leaves}


def _describe_mismatch(saved: dict, current: dict, most: int = 3) -> str | None:
  """A phrase naming (up to ``most`` of) the arrays that differ; None: none."""
  def some(names):
    names = sorted(names)
    more = f" and {len(names) - most} more" if len(names) > most else ""
    return ", ".join(names[:most]) + more
  parts = []
  if only := set(saved) - set(current):
    parts.append(f"only in the checkpoint: {some(only)}")
  if only := set(current) - set(saved):
    parts.append(f"only in this version: {some(only)}")
  shapes = {k for k in set(saved) & set(current) if saved[k] != current[k]}
  if shapes:
    parts.append(f"other shapes: {some(shapes)}")
  return "; ".join(parts) or None
