"""XLA's heap packing: where buffer assignment places values whose live ranges are known.

XLA's buffer assignment places every value of a module's temp allocation at one offset for
its whole live range, and the allocation is the highest chunk end (xla/service/heap_simulator/
heap_simulator.cc, `GlobalDecreasingSizeBestFitHeap`, as `BufferAssigner` runs it in
xla/service/buffer_assignment.cc: `ChooseBestHeapAlgorithm` over a spatial and a temporal
order, whichever allocation is smaller):
- the buffers are placed one at a time, in a fixed order: 'spatial' by size (descending), then
  live duration (descending); 'temporal' by the live duration of the buffer and everything
  colocated with it (descending), then size (descending); ties by the value's id;
- each takes the smallest free chunk (the gaps between the chunks already placed that are
  live at some time of its own life, and the open space above them) that holds it, at the
  chunk's start (best fit; ties: the lower offset); the open space above counts as the largest;
- colocated values (a while loop's carried tuple and its body's parameter and root, in-place
  outputs sharing their operand's buffer) are one buffer: one offset for all their ranges.
Its result can exceed the most bytes live at once: a few equal-sized values, each placed
where the values placed before it left a gap, can need one slot more than are ever live.

The durations are compared on the intervals' own clock. XLA's is its heap algorithm's: one
tick per allocation or free event (a schedule step's definitions, then its frees); on that
clock the dumped live ranges give XLA's allocation within a KiB on five of seven traced plans
(the other two within 1.3%), and shifting the events by one tick can open or close a whole slot (benchmarks/RESULTS.md,
"Heap packing, simulated"), so intervals coarser than XLA's buffers do not predict the gap.

`pack` reproduces that on given intervals; `benchmarks/heap_gap.py --simulate` checks it on
XLA's own live ranges (the dumps `benchmarks/memory_peak.py --keep` leaves).
"""
from __future__ import annotations

from typing import NamedTuple, Sequence


class Interval(NamedTuple):
  """A buffer: `size` bytes live from `start` to `end` (inclusive; two buffers overlap when
  each starts no later than the other ends, as XLA's interval tree has it), `key` breaks
  ties (XLA: the value's id), `spans`: further (start, end) ranges of values colocated with
  it (same offset), empty for a buffer of one value."""
  size: int
  start: int
  end: int
  key: int = 0
  spans: tuple = ()


def _ranges(b: Interval) -> tuple:
  return ((b.start, b.end),) + tuple(b.spans)


def _order(buffers: Sequence[Interval], strategy: str) -> list[int]:
  """Indices of `buffers` in the order XLA places them (`GetSpatialBufferIntervalCompare`,
  `GetTemporalBufferIntervalCompare`)."""
  if strategy == "spatial":
    key = lambda i: (-buffers[i].size, buffers[i].start - buffers[i].end, buffers[i].key)
  elif strategy == "temporal":
    def key(i):
      r = _ranges(buffers[i])
      return (min(s for s, _ in r) - max(e for _, e in r), -buffers[i].size, buffers[i].key)
  else:
    raise ValueError(f"heap_packing: strategy={strategy!r}; expected 'spatial' or 'temporal'.")
  return sorted(range(len(buffers)), key=key)


def _align(x: int, alignment: int) -> int:
  return -(-x // alignment) * alignment


def place(buffers: Sequence[Interval], strategy: str = "spatial", alignment: int = 1) -> tuple[int, list[int]]:
  """(heap size, offset of each buffer) of XLA's best fit in one order (module doc).

  Example:
    >>> place([Interval(4, 0, 1), Interval(4, 1, 2), Interval(4, 2, 3)])
    (8, [0, 4, 0])
  """
  offsets = [0] * len(buffers)
  placed: list[tuple] = []  # (offset, end offset, ranges)
  heap = 0
  for i in _order(buffers, strategy):
    b = buffers[i]
    if b.size <= 0:
      continue
    mine = _ranges(b)
    used = sorted((o, e) for o, e, r in placed
                  if any(s <= e2 and s2 <= e1 for s, e1 in mine for s2, e2 in r))
    best, best_size, free_from = None, None, 0
    for o, e in used:
      if o - free_from >= b.size and (best is None or o - free_from < best_size):
        best, best_size = free_from, o - free_from
      free_from = max(free_from, _align(e, alignment))
    if best is None:
      best = free_from
    offsets[i] = best
    placed.append((best, best + b.size, mine))
    heap = max(heap, best + b.size)
  return heap, offsets


def pack(buffers: Sequence[Interval], alignment: int = 1) -> int:
  """The bytes XLA's buffer assignment allocates for `buffers`: the smaller of its spatial and
  temporal best fits (module doc).

  Example:
    >>> pack([Interval(8, 0, 9), Interval(4, 0, 3), Interval(4, 5, 9)])
    12
  """
  return min(place(buffers, s, alignment)[0] for s in ("spatial", "temporal"))


def live_peak(buffers: Sequence[Interval]) -> int:
  """The most bytes of `buffers` live at once (what no packing can go below)."""
  events = sorted({s for b in buffers for s, _ in _ranges(b)})
  return max((sum(b.size for b in buffers if any(s <= t <= e for s, e in _ranges(b))) for t in events), default=0)
