"""A parallel plan: one point of the candidate space."""
from __future__ import annotations

import dataclasses

# Mesh axis names, outermost first. 'stage' carries pipeline stages, 'data' data
# parallelism (and the FSDP shards), 'tensor' Megatron-style tensor parallelism.
STAGE, DATA, TENSOR = "stage", "data", "tensor"
MESH_AXES = (STAGE, DATA, TENSOR)

# passes.recompute defines them; it imports jax, this module does not.
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

  @property
  def num_devices(self) -> int:
    return self.dp * self.tp * self.pp

  @property
  def mesh_shape(self) -> dict[str, int]:
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
