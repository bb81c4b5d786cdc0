"""Reading compiled XLA programs: instructions, collectives, custom calls.

The text of an HLO module (``jax.jit(f).lower(...).compile().as_text()``)
holds one computation per block::

  %fused_computation (p.0: f32[8,4]) -> f32[8] { ... }
  ENTRY %main.12 (p.1: f32[8,4]) -> (f32[8], f32[]) {
    %p.1 = f32[8,4]{1,0} parameter(0)
    %all-reduce.3 = f32[8]{0} all-reduce(%fusion.2), replica_groups=[2,2]<=[4]
    ROOT %tuple.4 = (f32[8]{0}, f32[]) tuple(%all-reduce.3, %c.1)
  }

and one instruction per line: ``name = TYPE opcode(operands), attributes``,
where TYPE is an array type such as ``f32[8,4]{1,0}`` (dtype, dimensions,
layout) or a tuple of them. This module reads that text, line by line, for
what the sharding code, the compile-for-accelerators tests and the
benchmarks measure in a compiled program:

* :func:`instructions` and :func:`computations` parse the instructions
  (:class:`Instr`: name, result type, opcode, operand names, line), per
  computation; :func:`fused_computations` and :func:`multiplicities` say
  which computations are fusion bodies and how often each runs (loop bodies
  times XLA's ``known_trip_count``);
* :func:`arrays` and :func:`shape_bytes` read types;
* :func:`hlo_collectives` counts the collectives (all-reduce, all-gather,
  reduce-scatter, all-to-all, collective-permute), the bytes of their
  operands per device and what one device sends for each
  (:func:`wire_bytes`, from the replica groups' size, :func:`group_size`),
  with :func:`merge_async_copies` reading each TPU async collective once;
* :func:`custom_calls` and :func:`kernel_calls` count custom calls by
  target, and the Pallas kernels among them (Triton and Mosaic GPU on GPUs,
  Mosaic TPU).

Every reader takes the text and returns plain Python values; nothing here
needs a device or imports JAX.
"""
from __future__ import annotations

import math
import re
from collections.abc import Iterator
from typing import Any, NamedTuple

#: The collectives, by HLO opcode (an async one's ``-start`` counts as it).
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all",
               "collective-permute")
#: Short names of :data:`COLLECTIVES` for tables.
SHORT_NAMES = {"all-reduce": "AR", "all-gather": "AG", "reduce-scatter": "RS",
               "all-to-all": "A2A", "collective-permute": "CP"}
#: Opcodes that move data between the host and a device.
HOST_TRANSFER_OPS = ("send", "recv", "send-done", "recv-done", "infeed",
                     "outfeed")
#: Bytes per element of each HLO element type (sub-byte types count one
#: byte, ``token`` none); a type not listed is not counted.
DTYPE_BYTES = {
    "pred": 1, "s2": 1, "u2": 1, "s4": 1, "u4": 1, "s8": 1, "u8": 1,
    "f8e4m3fn": 1, "f8e5m2": 1, "f8e4m3": 1, "f8e3m4": 1, "f8e4m3b11fnuz": 1,
    "f8e4m3fnuz": 1, "f8e5m2fnuz": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2,
    "f32": 4, "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8, "c64": 8,
    "c128": 16, "token": 0}
#: Custom-call target substrings of compiled Pallas kernels, by backend:
#: Triton (``__gpu$xla.gpu.triton``) and Mosaic GPU (``mosaic_gpu_v2``) on
#: GPUs, Mosaic TPU (``tpu_custom_call``).
KERNEL_TARGETS = {"triton": "triton", "mosaic_gpu": "mosaic_gpu",
                  "tpu": "tpu_custom_call"}

_ARRAY_RE = re.compile(r"\b([a-z][a-z0-9]*)\[([0-9,]*)\]")
_HEAD_RE = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*")
_OPCODE_RE = re.compile(r"([a-z][\w\-]*)\(")
_TARGET_RE = re.compile(r'custom_call_target="([^"]*)"')
_COMMENT_RE = re.compile(r"/\*.*?\*/")


class Instr(NamedTuple):
  """One HLO instruction.

  Attributes:
    name: its name, without ``%``.
    shape: its result type as written, e.g. ``(f32[8]{0}, f32[])``.
    opcode: e.g. ``fusion``, ``all-reduce-start``, ``custom-call``.
    operands: the names of its operands, without ``%``.
    line: the whole line, attributes included.
  """
  name: str
  shape: str
  opcode: str
  operands: tuple[str, ...]
  line: str


