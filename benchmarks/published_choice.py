"""The free choice of `ap-xla plan` for each published workload, held against the published runs.

Issue 19's check: "`ap-xla plan`'s free choice for those models is never one that the
published data shows to be more than 10% slower than a configuration in the search space".

For each workload of `benchmarks/published_runs.py` (rows of one group with the same global
batch and sequence: same model, GPU and count), the free search's space is enumerated as
`ap-xla plan` enumerates it (every option 'auto', mixed precision on: `passes.space`), every
candidate is screened for the row's GPU profile (`passes.screen`, the analytic route: nothing is
compiled, so this is the search's ranking before its compile stage) and the fastest one under
80% of device memory is the choice. Where a published row's pinned plan is that choice, the
choice is judged: it is "slower" when its measured step is more than 10% slower than the best
measured step among the group's published rows whose pinned plans are in the space; otherwise
"ok". A choice no published row ran is "not covered" (the data cannot judge it).

Run: .venv/bin/python benchmarks/published_choice.py
"""
from __future__ import annotations

import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import published_runs as pr  # noqa: E402

SLOWER = 0.10  # "more than 10% slower"


def workloads(rows: list[dict]) -> dict:
  """{(group, batch, seq): rows}: the published rows of one workload."""
  out: dict = {}
  for r in rows:
    w = r["workload"]
    out.setdefault((r["group"], w["global_batch_seqs"], w["seq_len"]), []).append(r)
  return out


_RULES: dict = {}


def _rules(preset: str, program):
  if preset not in _RULES:
    from passes.build import derive_program_tp
    _RULES[preset] = derive_program_tp(program.abstract())
  return _RULES[preset]


def free_choice(planner: "pr.Planner", row: dict):
  """(chosen plan or None, its screened figures, the space's plans, candidates screened) of
  the free search for `row`'s workload and GPU."""
  from passes.space import SearchOptions, enumerate_plans
  from passes.search import fsdp_groups
  from passes import pipeline
  preset, pinned, batch, seq, _ = pr.pin(row)
  hw = pr.hardware_for(row)
  spec, screen = planner.screen(preset, batch, seq, pinned, pr.row_fusion(row))
  n = row["hardware"]["num_gpus"]
  rules = _rules(preset, screen.program)
  blocks = screen.program.num_blocks

  def tp_ok(tp):  # as passes.search.search
    return None if rules.shardable(tp) else f"no tensor-parallel group of the program divides by tp={tp}"
  options = SearchOptions()
  plans, _ = enumerate_plans(n, batch, blocks, options, tp_ok,
                             lambda pp, mb, dp: pipeline.check_pipeline(blocks, batch, pp, mb, dp),
                             fsdp_groups(screen.program, hw, options))
  sizes = {batch // (p.dp * p.mb) for p in plans}
  for p in plans:  # as passes.screen.build_screen: a pipeline's pre and post run on the local batch
    if p.pp > 1:
      local = batch // p.dp
      sizes |= {local, local // p.pp if local % p.pp == 0 else local}
  screen.profile.set_sizes(sizes)
  budget = pr.MEMORY_RATIO * hw.memory_bytes
  best = None
  for p in plans:
    s = screen(p, hw)
    if s.memory_bytes <= budget and (best is None or s.cost.total_s < best[1].cost.total_s):
      best = (p, s)
  return (best[0] if best else None), (best[1] if best else None), plans


def judge(planner: "pr.Planner", rows: list[dict]) -> dict:
  """The free choice for one workload's rows, and the published data's verdict on it."""
  t0 = time.perf_counter()
  choice, s, plans = free_choice(planner, rows[0])
  space = set(plans)
  preset, plan, batch, seq, _ = pr.pin(rows[0])
  program = planner.screen(preset, batch, seq, plan, pr.row_fusion(rows[0]))[1].program
  # each row's layout as ap-xla runs it (FSDP over 96 as HSDP 32x3, as the pinned rows are)
  pinned = {r["id"]: pr._shardable(pr.pin(r)[1], program, [])[0] for r in rows}
  in_space = [r for r in rows if pinned[r["id"]] in space]
  best = min(in_space, key=lambda r: r["derived"]["step_time_s"]) if in_space else None
  ran = [r for r in rows if pinned[r["id"]] == choice]
  verdict, measured = "not covered", None
  if choice is None:
    verdict = "nothing fits"
  elif ran and best is not None:
    measured = min(r["derived"]["step_time_s"] for r in ran)
    verdict = "slower" if measured > (1 + SLOWER) * best["derived"]["step_time_s"] else "ok"
  return {"group": rows[0]["group"], "batch": rows[0]["workload"]["global_batch_seqs"],
          "seq": rows[0]["workload"]["seq_len"], "choice": repr(choice) if choice else None,
          "predicted_s": s.cost.total_s if s else None, "memory_gib": s.memory_bytes / 2**30 if s else None,
          "candidates": len(plans), "published_in_space": [r["id"] for r in in_space],
          "best_published": best["id"] if best else None,
          "best_published_s": best["derived"]["step_time_s"] if best else None,
          "choice_rows": [r["id"] for r in ran], "choice_measured_s": measured, "verdict": verdict,
          "wall_s": time.perf_counter() - t0}


def run(rows: list[dict] | None = None, planner: "pr.Planner | None" = None) -> tuple[list[dict], dict]:
  """(per-workload results, summary) over the benchmark-eligible rows."""
  t0 = time.perf_counter()
  rows = pr.load_rows() if rows is None else rows
  planner = planner or pr.Planner()
  results = [judge(planner, rs) for _, rs in sorted(workloads(rows).items(), key=lambda kv: str(kv[0]))]
  summary = {"workloads": len(results), "judged": sum(r["verdict"] in ("ok", "slower") for r in results),
             "choice_over_10pct_slower": sum(r["verdict"] == "slower" for r in results),
             "not_covered": sum(r["verdict"] == "not covered" for r in results),
             "nothing_fits": sum(r["verdict"] == "nothing fits" for r in results),
             "candidates_screened": sum(r["candidates"] for r in results),
             "wall_s": round(time.perf_counter() - t0, 1)}
  return results, summary


def table(results: list[dict]) -> str:
  lines = [f"{'workload':<58} {'cands':>5}  {'free choice (screen, 80% budget)':<70} {'pred s':>7} {'GiB':>6}  verdict"]
  lines.append("-" * len(lines[0]))
  for r in results:
    plan = (r["choice"] or "-").replace("Plan(", "").replace(")", "").replace(", bf16=True", "")
    pred = f"{r['predicted_s']:.3f}" if r["predicted_s"] else "-"
    mem = f"{r['memory_gib']:.1f}" if r["memory_gib"] else "-"
    why = r["verdict"]
    if r["verdict"] in ("ok", "slower"):
      why += f" (ran as {r['choice_rows'][0]}: {r['choice_measured_s']:.3f} s; best published in space " \
             f"{r['best_published']}: {r['best_published_s']:.3f} s)"
    name = f"{r['group'][:44]} b{r['batch']} s{r['seq']}"
    lines.append(f"{name:<58} {r['candidates']:>5}  {plan:<70} {pred:>7} {mem:>6}  {why}")
  return "\n".join(lines)


def main():
  import json
  results, summary = run()
  print(table(results))
  print(json.dumps(summary))


if __name__ == "__main__":
  main()
