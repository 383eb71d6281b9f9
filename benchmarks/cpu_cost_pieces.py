"""What the pieces of a step cost on XLA:CPU's simulated devices, against what the cost model charges.

Four measurements, all devices running at once (as in a step), each beside the cost model's
charge with a profile calibrated in the same run (`passes.calibrate.run_calibration`, so the
machine's load hits both alike):

  stream   per device y = a * x + b over 16 MiB, into a fresh output per run (what the
           calibration timed before: the page faults of the new buffer included) and into the
           input's own buffer (donated: a step's state is donated, its temporaries reused).
  sizes    the same stream, into the donated input, repeated in a loop inside one program at
           buffer sizes from 16 KiB to 64 MiB per device: what a kernel gets whose operands the
           caches still hold (L2 and L3 on this host), against the one 16 MiB pass.
  adamw    the update of optax.adamw on the plan_quality model's 1.57M parameters, replicated
           on every device vs sharded over 8 (FSDP), K updates in one program; the model
           charges 7 passes over the local parameters (read g, m, v, p; write m, v, p) at the
           profile's memory bandwidth.
  gather   L layers of (all-gather a weight shard -> dot -> tanh) against the same chain with
           the weight replicated: the difference per layer is what one all-gather costs amid
           compute, over groups of 2 and of 8 (the other devices in concurrent groups).

The machine is shared: compare ratios within one run, not figures across runs.
Prints a table, then one JSON object with the figures as its last line.

Run: XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu .venv/bin/python benchmarks/cpu_cost_pieces.py
"""
from __future__ import annotations

import json
import os
import sys
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

from passes import calibrate, cost_model  # noqa: E402
from passes.compat import auto_mesh  # noqa: E402
from passes.hlo_stats import Collective  # noqa: E402

PARAMS = 1_573_504  # benchmarks/plan_quality.py's 'small' Llama


def _median(fn, reps: int = 9) -> float:
  """Median wall time of `fn()` after a warm-up call, timed as the calibration times its samples."""
  return calibrate._median_time(fn, reps)


