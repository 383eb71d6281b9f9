"""FLOPs, collectives and memory read from compiled programs on 8 simulated devices."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from passes import hlo_stats, memory
from passes.hlo_stats import Collective, analyze_hlo


def _mesh(shape, names):
  return Mesh(np.array(jax.devices()[:int(np.prod(shape))]).reshape(shape), names)


def _sds(shape, mesh, spec, dtype=jnp.float32):
  return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, spec))


# ------------------------------------------------------------------ real programs

def test_scan_of_matmuls_counts_every_iteration():
  mesh = _mesh((8,), ("d",))
  b, d, n = 64, 32, 5
  def f(x, ws):
    return jax.lax.scan(lambda h, w: (h @ w, None), x, ws)[0]
  compiled = jax.jit(f).lower(_sds((b, d), mesh, P("d")), _sds((n, d, d), mesh, P())).compile()
  one = 2 * (b // 8) * d * d  # per device: each holds b/8 rows
  stats = analyze_hlo(compiled.as_text())
  assert stats.flops == n * one
  assert stats.collectives == () and stats.unknown_trip_counts == 0
  xla_flops, xla_bytes = hlo_stats.xla_cost_analysis(compiled)
  assert one <= xla_flops < 1.1 * one and xla_bytes > 0  # XLA counts the loop body once


def test_nested_scans_multiply():
  mesh = _mesh((8,), ("d",))
  def f(x, ws):  # ws: [outer=3, inner=4, d, d]
    def outer(h, w4):
      return jax.lax.scan(lambda g, w: (jnp.tanh(g @ w), None), h, w4)[0], None
    return jax.lax.scan(outer, x, ws)[0]
  compiled = jax.jit(f).lower(_sds((16, 8), mesh, P("d")), _sds((3, 4, 8, 8), mesh, P())).compile()
  assert analyze_hlo(compiled.as_text()).flops == 12 * 2 * 2 * 8 * 8


def test_psum_in_scan_counts_trip_count_group_and_bytes():
  mesh = _mesh((2, 4), ("a", "b"))
  def inner(x):  # x: this device's [4, 8] block
    return jax.lax.scan(lambda c, _: (c + jax.lax.psum(c * 2, "b"), None), x, None, length=3)[0]
  f = jax.jit(jax.shard_map(inner, mesh=mesh, in_specs=P("a", "b"), out_specs=P("a", "b")))
  stats = analyze_hlo(f.lower(_sds((8, 32), mesh, P("a", "b"))).compile().as_text())
  (c,) = stats.collectives
  assert (c.kind, c.group_size, c.count, c.bytes) == ("all-reduce", 4, 3, 4 * 8 * 4)
  assert sorted(c.groups) == [(0, 1, 2, 3), (4, 5, 6, 7)]
  assert stats.bytes_by_kind() == {"all-reduce": 3 * 128} and stats.comm_bytes == 384


def test_all_gather_from_a_replicating_constraint():
  mesh = _mesh((8,), ("d",))
  def f(x):
    return jax.lax.with_sharding_constraint(x * 2, NamedSharding(mesh, P())) + 1
  stats = analyze_hlo(jax.jit(f).lower(_sds((64, 16), mesh, P("d"))).compile().as_text())
  gathers = [c for c in stats.collectives if c.kind == "all-gather"]
  assert gathers and {c.kind for c in stats.collectives} == {"all-gather"}
  assert max(c.bytes for c in gathers) == 64 * 16 * 4  # the full replicated array
  assert all(c.group_size == 8 and c.count == 1 for c in gathers)


def test_memory_stats_of_a_sharded_array():
  mesh = _mesh((8,), ("d",))
  x = _sds((64, 32), mesh, P("d"))
  shard = 64 * 32 * 4 // 8
  m = memory.memory_stats(jax.jit(lambda x: x * 2).lower(x).compile())
  assert (m.argument, m.output, m.alias) == (shard, shard, 0)
  assert m.total == m.argument + m.output - m.alias + m.temp
  donated = memory.memory_stats(jax.jit(lambda x: x * 2, donate_argnums=0).lower(x).compile())
  assert donated.alias == shard and donated.total == shard + donated.temp
  assert "\n" not in repr(m) and repr(m).startswith("MemoryStats(total=")
  with pytest.raises(ValueError, match=r"MemoryStats.temp must be a non-negative int, got -1"):
    memory.MemoryStats(1, 1, 0, -1)
  class NoAnalysis:
    def memory_analysis(self):
      return None
  with pytest.raises(ValueError, match="returned no memory_analysis"):
    memory.memory_stats(NoAnalysis())


def test_kernels_move_what_they_touch():
  x = jax.ShapeDtypeStruct((1024, 256), jnp.float32)  # 1 MiB
  ew = analyze_hlo(jax.jit(lambda x: x * 2 + 1).lower(x).compile().as_text())
  assert ew.kernels == (hlo_stats.Kernel(flops=0, bytes=2 * 2**20, count=1),)  # read once, write once

  row = 4096 * 4
  buf = jax.ShapeDtypeStruct((16, 4096), jnp.float32)

  def read_rows(b):  # a loop reading one row per trip: a slice, not the whole buffer
    return jax.lax.fori_loop(0, 16, lambda i, acc: acc + jnp.sin(jax.lax.dynamic_index_in_dim(b, i, keepdims=False)),
                             jnp.zeros(4096))

  def write_rows(b):  # a loop updating one row in place per trip
    return jax.lax.fori_loop(0, 16, lambda i, acc: jax.lax.dynamic_update_index_in_dim(acc, jnp.cos(acc[i]), i, 0), b)

  for fn, per_trip in ((read_rows, 3 * row), (write_rows, 2 * row)):  # (+ a 4-byte index)
    stats = analyze_hlo(jax.jit(fn, donate_argnums=0 if fn is write_rows else ()).lower(buf).compile().as_text())
    body = max(stats.kernels, key=lambda k: k.bytes)
    assert body.count == 16 and per_trip <= body.bytes <= per_trip + 64, stats.kernels
    assert stats.kernel_bytes < 16 * 4096 * 4 * 4  # far from the whole buffer on every trip
  # XLA:CPU updates a bf16 buffer as convert(dynamic-update-slice(convert(buffer))): still in place
  text = jax.jit(write_rows, donate_argnums=0).lower(jax.ShapeDtypeStruct((16, 4096), jnp.bfloat16)).compile().as_text()
  stats = analyze_hlo(text)
  update = [k for k in stats.kernels if "dynamic-update-slice" in text and k.count == 16 and k.bytes > 64]
  # the update fusion moves a row each way (f32 after the converts); XLA:CPU's copy of the
  # loop-carried buffer on every trip is a real copy and is charged as one
  assert any(k.bytes <= 2 * 4096 * 4 + 64 for k in update), stats.kernels
  assert all(k.bytes in (range(2 * 4096 * 2, 2 * 4096 * 4 + 65)) or k.bytes == 2 * 16 * 4096 * 2 for k in update)

  # a conditional is charged its costlier branch
  big = jax.ShapeDtypeStruct((1 << 18,), jnp.float32)
  cond = analyze_hlo(jax.jit(lambda p, x: jax.lax.cond(p, lambda x: jnp.sin(x) * 2, lambda x: x[:8].sum() + x, x))
                     .lower(jax.ShapeDtypeStruct((), jnp.bool_), big).compile().as_text())
  assert cond.kernel_bytes >= 2 * (1 << 18) * 4

  # a dot's FLOPs are in its kernel, collectives are not kernels (the ring model charges them)
  mesh = _mesh((8,), ("d",))
  w = _sds((64, 64), mesh, P())
  xs = _sds((256, 64), mesh, P("d"))
  grad = analyze_hlo(jax.jit(jax.grad(lambda w, x: jnp.sum(x @ w))).lower(w, xs).compile().as_text())
  assert sum(k.flops * k.count for k in grad.kernels) == grad.flops > 0 and grad.collectives


def test_cpu_dot_scratch_charges_the_largest_unfused_dot():
  # A weight gradient x.T @ g contracts the left operand on dim 0: XLA:CPU runs it as an Eigen
  # contraction outside any fusion; the canonical x @ w goes into a YNNPACK fusion.
  x = jax.ShapeDtypeStruct((1024, 128), jnp.float32)
  g = jax.ShapeDtypeStruct((1024, 512), jnp.float32)
  w = jax.ShapeDtypeStruct((128, 512), jnp.float32)
  grad = jax.jit(lambda x, g: x.T @ g).lower(x, g).compile()
  dots = hlo_stats.unfused_dots(grad.as_text())
  assert [(d.m, d.n, d.k, d.dtype_bytes) for d in dots] == [(128, 512, 1024, 4)]
  plain = memory.memory_stats(grad)
  cpu = memory.memory_stats(grad, "cpu")
  assert plain.scratch == 0 and cpu.scratch == 2 * 256 * (128 + 512) * 4  # k capped at Eigen's 256 block
  assert cpu.total == plain.total + cpu.scratch and "scratch=" in repr(cpu)
  assert memory.memory_stats(grad, "gpu").scratch == 0
  fwd = jax.jit(lambda x, w: x @ w).lower(x, w).compile()
  assert memory.cpu_dot_scratch(fwd.as_text()) == 0, hlo_stats.unfused_dots(fwd.as_text())

  # one inside a loop body is found too; k below the block size is charged as it is
  def loop(x, g):
    return jax.lax.fori_loop(0, 3, lambda i, acc: acc + x[:64].T @ g[:64], jnp.zeros((128, 512)))
  looped = jax.jit(loop).lower(x, g).compile()
  assert memory.cpu_dot_scratch(looped.as_text()) == 2 * 64 * (128 + 512) * 4
  with pytest.raises(ValueError, match=r"MemoryStats.scratch must be a non-negative int, got -1"):
    memory.MemoryStats(1, 1, 0, 0, -1)
  with pytest.raises(TypeError, match="unfused_dots takes the HLO text"):
    hlo_stats.unfused_dots(grad)


# ------------------------------------------------------------------ literal HLO

def _module(*body, header="num_partitions=8", extra=""):
  lines = "\n".join("  " + l for l in body)
  return (f"HloModule m, is_scheduled=true, {header}\n\n%add (x: f32[], y: f32[]) -> f32[] {{\n"
          "  %x = f32[] parameter(0)\n  %y = f32[] parameter(1)\n  ROOT %s = f32[] add(%x, %y)\n}\n\n"
          f"{extra}ENTRY %main (p: f32[16,8]) -> f32[16,8] {{\n  %p = f32[16,8]{{1,0}} parameter(0)\n{lines}\n}}\n")


def _one(rg: str) -> Collective:
  (c,) = analyze_hlo(_module(f"ROOT %ar = f32[16,8]{{1,0}} all-reduce(%p), channel_id=1, replica_groups={rg}, "
                             "use_global_device_ids=true, to_apply=%add")).collectives
  return c


@pytest.mark.parametrize("rg, groups", [
    ("{{0,1},{2,3},{4,5},{6,7}}", [(0, 1), (2, 3), (4, 5), (6, 7)]),
    ("{}", [tuple(range(8))]),
    ("[4,2]<=[2,4]T(1,0)", [(0, 4), (1, 5), (2, 6), (3, 7)]),
    ("[2,4]<=[8]", [(0, 1, 2, 3), (4, 5, 6, 7)]),
    ("mesh['axis_0'=2,'axis_1'=4] {'axis_1'}", [(0, 1, 2, 3), (4, 5, 6, 7)]),
    ("mesh['axis_0'=2,'axis_1'=4] {'axis_0'}", [(0, 4), (1, 5), (2, 6), (3, 7)]),
    ("mesh['axis_0'=1,'axis_1'=4,'axis_2'=2], device_ids=([2,4]T(1,0)) {'axis_1'}", [(0, 1, 2, 3), (4, 5, 6, 7)]),
    ("mesh['axis_0'=2,'axis_1'=4] {'axis_1':(1)2}", [(0, 2), (1, 3), (4, 6), (5, 7)]),
    ("mesh['axis_0'=2,'axis_1'=4] {'axis_0','axis_1'}", [tuple(range(8))]),
    ("mesh['axis_0'=2,'axis_1'=4] {}", [(i,) for i in range(8)]),
])
def test_replica_group_spellings(rg, groups):
  c = _one(rg)
  assert sorted(tuple(sorted(g)) for g in c.groups) == groups
  assert (c.kind, c.bytes, c.group_size, c.count) == ("all-reduce", 16 * 8 * 4, len(groups[0]), 1)


def test_async_pairs_count_once_with_the_done_result():
  stats = analyze_hlo(_module(
      "%ags = (f32[16,8]{1,0}, f32[64,8]{1,0}) all-gather-start(%p), channel_id=1, replica_groups=[2,4]<=[8], "
      "dimensions={0}, use_global_device_ids=true",
      "%agd = f32[64,8]{1,0} all-gather-done(%ags)",
      "%ars = f32[16,8]{1,0} all-reduce-start(%p), channel_id=2, replica_groups={{0,1},{2,3},{4,5},{6,7}}, to_apply=%add",
      "%ard = f32[16,8]{1,0} all-reduce-done(%ars)",
      "%cps = (f32[16,8]{1,0}, f32[16,8]{1,0}, u32[], u32[]) collective-permute-start(%p), channel_id=3, "
      "source_target_pairs={{0,4},{4,0}}",
      "%cpd = f32[16,8]{1,0} collective-permute-done(%cps)",
      "%rss = ((f32[16,8]{1,0}), f32[4,8]{1,0}) async-start(%p), calls=%rs_wrapped",
      "%rsd = f32[4,8]{1,0} async-done(%rss), calls=%rs_wrapped",
      "ROOT %t = (f32[64,8]{1,0}, f32[16,8]{1,0}) tuple(%agd, %ard)",
      extra=("%rs_wrapped (a: f32[16,8]) -> f32[4,8] {\n  %a = f32[16,8]{1,0} parameter(0)\n"
            "  ROOT %rs = f32[4,8]{1,0} reduce-scatter(%a), channel_id=4, replica_groups=[2,4]<=[8], "
            "dimensions={0}, to_apply=%add\n}\n\n")))
  got = {(c.kind, c.bytes, c.group_size, c.count) for c in stats.collectives}
  assert got == {("all-gather", 64 * 8 * 4, 4, 1), ("all-reduce", 512, 2, 1),
                 ("collective-permute", 512, 2, 1), ("reduce-scatter", 4 * 8 * 4, 4, 1)}
  assert len(stats.collectives) == 4
  (cp,) = [c for c in stats.collectives if c.kind == "collective-permute"]
  assert cp.groups == ((0, 4), (4, 0))


def test_gemm_custom_call_conditional_unknown_loop_and_tuple_bytes():
  body = ("%body (bp: (s32[], f32[16,8])) -> (s32[], f32[16,8]) {\n"
          "  %bp = (s32[], f32[16,8]{1,0}) parameter(0)\n"
          "  %bx = f32[16,8]{1,0} get-tuple-element(%bp), index=1\n"
          "  %w = f32[8,8]{1,0} constant({...})\n"
          "  %g = (f32[16,8]{1,0}, s8[1024]{0}) custom-call(%bx, %w), custom_call_target=\"__cublas$gemm\", "
          "backend_config={\"gemm_backend_config\":{\"dot_dimension_numbers\":{\"lhs_contracting_dimensions\":[\"1\"],"
          "\"rhs_contracting_dimensions\":[\"0\"],\"lhs_batch_dimensions\":[],\"rhs_batch_dimensions\":[]}}}\n"
          "  %i = s32[] get-tuple-element(%bp), index=0\n"
          "  %ar2 = (f32[16,8]{1,0}, bf16[4]{0}) all-reduce(%bx, %bx), replica_groups={}, to_apply=%add\n"
          "  ROOT %r = (s32[], f32[16,8]{1,0}) tuple(%i, %bx)\n}\n\n"
          "%cond (cp: (s32[], f32[16,8])) -> pred[] {\n  %cp = (s32[], f32[16,8]{1,0}) parameter(0)\n"
          "  ROOT %lt = pred[] constant(true)\n}\n\n"
          "%big (a1: f32[16,8]) -> f32[16,16] {\n  %a1 = f32[16,8]{1,0} parameter(0)\n"
          "  ROOT %d1 = f32[16,16]{1,0} dot(%a1, %a1), lhs_contracting_dims={1}, rhs_contracting_dims={1}\n}\n\n"
          "%small (a2: f32[16,8]) -> f32[16,16] {\n  %a2 = f32[16,8]{1,0} parameter(0)\n"
          "  ROOT %d2 = f32[16,16]{1,0} broadcast(%a2), dimensions={}\n}\n\n")
  stats = analyze_hlo(_module(
      "%z = s32[] constant(0)",
      "%t0 = (s32[], f32[16,8]{1,0}) tuple(%z, %p)",
      "%wh = (s32[], f32[16,8]{1,0}) while(%t0), condition=%cond, body=%body",
      "%k = s32[] constant(1)",
      "%cd = f32[16,16]{1,0} conditional(%k, %p, %p), branch_computations={%small, %big}",
      "ROOT %o = f32[16,8]{1,0} copy(%p)", extra=body))
  assert stats.unknown_trip_counts == 1  # no known_trip_count: the body counted once
  assert stats.flops == 2 * 16 * 8 * 8 + 2 * 16 * 16 * 8  # the gemm + the costlier branch
  (c,) = stats.collectives
  assert (c.bytes, c.group_size) == (16 * 8 * 4 + 4 * 2, 8)  # tuple result summed; {} = all 8


def test_shape_bytes_and_errors():
  assert hlo_stats.shape_bytes("bf16[4,8]{1,0}") == 64
  assert hlo_stats.shape_bytes("(s32[], f32[2]{0}, /*index=2*/pred[3])") == 4 + 8 + 3
  assert hlo_stats.shape_bytes("s4[4]") == 2 and hlo_stats.shape_bytes("token[]") == 0
  with pytest.raises(ValueError, match="no ENTRY computation"):
    analyze_hlo("not hlo")
  with pytest.raises(TypeError, match="takes the HLO text"):
    analyze_hlo(object())
  assert "\n" not in repr(analyze_hlo(_module("ROOT %o = f32[16,8]{1,0} copy(%p)")))


def test_unrecognized_replica_groups_warn_and_assume_all_devices(caplog):
  with caplog.at_level("WARNING", logger="ap_xla"):
    c = _one("someday<new>")
  assert c.group_size == 8 and "Unrecognized replica_groups=" in caplog.text


_FMHA = """HloModule m

