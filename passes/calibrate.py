"""Calibration: microbenchmarks on the devices present, turned into a HardwareProfile.

Every figure is measured with all devices busy at once (one shard_map over every device),
so it is what one device gets while the others run too. On a GPU that is the device's own
rate; on simulated host devices, which share a few cores and one memory, it is the share a
device really gets during a step, which is what the cost model needs.

  matmul      per device an [n, n] x [n, n] dot in f32 and bf16 at a few n; the peak FLOP/s
              is the best rate over the sizes.
  memory      per device y = a * x + b over a large vector, written over x (donated): 2 x
              bytes / time. A fresh output per run would be timed with its page faults: on 8
              simulated CPU devices 1.7 GB/s per device against 5.0 GB/s into a reused
              buffer, which a step's buffers are (its state is donated, its temporaries come
              back from the heap); the replicated AdamW update measured what the reused
              figure predicts (`benchmarks/cpu_cost_pieces.py`).
  collectives psum and all-gather over groups of 2, 4, 8 devices (as many as are present),
              each at a small and a large size, repeated in a loop inside one program so
              dispatch is not counted; the ring model of `cost_model.collective_time` is
              fitted to them: one (bandwidth, latency) per group size for the log, and one
              over all of them (least squares on relative error) for the profile.

A calibrated profile is saved as JSON (`hardware.save_profile`) and read back validated
(`hardware.load_profile`) on later runs: `load_or_calibrate`.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import os
import re
import statistics
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from passes import hardware as hw_lib
from passes.compat import auto_mesh
from passes.hardware import HardwareProfile

log = logging.getLogger("ap_xla")

GROUP_SIZES = (2, 4, 8)


@dataclasses.dataclass(frozen=True)
class Sample:
  """One microbenchmark: what ran, how big, and the median seconds of one run of it."""
  kind: str    # 'matmul-f32', 'matmul-bf16', 'memory', 'all-reduce', 'all-gather'
  size: int    # n of the matmul; bytes per device otherwise (all-gather: the gathered result)
  group: int   # devices per group (1 for matmul and memory)
  seconds: float

  def __repr__(self):
    return f"Sample({self.kind}, size={self.size}, group={self.group}, {self.seconds * 1e6:.4g} us)"


@dataclasses.dataclass(frozen=True)
class LinkFit:
  """The ring model fitted to collectives over one group size (or all of them: group=0)."""
  group: int
  bandwidth: float  # B/s per device, one direction
  latency: float    # s per ring step

  def __repr__(self):
    g = "all" if self.group == 0 else self.group
    return f"LinkFit(group={g}, bw={self.bandwidth / 1e9:.4g} GB/s, latency={self.latency * 1e6:.3g} us)"


@dataclasses.dataclass(frozen=True)
class Calibration:
  """Everything one calibration measured, and the profile made from it."""
  profile: HardwareProfile
  samples: tuple[Sample, ...]
  links: tuple[LinkFit, ...]
  seconds: float

  def __repr__(self):
    return f"Calibration({self.profile!r}, samples={len(self.samples)}, {self.seconds:.2f} s)"


def _sanitize(s: str) -> str:
  return re.sub(r"[^A-Za-z0-9_.-]+", "_", s.strip()).strip("_").lower() or "unknown"


def profile_key(devices) -> str:
  """'<platform>-<device_kind>-<count>' of a device list, safe as a file name."""
  devices = list(devices)
  if not devices:
    raise ValueError("profile_key needs at least one device, got none.")
  d = devices[0]
  return f"{_sanitize(d.platform)}-{_sanitize(d.device_kind)}-{len(devices)}"


# Bumped when what a calibration measures changes meaning, so a profile measured the old way
# is not read back (2: the memory stream into a reused buffer, not a fresh output).
CALIBRATION_VERSION = 2


def default_profile_path(devices, cache_dir: str | None = None) -> str:
  """Where a calibrated profile of these devices is kept:
  <cache_dir>/profiles/<key>.v<CALIBRATION_VERSION>.json.

  Args:
    devices: the devices the profile describes.
    cache_dir: the cache folder (default ~/.cache/ap_xla).
  """
  base = os.path.expanduser(cache_dir or os.path.join("~", ".cache", "ap_xla"))
  return os.path.join(base, "profiles", f"{profile_key(devices)}.v{CALIBRATION_VERSION}.json")


def _median_time(fn: Callable[[], object], reps: int) -> float:
  """Median wall time of `fn()` after one warm-up call (which also compiles it)."""
  jax.block_until_ready(fn())
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def _per_device(mesh: Mesh, body: Callable, spec: P):
  """`body` run on every device's block at once: one jitted shard_map over the whole mesh."""
  return jax.jit(jax.shard_map(body, mesh=mesh, in_specs=spec, out_specs=spec))


