"""Estimated step time of a compiled candidate: compute plus communication.

The model, per device:
  compute = sum over the step's kernels (`HloStats.kernels`: every fusion, dot, copy... with
            its run count) of count x max(FLOPs / matmul rate of the compute dtype,
            bytes moved / streaming bandwidth): a roofline per kernel, so an elementwise
            kernel costs its memory traffic and a large dot its FLOPs. The rates are the
            profile's peaks times its published efficiencies (`HardwareProfile.matmul_rate`,
            `streaming_bandwidth`); the bf16 peak is used when the plan is bf16. Without
            kernels (an HloStats built by hand) it is FLOPs / matmul rate.
  comm    = sum over collectives of count x their time on the topology (below);
  hidden  = on a profile whose compiler overlaps them (`overlaps_collectives`, XLA:GPU's
            latency-hiding scheduler), the collectives over the 'data' axis (FSDP gathers,
            gradient reduce-scatters and all-reduces) but one run of each (the first layer's
            gather, the last one's reduction have no compute to hide under), up to the
            compute they run beside; tensor-parallel all-reduces stay on the critical path;
  flash   = on a profile with `flash_attention`, the fused attention's kernels
            (`HloStats.attention`) leave compute and come back as one flash kernel: their
            FLOPs (half when causal: the chunked path computes the masked blocks too) at
            `attention_rate`, no score traffic;
  total   = compute + (comm - hidden) - overlap x min(compute - hidden, comm - hidden).

Why the traffic term: what separates plans of equal FLOPs is mostly memory-bound work. Data
parallelism updates the full optimizer state on every device (FSDP and TP update shards);
tensor parallelism repeats the norms, residuals and softmax of the whole batch on every
device (data parallelism splits them). On the plan_quality model on 8 simulated CPU devices,
over six measured runs, FLOPs alone gave Spearman 0.70-0.83 and a regret up to 1.14; the
roofline with the calibrated bandwidth, against the same measurements, 0.78-0.93 and at most
1.04, and in two new runs 0.850 and 0.826, regret 1.000 and 1.071 (benchmarks/RESULTS.md).
With the default `overlap=0` and a profile without `overlaps_collectives` (the 'cpu' one:
XLA:CPU runs collectives synchronously) every collective is charged in full.

Collectives, alpha-beta, for B bytes (`Collective.bytes`, the result per device) over a group
of n devices, k of them per node on m nodes (`topology`), NVLink bandwidth nvl and one NIC per
device of bandwidth nic (both times the profile's efficiencies), latencies lat / net per step:
  within a node (m = 1), the ring:
    all-reduce          2(n-1)/n * B/nvl + 2(n-1) lat     (B: the reduced array)
    all-gather          (n-1)/n * B/nvl + (n-1) lat       (B: the full gathered result)
    reduce-scatter      (n-1)/n * nB/nvl + (n-1) lat      (nB: the input; B is the shard)
    all-to-all          (n-1)/n * B/nvl + (n-1) lat
    collective-permute  B/nvl + lat
  across nodes, the ring as NCCL runs it: one ring (channel) per NIC, each crossing between
  nodes on its own NIC, so a device sends 1/k of its ring traffic over its NIC and (k-1)/k
  over NVLink: the wire time is traffic x max(1/(k nic), (k-1)/(k nvl)), and the network's
  latency is paid on the m of n hops that cross. An all-reduce may instead run
  hierarchically (NCCL's tree between nodes): reduce-scatter in the node, all-reduce of each
  device's 1/k share over the m nodes on its own NIC, all-gather in the node, pipelined:
    max(2(k-1)/k * B/nvl, 2(m-1)/m * (B/k)/nic) + latencies; the faster of the two is taken.
  (On 2 nodes of 8 A100 with 6.25 GB/s of network per GPU this gives 51.7 ms for 2 GiB with the
  profile's efficiencies; nccl-tests measured 51.4 ms: `passes/hardware.py`.)
  A group with one device per node (k = 1) is a ring over NICs alone.

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
    hidden_s: the communication run beside compute (the 'data' collectives on a profile
      with `overlaps_collectives`), not in total_s.
  """
  compute_s: float
  comm_s: float
  bubble_fraction: float
  total_s: float
  comm_by_kind: dict = dataclasses.field(default_factory=dict, hash=False)
  dtype: str = "f32"
  flops_s: float = 0.0
  memory_bound_s: float = 0.0
  hidden_s: float = 0.0

  def __repr__(self):
    ms = lambda s: f"{s * 1e3:.4g} ms"
    return (f"CostEstimate(total={ms(self.total_s)}, compute={ms(self.compute_s)} "
            f"(memory-bound {ms(self.memory_bound_s)}), comm={ms(self.comm_s)} (hidden {ms(self.hidden_s)}), "
            f"bubble={self.bubble_fraction:.3g}, dtype={self.dtype!r})")


