"""Memory XLA:CPU uses outside its buffer assignment, per dot shape (why plan_quality's memory
predictions run low on CPU).

`passes.memory` predicts a candidate's per-device peak from the compiled program's buffer
assignment (argument + output - alias + temp). On simulated CPU devices the measured peak is
higher by what the runtime allocates on its own. This benchmark isolates the largest such
allocation: one dot per device (a shard_map over all devices, as a training step runs them),
with the left operand canonical ("mk,kn->mn") or contracted on its first dimension
("km,kn->mn", what a weight gradient x.T @ g compiles to). For each shape it prints the
predicted bytes, the measured per-device peak (the process's peak resident size over the
resident size before the run, over the device count, with glibc mapping every buffer over
128 KiB so the resident size follows what is live; the smaller of the last two of three
runs), the difference, and what `passes.memory.cpu_dot_scratch` charges for it (the search
adds that to a CPU plan's predicted memory).

What it shows (see benchmarks/RESULTS.md): canonical dots compile to YNNPACK fusions, whose
memory is in the buffer assignment; a dot with its left operand contracted on dim 0 runs as
XLA:CPU's DotThunk, an Eigen thread-pool contraction that packs operand slices in memory of
its own (on one device about 2 x 256 x (m + n) x 4 bytes). With several simulated devices
on few cores, each device's share depends on how their dots overlap in time.

Run: .venv/bin/python benchmarks/cpu_dot_scratch.py   (XLA_FLAGS=--xla_force_host_platform_device_count=1 for one device)
"""
from __future__ import annotations

import gc
import json
import os
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # noqa: E402

import plan_quality as pq  # noqa: E402  (its RSS and malloc helpers)
from passes import memory  # noqa: E402

# (m, k, n, lhs contracted on dim 0): the benchmark model's head gradient is (128, 1024, 4096, True)
SHAPES = [(128, 1024, 4096, False), (1024, 128, 4096, False), (1024, 4096, 128, False), (1024, 1024, 1024, False),
          (128, 128, 4096, True), (128, 512, 4096, True), (128, 1024, 4096, True), (128, 2048, 4096, True),
          (128, 1024, 1024, True), (128, 1024, 8192, True), (512, 1024, 4096, True), (4096, 1024, 128, True)]


def measure(mesh: Mesh, m: int, k: int, n: int, lhs_t: bool) -> dict:
  nd = mesh.size
  sh = NamedSharding(mesh, P("d"))
  a_shape = (nd * k, m) if lhs_t else (nd * m, k)
  eq = "km,kn->mn" if lhs_t else "mk,kn->mn"
  f = jax.shard_map(lambda a, b: jnp.einsum(eq, a, b), mesh=mesh, in_specs=(P("d"), P("d")), out_specs=P("d"))
  compiled = jax.jit(f).lower(jax.ShapeDtypeStruct(a_shape, jnp.float32, sharding=sh),
                              jax.ShapeDtypeStruct((nd * k, n), jnp.float32, sharding=sh)).compile()
  ma = compiled.memory_analysis()
  pred = ma.argument_size_in_bytes + ma.output_size_in_bytes + ma.temp_size_in_bytes - ma.alias_size_in_bytes
  make = jax.jit(lambda: (jnp.ones(a_shape, jnp.float32), jnp.ones((nd * k, n), jnp.float32)),
                 out_shardings=(sh, sh)).lower().compile()
  runs = []
  for _ in range(3):
    gc.collect()
    pq._malloc_mode(True)
    if not pq._reset_peak_rss():
      raise SystemExit("cpu_dot_scratch: /proc/self/clear_refs is not writable; the peak cannot be measured")
    before = pq._proc_status("VmRSS")
    a, b = make()
    out = jax.block_until_ready(compiled(a, b))
    runs.append((pq._proc_status("VmHWM") - before) / nd)
    for x in (a, b, out):
      x.delete()
  meas = min(runs[1:])
  return {"m": m, "k": k, "n": n, "lhs_contracted_dim0": lhs_t, "predicted_bytes": int(pred),
          "measured_bytes": int(meas), "extra_bytes": int(meas - pred),
          "charged_bytes": memory.cpu_dot_scratch(compiled.as_text())}


def main():
  devices = jax.devices()
  if devices[0].platform != "cpu":
    raise SystemExit("cpu_dot_scratch measures the CPU runtime; run it with JAX_PLATFORMS=cpu")
  mesh = Mesh(devices, ("d",))
  mib = lambda b: f"{b / 2**20:8.2f}"
  print(f"one f32 dot per device on {len(devices)} simulated CPU devices; MiB per device")
  print(f"{'m':>5} {'k':>5} {'n':>5} {'lhs':>9} {'pred':>8} {'meas':>8} {'extra':>8} {'extra/pred':>10} {'charged':>8}")
  rows = []
  for m, k, n, t in SHAPES:
    r = measure(mesh, m, k, n, t)
    rows.append(r)
    print(f"{m:5} {k:5} {n:5} {'[k,m]' if t else '[m,k]':>9} {mib(r['predicted_bytes'])} {mib(r['measured_bytes'])} "
          f"{mib(r['extra_bytes'])} {r['extra_bytes'] / r['predicted_bytes'] * 100:9.1f}% {mib(r['charged_bytes'])}",
          flush=True)
  canon = [r["extra_bytes"] for r in rows if not r["lhs_contracted_dim0"]]
  trans = [r["extra_bytes"] for r in rows if r["lhs_contracted_dim0"]]
  print(f"extra: canonical lhs max {max(canon) / 2**20:.2f} MiB; lhs contracted on dim 0 max {max(trans) / 2**20:.2f} MiB")
  under = [r for r in rows if r["measured_bytes"] > r["predicted_bytes"] + r["charged_bytes"]]
  worst = max(rows, key=lambda r: (r["measured_bytes"] - r["predicted_bytes"] - r["charged_bytes"]) / r["measured_bytes"])
  worst_err = (worst["predicted_bytes"] + worst["charged_bytes"] - worst["measured_bytes"]) / worst["measured_bytes"]
  print(f"with the charged scratch: {len(under)} of {len(rows)} shapes still measure above the prediction; "
        f"worst {worst_err * 100:+.1f}% ({worst['m']}x{worst['k']}x{worst['n']})")
  print(json.dumps({"benchmark": "cpu_dot_scratch", "devices": len(devices), "rows": rows,
                    "max_extra_canonical_bytes": max(canon), "max_extra_transposed_bytes": max(trans),
                    "shapes_under_predicted_with_charge": len(under), "worst_err_with_charge": worst_err}))


if __name__ == "__main__":
  main()