class Module(NamedTuple):
  """An HLO module's instructions by computation.

  Attributes:
    computations: ``{computation name: [Instr, ...]}`` in text order.
    entry: the name of the ``ENTRY`` computation (None if there is none).
  """
  computations: dict[str, list[Instr]]
  entry: str | None


# ----------------------------------------------------------------------------
# Types.


def arrays(shape: str) -> list[tuple[str, tuple[int, ...]]]:
  """``[(dtype, dims), ...]`` of the arrays in a type string.

  ``arrays("(f32[8,4]{1,0}, s32[])") == [("f32", (8, 4)), ("s32", ())]``;
  element types not in :data:`DTYPE_BYTES` are left out.
  """
  return [(dtype, tuple(int(d) for d in dims.split(",") if d))
          for dtype, dims in _ARRAY_RE.findall(shape) if dtype in DTYPE_BYTES]


def shape_bytes(shape: str) -> int:
  """Bytes of the arrays in a type string (a tuple's elements summed)."""
  return sum(DTYPE_BYTES[d] * math.prod(dims) for d, dims in arrays(shape))


def _closing(text: str, start: int) -> int:
  """Index of the parenthesis closing the one at ``text[start]``."""
  depth = 0
  for i in range(start, len(text)):
    depth += {"(": 1, ")": -1}.get(text[i], 0)
    if depth == 0:
      return i
  return len(text)


def _operand_names(text: str) -> tuple[str, ...]:
  """Names in an operand list: ``%a, %b`` or ``f32[8]{0} %a, ...``."""
  text = _COMMENT_RE.sub("", text)
  if "%" in text:
    return tuple(re.findall(r"%([\w.\-]+)", text))
  names = []
  for item in re.split(r",(?![^\[{(]*[\]})])", text):
    if item.strip():
      names.append(item.split()[-1])
  return tuple(names)


# ----------------------------------------------------------------------------
# Instructions and computations.


def parse_instruction(line: str) -> Instr | None:
  """The instruction on one line of HLO text, or None if there is none."""
  head = _HEAD_RE.match(line)
  if not head:
    return None
  rest = line[head.end():]
  if rest.startswith("("):
    end = _closing(rest, 0) + 1
    shape, rest = rest[:end], rest[end:].lstrip()
  else:
    shape, _, rest = rest.partition(" ")
  op = _OPCODE_RE.match(rest)
  if not op:
    return None
  end = _closing(rest, op.end() - 1)
  return Instr(head.group(1), shape, op.group(1),
               _operand_names(rest[op.end():end]), line)


def instructions(hlo_text: str) -> Iterator[Instr]:
  """Every instruction of the text, in order, whatever its computation."""
  for line in hlo_text.splitlines():
    instr = parse_instruction(line)
    if instr is not None:
      yield instr


def _computation_name(line: str) -> tuple[str, bool] | None:
  """(name, is entry) of a computation's header line, else None."""
  if not line.endswith("{") or "->" not in line or line.startswith(" "):
    return None
  head = line.split(" (")[0].split()
  if not head:
    return None
  return head[-1].lstrip("%"), head[0] == "ENTRY"


def computations(hlo_text: str) -> Module:
  """The instructions of each computation (lines outside any are skipped)."""
  comps: dict[str, list[Instr]] = {}
  entry, current = None, None
  for line in hlo_text.splitlines():
    header = _computation_name(line)
    if header is not None:
      name, is_entry = header
      entry = name if is_entry else entry
      current = comps.setdefault(name, [])
      continue
    instr = parse_instruction(line) if current is not None else None
    if instr is not None:
      current.append(instr)
  return Module(comps, entry)


def called(instr: Instr) -> list[str]:
  """Computations an instruction calls: a fusion's ``calls=``, a loop's
  ``body=`` and ``condition=``, ``to_apply=``, a conditional's branches."""
  found = re.findall(
      r"\b(?:calls|body|condition|to_apply|true_computation"
      r"|false_computation)=%?([\w.\-]+)", instr.line)
  branches = re.search(r"branch_computations=\{([^}]*)\}", instr.line)
  if branches:
    found += [b.strip().lstrip("%") for b in branches.group(1).split(",")
              if b.strip()]
  return found


def fused_computations(module: Module) -> set[str]:
  """Names of the computations that are fusion bodies."""
  return {c for instrs in module.computations.values() for i in instrs
          if i.opcode == "fusion" for c in called(i)}


def trip_count(instr: Instr) -> int | None:
  """A ``while`` loop's ``known_trip_count`` (None where XLA records none)."""
  n = re.search(r'"known_trip_count":\{"n":"(\d+)"', instr.line)
  return int(n.group(1)) if n and instr.opcode == "while" else None


