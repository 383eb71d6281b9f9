"""`torch.cuda` memory figures for the presented accelerator: the plan's per-device memory.

A script that prints `torch.cuda.max_memory_allocated()` on MoAI sees the memory of the
devices the plan runs on. Here each figure is per device, the largest over the plan's
devices (the device that runs out first):

  * where the JAX backend keeps device statistics (GPUs: `device.memory_stats()`), they are
    read: `memory_allocated` = bytes_in_use, `max_memory_allocated` = peak_bytes_in_use,
    `memory_reserved` = the pool, `mem_get_info` = (limit - in use, limit);
  * elsewhere (CPU), `memory_allocated` is the bytes of the live training state on a device
    (parameters, optimizer state and accumulated gradients of every model ap-xla trains) and
    `max_memory_allocated` the compiled plan's per-device peak (XLA's memory analysis of the
    step: argument + output - alias + temp) once a training step ran, the figure the search
    checked against the budget.

`reset_peak_memory_stats()` starts a new peak: afterwards the peak is the device's own peak if
it rose since, else the largest of the figures above seen since the reset.
"""
from __future__ import annotations

import jax

from ap_xla.torch_frontend import registry

_peak = {"plan": 0, "baseline": None}


def plan_devices() -> list:
  """The devices of the plans ap-xla trains with (all JAX devices before the first takeover)."""
  found = []
  for s in registry.sessions():
    for d in (s.phase.devices if s.phase is not None else ()):
      if d not in found:
        found.append(d)
  return found or list(jax.devices())


def _stats(devices) -> list[dict] | None:
  try:
    stats = [d.memory_stats() for d in devices]
  except Exception:  # a backend without statistics may raise instead of returning None
    return None
  return stats if all(stats) else None


def _state_bytes(device) -> int:
  """Bytes of the live training state held on `device`."""
  total = 0
  for s in registry.sessions():
    for leaf in jax.tree.leaves(s.training_state()):
      for shard in getattr(leaf, "addressable_shards", ()):
        if shard.device == device:
          total += shard.data.nbytes
  return total


def note_step(plan_bytes: int | None) -> None:
  """Called by a session when a compiled step ran: its plan's per-device peak counts."""
  if plan_bytes:
    _peak["plan"] = max(_peak["plan"], int(plan_bytes))


def memory_allocated(device=None) -> int:
  devices = plan_devices()
  stats = _stats(devices)
  if stats is not None:
    return max(int(s.get("bytes_in_use", 0)) for s in stats)
  return max(_state_bytes(d) for d in devices)


def max_memory_allocated(device=None) -> int:
  stats = _stats(plan_devices())
  now = memory_allocated()
  if stats is not None:
    peak = max(int(s.get("peak_bytes_in_use", 0)) for s in stats)
    if _peak["baseline"] is None or peak > _peak["baseline"]:
      return peak
  return max(now, _peak["plan"])


def memory_reserved(device=None) -> int:
  stats = _stats(plan_devices())
  if stats is not None:
    return max(int(s.get("pool_bytes", s.get("bytes_reserved", s.get("bytes_in_use", 0)))) for s in stats)
  return memory_allocated()


def max_memory_reserved(device=None) -> int:
  stats = _stats(plan_devices())
  if stats is not None and any("peak_pool_bytes" in s for s in stats):
    return max(int(s.get("peak_pool_bytes", 0)) for s in stats)
  return max_memory_allocated()


def reset_peak_memory_stats(device=None) -> None:
  stats = _stats(plan_devices())
  _peak["plan"] = 0
  _peak["baseline"] = max(int(s.get("peak_bytes_in_use", 0)) for s in stats) if stats else None


def capacity() -> int:
  """Per-device memory capacity: the device's limit, else what the search budgets against."""
  devices = plan_devices()
  stats = _stats(devices)
  if stats is not None and all("bytes_limit" in s for s in stats):
    return min(int(s["bytes_limit"]) for s in stats)
  from ap_xla import env
  from passes import search as search_pass
  return search_pass.resolve_hardware(env.read_settings(), devices)[1]


def mem_get_info(device=None) -> tuple[int, int]:
  total = capacity()
  return max(0, total - memory_allocated()), total


def memory_stats(device=None) -> dict:
  """The keys of `torch.cuda.memory_stats()` that scripts read."""
  return {"allocated_bytes.all.current": memory_allocated(), "allocated_bytes.all.peak": max_memory_allocated(),
          "reserved_bytes.all.current": memory_reserved(), "reserved_bytes.all.peak": max_memory_reserved(),
          "num_devices_in_plan": len(plan_devices())}


def memory_summary(device=None, abbreviated: bool = False) -> str:
  mib = 2 ** 20
  return (f"ap-xla accelerator: {len(plan_devices())} device(s), per device: "
          f"allocated {memory_allocated() / mib:.1f} MiB (peak {max_memory_allocated() / mib:.1f} MiB), "
          f"capacity {capacity() / mib:.1f} MiB")


def synchronize() -> None:
  """Waits for every JAX computation of the trained models (what `torch.cuda.synchronize()` means)."""
  for s in registry.sessions():
    jax.block_until_ready([x for x in jax.tree.leaves(s.training_state()) if hasattr(x, "block_until_ready")])
  jax.effects_barrier()
