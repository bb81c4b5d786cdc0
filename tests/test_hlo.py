"""cdat_fast.hlo: reading compiled HLO text.

Literal HLO modules with known collectives, custom calls, loops and fusions,
whose counts and bytes are worked out by hand in each test, and programs
compiled here on the CPU (one device; the collectives of sharded steps on 8
fake devices are read in ``tests/sharding_checks.py``).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cdat_fast import hlo, sharding

# One module of each construct the readers handle: an all-gather of a
# parameter over groups of 2, a tuple all-reduce (no groups given), an async
# collective-permute, a host callback, a loop with a known trip count whose
# body holds a fusion and an all-reduce over iota groups of 4, a
# conditional with two branches, and kernel and library custom calls.
MODULE = """\
HloModule m, entry_computation_layout={(f32[16,8]{1,0})->f32[]}

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %s = f32[] add(%a, %b)
}

%fused_mul (p0: f32[64]) -> f32[64] {
  %p0 = f32[64]{0} parameter(0)
  ROOT %m = f32[64]{0} multiply(%p0, %p0)
}

%body (t: (s32[], f32[64])) -> (s32[], f32[64]) {
  %t = (s32[], f32[64]{0}) parameter(0)
  %x = f32[64]{0} get-tuple-element(%t), index=1
  %f = f32[64]{0} fusion(%x), kind=kLoop, calls=%fused_mul
  %ar2 = f32[64]{0} all-reduce(%f), replica_groups=[2,4]<=[8], to_apply=%add
  %i = s32[] get-tuple-element(%t), index=0
  ROOT %r = (s32[], f32[64]{0}) tuple(%i, %ar2)
}

%cond (t.1: (s32[], f32[64])) -> pred[] {
  %t.1 = (s32[], f32[64]{0}) parameter(0)
  ROOT %lt = pred[] constant(true)
}

%yes (y: f32[]) -> f32[] {
  ROOT %y = f32[] parameter(0)
}

%no (n: f32[]) -> f32[] {
  %n = f32[] parameter(0)
  ROOT %k = f32[] custom-call(%n), custom_call_target="__gpu$xla.gpu.triton"
}

