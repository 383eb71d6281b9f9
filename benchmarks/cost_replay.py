"""Cost-model variants judged on one plan_quality run, without measuring again.

`benchmarks/plan_quality.py --dump F` writes every measured plan's compiled kernels and
collectives (its HloStats) with its step times. This replays them: the step-time estimate of
every plan under the dump's profile (the model the run used) and under the profile given by
`--profile` (a calibration measured later, or one with other fields), and for each the
Spearman rank correlation with the measured medians and the regret of the plan it would choose
(judged on the confirmation's times where that plan was confirmed, else on the rounds').

`--stream-curve F` judges one variant the model does not have: each kernel's memory traffic at
the streaming rate of its own size, interpolated (in log size) in the looped-stream rates that
`benchmarks/cpu_cost_pieces.py` measured (`stream_sizes` in its JSON line, saved to F), instead
of the one calibrated bandwidth: a cache-aware bandwidth for host profiles.

Run: .venv/bin/python benchmarks/cost_replay.py DUMP.json [--profile PROFILE.json]
"""
from __future__ import annotations

import argparse
import bisect
import dataclasses
import json
import math
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from passes import cost_model, hardware  # noqa: E402
from passes.hlo_stats import Collective, HloStats, Kernel  # noqa: E402
from passes.plan import Plan  # noqa: E402


def stats_of(row: dict) -> HloStats:
  """The HloStats a dump row was made from."""
  return HloStats(row["flops"], tuple(Collective(k, b, n, c, tuple(tuple(g) for g in groups))
                                      for k, b, n, c, groups in row["collectives"]),
                  kernels=tuple(Kernel(*k) for k in row["kernels"]),
                  attention=tuple(Kernel(*k) for k in row["attention"]), attention_causal=row["attention_causal"])


def curve_bandwidth(curve: list[tuple[int, float]], nbytes: float) -> float:
  """B/s at `nbytes` in a (bytes, B/s) curve sorted by size: log-linear between points, the
  end points' rates beyond them."""
  sizes = [b for b, _ in curve]
  i = bisect.bisect_left(sizes, nbytes)
  if i == 0:
    return curve[0][1]
  if i == len(curve):
    return curve[-1][1]
  (s0, v0), (s1, v1) = curve[i - 1], curve[i]
  t = (math.log(nbytes) - math.log(s0)) / (math.log(s1) - math.log(s0))
  return v0 + (v1 - v0) * t


def curve_estimate(stats: HloStats, plan: Plan, profile: hardware.HardwareProfile, curve) -> float:
  """`cost_model.estimate_step_time`'s total with each kernel's bytes at the curve's rate for its
  size: the model itself, run on kernels whose bytes are rescaled by the profile's streaming
  bandwidth over the curve's rate (so bytes / bandwidth is bytes / the curve's rate)."""
  bw = profile.streaming_bandwidth

  def at_size(ks):
    return tuple(Kernel(k.flops, k.bytes * bw / curve_bandwidth(curve, max(k.bytes, 1)), k.count) for k in ks)
  scaled = dataclasses.replace(stats, kernels=at_size(stats.kernels), attention=at_size(stats.attention))
  return cost_model.estimate_step_time(scaled, plan, profile).total_s


def judge(rows: list[dict], profile: hardware.HardwareProfile, curve=None) -> dict:
  """Spearman and regret of the estimates under `profile` (and `curve`, if given) against the
  dump's measurements."""
  from scipy.stats import spearmanr
  if curve is None:
    est = [cost_model.estimate_step_time(stats_of(r), Plan.from_dict(r["plan"]), profile).total_s for r in rows]
  else:
    est = [curve_estimate(stats_of(r), Plan.from_dict(r["plan"]), profile, curve) for r in rows]
  meas = [statistics.median(r["times"]) for r in rows]
  confirmed = {i: statistics.median(r["confirm_times"]) for i, r in enumerate(rows) if r["confirm_times"]}
  pick = min(range(len(rows)), key=est.__getitem__)
  if pick in confirmed:
    regret, basis = confirmed[pick] / min(confirmed.values()), "confirmed"
  else:
    regret, basis = meas[pick] / min(meas), "rounds"
  return {"spearman": float(spearmanr(est, meas).statistic), "choice": repr(Plan.from_dict(rows[pick]["plan"])),
          "regret": regret, "basis": basis, "est": est}


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("dump")
  ap.add_argument("--profile", action="append", default=[], help="a profile JSON to judge (repeatable)")
  ap.add_argument("--stream-curve", default=None,
                  help="cpu_cost_pieces.py's JSON line (a file): judge the dump's profile with each kernel "
                       "at the looped-stream rate of its size")
  args = ap.parse_args()
  with open(args.dump) as f:
    d = json.load(f)
  rows = [r for r in d["plans"] if r["times"]]
  profiles = [("dump", hardware.HardwareProfile(**d["profile"]))]
  profiles += [(p, hardware.load_profile(p)) for p in args.profile]
  out = {}
  print(f"{len(rows)} measured plans from {args.dump}")
  print(f"{'profile':40} {'spearman':>8} {'regret':>7}  choice")
  for name, prof in profiles:
    j = judge(rows, prof)
    out[name] = {k: v for k, v in j.items() if k != "est"}
    print(f"{os.path.basename(name)[:40]:40} {j['spearman']:8.3f} {j['regret']:7.3f}  {j['choice']} ({j['basis']})")
  if args.stream_curve:
    with open(args.stream_curve) as f:
      pieces = json.loads(f.read().strip().splitlines()[-1])
    curve = sorted((r["bytes"], r["GBps"] * 1e9) for r in pieces["stream_sizes"])
    j = judge(rows, profiles[0][1], curve)
    out["dump+stream-curve"] = {k: v for k, v in j.items() if k != "est"}
    print(f"{'dump, kernels at their size':40} {j['spearman']:8.3f} {j['regret']:7.3f}  {j['choice']} ({j['basis']})")
  print(json.dumps({"benchmark": "cost_replay", "dump": args.dump, "plans": len(rows), "profiles": out}))


if __name__ == "__main__":
  main()
