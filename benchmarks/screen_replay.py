"""The screen's memory predictions against compiled figures saved earlier, without compiling.

`benchmarks/screen_accuracy.py --rows F` saves every compiled candidate's memory (XLA's buffer
assignment, which does not change while the program does not). This replays the current
screen on those plans, so that a change to the screen's memory terms is checked against every
candidate of both models in seconds. Printed per model: the worst raw error over the
candidates within 2x of the budget (screen_accuracy's goal: 5%), how many are within 5%, the
mean |error|, the error per kind of plan, and the worst rows with their terms.

Run: .venv/bin/python benchmarks/screen_replay.py ROWS.json [--models small,100m,gqa] [--worst 15]
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

from benchmarks.screen_accuracy import MODELS  # noqa: E402
from ap_xla.models.llama import llama_program  # noqa: E402
from passes import build, screen  # noqa: E402
from passes.hardware import get_profile  # noqa: E402
from passes.plan import Plan  # noqa: E402


def kind(p: Plan) -> str:
  """A plan's class for the per-kind table: pipeline schedule, FSDP, recomputation, TP."""
  pipe = f"{p.schedule} pp={p.pp}" if p.pp > 1 else "no pipeline"
  return f"{pipe:14} {'fsdp' if p.fsdp else 'repl':4} {p.recompute:14} tp={p.tp}"


def replay(name: str, rows: list[dict]) -> dict:
  cfg, batch, _ = MODELS[name]
  prog = llama_program(cfg, batch, abstract=True)
  plans = [eval(r["plan"], {"Plan": Plan}) for r in rows]
  scr = screen.build_screen(prog, jax.devices(), build.derive_program_tp(prog), plans)
  hw = get_profile("cpu")
  out = []
  for p, r in zip(plans, rows):
    s = scr(p, hw)
    out.append({"plan": p, "memory": r["memory"], "screen": s.memory_bytes, "near": r["near_budget"],
                "err": s.memory_bytes / r["memory"] - 1, "terms": s.memory, "was": r["raw_memory"] / r["memory"] - 1})
  return {"model": name, "rows": out}


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("rows", help="a JSON file written by screen_accuracy.py --rows")
  ap.add_argument("--models", default=",".join(MODELS), help="those in ROWS.json are replayed")
  ap.add_argument("--worst", type=int, default=15)
  args = ap.parse_args()
  with open(args.rows) as f:
    saved = json.load(f)
  summary = []
  for name in [m.strip() for m in args.models.split(",") if m.strip() in saved]:
    res = replay(name, saved[name])
    near = [r for r in res["rows"] if r["near"]]
    worst = max(abs(r["err"]) for r in near)
    was = max(abs(r["was"]) for r in near)
    within = sum(abs(r["err"]) <= 0.05 for r in near)
    mean = sum(abs(r["err"]) for r in near) / len(near)
    print(f"\n{name}: {len(near)} candidates within 2x of the budget: worst {worst:.1%} (saved run {was:.1%}), "
          f"within 5%: {within}, mean |err| {mean:.1%}")
    by = collections.defaultdict(list)
    for r in near:
      by[kind(r["plan"])].append(r["err"])
    print(f"  {'kind':50} {'n':>3} {'min':>7} {'max':>7}")
    for k in sorted(by):
      print(f"  {k:50} {len(by[k]):>3} {min(by[k]):+7.1%} {max(by[k]):+7.1%}")
    print("  worst:")
    for r in sorted(near, key=lambda r: -abs(r["err"]))[:args.worst]:
      terms = " ".join(f"{k[:5]}={v / 2**20:.1f}" for k, v in r["terms"].items())
      print(f"  {r['err']:+6.1%} compiled {r['memory'] / 2**20:8.2f} MiB  {r['plan']!r}\n           {terms}")
    summary.append({"model": name, "near_budget": len(near), "worst": worst, "within_5pct": within,
                    "mean_abs": mean, "saved_worst": was})
  print(json.dumps({"benchmark": "screen_replay", "rows": args.rows, "models": summary}))


if __name__ == "__main__":
  main()