def multiplicities(module: Module) -> dict[str, int]:
  """``{computation: runs per execution}`` of the control flow from the entry.

  The entry runs once; the body and condition of a ``while`` loop run its
  :func:`trip_count` times its caller's (once where the count is not
  known); a ``call``'s callee and both branches of a ``conditional`` run as
  often as their caller. Fusion bodies and reducers (``to_apply``) are not
  control flow and are not listed.
  """
  if module.entry is None:
    return {}
  mult = {module.entry: 1}
  order = [module.entry]
  while order:
    caller = order.pop()
    for instr in module.computations.get(caller, []):
      if instr.opcode not in ("while", "call", "conditional"):
        continue
      k = trip_count(instr) or 1
      for callee in called(instr):
        if callee not in mult:
          mult[callee] = mult[caller] * k
          order.append(callee)
  return mult


# ----------------------------------------------------------------------------
# Custom calls.


def custom_calls(hlo_text: str) -> dict[str, int]:
  """``{custom-call target: number of calls}`` anywhere in the text."""
  out: dict[str, int] = {}
  for target in _TARGET_RE.findall(hlo_text):
    out[target] = out.get(target, 0) + 1
  return out


def kernel_calls(hlo_text: str) -> dict[str, int]:
  """``{backend: number of Pallas kernel calls}`` for each backend of
  :data:`KERNEL_TARGETS`: the custom calls whose target contains its
  substring (case-insensitive). A kernel left to Pallas' interpreter is
  plain HLO and counts nothing."""
  calls = custom_calls(hlo_text)
  return {backend: sum(n for t, n in calls.items() if key in t.lower())
          for backend, key in KERNEL_TARGETS.items()}


# ----------------------------------------------------------------------------
# Collectives.

_MESH_GROUPS_RE = re.compile(
    r"replica_groups=mesh\[([^\]]*)\](?:,\s*device_ids=\(\S*?\))?\s*"
    r"\{([^}]*)\}")
_LIST_GROUPS_RE = re.compile(r"replica_groups=\{\{([0-9,]*)\}")
_IOTA_GROUPS_RE = re.compile(r"replica_groups=\[([0-9,]+)\]<=")
_CHAIN_RE = re.compile(r'chain_id="([^"]*)"')
_LAYOUT_RE = re.compile(r"\{[^{}]*\}")
_GROUPS_RE = re.compile(r"replica_groups=(\S+(?:\s*\{[^}]*\})?)")


def collective_kind(opcode: str) -> str | None:
  """The collective of :data:`COLLECTIVES` an opcode is (sync, or the
  ``-start`` of an async pair), else None."""
  kind = opcode.removesuffix("-start")
  return kind if kind in COLLECTIVES else None


def group_size(line: str) -> int | None:
  """Devices per replica group of a collective's HLO line; None: unknown.

  Reads the three forms XLA prints: explicit lists ``{{0,1},{2,3}}``, iota
  ``[4,2]<=[8]`` (groups of the last size) and mesh axes
  ``mesh['axis_0'=4,'axis_1'=2] {'axis_1'}`` (the named axes' product).
  """
  m = _MESH_GROUPS_RE.search(line)
  if m:
    sizes = {k.strip().strip("'"): int(v) for k, v in
             (item.split("=") for item in m.group(1).split(",") if "=" in item)}
    names = [n.strip().strip("'") for n in m.group(2).split(",") if n.strip()]
    return math.prod(sizes.get(n, 1) for n in names)
  m = _LIST_GROUPS_RE.search(line)
  if m:
    return len([d for d in m.group(1).split(",") if d])
  m = _IOTA_GROUPS_RE.search(line)
  if m:
    return int(m.group(1).split(",")[-1])
  return None


def wire_bytes(kind: str, nbytes: int, group: int | None) -> int | None:
  """Bytes one device sends for a collective (bandwidth-optimal algorithms).

  ``nbytes`` is the operand size ``S`` per device and ``g`` the replica
  group's size: all-reduce ``2(g−1)/g·S`` (a ring's reduce-scatter then
  all-gather), all-gather ``(g−1)·S``, reduce-scatter and all-to-all
  ``(g−1)/g·S``, collective-permute ``S``. None where ``g`` is unknown.
  """
  if kind == "collective-permute":
    return nbytes
  if group is None:
    return None
  factor = {"all-reduce": 2 * (group - 1) / group,
            "all-gather": group - 1,
            "reduce-scatter": (group - 1) / group,
            "all-to-all": (group - 1) / group}[kind]
  return int(round(factor * nbytes))


