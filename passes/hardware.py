"""Hardware profiles: the per-device figures the cost model and the memory budget use.

Built-in profiles come from vendors' published datasheet figures (dense, no sparsity); what
a datasheet does not give (what share of a peak real kernels reach, latencies) comes from
published microbenchmarks, cited at `_BUILTINS`, or from calibration on the devices
(`passes.calibrate`, whose measured figures are achievable rates: efficiencies 1).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
import tempfile
from typing import Mapping

log = logging.getLogger("ap_xla")

_REQUIRED_DTYPES = ("f32", "bf16")


@dataclasses.dataclass(frozen=True)
class HardwareProfile:
  """Per-device figures of one accelerator kind.

  Attributes:
    name: profile name ('h100', ...).
    memory_bytes: device memory per device (bytes).
    peak_flops: dense peak FLOP/s per dtype name; at least 'f32' and 'bf16'.
    memory_bandwidth: device memory bandwidth (B/s).
    link_bandwidth: collective bandwidth within a node, per device, one direction (B/s).
    link_latency: effective latency of one step of a collective within a node (s).
    devices_per_node: devices sharing the fast links.
    inter_node_bandwidth: network bandwidth per device, one direction (B/s): one NIC per
      device, as on H100/A100 clusters (a node's NICs together carry devices_per_node times it).
    inter_node_latency: latency of one step of a collective between nodes (s); None: link_latency.
    matmul_efficiency: the share of peak_flops large matmuls reach (1: the peak is a measured rate).
    memory_efficiency: the share of memory_bandwidth streaming kernels reach.
    link_efficiency: the share of link_bandwidth a large collective's bus bandwidth reaches.
    inter_node_efficiency: the same for inter_node_bandwidth.
    overlaps_collectives: whether the target's compiler runs the collectives over 'data' (FSDP
      gathers, gradient reductions) asynchronously beside compute (XLA:GPU does; XLA:CPU does not).
    flash_attention: whether the target runs fused attention as one flash kernel (cuDNN on
      GPUs): the analytic screen charges its FLOPs (the causal mask's skipped half left out)
      and not the score arrays the CPU's chunked path moves through memory.
    attention_efficiency: the share of peak_flops flash attention (forward and backward) reaches.
  """
  name: str
  memory_bytes: int
  peak_flops: Mapping[str, float] = dataclasses.field(hash=False)
  memory_bandwidth: float
  link_bandwidth: float
  link_latency: float
  devices_per_node: int
  inter_node_bandwidth: float
  inter_node_latency: float | None = None
  matmul_efficiency: float = 1.0
  memory_efficiency: float = 1.0
  link_efficiency: float = 1.0
  inter_node_efficiency: float = 1.0
  overlaps_collectives: bool = False
  flash_attention: bool = False
  attention_efficiency: float = 1.0

  def __post_init__(self):
    object.__setattr__(self, "peak_flops", dict(self.peak_flops))  # a private copy: frozen means frozen
    problems = _check_fields(dataclasses.asdict(self))
    if problems:
      raise ValueError(f"HardwareProfile {self.name!r}: " + "; ".join(problems))

  def peak(self, dtype: str) -> float:
    """Peak FLOP/s for `dtype` ('f32', 'bf16', ...)."""
    if dtype not in self.peak_flops:
      raise ValueError(f"Hardware profile {self.name!r} has no peak FLOP/s for dtype {dtype!r}; "
                       f"it has {sorted(self.peak_flops)}.")
    return self.peak_flops[dtype]

  def attention_rate(self, dtype: str) -> float:
    """FLOP/s a flash-attention kernel reaches: `peak(dtype)` x `attention_efficiency`."""
    return self.peak(dtype) * self.attention_efficiency

  def matmul_rate(self, dtype: str) -> float:
    """FLOP/s large matmuls reach: `peak(dtype)` x `matmul_efficiency`."""
    return self.peak(dtype) * self.matmul_efficiency

  @property
  def streaming_bandwidth(self) -> float:
    """Bytes/s streaming kernels reach: `memory_bandwidth` x `memory_efficiency`."""
    return self.memory_bandwidth * self.memory_efficiency

  @property
  def network_latency(self) -> float:
    """Latency of one step between nodes (`inter_node_latency`, else `link_latency`)."""
    return self.link_latency if self.inter_node_latency is None else self.inter_node_latency

  def __repr__(self):
    flops = ", ".join(f"{k}={v / 1e12:.4g} TFLOP/s" for k, v in sorted(self.peak_flops.items()))
    eff = [f"{f}={getattr(self, f + '_efficiency'):.3g}" for f in ("matmul", "memory", "link", "inter_node",
                                                                      "attention")
           if getattr(self, f + "_efficiency") != 1.0]
    return (f"HardwareProfile(name={self.name!r}, memory={self.memory_bytes / 1e9:.4g} GB, {flops}, "
            f"mem_bw={self.memory_bandwidth / 1e9:.4g} GB/s, link={self.link_bandwidth / 1e9:.4g} GB/s, "
            f"latency={self.link_latency * 1e6:.3g} us, {self.devices_per_node}/node, "
            f"inter_node={self.inter_node_bandwidth / 1e9:.4g} GB/s"
            + (f", network latency={self.network_latency * 1e6:.3g} us" if self.inter_node_latency is not None else "")
            + (f", efficiency {' '.join(eff)}" if eff else "")
            + (", async data collectives" if self.overlaps_collectives else "")
            + (", flash attention" if self.flash_attention else "") + ")")


def _is_number(v) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


# Fields a profile saved before they existed may lack: they default to "no correction".
OPTIONAL_FIELDS = ("inter_node_latency", "matmul_efficiency", "memory_efficiency", "link_efficiency",
                   "inter_node_efficiency", "overlaps_collectives", "flash_attention",
                   "attention_efficiency")


def _check_fields(d: dict) -> list[str]:
  """Problems with a profile's field values, each naming the field and the value."""
  problems = []
  if not isinstance(d.get("name"), str) or not d["name"]:
    problems.append(f"field 'name' must be a non-empty string, got {d.get('name')!r}")
  for f in ("memory_bytes", "devices_per_node"):
    v = d.get(f)
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
      problems.append(f"field {f!r} must be a positive int, got {v!r}")
  for f in ("memory_bandwidth", "link_bandwidth", "inter_node_bandwidth", "link_latency"):
    v = d.get(f)
    if not _is_number(v) or v < 0 or (v == 0 and f != "link_latency"):
      what = "a non-negative number" if f == "link_latency" else "a positive number"
      problems.append(f"field {f!r} must be {what}, got {v!r}")
  v = d.get("inter_node_latency")
  if v is not None and (not _is_number(v) or v < 0):
    problems.append(f"field 'inter_node_latency' must be a non-negative number or null, got {v!r}")
  for f in ("matmul_efficiency", "memory_efficiency", "link_efficiency", "inter_node_efficiency",
            "attention_efficiency"):
    v = d.get(f, 1.0)
    if not _is_number(v) or not 0 < v <= 1.5:
      problems.append(f"field {f!r} must be a number in (0, 1.5] (a share of the peak; above 1 only where "
                      f"a switch reduces in the network), got {v!r}")
  for f in ("overlaps_collectives", "flash_attention"):
    if not isinstance(d.get(f, False), bool):
      problems.append(f"field {f!r} must be true or false, got {d[f]!r}")
  flops = d.get("peak_flops")
  if not isinstance(flops, dict):
    problems.append(f"field 'peak_flops' must be a mapping dtype -> FLOP/s, got {flops!r}")
  else:
    missing = [k for k in _REQUIRED_DTYPES if k not in flops]
    if missing:
      problems.append(f"field 'peak_flops' needs entries {missing}, got {sorted(flops)}")
    for k, v in flops.items():
      if not isinstance(k, str) or not _is_number(v) or v <= 0:
        problems.append(f"field 'peak_flops'[{k!r}] must be a positive number, got {v!r}")
  return problems


# Datasheet figures (dense, no sparsity): peak FLOP/s, memory, memory bandwidth; NVLink
# bandwidth is the datasheet's bidirectional total halved (H100/H200 NVLink 4: 900 GB/s, A100
# NVLink 3: 600 GB/s); the network is one NIC per GPU as in DGX/HGX systems (DGX H100: eight
# ConnectX-7 400 Gb/s; DGX A100: eight ConnectX-6 HDR 200 Gb/s). 'f32' is the CUDA-core FP32
# peak: matmuls at precision 'highest' do not use TF32 tensor cores; 'tf32' is listed for
# callers that allow it.
#
# Published microbenchmarks for what the datasheets do not give:
# - matmul_efficiency: Maximum Achievable Matmul FLOPS (bf16 torch.matmul, best shape) / peak,
#   stas00/ml-engineering compute/accelerator/README.md @b9e2972: A100 SXM 271.2/312 = 0.869,
#   H100 SXM 794.5/989 = 0.803, GH200 (H200-class) 828.6/989 = 0.838.
# - link_efficiency, link_latency: all-reduce over one node of 8 H200 (NVLink 4, NCCL 2.27),
#   stas00/ml-engineering network/benchmarks/results/all-reduce-8xH200.md @c53741b: ring bus
#   bandwidth with NVLink SHARP off 367.61 GB/s of 450 (0.82); 32 KiB-512 KiB take 38-40 us,
#   the latency of 2 x 7 ring steps: 2.8 us a step. Taken for NVLink 3 too (no A100 sweep found).
# - inter_node_latency, inter_node_efficiency: nccl-tests all_reduce_perf on two nodes,
#   aws-samples/awsome-distributed-training micro-benchmarks/nccl-tests/README.md @0162aac:
#   8 bytes over 2 x 8 H100 (p5) 69.12 us = 2 x 7 steps in the node (39 us) + 2 steps between
#   nodes: 15 us a step; 2 GiB over 2 x 8 A100 (p4de, 4 x 100 Gb/s per node) 51.4 ms against
#   42.9 ms for each GPU's 1/8 share over its 6.25 GB/s of network: 0.83.
# - attention_efficiency: flash attention's share of the bf16 peak. A100: FlashAttention-2
#   (Dao, arXiv:2307.08691, abstract) "reaching 50-73% of the theoretical maximum FLOPs/s on
#   A100": the middle, 0.615. H100/H200 (ap-xla runs cuDNN's flash kernel, of FlashAttention-3's
#   class): FlashAttention-3 (arXiv:2407.08608, abstract) "FlashAttention-2 achieving only 35%
#   utilization on the H100 GPU", FlashAttention-3 "speedup on H100 GPUs by 1.5-2.0x": the
#   middle of 0.525-0.70, 0.61.
# - memory_efficiency: 1 (no published figure cited; calibration measures it on a lent GPU).
# The 'cpu' profile keeps the old model: simulated devices with no efficiencies and no overlap.
_GPU = dict(link_latency=2.8e-6, inter_node_latency=15e-6, link_efficiency=0.82, inter_node_efficiency=0.83,
            overlaps_collectives=True, flash_attention=True, devices_per_node=8)
_BUILTINS = {
    "h100": HardwareProfile(  # H100 SXM5 80GB
        name="h100", memory_bytes=80 * 10**9,
        peak_flops={"f32": 67e12, "tf32": 494.7e12, "bf16": 989.4e12, "f16": 989.4e12, "fp8": 1978.9e12},
        memory_bandwidth=3.35e12, link_bandwidth=450e9, inter_node_bandwidth=50e9, matmul_efficiency=0.803,
        attention_efficiency=0.61, **_GPU),
    "h200": HardwareProfile(  # H200 SXM 141GB: H100's compute with HBM3e
        name="h200", memory_bytes=141 * 10**9,
        peak_flops={"f32": 67e12, "tf32": 494.7e12, "bf16": 989.4e12, "f16": 989.4e12, "fp8": 1978.9e12},
        memory_bandwidth=4.8e12, link_bandwidth=450e9, inter_node_bandwidth=50e9, matmul_efficiency=0.838,
        attention_efficiency=0.61, **_GPU),
    "a100": HardwareProfile(  # A100 SXM4 80GB
        name="a100", memory_bytes=80 * 10**9,
        peak_flops={"f32": 19.5e12, "tf32": 156e12, "bf16": 312e12, "f16": 312e12},
        memory_bandwidth=2.039e12, link_bandwidth=300e9, inter_node_bandwidth=25e9, matmul_efficiency=0.869,
        attention_efficiency=0.615, **_GPU),
    # Simulated host devices share a few cores and one memory: deliberately low figures. The
    # 4 GiB memory is a placeholder; set the real budget with AP_XLA_DEVICE_MEMORY.
    "cpu": HardwareProfile(
        name="cpu", memory_bytes=4 * 2**30, peak_flops={"f32": 50e9, "bf16": 25e9},
        memory_bandwidth=10e9, link_bandwidth=5e9, link_latency=20e-6, devices_per_node=8,
        inter_node_bandwidth=1e9),
}
PROFILE_NAMES = tuple(_BUILTINS)

# device_kind substrings -> profile, first match wins ('NVIDIA H100 80GB HBM3', 'NVIDIA H200',
# 'NVIDIA A100-SXM4-80GB'); GH200 carries H200-class HBM3e.
_KINDS = (("gh200", "h200"), ("h200", "h200"), ("h100", "h100"), ("a100", "a100"))


def get_profile(name, /, **overrides) -> HardwareProfile:
  """A built-in profile by name (case-insensitive), with fields optionally overridden.

  Example:
    >>> get_profile('cpu', memory_bytes=parse_bytes('2GiB')).memory_bytes
    2147483648
  """
  if isinstance(name, HardwareProfile):
    profile = name
  elif isinstance(name, str) and name.strip().lower() in _BUILTINS:
    profile = _BUILTINS[name.strip().lower()]
  else:
    raise ValueError(f"Unknown hardware profile {name!r}; allowed: {list(PROFILE_NAMES)}, "
                     "or a JSON file written by save_profile.")
  fields = {f.name for f in dataclasses.fields(HardwareProfile)}
  unknown = sorted(set(overrides) - fields)
  if unknown:
    raise ValueError(f"get_profile: unknown fields {unknown}; allowed: {sorted(fields)}.")
  return dataclasses.replace(profile, **overrides) if overrides else profile


def load_profile(path: str) -> HardwareProfile:
  """Reads a profile from JSON (the fields of HardwareProfile; memory_bytes may be '80GB').

  A file saved before the OPTIONAL_FIELDS existed loads with their defaults (no efficiency
  correction, no overlap), i.e. as the cost model used it then.

  Raises:
    ValueError: unreadable JSON, or a missing, extra, negative or mistyped field; the
      message names the field, the value and the file.
  """
  try:
    with open(path) as f:
      d = json.load(f)
  except json.JSONDecodeError as e:
    raise ValueError(f"Hardware profile file {path!r} is not valid JSON: {e}.") from None
  except OSError as e:
    raise ValueError(f"Cannot read hardware profile file {path!r}: {e.strerror}.") from None
  if not isinstance(d, dict):
    raise ValueError(f"Hardware profile file {path!r} must hold a JSON object, got {type(d).__name__}.")
  fields = [f.name for f in dataclasses.fields(HardwareProfile)]
  missing = [f for f in fields if f not in d and f not in OPTIONAL_FIELDS]
  extra = sorted(set(d) - set(fields))
  problems = [f"missing field {f!r}" for f in missing] + [f"unknown field {f!r} (value {d[f]!r})" for f in extra]
  if isinstance(d.get("memory_bytes"), str):
    try:
      d["memory_bytes"] = parse_bytes(d["memory_bytes"])
    except ValueError as e:
      problems.append(f"field 'memory_bytes': {e}")
  if not missing:
    problems += _check_fields(d)
  if problems:
    raise ValueError(f"Invalid hardware profile file {path!r}: " + "; ".join(problems) +
                     f". Expected the fields {fields}.")
  return HardwareProfile(**d)


def save_profile(profile: HardwareProfile, path: str) -> None:
  """Writes a profile as JSON atomically (a temporary file, then os.replace)."""
  if not isinstance(profile, HardwareProfile):
    raise TypeError(f"save_profile: profile must be a HardwareProfile, got {type(profile).__name__}.")
  folder = os.path.dirname(os.path.abspath(path))
  fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp_profile_", suffix=".json")
  try:
    with os.fdopen(fd, "w") as f:
      json.dump(dataclasses.asdict(profile), f, indent=2, sort_keys=True)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise


_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*$")


def parse_bytes(value) -> int:
  """A byte count from an int or a string such as '256MiB', '1.5GB', '1024'.

  Units: B, KB/MB/GB/TB (powers of 1000), KiB/MiB/GiB/TiB (powers of 1024), case-insensitive.
  Bare 'K', 'M', 'G' are rejected as ambiguous.

  Example:
    >>> parse_bytes('1.5GB'), parse_bytes('256MiB')
    (1500000000, 268435456)
  """
  if isinstance(value, bool) or not isinstance(value, (int, str)):
    raise TypeError(f"A byte size must be an int or a string like '256MiB', got {type(value).__name__} {value!r}.")
  if isinstance(value, int):
    if value < 0:
      raise ValueError(f"A byte size must be non-negative, got {value}.")
    return value
  m = _SIZE_RE.match(value)
  unit = m.group(2).lower() if m else ""
  if not m or unit not in _UNITS:
    hint = (f" '{m.group(2)}' is ambiguous: write '{m.group(2).upper()}iB' (powers of 1024) or "
            f"'{m.group(2).upper()}B' (powers of 1000)." if m and unit in ("k", "m", "g", "t") else "")
    raise ValueError(f"Cannot parse the byte size {value!r}: expected a number with an optional unit "
                     f"such as '1024', '256MiB' or '1.5GB' (units {sorted(u for u in _UNITS if u)}).{hint}")
  return int(round(float(m.group(1)) * _UNITS[unit]))


def detect_profile(devices) -> HardwareProfile:
  """The built-in profile matching `devices[0].device_kind`; 'cpu' for host devices.

  An accelerator of unknown kind gets the 'a100' profile (the slowest built-in GPU) and a
  warning.
  """
  devices = list(devices)
  if not devices:
    raise ValueError("detect_profile needs at least one device, got none.")
  kinds = {d.device_kind for d in devices}
  if len(kinds) > 1:
    log.warning("Devices of several kinds %s; using the first one's profile.", sorted(kinds))
  dev = devices[0]
  if dev.platform == "cpu":
    return _BUILTINS["cpu"]
  kind = dev.device_kind.lower()
  for key, name in _KINDS:
    if key in kind:
      return _BUILTINS[name]
  log.warning("No hardware profile for device kind %r (platform %s); using 'a100'. Pass a profile "
              "with AP_XLA_HARDWARE for a better estimate.", dev.device_kind, dev.platform)
  return _BUILTINS["a100"]


def is_host_profile(profile: HardwareProfile) -> bool:
  """Whether a profile describes host (CPU) devices: the built-in 'cpu', or one calibrated on
  CPU devices ('calibrated-cpu-...'). A GPU profile used on simulated CPU devices (`ap-xla plan
  --hardware h100`) is not: XLA:CPU's own memory needs are then not the target's."""
  return profile.name == "cpu" or profile.name.startswith("calibrated-cpu-")


def device_memory_bytes(device) -> int | None:
  """The device's own memory limit (`memory_stats()['bytes_limit']`), or None if it has none."""
  try:
    stats = device.memory_stats()
  except Exception:  # backends without allocator statistics raise instead of returning None
    return None
  if not stats or not stats.get("bytes_limit"):
    return None
  return int(stats["bytes_limit"])