def gpipe_bubble_fraction(num_stages: int, num_micro_batches: int) -> float:
  """(S-1)/(M+S-1): the share of GPipe ticks a stage idles."""
  for name, v in (("num_stages", num_stages), ("num_micro_batches", num_micro_batches)):
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
      raise ValueError(f"gpipe_bubble_fraction: {name} must be a positive int, got {v!r}.")
  return (num_stages - 1) / (num_micro_batches + num_stages - 1)


def spans_nodes(c: Collective, devices_per_node: int) -> bool:
  """Whether a collective's groups have members on more than one node."""
  return topology(c, devices_per_node)[1] > 1


def topology(c: Collective, devices_per_node: int) -> tuple[int, int]:
  """(members per node k, nodes spanned m) of a collective's widest group (node = device id //
  devices_per_node); without groups, its devices as consecutive ids from 0."""
  if c.groups:
    best = (c.group_size, 1)
    for g in c.groups:
      per_node: dict[int, int] = {}
      for d in g:
        per_node[d // devices_per_node] = per_node.get(d // devices_per_node, 0) + 1
      km = (max(per_node.values()), len(per_node))
      best = km if km[1] > best[1] or (km[1] == best[1] and km[0] < best[0]) else best
    return best
  n = c.group_size
  return (n, 1) if n <= devices_per_node else (devices_per_node, -(-n // devices_per_node))


def collective_time(c: Collective, hw: HardwareProfile) -> float:
  """Seconds for one run of a collective on the profile's topology (module doc).

  Example:
    >>> collective_time(Collective('all-gather', 2**30, 16), get_profile('h100'))  # 2 nodes of 8
  """
  n = c.group_size
  if n <= 1:
    return 0.0  # a group of one moves nothing
  if c.kind not in COLLECTIVE_KINDS:
    raise ValueError(f"collective_time: unknown collective kind {c.kind!r}; allowed: {COLLECTIVE_KINDS}.")
  k, m = topology(c, hw.devices_per_node)
  k = max(1, min(k, n))
  nvl = hw.link_bandwidth * hw.link_efficiency
  nic = hw.inter_node_bandwidth * hw.inter_node_efficiency
  lat, net = hw.link_latency, hw.network_latency
  b = c.bytes

  def ring(sent: float, steps: int) -> float:
    """A ring in which each device sends `sent` bytes over `steps` lock-step steps."""
    if m == 1:
      return sent / nvl + steps * lat
    # NCCL runs one ring (channel) per NIC, each crossing between nodes on its own NIC: a device
    # sends 1/k of its ring traffic over its NIC and the rest over NVLink; a step's latency is
    # the network's on the m of n hops that cross between nodes.
    wire = sent * max(1 / (k * nic), (k - 1) / (k * nvl))
    return wire + steps * ((n - m) / n * lat + m / n * net)

  if c.kind == "all-gather":
    return ring((n - 1) / n * b, n - 1)
  if c.kind == "reduce-scatter":
    return ring((n - 1) * b, n - 1)  # (n-1)/n of the n*b input
  if c.kind == "all-reduce":
    flat = ring(2 * (n - 1) / n * b, 2 * (n - 1))
    if m == 1:
      return flat
    # Hierarchical (NCCL's tree between nodes): reduce-scatter in the node, all-reduce of each
    # device's 1/k share with its peers on the other nodes over its own NIC, all-gather in the
    # node, the phases pipelined chunk by chunk (the slower one sets the pace); NCCL's tuner
    # takes the faster of ring and tree.
    tree = (max(2 * (k - 1) / k * b / nvl, 2 * (m - 1) / m * (b / k) / nic)
            + 2 * (k - 1) * lat + 2 * math.ceil(math.log2(m)) * net)
    return min(flat, tree)
  if c.kind == "all-to-all":
    if m == 1:
      return (n - 1) / n * b / nvl + (n - 1) * lat
    # each device sends its (n-k)/n share to other nodes over its NIC, (k-1)/n over NVLink
    return max((n - k) / n * b / nic, (k - 1) / n * b / nvl) + (n - 1) * net
  return b / (nic if m > 1 else nvl) + (net if m > 1 else lat)  # collective-permute


def on_data_axis(c: Collective, plan: Plan) -> bool:
  """Whether a collective runs over the plan's 'data' axis (FSDP gathers, gradient reductions):
  its groups hold devices of one (stage, tensor) coordinate, the mesh's ids being
  (stage, data, tensor) in row-major order; without groups, a gather or reduce-scatter over
  dp devices, or an all-reduce over dp devices when dp != tp."""
  # (HSDP: over one FSDP group, or across the groups)
  sizes = {plan.dp, plan.shard_degree, plan.replicas} - {1}
  if plan.dp <= 1 or c.group_size not in sizes:
    return False
  if c.groups:
    tp, dp = plan.tp, plan.dp
    return all(len({(d // (dp * tp), d % tp) for d in g}) == 1 for g in c.groups)
  return c.kind in ("all-gather", "reduce-scatter") or (c.kind == "all-reduce" and plan.dp != plan.tp)


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
  peak, bw = hw.matmul_rate(dtype), hw.streaming_bandwidth
  flops_s = stats.flops / peak
  if stats.kernels:
    compute = math.fsum(k.count * max(k.flops / peak, k.bytes / bw) for k in stats.kernels)
    memory_bound = math.fsum(k.count * max(0.0, k.bytes / bw - k.flops / peak) for k in stats.kernels)
  else:
    compute, memory_bound = flops_s, 0.0
  if hw.flash_attention and stats.attention:
    # The fused attention's kernels (a chunked path on the CPU: score blocks through memory,
    # every block computed) run on the target as one flash kernel: its FLOPs, the masked half
    # skipped when causal, at the rate flash kernels reach (`HardwareProfile.attention_rate`).
    compute -= math.fsum(k.count * max(k.flops / peak, k.bytes / bw) for k in stats.attention)
    memory_bound -= math.fsum(k.count * max(0.0, k.bytes / bw - k.flops / peak) for k in stats.attention)
    att_flops = math.fsum(k.count * k.flops for k in stats.attention) * (0.5 if stats.attention_causal else 1.0)
    compute += att_flops / hw.attention_rate(dtype)
  by_kind: dict[str, float] = {}
  hideable = 0.0
  for c in stats.collectives:
    one = collective_time(c, hw)
    by_kind[c.kind] = by_kind.get(c.kind, 0.0) + c.count * one
    if hw.overlaps_collectives and on_data_axis(c, plan):
      hideable += (c.count - 1) * one  # the first gather, the last reduction: nothing to hide under
  comm = math.fsum(by_kind.values())
  # XLA:GPU's latency-hiding scheduler runs the 'data' collectives asynchronously beside the
  # layers' compute: only what outlasts the compute shows; the rest (TP's all-reduces, whose
  # result the next matmul needs) is on the critical path.
  hidden = min(hideable, compute)
  exposed = comm - hidden
  total = compute + exposed - overlap * min(compute - hidden, exposed)
  bubble = gpipe_bubble_fraction(plan.pp, plan.mb) if plan.pp > 1 else 0.0
  return CostEstimate(compute, comm, bubble, total, by_kind, dtype, flops_s, memory_bound, hidden)


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
