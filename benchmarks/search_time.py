"""How long the search takes: a ~100M-parameter Llama-style flax model on 8 simulated devices.

Prints a readable table, then one JSON object with the figures as the last line. Also
reports the same search served from the plan cache (the time a second run saves), and the
search time for 8 and 64 blocks of the same width (compile time must not grow with depth:
the ratio 64/8 should stay at or under 1.5). Goal for the first search: at most 10 s on 2
cores (the analytic screen compiles only the candidates that can win). Default options are MoAI's with fp32 compute
(`--bf16` adds mixed precision: bf16 matmuls compile slowly on CPU hosts).

Run: XLA_FLAGS=--xla_force_host_platform_device_count=8 .venv/bin/python benchmarks/search_time.py
"""
from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

from ap_xla.models.llama import LlamaConfig, llama_program  # noqa: E402
import tempfile  # noqa: E402

from ap_xla.plan_cache import cached_search  # noqa: E402
from passes.search import SearchSettings  # noqa: E402
from passes.space import SearchOptions  # noqa: E402

MODEL_100M = LlamaConfig(vocab=8192, dim=768, layers=12, heads=12, ffn=2048, seq=256)


def run(cfg: LlamaConfig, batch: int, options: SearchOptions, capacity: int, threads: int,
        cache_dir: str):
  prog = llama_program(cfg, batch, abstract=True)
  t0 = time.perf_counter()
  res = cached_search(prog, options=options, directory=cache_dir, enabled=True,
                      settings=SearchSettings(capacity_bytes=capacity, progress=False, max_threads=threads))
  total = time.perf_counter() - t0
  compiled = sum(c.compiled for c in res.candidates)
  return {"params": prog.num_params, "blocks": cfg.layers, "candidates": len(res.candidates),
          "compiled": compiled, "feasible": len(res.feasible), "compile_s": round(res.timings["compile"], 2),
          "measure_s": round(res.timings.get("measure", 0.0), 2), "search_s": round(total, 2),
          "plan": repr(res.plan), "from_cache": res.from_cache}


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--batch", type=int, default=32)
  ap.add_argument("--capacity", default="2GiB", help="per-device memory of the simulated devices")
  ap.add_argument("--threads", type=int, default=2)
  ap.add_argument("--bf16", action="store_true", help="search mixed precision too (slow to compile on CPU)")
  args = ap.parse_args()
  from passes.hardware import parse_bytes
  capacity = parse_bytes(args.capacity)
  opts = SearchOptions(mixed_precision=args.bf16)
  cache = tempfile.mkdtemp(prefix="ap_xla_bench_cache_")
  rows = {"100M": run(MODEL_100M, args.batch, opts, capacity, args.threads, cache)}
  rows["100M again"] = run(MODEL_100M, args.batch, opts, capacity, args.threads, cache)
  # Depth scaling: the same width with 8 and 64 blocks. Stages stay 'auto' (1, 2, 4, 8 in both:
  # the same candidates), micro-batches are pinned to keep the run short.
  depth_opts = SearchOptions(num_micro_batches=4, mixed_precision=False, distribute_parameter=False)
  for layers in (8, 64):
    cfg = LlamaConfig(vocab=1024, dim=256, layers=layers, heads=8, ffn=512, seq=64)
    rows[f"{layers} blocks"] = run(cfg, 16, depth_opts, 2**40, args.threads, cache)
  print(f"{'model':10} {'params':>12} {'blocks':>6} {'cands':>6} {'compiled':>8} {'feasible':>8} "
        f"{'compile s':>9} {'measure s':>9} {'search s':>9}  chosen plan")
  for name, r in rows.items():
    print(f"{name:10} {r['params']:>12,} {r['blocks']:>6} {r['candidates']:>6} {r['compiled']:>8} "
          f"{r['feasible']:>8} {r['compile_s']:>9} {r['measure_s']:>9} {r['search_s']:>9}  {r['plan']}")
  print("(measure s: timing near ties on the devices, SearchSettings.measure_budget_s, within search s)")
  # Depth scaling is the search's own: timing near ties is bounded by its budget, not by depth.
  unmeasured = lambda r: r["search_s"] - r["measure_s"]
  ratio = unmeasured(rows["64 blocks"]) / unmeasured(rows["8 blocks"])
  ratio_total = rows["64 blocks"]["search_s"] / rows["8 blocks"]["search_s"]
  saved = rows["100M"]["search_s"] - rows["100M again"]["search_s"]
  first = rows["100M"]
  print(f"first search of the 100M model: {first['search_s']} s, {first['compiled']} of {first['candidates']} "
        f"candidates compiled (goal <= 10 s)")
  print(f"search time 64 blocks / 8 blocks = {ratio:.2f} without timing near ties (goal <= 1.5); "
        f"{ratio_total:.2f} with it")
  print(f"second run served from the plan cache: {rows['100M again']['from_cache']}, "
        f"{saved:.1f} s saved ({rows['100M again']['search_s']} s instead of {rows['100M']['search_s']} s)")
  print(json.dumps({"benchmark": "search_time", "devices": jax.device_count(), "rows": rows,
                    "depth_ratio_64_over_8": round(ratio, 3), "depth_ratio_with_measuring": round(ratio_total, 3),
                    "cache_saved_s": round(saved, 2)}))


if __name__ == "__main__":
  main()
