"""Estimated step time of a compiled candidate: compute plus communication.

The model, per device:
  compute = sum over the step's kernels (`HloStats.kernels`: every fusion, dot, copy... with
            its run count) of count x max(FLOPs / peak FLOP/s of the compute dtype,
            bytes moved / memory bandwidth): a roofline per kernel, so an elementwise
            kernel costs its memory traffic and a large dot its FLOPs. The bf16 peak is used
            when the plan is bf16. Without kernels (an HloStats built by hand) it is
            FLOPs / peak.
  comm    = sum over collectives of count x ring-model time (below);
  total   = compute + comm - overlap x min(compute, comm).

Why the traffic term: what separates plans of equal FLOPs is mostly memory-bound work. Data
parallelism updates the full optimizer state on every device (FSDP and TP update shards);
tensor parallelism repeats the norms, residuals and softmax of the whole batch on every
device (data parallelism splits them). On the plan_quality model on 8 simulated CPU devices,
over six measured runs, FLOPs alone gave Spearman 0.70-0.83 and a regret up to 1.14; the
roofline with the calibrated bandwidth, against the same measurements, 0.78-0.93 and at most
1.04, and in two new runs 0.850 and 0.826, regret 1.000 and 1.071 (benchmarks/RESULTS.md).
With the default `overlap=0` nothing overlaps: a pessimistic bound that charges every
collective in full (XLA's async collectives hide part of it on GPUs).

Ring model for one collective of B bytes (`Collective.bytes`, the result per device) over a
group of n devices with per-device bandwidth bw and per-step latency lat:
  all-reduce          2(n-1)/n * B/bw + 2(n-1) lat     (B: the reduced array)
  all-gather          (n-1)/n * B/bw + (n-1) lat       (B: the full gathered result)
  reduce-scatter      (n-1)/n * nB/bw + (n-1) lat      (nB: the input; B is the shard)
  all-to-all          (n-1)/n * B/bw + (n-1) lat
  collective-permute  B/bw + lat
bw is the profile's inter-node bandwidth when a replica group has members on different
nodes (partition id // devices_per_node; with no groups known, when n > devices_per_node),
else its intra-node link bandwidth.

Pipeline bubble: the plans are SPMD GPipe programs in which every stage computes on each of
the M + S - 1 ticks of the schedule (idle ticks compute on padding). The per-device kernels
therefore already contain the bubble ticks, and so does `compute_s`. `bubble_fraction`
((S-1)/(M+S-1)) is reported for the log only and is NOT added to the total again.
"""
from __future__ import annotations

import dataclasses
import math

from passes.hardware import HardwareProfile
from passes.hlo_stats import COLLECTIVE_KINDS, Collective, HloStats
from passes.plan import Plan


@dataclasses.dataclass(frozen=True)
class CostEstimate:
  """Estimated time of one training step, per device.

  Attributes:
    compute_s: the kernels' roofline time (bubble ticks included, see module doc).
    comm_s: all collectives under the ring model.
    bubble_fraction: GPipe idle fraction (S-1)/(M+S-1); 0 without pipelining. Informational.
    total_s: compute_s + comm_s - overlap x min(compute_s, comm_s).
    comm_by_kind: seconds per collective kind.
    dtype: the peak FLOP/s entry used for compute.
    flops_s: the FLOPs alone at that peak (what compute_s would be with infinite bandwidth).
    memory_bound_s: the part of compute_s where kernels wait on memory (compute_s - the
      FLOP time of those kernels).
  """
  compute_s: float
  comm_s: float
  bubble_fraction: float
  total_s: float
  comm_by_kind: dict = dataclasses.field(default_factory=dict, hash=False)
  dtype: str = "f32"
  flops_s: float = 0.0
  memory_bound_s: float = 0.0

  def __repr__(self):
    ms = lambda s: f"{s * 1e3:.4g} ms"
    return (f"CostEstimate(total={ms(self.total_s)}, compute={ms(self.compute_s)} "
            f"(memory-bound {ms(self.memory_bound_s)}), comm={ms(self.comm_s)}, "
            f"bubble={self.bubble_fraction:.3g}, dtype={self.dtype!r})")


def gpipe_bubble_fraction(num_stages: int, num_micro_batches: int) -> float:
  """(S-1)/(M+S-1): the share of GPipe ticks a stage idles."""
  for name, v in (("num_stages", num_stages), ("num_micro_batches", num_micro_batches)):
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
      raise ValueError(f"gpipe_bubble_fraction: {name} must be a positive int, got {v!r}.")
  return (num_stages - 1) / (num_micro_batches + num_stages - 1)


