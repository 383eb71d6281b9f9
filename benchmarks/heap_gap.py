"""Where XLA's temp allocation exceeds the most of its bytes live at once (its heap packing).

Reads the dumps that `benchmarks/memory_peak.py --keep` leaves (the step's
`*-buffer-assignment.txt` and `*-live-range.txt`) and prints: the temp allocation, the most
of its bytes live at once (the union of the live values' chunks, loop-carried values
included, as `memory_peak.live_at_peak`), the gap, and each hole (free bytes below the top)
at that peak with the value right above it and the largest values that use its addresses
at other times (what set the offsets above it). XLA's buffer assignment places every value of the whole module at one offset for its
whole live range (`GlobalDecreasingSizeBestFitHeap`: larger first, the smallest free chunk
that fits, the best of a spatial and a temporal order, `ChooseBestHeapAlgorithm` in
xla/service/heap_simulator/heap_simulator.cc), so a long-lived value (a while loop's carried
stack, colocated with its aliases over both layer loops) sits above whatever larger values
used its range at any time of its life: a hole at another phase's peak.

With --simulate it also replays the temp allocation's values through `benchmarks.heap_packing`
(XLA's best fit, re-implemented) on their dumped live ranges, timed twice: by schedule step, and
by XLA's heap algorithm's own clock (one tick per allocation or free event, which sets the
duration its spatial order sorts equal-sized buffers by): whether the simulation reproduces the
allocation from the values' sizes and live ranges alone.

Run: .venv/bin/python benchmarks/heap_gap.py /tmp/ap_xla_memory_peak_XXXX [--min-mib 1] [--simulate]
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import heap_packing  # noqa: E402

MiB = 2**20


def _one(dump: str, suffix: str) -> str:
  files = sorted(glob.glob(f"{dump}/*jit_step*cpu_after_optimizations-{suffix}"))
  if not files:
    raise FileNotFoundError(f"heap_gap: no *jit_step*{suffix} under {dump}; run memory_peak.py with --keep.")
  return open(files[-1]).read()


def temp_values(dump: str, ids: bool = False) -> tuple[int, list[tuple]]:
  """(bytes of the temp allocation, [(offset, size, (first, last) time, value)] in it); with
  `ids`, each value's HLO value id appended (XLA's heap orders break ties by it)."""
  ba, lr = _one(dump, "buffer-assignment.txt"), _one(dump, "live-range.txt")
  ranges = {m.group(1): (int(m.group(2)), int(m.group(3))) for m in re.finditer(
      r"^\s+(\S+?\{[\d,]*\}):(\d+)-(\d+)$", lr[lr.index("BufferLiveRange"):lr.index("Live ranges at")], re.M)}
  at = ba.index("preallocated-temp")
  start = ba.rindex("\nallocation", 0, at) + 1
  end = ba.find("\nallocation", at)
  block = ba[start:end if end >= 0 else len(ba)]
  values = []
  for m in re.finditer(r"value: <(\d+) (\S+?)(\{[\d,]*\})?(?: \(phi\))? @\d+> \(size=(\d+),offset=(\d+)\): (\S+)", block):
    key = m.group(2) + (m.group(3) or "{}")
    if key in ranges:
      values.append((int(m.group(5)), int(m.group(4)), ranges[key], f"{key} {m.group(6)}")
                    + ((int(m.group(1)),) if ids else ()))
  return int(re.search(r"size (\d+)", block).group(1)), values


def _live(values, t) -> tuple[int, list]:
  """(bytes live at t, the chunks live then sorted by offset), overlapping aliases once."""
  chunks = sorted((o, s, r, w) for o, s, r, w in values if r[0] <= t <= r[1])
  live, top = 0, -1
  for o, s, _, _ in chunks:
    if o + s > top:
      live += o + s - max(o, top)
      top = o + s
  return live, chunks


def heap_gap(dump: str, min_bytes: int = MiB) -> dict:
  """The temp allocation, its live peak and the holes at that peak (see the module doc)."""
  total, values = temp_values(dump)
  best, when, chunks = -1, 0, []
  for t in sorted({r[0] for _, _, r, _ in values}):
    live, at_t = _live(values, t)
    if live > best:
      best, when, chunks = live, t, at_t
  holes, top = [], 0
  for o, s, (a, b), w in chunks:
    if o >= top + min_bytes:
      users = sorted({(uo, us, ur, uw) for uo, us, ur, uw in values
                      if uo < o and uo + us > top and not (ur[0] <= when <= ur[1])}, key=lambda u: (-u[1], u[2]))
      holes.append(dict(lo=top, hi=o, above=w, above_live=(a, b),
                        used_by=[(uw, uo, us, ur) for uo, us, ur, uw in users[:4]]))
    top = max(top, o + s)
  return dict(temp=total, live_peak=best, at=when, top_at_peak=top, holes=holes)


def _event_clock(values) -> list[tuple]:
  """The values re-timed by XLA's heap algorithm's clock (`GlobalDecreasingSizeBestFitHeap`'s
  `current_time_`): `HeapSimulator::RunComputation` replays each schedule step's definitions
  (ordered by (start, end, id)), then its frees, and each Alloc, ShareWith and Free ticks."""
  order = sorted(range(len(values)), key=lambda i: (values[i][2][0], values[i][2][1], values[i][4]))
  steps = max(v[2][1] for v in values) + 1
  defined, freed = [[] for _ in range(steps)], [[] for _ in range(steps)]
  for i in order:
    defined[values[i][2][0]].append(i)
    freed[values[i][2][1]].append(i)
  t, start, end = 0, {}, {}
  for step in range(steps):
    for i in defined[step]:
      start[i], t = t, t + 1
    for i in freed[step]:
      end[i], t = t, t + 1
  return [(o, s, (start[i], end[i]), w, k) for i, (o, s, _, w, k) in enumerate(values)]


def buffers(values) -> list[heap_packing.Interval]:
  """The values as XLA's heap buffers: values at one offset whose live ranges overlap are one
  buffer (aliases: a loop's carried tuple, its body's parameter and root; in-place outputs),
  its first value's range first, the others' as its `spans`, the largest value's size."""
  group = list(range(len(values)))

  def root(i):
    while group[i] != i:
      group[i] = group[group[i]]
      i = group[i]
    return i
  at: dict[int, list] = {}
  for i, v in enumerate(values):
    at.setdefault(v[0], []).append(i)
  for same in at.values():
    for a in same:
      for b in same:
        if a < b and values[a][2][0] <= values[b][2][1] and values[b][2][0] <= values[a][2][1]:
          group[root(a)] = root(b)
  members: dict[int, list] = {}
  for i in range(len(values)):
    members.setdefault(root(i), []).append(values[i])
  out = []
  for g in members.values():
    g.sort(key=lambda v: (v[2][0], v[4]))
    out.append(heap_packing.Interval(max(v[1] for v in g), g[0][2][0], g[0][2][1], g[0][4],
                                     tuple(v[2] for v in g[1:])))
  return out


