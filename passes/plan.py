"""A parallel plan: one point of the candidate space."""
from __future__ import annotations

import dataclasses

# Mesh axis names, outermost first. 'stage' carries pipeline stages, 'data' data
# parallelism (and the FSDP shards), 'tensor' Megatron-style tensor parallelism. An HSDP plan
# splits data parallelism into 'replica' (outer: the FSDP groups, state replicated across them)
# and 'data' (inner: one group, the state sharded over it).
STAGE, DATA, TENSOR = "stage", "data", "tensor"
REPLICA = "replica"
MESH_AXES = (STAGE, DATA, TENSOR)
HSDP_MESH_AXES = (STAGE, REPLICA, DATA, TENSOR)

# The recomputation policies `passes.recompute` implements (named here: this module imports no jax).
RECOMPUTE_POLICIES = ("none", "full", "dots", "selective_op", "selective_layer")
SCHEDULES = ("gpipe", "1f1b")  # pipeline schedules the step builder implements


@dataclasses.dataclass(frozen=True)
class Plan:
  """How one training step is parallelized.

  Attributes:
    dp: size of the 'data' mesh axis.
    tp: size of the 'tensor' mesh axis.
    pp: number of pipeline stages (size of the 'stage' axis).
    mb: micro-batches per step (gradient accumulation, or the pipeline's micro-batches).
    recompute: activation recomputation (`passes.recompute`): 'none', 'full' (save only each
      block's input), 'dots' (save every weight matmul's output), 'selective_op'
      (torchtitan's per-op SAC: save the attention's output and every other weight matmul's)
      or 'selective_layer' (torchtitan's per-layer SAC: every 2nd block recomputed fully,
      the others not at all).
    fsdp: parameters, gradients and optimizer state sharded over 'data' (ZeRO-3).
    low_prec: with `bf16` and `fsdp`, gather the bf16 working copy instead of fp32 (half the
      bytes on GPUs; XLA:CPU has no bf16 collectives and widens them back to fp32).
    bf16: bf16 compute with fp32 master weights.
    schedule: pipeline schedule: 'gpipe' (fill and drain: every micro-batch's residuals kept
      until the backward) or '1f1b' (one forward, one backward: at most 2 x pp kept);
      ignored when pp == 1.
    fsdp_group: with `fsdp`, the FSDP shard-group size: 0 (or dp) shards over all dp ranks;
      a proper divisor g of dp is HSDP (hybrid sharding): the state is sharded over groups of
      g consecutive data ranks and replicated across the dp / g groups (mesh axes 'replica' x
      'data'); the gradients are reduced over every data rank (XLA:CPU and XLA:GPU emit one
      all-reduce and slice the group's shard, not a reduce-scatter plus an all-reduce).
  """
  dp: int = 1
  tp: int = 1
  pp: int = 1
  mb: int = 1
  recompute: str = "none"
  fsdp: bool = False
  low_prec: bool = False
  bf16: bool = False
  schedule: str = "gpipe"
  fsdp_group: int = 0

  def __post_init__(self):
    for f in ("dp", "tp", "pp", "mb"):
      v = getattr(self, f)
      if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise ValueError(f"Plan.{f} must be a positive int, got {v!r}.")
    if self.recompute not in RECOMPUTE_POLICIES:
      raise ValueError(f"Plan.recompute must be one of {RECOMPUTE_POLICIES}, got {self.recompute!r}.")
    if self.schedule not in SCHEDULES:
      raise ValueError(f"Plan.schedule must be one of {SCHEDULES}, got {self.schedule!r}.")
    for f in ("fsdp", "low_prec", "bf16"):
      if not isinstance(getattr(self, f), bool):
        raise TypeError(f"Plan.{f} must be True or False, got {getattr(self, f)!r}.")
    g = self.fsdp_group
    if not isinstance(g, int) or isinstance(g, bool) or g < 0:
      raise ValueError(f"Plan.fsdp_group must be 0 (all of dp) or a positive int, got {g!r}.")
    if g and (self.dp % g):
      raise ValueError(f"Plan.fsdp_group={g} must divide dp={self.dp} (the FSDP groups tile the data ranks).")
    if g == self.dp:
      object.__setattr__(self, "fsdp_group", 0)  # one group of all dp: plain FSDP, one spelling
    elif g and not self.fsdp:
      raise ValueError(f"Plan.fsdp_group={g} needs fsdp=True (it is the FSDP shard-group size).")
    elif g and self.pp > 1:
      raise ValueError(f"Plan.fsdp_group={g} (HSDP) is not implemented with pipeline stages (pp={self.pp}); "
                       "use fsdp_group=0 or pp=1.")

  @property
  def hsdp(self) -> bool:
    """Whether the FSDP state is sharded over groups smaller than dp and replicated across them."""
    return bool(self.fsdp_group)

  @property
  def shard_degree(self) -> int:
    """Ranks one FSDP-sharded leaf is split over: the group size (dp without HSDP)."""
    return self.fsdp_group or self.dp

  @property
  def replicas(self) -> int:
    """FSDP groups the state is replicated across (1 without HSDP)."""
    return self.dp // self.shard_degree

  @property
  def data_axes(self):
    """The mesh axis (or axes) the batch is split over."""
    return (REPLICA, DATA) if self.hsdp else DATA

  @property
  def mesh_axes(self) -> tuple[str, ...]:
    return HSDP_MESH_AXES if self.hsdp else MESH_AXES

  @property
  def num_devices(self) -> int:
    return self.dp * self.tp * self.pp

  @property
  def mesh_shape(self) -> dict[str, int]:
    if self.hsdp:
      return {STAGE: self.pp, REPLICA: self.replicas, DATA: self.fsdp_group, TENSOR: self.tp}
    return {STAGE: self.pp, DATA: self.dp, TENSOR: self.tp}

  def batch_per_device(self, global_batch: int) -> int:
    """Examples per data-parallel rank per micro-batch (MoAI's batch_per_device)."""
    return global_batch // (self.dp * self.mb)

  def __repr__(self):
    s = f"Plan(dp={self.dp}, tp={self.tp}, pp={self.pp}, mb={self.mb}, recompute={self.recompute!r}, fsdp={self.fsdp}"
    if self.bf16:
      s += f", bf16=True, low_prec={self.low_prec}"
    if self.pp > 1:
      s += f", schedule={self.schedule!r}"
    if self.hsdp:
      s += f", fsdp_group={self.fsdp_group}"
    return s + ")"

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: dict) -> "Plan":
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - fields
    if unknown:
      raise ValueError(f"Plan.from_dict: unknown fields {sorted(unknown)}; allowed: {sorted(fields)}.")
    return cls(**d)
