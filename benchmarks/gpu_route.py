"""Memory of pinned plans for an H100 target by three routes: XLA:GPU compiled without a device
(`passes.gpu_target`), XLA:CPU on simulated CPU devices (what ap-xla used before), and the
analytic screen (`passes.screen`, uncalibrated); with each compile's wall and CPU seconds.

Models: a tiny Llama (`tests.models.TINY_LLAMA` at seq 256) and llama2-7b (seq 2048), one sequence
per GPU on 8 H100s, bf16 compute, plans FSDP-8 gathering bf16 with and without full
recomputation, and DP-8 (replicated) for the tiny model. Nothing is allocated (shapes only).
Prints a table, then one JSON line with every figure.

Run: .venv/bin/python benchmarks/gpu_route.py [--models tiny,7b]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import sys
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

from ap_xla.presets import build_program, get_preset  # noqa: E402
from passes import gpu_target, hlo_stats, memory, screen  # noqa: E402
from passes.evaluate import compile_plan, tp_dims  # noqa: E402
from passes.hardware import get_profile  # noqa: E402
from passes.plan import Plan  # noqa: E402

GIB = 2**30
MIB = 2**20
FSDP = Plan(dp=8, fsdp=True, bf16=True, low_prec=True)
PLANS = {"tiny": [Plan(dp=8, bf16=True), FSDP, dataclasses.replace(FSDP, recompute="full")],
         "7b": [FSDP, dataclasses.replace(FSDP, recompute="full")]}


def _program(name: str):
  if name == "tiny":
    from tests.models import TINY_LLAMA, llama_tiny
    return llama_tiny(batch=8, cfg=dataclasses.replace(TINY_LLAMA, seq=256))
  return build_program(get_preset("llama2-7b"), batch=8, seq=2048, abstract=True)


def _cpu_s() -> float:
  r = resource.getrusage(resource.RUSAGE_SELF)
  return r.ru_utime + r.ru_stime


def _compile(program, plan, route):
  t0, c0 = time.perf_counter(), _cpu_s()
  compiled = compile_plan(program, plan, route.devices, tp_dims(program, None, 1))
  wall, cpu = time.perf_counter() - t0, _cpu_s() - c0
  platform = route.platform if not route.deviceless else None  # XLA:CPU's dot packing on CPU only
  mem = memory.memory_stats(compiled, platform)
  stats = hlo_stats.analyze_hlo(compiled.as_text())
  gathers = sum(c.bytes * c.count for c in stats.collectives if c.kind == "all-gather")
  return {"total_gib": mem.total / GIB, "temp_gib": mem.temp / GIB, "compile_wall_s": wall, "compile_cpu_s": cpu,
          "all_gather_gib": gathers / GIB, "cudnn_attention": "__cudnn$fmha" in compiled.as_text()}


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--models", default="tiny,7b")
  args = ap.parse_args(argv)
  hw = get_profile("h100")
  gpu = gpu_target.compile_route(hw, jax.devices())
  if not gpu.deviceless:
    print(f"no deviceless XLA:GPU route here: {gpu.note}", file=sys.stderr)
    return 1
  cpu = gpu_target.CompileRoute("xla:cpu", tuple(jax.devices()))
  rows = []
  for name in args.models.split(","):
    program, plans = _program(name), PLANS[name]
    with gpu_target.tracing_for(gpu):
      scr = screen.build_screen(program, gpu.devices, None, plans)
      screened = {p: scr(p, hw).memory_bytes / GIB for p in plans}
    for plan in plans:
      row = {"model": name, "plan": repr(plan), "screen_gib": screened[plan]}
      for key, route in (("gpu", gpu), ("cpu", cpu)):
        row[key] = _compile(program, plan, route)
      rows.append(row)
  head = f"{'model':5} {'plan':88} {'XLA:GPU MiB':>11} {'XLA:CPU MiB':>11} {'screen MiB':>10} " \
         f"{'GPU compile s (cpu)':>20} {'CPU compile s (cpu)':>20} {'all-gather MiB gpu/cpu':>22} cudnn"
  print(head)
  print("-" * len(head))
  for r in rows:
    g, c = r["gpu"], r["cpu"]
    mib = lambda gib: gib * GIB / MIB
    print(f"{r['model']:5} {r['plan']:88} {mib(g['total_gib']):11.1f} {mib(c['total_gib']):11.1f} "
          f"{mib(r['screen_gib']):10.1f} {g['compile_wall_s']:11.1f} ({g['compile_cpu_s']:6.1f}) "
          f"{c['compile_wall_s']:11.1f} ({c['compile_cpu_s']:6.1f}) "
          f"{mib(g['all_gather_gib']):12.2f}/{mib(c['all_gather_gib']):.2f} {g['cudnn_attention']}")
  print(json.dumps({"benchmark": "gpu_route", "hardware": "h100", "devices": 8, "target": gpu.describe(),
                    "rows": rows}))
  return 0


if __name__ == "__main__":
  sys.exit(main())