def stream(mesh, nbytes: int) -> dict:
  """GB/s per device of y = a x + b into a fresh output vs into the donated input."""
  spec = P("d")
  body = jax.shard_map(lambda a: a * 1.0001 + 0.5, mesh=mesh, in_specs=spec, out_specs=spec)
  x = jax.device_put(jnp.ones((mesh.size, nbytes // 4), jnp.float32), NamedSharding(mesh, spec))
  fresh = jax.jit(body)
  t_fresh = _median(lambda: fresh(x))
  donated, st = jax.jit(body, donate_argnums=0), [x + 0]

  def run():
    st[0] = donated(st[0])
    return st[0]
  t_reused = _median(run)
  return {"fresh_GBps": 2 * nbytes / t_fresh / 1e9, "reused_GBps": 2 * nbytes / t_reused / 1e9}


STREAM_SIZES = (16 << 10, 64 << 10, 256 << 10, 1 << 20, 4 << 20, 16 << 20, 64 << 20)


def stream_sizes(mesh, sizes=STREAM_SIZES, moved: int = 64 << 20) -> list[dict]:
  """GB/s per device of y = a x + b into the donated input, per buffer size, all devices at once.

  The pass repeats in a loop inside one program (`moved` bytes per device in all, at most 512
  passes), so dispatch is not timed and a buffer that fits the caches stays in them between
  passes: the rate a kernel gets when its operands are still cached, against the calibration's
  one pass over 16 MiB.
  """
  spec = P("d")
  out = []
  for nbytes in sizes:
    loops = max(1, min(512, moved // nbytes))
    body = jax.shard_map(lambda a: jax.lax.fori_loop(0, loops, lambda i, v: v * 1.0001 + 0.5, a),
                         mesh=mesh, in_specs=spec, out_specs=spec)
    f, st = jax.jit(body, donate_argnums=0), [jax.device_put(jnp.ones((mesh.size, nbytes // 4), jnp.float32),
                                                             NamedSharding(mesh, spec))]

    def run():
      st[0] = f(st[0])
      return st[0]
    out.append({"bytes": nbytes, "passes": loops, "GBps": 2 * nbytes * loops / _median(run, 7) / 1e9})
  return out


def adamw(mesh, profile, updates: int = 5) -> dict:
  """Seconds per AdamW update, replicated and sharded over every device, and the model's charge."""
  n = PARAMS // mesh.size * mesh.size
  tx = optax.adamw(1e-3)
  out = {}
  for name, spec, local in (("replicated", P(), n), ("sharded", P("d"), n // mesh.size)):
    sh = NamedSharding(mesh, spec)
    p = jax.device_put(jnp.ones((n,), jnp.float32), sh)
    g = jax.device_put(jnp.full((n,), 1e-3, jnp.float32), sh)

    def loop(p, s, g):
      def body(_, c):
        u, s = tx.update(g, c[1], c[0])
        return optax.apply_updates(c[0], u), s
      return jax.lax.fori_loop(0, updates, body, (p, s))
    f, st = jax.jit(loop, donate_argnums=(0, 1)), [p, jax.jit(tx.init)(p)]

    def run():
      st[0], st[1] = f(st[0], st[1], g)
      return st[0]
    out[name] = {"measured_s": _median(run) / updates, "model_s": 7 * 4 * local / profile.streaming_bandwidth}
  return out


def gather(devices, profile, layers: int = 24) -> list[dict]:
  """Seconds per all-gather amid compute over groups of 2 and 8, and the model's charge."""
  rows = []
  for n in (2, 8):
    mesh = auto_mesh(np.array(devices, dtype=object).reshape(len(devices) // n, n), ("r", "g"))
    for d in (64, 256):  # a [d, d] f32 weight: 16 KiB and 256 KiB gathered
      w = jax.device_put(jnp.full((layers, d, d), 0.01, jnp.float32), NamedSharding(mesh, P(None, "g")))
      wr = jax.device_put(jnp.full((layers, d, d), 0.01, jnp.float32), NamedSharding(mesh, P()))
      x = jax.device_put(jnp.ones((len(devices) * 64, d), jnp.float32), NamedSharding(mesh, P(("r", "g"))))

      def chain(w, x, gathered):
        for i in range(layers):
          wi = jax.lax.all_gather(w[i], "g", axis=0, tiled=True) if gathered else w[i]
          x = jnp.tanh(x @ wi)
        return x
      make = lambda gathered, ws: jax.jit(jax.shard_map(
          lambda w, x: chain(w, x, gathered), mesh=mesh, in_specs=(ws, P(("r", "g"))),
          out_specs=P(("r", "g")), check_vma=False))
      fg, fr = make(True, P(None, "g")), make(False, P())
      t = (_median(lambda: fg(w, x)) - _median(lambda: fr(wr, x))) / layers
      rows.append({"group": n, "bytes": 4 * d * d, "measured_s": t,
                   "model_s": cost_model.collective_time(Collective("all-gather", 4 * d * d, n, 1, ()), profile)})
  return rows


def main():
  devices = jax.devices()
  t0 = time.perf_counter()
  profile = calibrate.run_calibration(devices).profile
  mesh = auto_mesh(np.array(devices, dtype=object), ("d",))
  print(f"{len(devices)} {devices[0].platform} devices; calibrated now: {profile!r}")
  s = stream(mesh, 16 << 20)
  print(f"stream 16 MiB per device: into a fresh output {s['fresh_GBps']:.3g} GB/s, into the donated input "
        f"{s['reused_GBps']:.3g} GB/s per device ({s['reused_GBps'] / s['fresh_GBps']:.2f}x)")
  sizes = stream_sizes(mesh)
  print(f"\n{'stream, looped':24} {'passes':>7} {'GB/s per device':>16}")
  for r in sizes:
    print(f"{str(r['bytes'] >> 10) + ' KiB per device':24} {r['passes']:7d} {r['GBps']:16.3g}")
  a = adamw(mesh, profile)
  print(f"\n{'adamw update':24} {'measured ms':>12} {'model ms':>9}")
  for k, v in a.items():
    print(f"{k:24} {v['measured_s'] * 1e3:12.3f} {v['model_s'] * 1e3:9.3f}")
  ratio = a["replicated"]["measured_s"] / a["sharded"]["measured_s"]
  print(f"replicated / sharded: measured {ratio:.2f}, model {len(devices)}")
  g = gather(devices, profile)
  print(f"\n{'all-gather amid compute':24} {'measured ms':>12} {'model ms':>9}")
  for r in g:
    print(f"{'group ' + str(r['group']) + ', ' + str(r['bytes'] // 1024) + ' KiB':24} "
          f"{r['measured_s'] * 1e3:12.3f} {r['model_s'] * 1e3:9.3f}")
  print(json.dumps({"benchmark": "cpu_cost_pieces", "devices": len(devices), "platform": devices[0].platform,
                    "profile": {"memory_bandwidth": profile.memory_bandwidth, "link_bandwidth": profile.link_bandwidth,
                                "link_latency": profile.link_latency},
                    "stream": s, "stream_sizes": sizes, "adamw": a, "gather": g, "seconds": round(time.perf_counter() - t0, 1)}))


if __name__ == "__main__":
  main()
