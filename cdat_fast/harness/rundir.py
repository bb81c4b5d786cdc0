"""Run directories: whether one already holds a run, and clearing it.

``cdat-fast train|sweep|compare --out DIR`` refuses a ``DIR`` that already
holds a run (:func:`claim`) unless ``--overwrite`` is given; then the files an
earlier run wrote there are removed (:func:`clear_runs`) before the new run
writes, so that no stale checkpoint or metrics file is mistaken for the new
run's. Other files in ``DIR`` are left alone.
"""
from __future__ import annotations

import shutil
from pathlib import Path

from cdat_fast.harness.errors import InputError

# What cdat_fast.harness.train writes into a run directory.
RUN_FILES = ("config.json", "metrics.jsonl", "summary.json", "history.npz",
             "training.png", "spectrum.jsonl", "error.log")
# Files whose presence means the directory holds a run (or a sweep, a
# comparison); error.log alone does not.
_MARKERS = ("config.json", "metrics.jsonl", "summary.json", "checkpoints",
            "sweep.json", "compare.json")
# What cdat-fast sweep and compare write beside their runs.
_SUMMARY_FILES = ("sweep.json", "sweep.png", "compare.json", "compare.png")


def holds_run(path: str | Path) -> str | None:
  """The first file (or ``checkpoints``) of a run found in ``path``; None."""
  path = Path(path)
  if not path.is_dir():
    return None
  for name in _MARKERS:
    if (path / name).exists():
      return name
  return None


def _run_dirs(path: Path) -> list[Path]:
  """``path`` and its sub-directories (two levels) that hold a run."""
  found = [path] if holds_run(path) else []
  for sub in sorted(p for p in path.iterdir() if p.is_dir()):
    if sub.name != "checkpoints":
      found.extend(_run_dirs(sub) if holds_run(sub) is None else [sub])
  return found


def clear_run(path: str | Path) -> None:
  """Removes a run's files (:data:`RUN_FILES`, ``checkpoints/``) from ``path``."""
  path = Path(path)
  for name in RUN_FILES + _SUMMARY_FILES:
    (path / name).unlink(missing_ok=True)
  shutil.rmtree(path / "checkpoints", ignore_errors=True)


def claim(path: str | Path | None, overwrite: bool, flag: str = "--out",
          *, nested: bool = False, resumable: bool = False) -> list[Path]:
  """Refuses ``path`` if it holds a run, unless ``overwrite``.

  Nothing is removed here: pass what it returns to :func:`clear_runs` once
  the new run is about to write.

  Args:
    path: the run directory; None: nothing is written, nothing to check.
    overwrite: allow replacing the earlier run.
    flag: the flag that named ``path``, for the message.
    nested: also look one and two levels down (the runs of a sweep or a
      comparison live in sub-directories).
    resumable: say that ``--resume`` continues the run (``train``).

  Returns:
    The directories holding a run, to clear (empty unless ``overwrite``).

  Raises:
    InputError: naming ``path``, the file found, and the ways out.
  """
  if path is None or not Path(path).is_dir():
    return []
  path = Path(path)
  found = _run_dirs(path) if nested else ([path] if holds_run(path) else [])
  if found and not overwrite:
    where = found[0] / holds_run(found[0])
    resume = f", continue it with --resume {path}" if resumable else ""
    raise InputError(
        f"{flag} {path}: already holds a run ({where}); pass --overwrite to"
        f" replace it{resume}, or choose another directory")
  return found


def clear_runs(paths: list[Path]) -> None:
  """:func:`clear_run` on each of ``paths``."""
  for path in paths:
    clear_run(path)