ENTRY %main (p: f32[16,8]) -> f32[] {
  %p = f32[16,8]{1,0} parameter(0)
  %s.1 = f32[] parameter(1)
  %ag = f32[32,8]{1,0} all-gather(%p), replica_groups={{0,1}}, dimensions={0}
  %ar = (f32[16,8]{1,0}, f32[]) all-reduce(%p, /*index=1*/%s.1), to_apply=%add
  %cp-start = (f32[], f32[]) collective-permute-start(%s.1), channel_id=2
  %cp-done = f32[] collective-permute-done(%cp-start)
  %cb = () custom-call(%s.1), custom_call_target="xla_ffi_python_cpu_callback"
  %t0 = (s32[], f32[64]{0}) parameter(2)
  %w = (s32[], f32[64]{0}) while(%t0), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"5"}}
  %q = pred[] parameter(3)
  %c = f32[] conditional(%q, %s.1, %s.1), branch_computations={%yes, %no}
  %k1 = f32[8]{0} custom-call(%c), custom_call_target="__gpu$xla.gpu.triton"
  %k2 = f32[8]{0} custom-call(%c), custom_call_target="mosaic_gpu_v2"
  %g = f32[8,8]{1,0} custom-call(%p), custom_call_target="__cublas$gemm"
  ROOT %out = f32[] add(%c, %s.1)
}
"""


def test_types_are_read_as_arrays_and_bytes():
  assert hlo.arrays("(f32[8,4]{1,0}, bf16[3], pred[], token[])") == [
      ("f32", (8, 4)), ("bf16", (3,)), ("pred", ()), ("token", ())]
  # 8*4*4 + 3*2 + 1 + 0
  assert hlo.shape_bytes("(f32[8,4]{1,0}, bf16[3], pred[], token[])") == 135
  assert hlo.shape_bytes("f32[1024,256]{1,0:T(8,128)S(1)}") == 1024 * 256 * 4
  assert hlo.shape_bytes("opaque[]") == 0


def test_an_instruction_line_is_parsed():
  instr = hlo.parse_instruction(
      "  ROOT %ar = (f32[16,8]{1,0}, f32[]) all-reduce(%p, /*index=1*/%s.1),"
      " to_apply=%add")
  assert instr == hlo.Instr("ar", "(f32[16,8]{1,0}, f32[])", "all-reduce",
                            ("p", "s.1"), instr.line)
  # Operands printed with their types and without %.
  bare = hlo.parse_instruction(
      "x.2 = f32[4]{0} add(f32[4]{0} x.0, f32[4]{0} x.1)")
  assert (bare.name, bare.opcode, bare.operands) == ("x.2", "add",
                                                     ("x.0", "x.1"))
  assert hlo.parse_instruction("ENTRY %main (p: f32[2]) -> f32[2] {") is None
  assert hlo.parse_instruction("}") is None


def test_computations_fusions_and_multiplicities():
  module = hlo.computations(MODULE)
  assert module.entry == "main"
  assert set(module.computations) == {"add", "fused_mul", "body", "cond",
                                      "yes", "no", "main"}
  assert [i.opcode for i in module.computations["body"]] == [
      "parameter", "get-tuple-element", "fusion", "all-reduce",
      "get-tuple-element", "tuple"]
  assert hlo.fused_computations(module) == {"fused_mul"}
  # The loop body and condition run 5 times, both branches once; fusion
  # bodies and reducers are not control flow.
  assert hlo.multiplicities(module) == {"main": 1, "body": 5, "cond": 5,
                                        "yes": 1, "no": 1}
  loop = [i for i in module.computations["main"] if i.opcode == "while"][0]
  assert hlo.trip_count(loop) == 5


def test_custom_and_kernel_calls_are_counted():
  assert hlo.custom_calls(MODULE) == {
      "__gpu$xla.gpu.triton": 2, "xla_ffi_python_cpu_callback": 1,
      "mosaic_gpu_v2": 1, "__cublas$gemm": 1}
  assert hlo.kernel_calls(MODULE) == {"triton": 2, "mosaic_gpu": 1, "tpu": 0}
  assert hlo.kernel_calls('custom_call_target="tpu_custom_call"')["tpu"] == 1


def test_collectives_their_bytes_and_what_is_sent():
  stats = hlo.hlo_collectives(MODULE)
  assert stats["count"] == {"all-reduce": 2, "all-gather": 1,
                            "reduce-scatter": 0, "all-to-all": 0,
                            "collective-permute": 1}
  assert stats["bytes"]["all-gather"] == 16 * 8 * 4
  # The tuple all-reduce (512 + 4) and the loop's (64 floats, counted once).
  assert stats["bytes"]["all-reduce"] == 16 * 8 * 4 + 4 + 64 * 4
  assert stats["bytes"]["collective-permute"] == 4
  assert stats["total_bytes"] == 512 + 772 + 4
  # In text order: the loop body comes before the entry.
  assert stats["non_scalar"] == [("all-reduce", "f32[64]"),
                                 ("all-gather", "f32[16,8]"),
                                 ("all-reduce", "f32[16,8]")]
  assert stats["callbacks"] == ["xla_ffi_python_cpu_callback"]
  assert stats["host_transfers"] == []
  # Groups of 2: an all-gather sends its operand once. The tuple
  # all-reduce's groups are not given; the loop's are groups of 4:
  # 2·3/4·256 bytes. A collective-permute sends its operand.
  ops = {(op["kind"], op["bytes"]): op for op in stats["ops"]}
  assert ops[("all-gather", 512)] == {"kind": "all-gather", "bytes": 512,
                                      "group": 2, "wire_bytes": 512}
  assert ops[("all-reduce", 516)]["wire_bytes"] is None
  assert ops[("all-reduce", 256)]["group"] == 4
  assert stats["wire_bytes"]["all-reduce"] == 384
  assert stats["wire_bytes"]["collective-permute"] == 4


@pytest.mark.parametrize("kind,group,sent", [
    ("all-reduce", 4, 1536), ("all-gather", 4, 3072),
    ("reduce-scatter", 4, 768), ("all-to-all", 8, 896),
    ("collective-permute", None, 1024), ("all-reduce", None, None)])
def test_wire_bytes(kind, group, sent):
  assert hlo.wire_bytes(kind, 1024, group) == sent


@pytest.mark.parametrize("groups,size", [
    ("replica_groups={{0,1,2,3},{4,5,6,7}}", 4),
    ("replica_groups=[4,2]<=[8]", 2),
    ("replica_groups=mesh['axis_0'=4,'axis_1'=2] {'axis_1'}", 2),
    ("replica_groups=mesh['axis_0'=4,'axis_1'=1,'axis_2'=2],"
     " device_ids=([2,4]T(1,0)) {'axis_0'}", 4),
    ("replica_groups=mesh['axis_0'=4,'axis_1'=4] {'axis_0','axis_1'}", 16)])
def test_replica_groups_are_read(groups, size):
  text = ("%p = f32[64]{0} parameter(0)\n"
          f"%r = f32[64]{{0}} all-reduce(%p), {groups}, to_apply=%add")
  op = hlo.hlo_collectives(text)["ops"][0]
  assert op["group"] == size
  assert op["wire_bytes"] == round(2 * (size - 1) / size * 256)


def test_merge_async_copies_counts_each_chain_once():
  # libtpu's async collective fusion puts the whole collective in the
  # fusion that starts it, in each continuation and in the one that ends
  # it, all tagged with one chain_id; a sync collective has none.
  ag = ("  %all-gather.{n} = f32[1024,256]{{1,0:T(8,128){s}}} all-gather("
        "%p.{n}), channel_id=40, replica_groups=mesh['axis_0'=4,'axis_1'=4]"
        " {{'axis_0'}}, dimensions={{0}}, frontend_attributes={{chain_id="
        '"{c}"}}')
  text = "\n".join([
      "%start (p.1: f32[256,256]) -> f32[1024,256] {",
      "  %p.1 = f32[256,256]{1,0} parameter(0)",
      ag.format(n=1, s="", c=51), "}",
      "%continuation (p.2: f32[256,256]) -> f32[1024,256] {",
      "  %p.2 = f32[256,256]{1,0} parameter(0)",
      ag.format(n=2, s="S(1)", c=51), "}",
      "%done (p.3: f32[256,256]) -> f32[1024,256] {",
      "  %p.3 = f32[256,256]{1,0} parameter(0)",
      ag.format(n=3, s="", c=51), "}",
      "%other (p.4: f32[256,256]) -> f32[1024,256] {",
      "  %p.4 = f32[256,256]{1,0} parameter(0)",
      ag.format(n=4, s="", c=52), "}",
      "ENTRY %main (p.5: f32[256,256]) -> f32[1024,256] {",
      "  %p.5 = f32[256,256]{1,0} parameter(0)",
      "  ROOT %all-gather.5 = f32[1024,256]{1,0} all-gather(%p.5),"
      " replica_groups=[4,4]<=[16], dimensions={0}", "}"])
  raw = hlo.hlo_collectives(text, merge_async=False)
  assert raw["count"]["all-gather"] == 5
  assert hlo.hlo_collectives(text)["count"]["all-gather"] == 3
  merged, dropped = hlo.merge_async_copies(text)
  stats = hlo.hlo_collectives(merged)
  assert dropped == 2
  assert stats["count"]["all-gather"] == 3  # chains 51, 52 and the sync one
  assert stats["total_bytes"] == 3 * 256 * 256 * 4
  no_chains = text.replace("chain_id", "other_id")
  assert hlo.merge_async_copies(no_chains) == (no_chains, 0)


def test_a_compiled_program_is_read():
  def f(x):
    y = jax.lax.fori_loop(0, 7, lambda i, v: jnp.sin(v) @ v, x)
    z = jax.pure_callback(lambda a: np.asarray(a) * 2,
                          jax.ShapeDtypeStruct(x.shape, x.dtype), y)
    return z.sum()

  text = jax.jit(f).lower(jnp.ones((4, 4))).compile().as_text()
  module = hlo.computations(text)
  instrs = [i for c in module.computations.values() for i in c]
  assert "dot" in {i.opcode for i in instrs}
  # The loop's computations run 7 times (XLA records the trip count).
  assert 7 in hlo.multiplicities(module).values()
  stats = hlo.hlo_collectives(text)
  assert sum(stats["count"].values()) == 0
  assert len(stats["callbacks"]) == 1
  assert hlo.kernel_calls(text) == {"triton": 0, "mosaic_gpu": 0, "tpu": 0}


def test_sharding_keeps_the_readers_importable():
  assert sharding.hlo_collectives is hlo.hlo_collectives
  assert sharding.merge_async_copies is hlo.merge_async_copies
  assert sharding.COLLECTIVES == hlo.COLLECTIVES
