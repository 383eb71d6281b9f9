"""`ap-xla plan` for a cluster this machine does not have: how long it takes, what it chooses.

Runs `ap-xla plan --model llama2-7b --hardware h100 --devices 64 --batch 64 --seq 2048 --json`
twice with a fresh plan cache: the first run searches (goal: at most 20 s on a 2-core machine),
the second is served from the cache. Prints a table, then one JSON object with the
figures as the last line, among them the chosen plan, its predicted per-device memory against
80% of the H100's 80 GB, and the time the cache saves.

Run: .venv/bin/python benchmarks/plan_cli.py [--model llama2-7b --devices 64 --batch 64 --seq 2048]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

GOAL_S = 20.0


def run(args, cache: str) -> dict:
  cmd = [sys.executable, "-m", "ap_xla", "plan", "--model", args.model, "--hardware", args.hardware,
         "--devices", str(args.devices), "--batch", str(args.batch), "--seq", str(args.seq), "--json", "-q",
         "--cache-dir", cache]
  t0 = time.perf_counter()
  p = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  wall = time.perf_counter() - t0
  if p.returncode:
    raise SystemExit(f"ap-xla plan failed (exit {p.returncode}):\n{p.stderr[-2000:]}")
  doc = json.loads(p.stdout)
  cands = doc["result"]["candidates"]
  return {"wall_s": round(wall, 1), "from_cache": doc["from_cache"], "plan": doc["plan"],
          "config_line": doc["config_line"], "memory_bytes": doc["memory_bytes"],
          "est_time_s": doc["est_time_s"], "budget_bytes": doc["result"]["budget_bytes"],
          "capacity_bytes": doc["result"]["capacity_bytes"], "params": doc["model"]["num_params"],
          "candidates": len(cands), "compiled": sum(c.get("figures", "compiled") == "compiled" and
                                                    c["verdict"] not in ("pruned", "skipped") for c in cands)}


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--model", default="llama2-7b")
  ap.add_argument("--hardware", default="h100")
  ap.add_argument("--devices", type=int, default=64)
  ap.add_argument("--batch", type=int, default=64)
  ap.add_argument("--seq", type=int, default=2048)
  args = ap.parse_args()
  cache = tempfile.mkdtemp(prefix="ap_xla_plan_cli_")
  first, again = run(args, cache), run(args, cache)
  gib = 2**30
  print(f"ap-xla plan --model {args.model} --hardware {args.hardware} --devices {args.devices} "
        f"--batch {args.batch} --seq {args.seq}  ({first['params']:,} parameters)")
  print(f"{'run':8} {'wall s':>7} {'cache':>6} {'cands':>6} {'compiled':>8}  chosen plan")
  for name, r in (("first", first), ("again", again)):
    print(f"{name:8} {r['wall_s']:>7} {str(r['from_cache']):>6} {r['candidates']:>6} {r['compiled']:>8}  {r['config_line']}")
  mem, budget, cap = first["memory_bytes"], first["budget_bytes"], first["capacity_bytes"]
  print(f"predicted per-device memory {mem / gib:.2f} GiB = {mem / cap:.1%} of the device "
        f"(budget {budget / gib:.2f} GiB = 80%); estimated step {first['est_time_s'] * 1e3:.1f} ms")
  print(f"first run {first['wall_s']} s (goal <= {GOAL_S:.0f} s), {first['compiled']} of {first['candidates']} "
        f"candidates compiled; from the cache {again['wall_s']} s")
  print(json.dumps({"benchmark": "plan_cli", "model": args.model, "hardware": args.hardware,
                    "devices": args.devices, "batch": args.batch, "seq": args.seq, "first": first,
                    "again": again, "memory_fraction_of_device": mem / cap, "under_budget": mem <= budget,
                    "goal_s": GOAL_S, "within_goal": first["wall_s"] <= GOAL_S,
                    "cache_saved_s": round(first["wall_s"] - again["wall_s"], 1)}))


if __name__ == "__main__":
  main()
