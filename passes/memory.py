"""Per-device memory of a compiled program: XLA's buffer assignment, plus on CPU the dots'
packing memory that the buffer assignment does not hold.

XLA:CPU runs a dot that its YNNPACK fusions do not take (a left operand contracted on dim 0,
such as a weight gradient `x.T @ g` whose transpose XLA folded into the dot; which ones:
`passes.screen_scratch`) as an Eigen thread-pool contraction, which packs slices of its
operands into memory it allocates itself. `benchmarks/cpu_dot_scratch.py` measured that
memory on one device at about 2 x 256 x (m + n) x element bytes for an m x n result (k >= 256);
on 8 simulated devices sharing 2 cores each device's share was at most that (0.45-8.5 MiB).
`cpu_dot_scratch` charges the largest such dot of a program at 2 x min(k, 256) x (m + n) x
element bytes (`eigen_packing_bytes`, which the screen charges too): on the plan_quality
model the worst memory prediction went from 4.7-6.3% low (TP=8, four runs) to 3.2-3.6% (two
runs; benchmarks/RESULTS.md). It errs high where Eigen
partitions a dot another way (128 x 8192 or 4096 x 128 results), which only makes a plan look
bigger than it is.
"""
from __future__ import annotations

import dataclasses

from passes import hlo_stats

# Eigen's contraction packs operand panels of at most this many contracted elements.
EIGEN_K_BLOCK = 256


@dataclasses.dataclass(frozen=True)
class MemoryStats:
  """Per-device bytes of one compiled program.

  `total` = argument + output - alias + temp + scratch is the predicted peak: donated
  arguments that alias outputs are counted once. It predicted the measured peak within ~2%
  (slightly low) in FIELD_NOTES; `peak_memory_in_bytes` is not used because it is
  meaningless on CPU.

  Attributes:
    argument: bytes of the parameters (this device's shards).
    output: bytes of the results.
    alias: bytes of outputs that reuse a donated argument's buffer.
    temp: bytes of temporaries (activations, gradients, workspace).
    scratch: memory the program's kernels allocate outside the buffer assignment (on CPU the
      largest unfused dot's packing, `cpu_dot_scratch`; 0 elsewhere).
    total: argument + output - alias + temp + scratch.
  """
  argument: int
  output: int
  alias: int
  temp: int
  scratch: int = 0
  total: int = dataclasses.field(init=False)

  def __post_init__(self):
    for f in ("argument", "output", "alias", "temp", "scratch"):
      v = getattr(self, f)
      if not isinstance(v, int) or isinstance(v, bool) or v < 0:
        raise ValueError(f"MemoryStats.{f} must be a non-negative int, got {v!r}.")
    object.__setattr__(self, "total", self.argument + self.output - self.alias + self.temp + self.scratch)

  def __repr__(self):
    mib = lambda b: f"{b / 2**20:.4g} MiB"
    return (f"MemoryStats(total={mib(self.total)}, argument={mib(self.argument)}, output={mib(self.output)}, "
            f"alias={mib(self.alias)}, temp={mib(self.temp)}, scratch={mib(self.scratch)})")


def eigen_packing_bytes(m: int, n: int, k: int, dtype_bytes: int) -> int:
  """Bytes Eigen packs for an m x n result contracting k elements (module doc): the formula
  the compiled side (`cpu_dot_scratch`) and the screen (`passes.screen`) both charge."""
  return 2 * min(k, EIGEN_K_BLOCK) * (m + n) * dtype_bytes


def cpu_dot_scratch(hlo: str | hlo_stats.HloStats) -> int:
  """Per-device bytes of the largest Eigen packing of a CPU program's unfused dots (module doc).

  Args:
    hlo: the program's HLO text (`compiled.as_text()`) or its `hlo_stats.analyze_hlo`.
  """
  dots = hlo.unfused_dots if isinstance(hlo, hlo_stats.HloStats) else hlo_stats.unfused_dots(hlo)
  return max((eigen_packing_bytes(d.m, d.n, d.k, d.dtype_bytes) for d in dots), default=0)


def memory_stats(compiled, platform: str | None = None, stats: hlo_stats.HloStats | None = None) -> MemoryStats:
  """Reads `compiled.memory_analysis()` (sizes are per device).

  Args:
    compiled: a compiled program (`jax.jit(f).lower(...).compile()`).
    platform: the devices' platform ('cpu', 'gpu', ...); on 'cpu' the unfused dots' packing
      memory is added (`cpu_dot_scratch`). None: buffer assignment only.
    stats: the program's `hlo_stats.analyze_hlo`, when the caller has it (the HLO is then
      not parsed again).

  Example:
    >>> memory_stats(jax.jit(f).lower(x).compile(), 'cpu').total

  Raises:
    ValueError: the backend gives no memory analysis.
  """
  ma = compiled.memory_analysis()
  if ma is None:
    raise ValueError("memory_stats: this backend returned no memory_analysis() for the compiled program; "
                     "the memory of a candidate cannot be predicted without it.")
  scratch = cpu_dot_scratch(stats if stats is not None else compiled.as_text()) if platform == "cpu" else 0
  return MemoryStats(argument=int(ma.argument_size_in_bytes), output=int(ma.output_size_in_bytes),
                     alias=int(ma.alias_size_in_bytes), temp=int(ma.temp_size_in_bytes), scratch=scratch)
