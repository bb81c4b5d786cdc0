"""What the bench scripts share: timing side by side, tables, JSON.

* :func:`side_by_side` times zero-argument callables in interleaved rounds
  (the order rotated each round) and divides each round's time by the same
  round's time of a base, so that a slow spell of a shared machine falls on
  both sides of a ratio. A :class:`Timing` holds the seconds and the ratios.
* :func:`markdown_table` and :func:`fmt` write the Markdown tables of
  ``bench/RESULTS.md``; :func:`write_json` saves a run.
* :func:`gmean`: the geometric mean the loss ratios are read from.

The scripts are run as ``python bench/NAME.py``, so this folder is on
``sys.path`` and they import ``from common import ...``. The benchmark
problems they share are in ``bench_problems.py``.
"""
from __future__ import annotations

import json
import math
import pathlib
import statistics
import time
from typing import Any, Callable, NamedTuple, Sequence


class Timing(NamedTuple):
  """One callable's times per round and their ratios to the base's."""
  seconds: list[float]  # one call per round
  ratios: list[float]  # this round's seconds / the base's in the same round

  @property
  def median(self) -> float:
    """Median seconds per call."""
    return statistics.median(self.seconds)

  @property
  def median_ratio(self) -> float:
    return statistics.median(self.ratios)

  @property
  def ratio_range(self) -> tuple[float, float]:
    return min(self.ratios), max(self.ratios)

  @property
  def ratio_quartiles(self) -> tuple[float, float, float]:
    """First quartile, median and third quartile of the ratios."""
    if len(self.ratios) < 2:
      r = self.ratios[0]
      return r, r, r
    q1, q2, q3 = statistics.quantiles(self.ratios, n=4)
    return q1, q2, q3


def median_ratio(t: Timing) -> float:
  return t.median_ratio


def ratio_range(t: Timing) -> tuple[float, float]:
  return t.ratio_range


def side_by_side(fns: dict[str, Callable[[], Any]], *, base: str,
                 rounds: int, warmup: int = 1) -> dict[str, Timing]:
  """Times each callable once per round, in interleaved, rotated rounds.

  Each callable takes no argument and must block until its result is ready
  (end with ``jax.block_until_ready``). Every callable is first called
  ``warmup`` times (compilation, first transients); then ``rounds`` rounds
  each time one call of every callable with :func:`time.perf_counter`, the
  order rotated by one each round so no callable always runs first.

  Args:
    fns: name -> callable; the order is the first round's.
    base: the name whose time is each round's denominator.
    rounds: timed rounds, at least 1.
    warmup: untimed calls of each callable before the rounds.

  Returns:
    name -> :class:`Timing` (the base's ratios are all 1).
  """
  if base not in fns:
    raise ValueError(f"base {base!r} is not among fns: {list(fns)}")
  if rounds < 1:
    raise ValueError(f"rounds must be >= 1, got {rounds}")
  if warmup < 0:
    raise ValueError(f"warmup must be >= 0, got {warmup}")
  names = list(fns)
  for _ in range(warmup):
    for name in names:
      fns[name]()
  seconds = {name: [] for name in names}
  for r in range(rounds):
    k = r % len(names)
    for name in names[k:] + names[:k]:
      start = time.perf_counter()
      fns[name]()
      seconds[name].append(time.perf_counter() - start)
  return {name: Timing(ts, [t / b for t, b in zip(ts, seconds[base])])
          for name, ts in seconds.items()}


def fmt(x: Any, digits: int = 3) -> str:
  """A table cell: ``digits`` decimals for floats (scientific when tiny or
  huge), ``-`` for None, ``str`` for anything else."""
  if x is None:
    return "-"
  if isinstance(x, bool) or not isinstance(x, float):
    return str(x)
  if not math.isfinite(x):
    return str(x)
  if x != 0 and not 1e-3 <= abs(x) < 1e6:
    return f"{x:.{max(digits - 1, 0)}e}"
  return f"{x:.{digits}f}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]], *,
                   align: str | None = None, digits: int = 3) -> str:
  """A Markdown table; cells through :func:`fmt`.

  ``align``: one letter per column, ``l`` (``---``) or ``r`` (``---:``);
  default all ``l``.
  """
  if align is not None and len(align) != len(header):
    raise ValueError(f"align {align!r} needs one letter per column "
                     f"({len(header)})")
  for i, row in enumerate(rows):
    if len(row) != len(header):
      raise ValueError(f"rows[{i}] has {len(row)} cells, header "
                       f"{len(header)}")
  rule = "|" + "|".join("---:" if a == "r" else "---"
                        for a in (align or "l" * len(header))) + "|"
  lines = ["| " + " | ".join(header) + " |", rule]
  lines += ["| " + " | ".join(fmt(c, digits) for c in row) + " |"
            for row in rows]
  return "\n".join(lines)


def write_json(path, obj, indent: int = 2) -> None:
  """Writes ``obj`` as JSON to ``path``, creating its folder."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  with open(path, "w") as f:
    json.dump(obj, f, indent=indent)


def gmean(xs) -> float:
  """Geometric mean of positive numbers."""
  xs = list(xs)
  return math.exp(sum(math.log(x) for x in xs) / len(xs))


def platform_line() -> str:
  """``jax VERSION on PLATFORM``: the first line of a timing table."""
  import jax  # pylint: disable=g-import-not-at-top
  return f"jax {jax.__version__} on {jax.devices()[0].platform}"