def spans_nodes(c: Collective, devices_per_node: int) -> bool:
  """Whether a collective's groups have members on more than one node."""
  if c.groups:
    return any(len({d // devices_per_node for d in g}) > 1 for g in c.groups)
  return c.group_size > devices_per_node


def collective_time(c: Collective, hw: HardwareProfile) -> float:
  """Seconds for one run of a collective under the ring model (module doc)."""
  n = c.group_size
  if n <= 1:
    return 0.0  # a group of one moves nothing
  bw = hw.inter_node_bandwidth if spans_nodes(c, hw.devices_per_node) else hw.link_bandwidth
  lat, b = hw.link_latency, c.bytes
  if c.kind == "all-reduce":
    return 2 * (n - 1) / n * b / bw + 2 * (n - 1) * lat
  if c.kind in ("all-gather", "all-to-all"):
    return (n - 1) / n * b / bw + (n - 1) * lat
  if c.kind == "reduce-scatter":
    return (n - 1) * b / bw + (n - 1) * lat  # (n-1)/n of the n*b input
  if c.kind == "collective-permute":
    return b / bw + lat
  raise ValueError(f"collective_time: unknown collective kind {c.kind!r}; allowed: {COLLECTIVE_KINDS}.")


def estimate_step_time(stats: HloStats, plan: Plan, hw: HardwareProfile, dtype_flops: str | None = None,
                       overlap: float = 0.0) -> CostEstimate:
  """Estimates a candidate's step time from its HLO statistics.

  Args:
    stats: `analyze_hlo` of the compiled step (per device).
    plan: the candidate's plan (its bf16 flag picks the peak; pp and mb the bubble).
    hw: the hardware profile.
    dtype_flops: peak FLOP/s entry to use ('f32', 'bf16', ...); None: 'bf16' when plan.bf16,
      else 'f32'.
    overlap: share (0..1) of the shorter of compute and communication hidden under the other.

  Returns:
    A CostEstimate.

  Example:
    >>> est = estimate_step_time(analyze_hlo(compiled.as_text()), Plan(dp=8), get_profile('h100'))
    >>> est.total_s
  """
  if not isinstance(stats, HloStats):
    raise TypeError(f"estimate_step_time: stats must be an HloStats (from analyze_hlo), got {type(stats).__name__}.")
  if not isinstance(plan, Plan):
    raise TypeError(f"estimate_step_time: plan must be a Plan, got {type(plan).__name__}.")
  if not isinstance(hw, HardwareProfile):
    raise TypeError(f"estimate_step_time: hw must be a HardwareProfile, got {type(hw).__name__}.")
  if isinstance(overlap, bool) or not isinstance(overlap, (int, float)) or not 0 <= overlap <= 1:
    raise ValueError(f"estimate_step_time: overlap must be a number in [0, 1], got {overlap!r}.")
  dtype = dtype_flops or ("bf16" if plan.bf16 else "f32")
  peak = hw.peak(dtype)
  flops_s = stats.flops / peak
  if stats.kernels:
    compute = math.fsum(k.count * max(k.flops / peak, k.bytes / hw.memory_bandwidth) for k in stats.kernels)
    memory_bound = math.fsum(k.count * max(0.0, k.bytes / hw.memory_bandwidth - k.flops / peak)
                             for k in stats.kernels)
  else:
    compute, memory_bound = flops_s, 0.0
  by_kind: dict[str, float] = {}
  for c in stats.collectives:
    by_kind[c.kind] = by_kind.get(c.kind, 0.0) + c.count * collective_time(c, hw)
  comm = math.fsum(by_kind.values())
  total = compute + comm - overlap * min(compute, comm)
  bubble = gpipe_bubble_fraction(plan.pp, plan.mb) if plan.pp > 1 else 0.0
  return CostEstimate(compute, comm, bubble, total, by_kind, dtype, flops_s, memory_bound)


def rank_key(estimate: CostEstimate | float | None, memory_bytes: int | None) -> tuple[float, float]:
  """Sort key: cheaper first; estimates equal to 3 significant digits go to less memory.

  Args:
    estimate: a CostEstimate or its total in seconds; None when the candidate has none.
    memory_bytes: its predicted per-device memory, or None.

  Missing values (a candidate that did not compile) sort last.
  """
  total = estimate.total_s if isinstance(estimate, CostEstimate) else estimate
  t = float(f"{total:.3g}") if total is not None else math.inf
  return (t, float(memory_bytes) if memory_bytes is not None else math.inf)
