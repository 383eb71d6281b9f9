"""The screen replayed with XLA's best fit in place of each part's live peak (an experiment).

The screen takes each part's temporaries (a layer's forward or backward, pre's, post's) as the
most bytes live at once over `passes.jaxpr_liveness`'s walk. XLA's buffer assignment packs
them by best fit (`benchmarks.heap_packing`), which can need more. This replays the saved
compiled rows twice, as `benchmarks/screen_replay.py` does: once as the screen is, once with
every walk's peak replaced by `heap_packing.pack` of the same buffers
(`jaxpr_liveness.live_intervals`, timed by XLA's heap clock: one tick per allocation or free),
and prints each model's worst error, the rows within 5%, the mean |error| of both, and the
rows that moved most. The screen itself is not changed.

Run: .venv/bin/python benchmarks/heap_packing_replay.py /work/notes/rows/main_c725c05.json [ROWS.json ...]
     [--clock events|schedule] [--top 12]
"""
from __future__ import annotations

import argparse
import json
import os
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import screen_replay  # noqa: E402
from benchmarks import heap_packing  # noqa: E402
from passes import jaxpr_liveness  # noqa: E402
from benchmarks.heap_packing import Interval  # noqa: E402

_PEAK = jaxpr_liveness.peak


def _event_clock(spans) -> list[Interval]:
  """The spans re-timed as XLA's heap algorithm counts: each step's allocations (by start,
  end), then its frees, one tick each (`benchmarks/heap_gap.py`'s `_event_clock`)."""
  order = sorted(range(len(spans)), key=lambda k: (spans[k][1], spans[k][2], k))
  defined: dict[int, list] = {}
  freed: dict[int, list] = {}
  for k in order:
    defined.setdefault(spans[k][1], []).append(k)
    freed.setdefault(spans[k][2], []).append(k)
  t, start, end = 0, {}, {}
  for step in sorted(set(defined) | set(freed)):
    for k in defined.get(step, []):
      start[k], t = t, t + 1
    for k in freed.get(step, []):
      end[k], t = t, t + 1
  return [Interval(int(b), start[k], end[k], k) for k, (b, _, _) in enumerate(spans)]


def packed_peak(clock: str):
  """A stand-in for `jaxpr_liveness.peak`: XLA's best fit of the walk's buffers."""
  def peak(eqns, kept, producer, out_set, inner_peak, size, describe, **kw):
    top, largest = _PEAK(eqns, kept, producer, out_set, inner_peak, size, describe, **kw)
    spans, base = jaxpr_liveness.live_intervals(eqns, kept, producer, out_set, inner_peak, size, **kw)
    spans = [s for s in spans if s[0] > 0]
    if not spans:
      return top, largest
    bufs = (_event_clock(spans) if clock == "events"
            else [Interval(int(b), s, e, k) for k, (b, s, e) in enumerate(spans)])
    return heap_packing.pack(bufs) - base, largest
  return peak


def _replay(files) -> dict:
  out = {}
  for f in files:
    with open(f) as fh:
      saved = json.load(fh)
    for name in saved:
      if name in screen_replay.MODELS:
        out[name] = [r for r in screen_replay.replay(name, saved[name])["rows"] if r["near"]]
  return out


def _summary(rows) -> dict:
  errs = [abs(r["err"]) for r in rows]
  return {"worst": max(errs), "within_5pct": sum(e <= 0.05 for e in errs), "mean_abs": sum(errs) / len(errs)}


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("rows", nargs="+", help="JSON files written by screen_accuracy.py --rows")
  ap.add_argument("--clock", choices=("events", "schedule"), default="events")
  ap.add_argument("--top", type=int, default=12)
  args = ap.parse_args()
  base = _replay(args.rows)
  jaxpr_liveness.peak = packed_peak(args.clock)
  try:
    packed = _replay(args.rows)
  finally:
    jaxpr_liveness.peak = _PEAK
  result = []
  for name in base:
    a, b = _summary(base[name]), _summary(packed[name])
    moved = [(x, y) for x, y in zip(base[name], packed[name]) if abs(x["err"] - y["err"]) > 0.001]
    print(f"\n{name}: {len(base[name])} rows within 2x of the budget; worst {a['worst']:.1%} -> {b['worst']:.1%}, "
          f"within 5% {a['within_5pct']} -> {b['within_5pct']}, mean |err| {a['mean_abs']:.2%} -> "
          f"{b['mean_abs']:.2%}; {len(moved)} rows moved by more than 0.1 point")
    for x, y in sorted(moved, key=lambda t: -abs(t[1]["err"]))[:args.top]:
      print(f"   {x['err']:+6.1%} -> {y['err']:+6.1%}  {x['plan']!r}")
    result.append({"model": name, "live": a, "packed": b, "moved": len(moved)})
  print(json.dumps({"benchmark": "heap_packing_replay", "clock": args.clock, "rows": args.rows, "models": result}))


if __name__ == "__main__":
  main()
