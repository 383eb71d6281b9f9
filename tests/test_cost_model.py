"""The cost model: compute at the dtype's peak, ring-model collectives, the GPipe bubble, ranking."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from passes import cost_model
from passes.cost_model import CostEstimate, collective_time, estimate_step_time, rank_key
from passes.hardware import HardwareProfile, get_profile
from passes.hlo_stats import Collective, HloStats, Kernel, analyze_hlo
from passes.plan import Plan

# Round figures so the expected times can be written by hand.
HW = HardwareProfile(name="toy", memory_bytes=2**30, peak_flops={"f32": 1e12, "bf16": 4e12},
                     memory_bandwidth=1e12, link_bandwidth=1e9, link_latency=1e-6, devices_per_node=4,
                     inter_node_bandwidth=1e8)


@pytest.mark.parametrize("kind, n, expected", [
    ("all-reduce", 4, 2 * 3 / 4 * 1e6 / 1e9 + 2 * 3 * 1e-6),
    ("all-gather", 4, 3 / 4 * 1e6 / 1e9 + 3 * 1e-6),          # bytes = the full gathered result
    ("reduce-scatter", 4, 3 / 4 * 4e6 / 1e9 + 3 * 1e-6),      # bytes = the shard; input is 4x
    ("all-to-all", 2, 1 / 2 * 1e6 / 1e9 + 1e-6),
    ("collective-permute", 2, 1e6 / 1e9 + 1e-6),
    ("all-reduce", 1, 0.0),
])
def test_ring_model_per_kind(kind, n, expected):
  assert collective_time(Collective(kind, 10**6, n), HW) == pytest.approx(expected, rel=1e-12)


def test_inter_node_bandwidth_when_a_group_spans_nodes():
  intra = collective_time(Collective("all-reduce", 10**6, 2, groups=((0, 1), (4, 5))), HW)
  inter = collective_time(Collective("all-reduce", 10**6, 2, groups=((0, 4), (1, 5))), HW)
  assert intra == pytest.approx(1e6 / 1e9 + 2e-6) and inter == pytest.approx(1e6 / 1e8 + 2e-6)
  # Without groups the size decides: 8 devices are 2 nodes of 4, and the ring (one per NIC)
  # sends 1/4 of its traffic over each device's NIC, 3/4 over the links.
  assert collective_time(Collective("all-gather", 8 * 10**6, 8), HW) == pytest.approx(
      7 / 8 * 8e6 * max(1 / (4 * 1e8), 3 / (4 * 1e9)) + 7e-6)
  permute = Collective("collective-permute", 10**6, 2, groups=((0, 1), (3, 4)))
  assert collective_time(permute, HW) == pytest.approx(1e6 / 1e8 + 1e-6)
  with pytest.raises(ValueError, match="unknown collective kind 'broadcast'"):
    collective_time(Collective("broadcast", 1, 2), HW)


def test_estimate_sums_compute_and_counted_collectives():
  stats = HloStats(flops=3 * 10**9, collectives=(
      Collective("all-reduce", 10**6, 4, count=3), Collective("all-gather", 10**6, 4, count=2)))
  est = estimate_step_time(stats, Plan(dp=4), HW)
  ar = 3 * (1.5e-3 + 6e-6)
  ag = 2 * (0.75e-3 + 3e-6)
  assert est.dtype == "f32" and est.compute_s == pytest.approx(3e-3)
  assert est.comm_by_kind == pytest.approx({"all-reduce": ar, "all-gather": ag})
  assert est.comm_s == pytest.approx(ar + ag) and est.total_s == pytest.approx(3e-3 + ar + ag)
  assert est.bubble_fraction == 0.0
  assert "\n" not in repr(est) and repr(est).startswith("CostEstimate(total=")
  # overlap hides the shorter of the two under the longer.
  assert estimate_step_time(stats, Plan(dp=4), HW, overlap=1.0).total_s == pytest.approx(max(3e-3, ar + ag))
  assert estimate_step_time(stats, Plan(dp=4), HW, overlap=0.5).total_s == pytest.approx(
      3e-3 + ar + ag - 0.5 * min(3e-3, ar + ag))


def test_bf16_plan_uses_the_bf16_peak_unless_told_otherwise():
  stats = HloStats(flops=4 * 10**12)
  assert estimate_step_time(stats, Plan(bf16=True), HW).compute_s == pytest.approx(1.0)
  assert estimate_step_time(stats, Plan(), HW).compute_s == pytest.approx(4.0)
  est = estimate_step_time(stats, Plan(bf16=True), HW, dtype_flops="f32")
  assert (est.dtype, est.compute_s) == ("f32", pytest.approx(4.0))


@pytest.mark.parametrize("s, m, expected", [(1, 4, 0.0), (2, 1, 0.5), (4, 8, 3 / 11), (4, 4, 3 / 7), (8, 32, 7 / 39)])
def test_gpipe_bubble_fraction(s, m, expected):
  assert cost_model.gpipe_bubble_fraction(s, m) == pytest.approx(expected)


def test_bubble_is_reported_not_added_again():
  stats = HloStats(flops=10**12, collectives=(Collective("collective-permute", 10**6, 2, count=11),))
  flat = estimate_step_time(stats, Plan(dp=1, pp=1, mb=8), HW)
  piped = estimate_step_time(stats, Plan(pp=4, mb=8), HW)
  assert piped.bubble_fraction == pytest.approx(3 / 11) and flat.bubble_fraction == 0.0
  assert piped.total_s == flat.total_s  # the bubble ticks are already in the HLO flops


def test_errors_name_the_parameter():
  stats = HloStats(flops=1)
  with pytest.raises(ValueError, match=r"overlap must be a number in \[0, 1\], got 2"):
    estimate_step_time(stats, Plan(), HW, overlap=2)
  with pytest.raises(ValueError, match=r"no peak FLOP/s for dtype 'fp8'"):
    estimate_step_time(stats, Plan(), HW, dtype_flops="fp8")
  with pytest.raises(TypeError, match="stats must be an HloStats"):
    estimate_step_time({"flops": 1}, Plan(), HW)
  with pytest.raises(TypeError, match="plan must be a Plan"):
    estimate_step_time(stats, "dp=2", HW)
  with pytest.raises(TypeError, match="hw must be a HardwareProfile"):
    estimate_step_time(stats, Plan(), "h100")
  with pytest.raises(ValueError, match="num_micro_batches must be a positive int, got 0"):
    cost_model.gpipe_bubble_fraction(2, 0)


def test_roofline_charges_each_kernel_its_flops_or_its_bytes():
  # HW: 1e12 FLOP/s f32, 4e12 bf16, 1e12 B/s. A dot-like kernel bound by FLOPs run twice, an
  # elementwise one bound by memory, one in between.
  kernels = (Kernel(flops=2 * 10**9, bytes=10**6, count=2), Kernel(flops=0, bytes=4 * 10**9, count=1),
             Kernel(flops=10**9, bytes=3 * 10**9, count=1))
  stats = HloStats(flops=5 * 10**9, kernels=kernels)
  est = estimate_step_time(stats, Plan(), HW)
  assert est.compute_s == pytest.approx(2 * 2e-3 + 4e-3 + 3e-3)
  assert est.memory_bound_s == pytest.approx(4e-3 + (3e-3 - 1e-3))
  assert est.flops_s == pytest.approx(5e-3) and est.total_s == pytest.approx(est.compute_s)
  assert "memory-bound" in repr(est)
  # bf16 quarters the FLOP time only: the first kernel becomes 0.5 ms, the others stay memory-bound
  bf16 = estimate_step_time(stats, Plan(bf16=True), HW)
  assert bf16.compute_s == pytest.approx(2 * 0.5e-3 + 4e-3 + 3e-3) and bf16.dtype == "bf16"
  # more bandwidth, less time for memory-bound kernels only
  fast = estimate_step_time(stats, Plan(), get_profile(HW, memory_bandwidth=4e12))
  assert fast.compute_s == pytest.approx(2 * 2e-3 + 1e-3 + 1e-3)
  # an HloStats without kernels (built by hand) is charged its FLOPs
  assert estimate_step_time(HloStats(flops=5 * 10**9), Plan(), HW).compute_s == pytest.approx(5e-3)


def test_rank_key_cheaper_first_then_less_memory():
  def est(t):
    return CostEstimate(t, 0.0, 0.0, t)
  items = [(est(2.0), 10), (est(1.0), 50), (est(1.0001), 20), (None, 1), (est(1.0), None)]
  ranked = sorted(items, key=lambda it: rank_key(*it))
  assert [(e.total_s if e else None, m) for e, m in ranked] == [
      (1.0001, 20), (1.0, 50), (1.0, None), (2.0, 10), (None, 1)]


def test_real_program_data_parallel_vs_replicated():
  """A data-parallel gradient step pays an all-reduce; the same step on one device does not."""
  mesh = Mesh(np.array(jax.devices()), ("data",))
  def loss(w, x):
    return jnp.mean(jnp.tanh(x @ w) ** 2)
  grad = jax.jit(jax.grad(loss))
  w = jax.ShapeDtypeStruct((64, 64), jnp.float32, sharding=NamedSharding(mesh, P()))
  x = jax.ShapeDtypeStruct((256, 64), jnp.float32, sharding=NamedSharding(mesh, P("data")))
  h100 = get_profile("h100")
  dp = estimate_step_time(analyze_hlo(grad.lower(w, x).compile().as_text()), Plan(dp=8), h100)
  one = estimate_step_time(analyze_hlo(jax.jit(jax.grad(loss)).lower(
      jax.ShapeDtypeStruct((64, 64), jnp.float32), jax.ShapeDtypeStruct((256, 64), jnp.float32)).compile().as_text()),
      Plan(), h100)
  assert one.comm_s == 0.0 and set(dp.comm_by_kind) == {"all-reduce"}
  assert dp.flops_s == pytest.approx(one.flops_s / 8)  # forward and backward dots split 8 ways
  # the replicated weight's gradient and its update are not split: less than 8x faster
  assert one.compute_s / 8 < dp.compute_s < one.compute_s and dp.compute_s >= dp.flops_s
  grad_bytes = 64 * 64 * 4
  assert dp.comm_s >= 2 * 7 / 8 * grad_bytes / h100.link_bandwidth + 14 * h100.link_latency
  # one all-reduce at the end of the step: even where 'data' collectives overlap (h100), the
  # last reduction has no compute left to hide under
  assert math.isclose(dp.total_s, dp.compute_s + dp.comm_s) and dp.hidden_s == 0.0


def test_rank_ties_within_three_digits_go_to_less_memory():
  from passes.report import FEASIBLE, OVER_BUDGET, CandidateResult, rank
  fast_big = CandidateResult(Plan(dp=8), FEASIBLE, memory_bytes=900, est_time_s=1.0001e-3)
  tie_small = CandidateResult(Plan(dp=4, tp=2), FEASIBLE, memory_bytes=500, est_time_s=1.0004e-3)
  slower = CandidateResult(Plan(dp=2, tp=4), FEASIBLE, memory_bytes=100, est_time_s=1.01e-3)
  over = CandidateResult(Plan(dp=1, tp=8), OVER_BUDGET, memory_bytes=50, est_time_s=1e-4)
  assert [r.plan for r in rank([over, slower, fast_big, tie_small])] == [
      tie_small.plan, fast_big.plan, slower.plan, over.plan]


def _llama_stats(layers: int, plan: Plan):
  """HloStats of a tiny Llama's compiled training step under `plan` (dp = tp = 1)."""
  from ap_xla.models.llama import LlamaConfig, llama_program
  from passes.evaluate import compile_plan
  cfg = LlamaConfig(vocab=64, dim=32, layers=layers, heads=4, ffn=64, seq=16)
  prog = llama_program(cfg, batch=4, abstract=True)  # shapes only: nothing is initialized
  return analyze_hlo(compile_plan(prog, plan, jax.devices(), None).as_text())