def merge_async_copies(hlo_text: str) -> tuple[str, int]:
  """The HLO text with one copy of each TPU async collective; how many more.

  libtpu's async collective fusion runs a collective alongside compute by
  splitting its steps over several fusions: the one that starts it, the
  ``async_collective_fusion`` continuations that compute while it
  proceeds, and the one that ends it. Each holds the whole collective
  instruction (same channel, replica groups and shapes), tagged with one
  ``frontend_attributes={chain_id="N"}``, so read line by line a chain of k
  fusions is k collectives. This keeps the first line of each chain (by
  chain id, opcode, result shape without layout and replica groups); every
  other line, including all of a program without chain ids (GPU, CPU), is
  kept as it is.
  """
  seen, out, dropped = set(), [], 0
  for line in hlo_text.splitlines():
    chain = _CHAIN_RE.search(line)
    instr = parse_instruction(line) if chain else None
    if instr is not None and collective_kind(instr.opcode):
      groups = _GROUPS_RE.search(line)
      key = (chain.group(1), instr.opcode, _LAYOUT_RE.sub("", instr.shape),
             groups.group(1) if groups else None)
      if key in seen:
        dropped += 1
        continue
      seen.add(key)
    out.append(line)
  return "\n".join(out), dropped


def _collective_op(kind: str, instr: Instr, shapes: dict[str, str]) -> dict:
  """``{"kind", "bytes", "group", "wire_bytes", "operands"}`` of one."""
  operand_shapes = " ".join(shapes.get(o, "") for o in instr.operands)
  nbytes = shape_bytes(operand_shapes)
  group = None if kind == "collective-permute" else group_size(instr.line)
  return {"kind": kind, "bytes": nbytes, "group": group,
          "wire_bytes": wire_bytes(kind, nbytes, group),
          "operands": [f"{d}[{','.join(map(str, dims))}]"
                       for d, dims in arrays(operand_shapes) if dims]}


def _host_callback(instr: Instr) -> str | None:
  """The target of a custom call into the host (a Python callback)."""
  if instr.opcode != "custom-call":
    return None
  target = _TARGET_RE.search(instr.line)
  target = target.group(1) if target else ""
  low = target.lower()
  return target if "callback" in low or "host" in low else None


def hlo_collectives(hlo_text: str, *, merge_async: bool = True
                    ) -> dict[str, Any]:
  """Collectives and host transfers in an HLO module's text.

  Counts every collective (``all-reduce``, ``all-gather``,
  ``reduce-scatter``, ``all-to-all``, ``collective-permute``, sync or the
  ``-start`` of an async pair) and sums the bytes of its operands, per
  device. A collective inside a loop body is counted once, and so is a TPU
  async collective whose steps libtpu spread over several fusions
  (:func:`merge_async_copies`; ``merge_async=False`` counts every line).

  Returns:
    ``{"count": {kind: n}, "bytes": {kind: b}, "total_bytes": b,
    "wire_bytes": {kind: b}, "non_scalar": [(kind, "f32[16,32]"), ...],
    "ops": [...], "host_transfers": [...], "callbacks": [...]}``:
    ``non_scalar`` lists every operand of rank ≥ 1 of a collective (a tuple
    all-reduce contributes one entry per operand); ``ops`` has one
    ``{"kind", "bytes", "group", "wire_bytes"}`` per collective, with the
    devices per replica group (None where the text does not say) and the
    bytes one device sends with bandwidth-optimal algorithms (see
    :func:`wire_bytes`, summed per kind where the group is known);
    ``host_transfers`` the send/recv/infeed/outfeed instructions and
    ``callbacks`` the custom calls into the host (Python callbacks).
  """
  if merge_async:
    hlo_text, _ = merge_async_copies(hlo_text)
  instrs = list(instructions(hlo_text))
  shapes = {i.name: i.shape for i in instrs}
  count = {k: 0 for k in COLLECTIVES}
  nbytes = {k: 0 for k in COLLECTIVES}
  wire = {k: 0 for k in COLLECTIVES}
  non_scalar, host, callbacks, ops = [], [], [], []
  for instr in instrs:
    kind = collective_kind(instr.opcode)
    if kind:
      op = _collective_op(kind, instr, shapes)
      count[kind] += 1
      nbytes[kind] += op["bytes"]
      wire[kind] += op["wire_bytes"] or 0
      non_scalar += [(kind, s) for s in op.pop("operands")]
      ops.append(op)
    elif (instr.opcode in HOST_TRANSFER_OPS
          or "is_host_transfer=true" in instr.line):
      host.append(instr.name)
    elif _host_callback(instr) is not None:
      callbacks.append(_host_callback(instr))
  return {"count": count, "bytes": nbytes,
          "total_bytes": sum(nbytes.values()), "wire_bytes": wire,
          "non_scalar": non_scalar, "ops": ops,
          "host_transfers": host, "callbacks": callbacks}