ENTRY %main (q: bf16[2,256,4,64], k: bf16[2,256,4,64], v: bf16[2,256,4,64]) -> bf16[2,4,256,64] {
  %q = bf16[2,256,4,64]{3,2,1,0} parameter(0)
  %k = bf16[2,256,4,64]{3,2,1,0} parameter(1)
  %v = bf16[2,256,4,64]{3,2,1,0} parameter(2)
  %a = (bf16[2,4,256,64]{3,1,2,0}, f32[2,4,256]{2,1,0}, u8[0]{0}) custom-call(%q, %k, %v), custom_call_target="__cudnn$fmhaKIND", backend_config={"cudnn_fmha_backend_config": {"bmm1_dot_dimension_numbers": {"lhs_contracting_dimensions": ["3"]}, "intermediate_tensor_shape": {"element_type": "BF16", "dimensions": ["2", "4", "256", "256"], "tuple_shapes": []}, "mask_type": "MASK"}}
  ROOT %o = bf16[2,4,256,64]{3,1,2,0} get-tuple-element(%a), index=0
}
"""


@pytest.mark.parametrize("kind,mask,matmuls", [("Softmax", "CAUSAL", 2), ("SoftmaxBackward", "NO_MASK", 5)])
def test_cudnn_flash_attention_counts_its_matmuls_and_is_reported_as_attention(kind, mask, matmuls):
  """XLA's own cost analysis counts cuDNN's attention calls as 0 FLOPs (and their config names
  'bmm1_dot_dimension_numbers', which is not a gemm's): every score's dot with the head dim."""
  stats = hlo_stats.analyze_hlo(_FMHA.replace("KIND", kind).replace("MASK", mask))
  assert stats.flops == 2 * matmuls * (2 * 4 * 256 * 256) * 64
  assert [k.flops for k in stats.attention] == [stats.flops]
  assert stats.attention_causal == (mask == "CAUSAL")