def test_pipelined_llama_cost_includes_the_bubble_and_the_stage_transfers():
  """GPipe on S stages with M micro-batches, from the real compiled HLO.

  Each stage runs its L/S blocks on every one of the M + S - 1 ticks, on a micro-batch of
  B/M examples (idle ticks compute on filler), so its block FLOPs are (M + S - 1)/M x those
  of the unpipelined step of L/S blocks on B examples: the same per-stage work plus the
  bubble. Depth differences cancel pre, post and the optimizer: blocks 4 -> 8 on 2 stages
  against 2 -> 4 unpipelined. Each tick passes one micro-batch's activations [B/M, T, D] to
  the next stage, and the backward passes their gradients back: 2 (M + S - 1) permutes.
  """
  S, M, B, T, D = 2, 2, 4, 16, 32
  piped = Plan(pp=S, mb=M)
  a, b = _llama_stats(2, Plan()), _llama_stats(4, Plan())
  c, d = _llama_stats(4, piped), _llama_stats(8, piped)
  assert d.flops - c.flops == (M + S - 1) / M * (b.flops - a.flops)

  permutes = [x for x in c.collectives if x.kind == "collective-permute"]
  assert sum(x.count for x in permutes) == 2 * (M + S - 1)
  assert {x.bytes for x in permutes} == {B // M * T * D * 4}  # f32 activations of one micro-batch
  assert {g for x in permutes for g in x.groups} == {(0, 1), (1, 0)}  # stage to stage, both ways

  est, est_d = estimate_step_time(c, piped, HW), estimate_step_time(d, piped, HW)
  flat_a, flat_b = estimate_step_time(a, Plan(), HW), estimate_step_time(b, Plan(), HW)
  # the bubble ticks are in the compute time (and reported, not added again) ...
  assert est.flops_s == pytest.approx(c.flops / HW.peak("f32")) and est.compute_s >= est.flops_s
  assert est_d.flops_s - est.flops_s == pytest.approx((M + S - 1) / M * (flat_b.flops_s - flat_a.flops_s))
  assert est_d.compute_s > est.compute_s  # the memory traffic of the extra blocks' ticks too
  assert est.bubble_fraction == pytest.approx((S - 1) / (M + S - 1))
  # ... and the stage-to-stage transfers in the communication time
  one = collective_time(Collective("collective-permute", B // M * T * D * 4, 2, groups=((0, 1),)), HW)
  assert est.comm_by_kind["collective-permute"] == pytest.approx(2 * (M + S - 1) * one)
  assert est.total_s == pytest.approx(est.compute_s + est.comm_s) and est.comm_s >= 2 * (M + S - 1) * one
