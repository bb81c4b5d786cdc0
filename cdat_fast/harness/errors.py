"""The harness's errors: bad input the user can fix, and everything else.

:class:`InputError` is the one type for input that the harness has checked
and refused: a flag value, a missing or corrupt data file, a run directory
without its files or already holding a run, an incompatible checkpoint, a
batch that does not fit in memory. The command line reports it as one line
and exit code 2 (:mod:`cdat_fast.harness.cli`). Its subclasses name where the
input came from (:class:`cdat_fast.harness.data.DataError`,
:class:`cdat_fast.harness.checkpoint.CheckpointError`,
:class:`cdat_fast.harness.plots.RunFilesError`). Any other exception is an
internal failure, reported as a bug with its traceback in a log file.

It derives from ``ValueError``, so code that caught the harness's
``ValueError`` before catches it still.
"""
from __future__ import annotations

from typing import Callable, TypeVar

T = TypeVar("T")


class InputError(ValueError):
  """Input that the harness checked and refused; the message says how to fix it."""


def checked(fn: Callable[[], T], prefix: str = "") -> T:
  """Runs a validation ``fn``, turning its ``ValueError`` into :class:`InputError`.

  For validators outside the harness (``cdat_fast.checks``, model and mesh
  constructors) that report bad values as ``ValueError``.

  Args:
    fn: the validation, called without arguments.
    prefix: put before the message (e.g. ``"--mesh data=3: "``).

  Returns:
    What ``fn`` returns.

  Raises:
    InputError: with ``prefix`` and the message of ``fn``'s ``ValueError``.
  """
  try:
    return fn()
  except InputError:
    raise
  except ValueError as e:
    raise InputError(f"{prefix}{e}") from e
