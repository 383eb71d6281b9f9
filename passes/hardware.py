"""Hardware profiles: the per-device figures the cost model and the memory budget use.

Built-in profiles come from vendors' published datasheet figures (dense, no sparsity).
Figures that no datasheet gives (link latency) are effective estimates and say so.
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
    link_latency: effective latency of one step of a ring collective (s).
    devices_per_node: devices sharing the fast links.
    inter_node_bandwidth: bandwidth per device for groups spanning nodes, one direction (B/s).
  """
  name: str
  memory_bytes: int
  peak_flops: Mapping[str, float] = dataclasses.field(hash=False)
  memory_bandwidth: float
  link_bandwidth: float
  link_latency: float
  devices_per_node: int
  inter_node_bandwidth: float

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

  def __repr__(self):
    flops = ", ".join(f"{k}={v / 1e12:.4g} TFLOP/s" for k, v in sorted(self.peak_flops.items()))
    return (f"HardwareProfile(name={self.name!r}, memory={self.memory_bytes / 1e9:.4g} GB, {flops}, "
            f"mem_bw={self.memory_bandwidth / 1e9:.4g} GB/s, link={self.link_bandwidth / 1e9:.4g} GB/s, "
            f"latency={self.link_latency * 1e6:.3g} us, {self.devices_per_node}/node, "
            f"inter_node={self.inter_node_bandwidth / 1e9:.4g} GB/s)")


def _is_number(v) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


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


# Datasheet figures. NVLink bandwidth is the datasheet's bidirectional total halved. The
# inter-node figure is one NIC per GPU as in DGX/HGX systems (NDR 400 Gb/s for Hopper, HDR
# 200 Gb/s for A100). 'f32' is the CUDA-core FP32 peak: matmuls at precision 'highest' do not
# use TF32 tensor cores; 'tf32' is listed for callers that allow it. The 5 us latency is an
# effective per-step NCCL figure, not a datasheet value.
_BUILTINS = {
    "h100": HardwareProfile(  # H100 SXM5 80GB
        name="h100", memory_bytes=80 * 10**9,
        peak_flops={"f32": 67e12, "tf32": 494.7e12, "bf16": 989.4e12, "f16": 989.4e12, "fp8": 1978.9e12},
        memory_bandwidth=3.35e12, link_bandwidth=450e9, link_latency=5e-6, devices_per_node=8,
        inter_node_bandwidth=50e9),
    "h200": HardwareProfile(  # H200 SXM 141GB: H100's compute with HBM3e
        name="h200", memory_bytes=141 * 10**9,
        peak_flops={"f32": 67e12, "tf32": 494.7e12, "bf16": 989.4e12, "f16": 989.4e12, "fp8": 1978.9e12},
        memory_bandwidth=4.8e12, link_bandwidth=450e9, link_latency=5e-6, devices_per_node=8,
        inter_node_bandwidth=50e9),
    "a100": HardwareProfile(  # A100 SXM4 80GB
        name="a100", memory_bytes=80 * 10**9,
        peak_flops={"f32": 19.5e12, "tf32": 156e12, "bf16": 312e12, "f16": 312e12},
        memory_bandwidth=2.039e12, link_bandwidth=300e9, link_latency=5e-6, devices_per_node=8,
        inter_node_bandwidth=25e9),
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
  missing = [f for f in fields if f not in d]
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