def _matmul_samples(mesh: Mesh, sizes: Sequence[int], dtypes: Sequence[str], reps: int) -> list[Sample]:
  n_dev = mesh.size
  spec = P(mesh.axis_names)
  out = []
  for dtype in dtypes:
    dt = {"f32": jnp.float32, "bf16": jnp.bfloat16}[dtype]
    for n in sizes:
      # [devices, n, n]: every device multiplies its own [n, n] block by itself. Random values,
      # not a constant: an H200's bf16 matmul was seen 13% faster on zeros than on random data
      # (2026-10-28), and a constant matrix toggles as few bits.
      make = lambda key, n=n, dt=dt: (jax.random.normal(key, (n_dev, n, n), jnp.float32) / n ** 0.5).astype(dt)
      x = jax.jit(make, out_shardings=NamedSharding(mesh, spec))(jax.random.PRNGKey(n))
      fn = _per_device(mesh, lambda a: jnp.einsum("dij,djk->dik", a, a), spec)
      out.append(Sample(f"matmul-{dtype}", n, 1, _median_time(functools.partial(fn, x), reps)))
  return out


def _memory_sample(mesh: Mesh, nbytes: int, reps: int) -> Sample:
  """Streams into the input's own buffer (donated): a fresh output would add its page faults."""
  n_dev = mesh.size
  spec = P(mesh.axis_names)
  x = [jax.device_put(jnp.ones((n_dev, nbytes // 4), jnp.float32), NamedSharding(mesh, spec))]
  fn = jax.jit(jax.shard_map(lambda a: a * 1.0001 + 0.5, mesh=mesh, in_specs=spec, out_specs=spec),
               donate_argnums=0)

  def run():
    x[0] = fn(x[0])
    return x[0]
  return Sample("memory", nbytes, 1, _median_time(run, reps))


def _collective_sample(devices, kind: str, group: int, nbytes: int, loops: int, reps: int) -> Sample:
  """Seconds of one psum (or all-gather) over groups of `group` devices, all groups at once."""
  n_dev = len(devices)
  mesh = auto_mesh(np.array(devices, dtype=object).reshape(n_dev // group, group), ("rest", "group"))
  spec = P(("rest", "group"))
  if kind == "all-reduce":
    elems = max(nbytes // 4, 1)  # the reduced array
  else:
    elems = max(nbytes // 4 // group, 1)  # the local shard; the gathered result is nbytes

  def body(x):
    def step(_, v):
      if kind == "all-reduce":
        return jax.lax.psum(v, "group") * (1.0 / group)
      # Use every gathered element so the gather cannot be simplified away; a sum of slices
      # (a loop fusion) rather than a reduce over a new axis, which XLA:CPU runs ~50x slower.
      full = jax.lax.all_gather(v, "group", tiled=True)
      return sum(full[i * elems:(i + 1) * elems] for i in range(group)) * (1.0 / group)
    return jax.lax.fori_loop(0, loops, step, x)

  x = jax.device_put(jnp.ones((n_dev * elems,), jnp.float32), NamedSharding(mesh, spec))
  # check_vma=False: the loop carry is varying over 'group' going in and invariant after psum.
  fn = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=spec, out_specs=spec, check_vma=False))
  t = _median_time(lambda: fn(x), reps) / loops
  size = elems * 4 * (1 if kind == "all-reduce" else group)
  return Sample(kind, size, group, t)


def _ring_coeffs(kind: str, n: int, nbytes: int) -> tuple[float, float]:
  """(bytes term, latency term) of the ring model: time = a / bw + b * latency."""
  if kind == "all-reduce":
    return 2 * (n - 1) / n * nbytes, 2 * (n - 1)
  return (n - 1) / n * nbytes, n - 1  # all-gather


def fit_link(samples: Sequence[Sample], group: int = 0) -> LinkFit:
  """Least squares (on relative error) of the ring model over collective samples.

  Args:
    samples: all-reduce / all-gather samples, at two sizes at least.
    group: the group size the samples share, or 0 when they span several.

  Returns:
    The fitted LinkFit; the latency is clamped at 0 and the bandwidth at 1 B/s when noise
    makes the unconstrained fit non-physical.
  """
  rows = [_ring_coeffs(s.kind, s.group, s.size) + (s.seconds,) for s in samples]
  if len({r[0] for r in rows}) < 2:
    raise ValueError(f"fit_link needs collective samples of at least two sizes, got {list(samples)}.")
  a = np.array([[r[0] / r[2], r[1] / r[2]] for r in rows])  # divide by t: relative residuals
  y = np.ones(len(rows))
  (inv_bw, lat), *_ = np.linalg.lstsq(a, y, rcond=None)
  if lat < 0:  # noise: refit the bandwidth alone
    lat = 0.0
    inv_bw = float(np.dot(a[:, 0], y) / np.dot(a[:, 0], a[:, 0]))
  if inv_bw <= 0:  # latency explains everything: refit it alone, bandwidth effectively unbounded
    inv_bw = 1e-18
    lat = float(np.dot(a[:, 1], y) / np.dot(a[:, 1], a[:, 1]))
  return LinkFit(group, 1.0 / float(inv_bw), max(float(lat), 0.0))


def _host_memory_per_device(n_dev: int) -> int:
  try:
    total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
  except (ValueError, OSError):
    total = hw_lib.get_profile("cpu").memory_bytes * n_dev
  return max(int(total // n_dev), 1)


def run_calibration(devices=None, quick: bool = False) -> Calibration:
  """Runs the microbenchmarks on `devices` (default: all) and builds a profile from them.

  Args:
    devices: the devices to measure; all of them run every benchmark at once.
    quick: fewer sizes and repetitions (a few seconds on 8 simulated CPU devices).

  Returns:
    A Calibration: the profile, the raw samples and the per-group link fits.
  """
  t0 = time.perf_counter()
  devices = list(devices if devices is not None else jax.devices())
  if not devices:
    raise ValueError("run_calibration needs at least one device, got none.")
  n_dev = len(devices)
  gpu_like = devices[0].platform != "cpu"
  mesh = auto_mesh(np.array(devices, dtype=object), ("d",))
  reps = 3 if quick else 7
  if gpu_like:
    mm_sizes, mem_bytes, big = ((4096,) if quick else (2048, 4096, 8192)), 1 << 30, 64 << 20
  else:
    mm_sizes, mem_bytes, big = ((256,) if quick else (128, 256, 512)), 16 << 20, 4 << 20
  samples = _matmul_samples(mesh, mm_sizes, ("f32", "bf16"), reps)
  samples.append(_memory_sample(mesh, mem_bytes, reps))
  groups = [g for g in GROUP_SIZES if g <= n_dev and n_dev % g == 0]
  kinds = ("all-reduce",) if quick else ("all-reduce", "all-gather")
  for g in groups:
    for kind in kinds:
      for nbytes, loops in ((4 << 10, 20), (big, 3)):
        samples.append(_collective_sample(devices, kind, g, nbytes, loops, reps))

  peak = {}
  for dtype in ("f32", "bf16"):
    rates = [2 * s.size ** 3 / s.seconds for s in samples if s.kind == f"matmul-{dtype}"]
    peak[dtype] = max(rates)
  mem = next(s for s in samples if s.kind == "memory")
  mem_bw = 2 * mem.size / mem.seconds
  coll = [s for s in samples if s.kind in ("all-reduce", "all-gather")]
  links = tuple(fit_link([s for s in coll if s.group == g], g) for g in groups)
  if coll:
    overall = fit_link(coll, 0)
    links += (overall,)
    link_bw, latency = overall.bandwidth, overall.latency
  else:  # one device: no collective runs; the figures are never used, keep them valid
    link_bw, latency = mem_bw, 0.0
  capacity = hw_lib.device_memory_bytes(devices[0]) or _host_memory_per_device(n_dev)
  per_process = sum(d.process_index == devices[0].process_index for d in devices)
  # Every group measured here lies within one process; groups across processes were not
  # measured, so the inter-node figure is the intra-node one (a multi-host run should pass a
  # profile with its real network figure).
  # The measured rates are achievable ones (efficiencies 1). On GPUs XLA's latency-hiding
  # scheduler overlaps the 'data' collectives and attention runs as a flash kernel, which is not
  # measured here: it keeps the built-in profile's published flash-to-matmul ratio.
  gpu = devices[0].platform == "gpu"
  builtin = hw_lib.detect_profile(devices) if gpu else None
  profile = HardwareProfile(
      name=f"calibrated-{profile_key(devices)}", memory_bytes=int(capacity), peak_flops=peak,
      memory_bandwidth=float(mem_bw), link_bandwidth=float(link_bw), link_latency=float(latency),
      devices_per_node=int(per_process), inter_node_bandwidth=float(link_bw), overlaps_collectives=gpu,
      flash_attention=gpu,
      attention_efficiency=builtin.attention_efficiency / builtin.matmul_efficiency if gpu else 1.0)
  cal = Calibration(profile, tuple(samples), links, time.perf_counter() - t0)
  log.info("Calibrated %d %s devices in %.2f s: %r", n_dev, devices[0].device_kind, cal.seconds, profile)
  for fit in links:
    log.info("  %r", fit)
  return cal


def calibrate(devices=None, path: str | None = None, quick: bool = False) -> HardwareProfile:
  """Measures the devices and returns their profile; saves it to `path` when given.

  Args:
    devices: the devices to measure (default: all).
    path: a JSON file to save the profile to (folders are created); None: not saved.
    quick: fewer sizes and repetitions.

  Example:
    >>> profile = calibrate(jax.devices(), path='/tmp/cpu.json', quick=True)
    >>> search(program, settings=SearchSettings(hardware=profile))
  """
  profile = run_calibration(devices, quick).profile
  if path is not None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    hw_lib.save_profile(profile, path)
    log.info("Saved the calibrated profile to %s", path)
  return profile


def load_or_calibrate(devices=None, path: str | None = None, quick: bool = False,
                      cache_dir: str | None = None) -> HardwareProfile:
  """The saved calibrated profile of these devices, or a new calibration saved for next time.

  Args:
    devices: the devices (default: all).
    path: an explicit profile file; when it exists it is loaded and must be valid. None: the
      default cache path `default_profile_path(devices, cache_dir)`.
    quick: calibrate in quick mode when no saved profile exists.
    cache_dir: the cache folder for the default path (default ~/.cache/ap_xla).

  Raises:
    ValueError: `path` was given and holds an invalid profile (the message names the file and
      the field). An invalid file at the default cache path is replaced with a warning.
  """
  devices = list(devices if devices is not None else jax.devices())
  target = path or default_profile_path(devices, cache_dir)
  if os.path.exists(target):
    try:
      profile = hw_lib.load_profile(target)
      log.info("Using the calibrated hardware profile %s", target)
      return profile
    except ValueError as e:
      if path is not None:
        raise
      log.warning("Ignoring the cached hardware profile: %s Calibrating again.", e)
  return calibrate(devices, target, quick)
