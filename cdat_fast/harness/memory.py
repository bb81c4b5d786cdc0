"""Whether a compiled training step fits in memory, checked before it runs.

A run compiles its training step once for the shape of its batch; XLA's
buffer assignment then knows exactly how much memory the step needs beyond
its arguments (``Compiled.memory_analysis()``: temporaries and outputs not
aliased to a donated input). :func:`check_fits` compares that with the memory
the device has left (the host's available memory for the CPU, read from
``/proc/meminfo`` and the cgroup limit; ``memory_stats()`` for a GPU or TPU)
and refuses a step that cannot fit, before anything is allocated. The same
compiled program then runs the steps, so the check costs no second compile.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Sequence

from cdat_fast.harness.errors import InputError

_CGROUP_FILES = (  # (limit, usage): cgroup v2, then v1
    ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
    ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
     "/sys/fs/cgroup/memory/memory.usage_in_bytes"),
)


def _read_int(path: str) -> int | None:
  try:
    return int(Path(path).read_text().split()[0])
  except (OSError, ValueError, IndexError):
    return None


def _meminfo_available() -> int | None:
  try:
    for line in Path("/proc/meminfo").read_text().splitlines():
      if line.startswith("MemAvailable:"):
        return int(line.split()[1]) * 1024
  except (OSError, ValueError, IndexError):
    pass
  try:
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
  except (ValueError, OSError, AttributeError):
    return None


def host_available_bytes() -> int | None:
  """The host's available memory, within its cgroup's limit; None: unknown."""
  found = [_meminfo_available()]
  for limit_file, usage_file in _CGROUP_FILES:
    limit, usage = _read_int(limit_file), _read_int(usage_file)
    if limit is not None and usage is not None and limit < 2 ** 60:
      found.append(max(limit - usage, 0))
      break
  found = [v for v in found if v is not None]
  return min(found) if found else None


def available_bytes(device) -> int | None:
  """Memory ``device`` has left (the host's for a CPU); None: unknown."""
  if device.platform == "cpu":
    return host_available_bytes()
  try:
    stats = device.memory_stats()
  except Exception:  # noqa: BLE001 (backends without statistics raise)
    return None
  if not stats or "bytes_limit" not in stats:
    return None
  return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))


def program_bytes(compiled) -> int | None:
  """Bytes a compiled program allocates per device beyond its arguments."""
  try:
    stats = compiled.memory_analysis()
  except Exception:  # noqa: BLE001 (not every backend implements it)
    return None
  if stats is None:
    return None
  return max(int(stats.temp_size_in_bytes) + int(stats.output_size_in_bytes)
             - int(stats.alias_size_in_bytes), 0)


def gigabytes(n: int) -> str:
  """``n`` bytes as text: ``1.2 GB``, ``340 MB``."""
  if n >= 10 ** 9:
    return f"{n / 1e9:.1f} GB"
  return f"{max(n, 0) / 1e6:.0f} MB"


def rows_that_fit(rows: int, need: int, available: int) -> int:
  """A power of two of rows whose step would take at most 80% of ``available``.

  The step's memory grows about linearly with its rows.
  """
  fit = rows * 0.8 * available / max(need, 1)
  return 2 ** max(int(math.floor(math.log2(fit))), 0) if fit >= 1 else 1


def check_fits(compiled, devices: Sequence[Any], *, rows: int,
               full_batch: bool) -> None:
  """Raises :class:`InputError` if ``compiled`` cannot fit on ``devices``.

  Args:
    compiled: the training step, compiled (``jax.stages.Compiled``).
    devices: the devices it runs on (a CPU mesh's devices share the host's
      memory, so their needs add up).
    rows: examples per step (the batch).
    full_batch: whether the batch is the whole training set (the advice
      names ``--subset`` and ``--batch-size``; else ``--batch-size``).

  Raises:
    InputError: naming the memory needed and available, and the flags that
      make the step smaller.
  """
  need = program_bytes(compiled)
  available = available_bytes(devices[0])
  if need is None or available is None:
    return
  if devices[0].platform == "cpu":
    need *= len(devices)
  if need <= available:
    return
  fit = rows_that_fit(rows, need, available)
  where = ("host" if devices[0].platform == "cpu"
           else devices[0].device_kind)
  if full_batch:
    what = f"a full batch of {rows} examples"
    advice = (f"train on fewer examples with --subset N or in minibatches"
              f" with --batch-size B (about {fit} examples fit)")
  else:
    what = f"--batch-size {rows}"
    advice = f"use a smaller --batch-size (about {fit} fit)"
  raise InputError(
      f"{what} needs about {gigabytes(need)} for a training step, more than"
      f" the {gigabytes(available)} available on the {where}; {advice}")