def simulate(dump: str) -> dict:
  """XLA's temp allocation beside `benchmarks.heap_packing`'s on the dumped live ranges (module doc)."""
  total, values = temp_values(dump, ids=True)
  out = {"temp": total}
  for clock, vals in (("schedule", values), ("events", _event_clock(values))):
    bufs = buffers(vals)
    out[clock] = {s: heap_packing.place(bufs, s, 64)[0] for s in ("spatial", "temporal")}
  out["live_peak"] = heap_packing.live_peak(buffers(values))
  return out


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("dump", help="the XLA dump folder memory_peak.py --keep printed")
  ap.add_argument("--min-mib", type=float, default=1.0, help="smallest hole to show")
  ap.add_argument("--simulate", action="store_true", help="replay the values through benchmarks.heap_packing")
  args = ap.parse_args()
  r = heap_gap(args.dump, int(args.min_mib * MiB))
  sim = simulate(args.dump) if args.simulate else None
  print(f"temp allocation {r['temp'] / MiB:9.2f} MiB")
  print(f"live at once    {r['live_peak'] / MiB:9.2f} MiB  (at time {r['at']})")
  print(f"packing gap     {(r['temp'] - r['live_peak']) / MiB:9.2f} MiB")
  for h in r["holes"]:
    print(f"  hole {h['lo'] / MiB:8.2f}..{h['hi'] / MiB:8.2f} MiB ({(h['hi'] - h['lo']) / MiB:6.2f}) below "
          f"{h['above']} (live {h['above_live'][0]}-{h['above_live'][1]}); its addresses held at other times by:")
    for w, o, s, (a, b) in h["used_by"]:
      print(f"      {w} at {o / MiB:.2f} MiB, {s / MiB:.2f} MiB, live {a}-{b}")
  if sim:
    print("simulated (benchmarks.heap_packing on the dumped live ranges; XLA keeps the smaller order):")
    for clock in ("schedule", "events"):
      print(f"  timed by {clock:8}  spatial {sim[clock]['spatial'] / MiB:9.2f} MiB  "
            f"temporal {sim[clock]['temporal'] / MiB:9.2f} MiB  (XLA {r['temp'] / MiB:.2f})")
  print(json.dumps({"benchmark": "heap_gap", "dump": args.dump, "temp_bytes": r["temp"],
                    "live_peak_bytes": r["live_peak"], "gap_bytes": r["temp"] - r["live_peak"],
                    "holes_bytes": sum(h["hi"] - h["lo"] for h in r["holes"]),
                    **({"simulated_bytes": {c: min(sim[c]["spatial"], sim[c]["temporal"])
                                            for c in ("schedule", "events")}} if sim else {})}))


if __name__ == "__main__":
  main()
