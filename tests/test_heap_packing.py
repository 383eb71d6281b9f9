"""benchmarks.heap_packing: XLA's best-fit heap packing on hand-made live ranges (no compile)."""
from __future__ import annotations

import pytest

from benchmarks.heap_packing import Interval, live_peak, pack, place


def _chain(durations):
  """Four equal buffers, each overlapping only the next: two live at once at most."""
  return [Interval(4, s, e, k) for k, (s, e) in enumerate(durations)]


def test_best_fit_needs_a_third_slot_where_two_are_live():
  # XLA places the longest first: the chain's ends (5 ticks each) share a slot, then the middle
  # two overlap each other and a different end each, so the last takes a third slot (the gqa
  # forward layer's score-sized values at TP 8 in XLA:CPU's buffer assignment).
  bufs = _chain([(0, 5), (4, 8), (7, 10), (9, 14)])
  assert live_peak(bufs) == 8
  assert place(bufs, "spatial") == (12, [0, 4, 8, 0])
  assert pack(bufs) == 12


def test_best_fit_packs_the_live_peak_when_the_order_allows():
  # The same chain with its middle buffers longest: they take two slots, the ends fit beside.
  bufs = _chain([(0, 3), (2, 8), (7, 12), (11, 14)])
  assert live_peak(bufs) == 8
  assert pack(bufs) == 8


def test_smallest_free_chunk_wins():
  # At time 5 two gaps are open below the top: 16 bytes at 0 (a short buffer's) and 4 bytes at
  # 22; the 2-byte buffer takes the 4-byte gap (best fit), not the first one (first fit).
  bufs = [Interval(16, 0, 1, 0), Interval(6, 0, 9, 1), Interval(4, 0, 1, 2), Interval(3, 0, 9, 3),
          Interval(2, 5, 9, 4)]
  assert place(bufs, "spatial") == (29, [0, 16, 22, 26, 22])


def test_the_smaller_of_the_two_orders_is_kept():
  # Spatial (size first) puts the two 12-byte buffers at 0 and the long 8-byte one above them;
  # temporal (duration first) puts that one at 0 and needs no more than the live peak.
  bufs = [Interval(12, 7, 11, 0), Interval(12, 0, 3, 1), Interval(4, 4, 7, 2), Interval(8, 1, 6, 3)]
  assert place(bufs, "spatial")[0] == 24
  assert place(bufs, "temporal")[0] == 20
  assert pack(bufs) == 20 == live_peak(bufs)


def test_colocated_spans_take_one_offset():
  # A loop's carried buffer (0-2, then 8-9 as its output) cannot move between its ranges: the
  # 8-byte buffer live in between sits above it, not in its range.
  carried = Interval(4, 0, 2, 0, spans=((8, 9),))
  bufs = [carried, Interval(8, 4, 6, 1), Interval(4, 8, 9, 2)]
  heap, offsets = place(bufs, "spatial")
  assert offsets[0] != offsets[2]
  assert heap == 8 and live_peak(bufs) == 8


def test_alignment_rounds_the_next_chunk_up():
  heap, offsets = place([Interval(10, 0, 5, 0), Interval(10, 0, 5, 1)], "spatial", alignment=64)
  assert sorted(offsets) == [0, 64] and heap == 74


def test_bad_strategy_is_named():
  with pytest.raises(ValueError, match="strategy='best'"):
    place([Interval(4, 0, 1)], "best")


def test_live_intervals_are_the_walk_peak_counts(monkeypatch):
  # `jaxpr_liveness.live_intervals` lays out the buffers `peak` sums (copies into a dot's layout,
  # inputs freed after their last read, a loop's inner peak included): their most live at once
  # is `peak`'s figure on every walk of a small backward, and best fit never packs below it.
  import jax
  import jax.numpy as jnp

  from passes import jaxpr_cost, jaxpr_liveness

  seen = []
  real = jaxpr_liveness.peak

  def checked(eqns, kept, producer, out_set, inner_peak, size, describe, **kw):
    top, largest = real(eqns, kept, producer, out_set, inner_peak, size, describe, **kw)
    spans, base = jaxpr_liveness.live_intervals(eqns, kept, producer, out_set, inner_peak, size, **kw)
    bufs = [Interval(int(b), s, e, k) for k, (b, s, e) in enumerate(spans) if b > 0]
    seen.append((top, live_peak(bufs) - base, pack(bufs) - base, base, len(kw.get("copies", ()))))
    return top, largest

  monkeypatch.setattr(jaxpr_liveness, "peak", checked)

  def layer(w, x):
    def body(h, wl):
      s = jax.nn.softmax(h @ wl @ h.T)
      return h + s @ h, None
    return jnp.sum(jax.lax.scan(body, x, w)[0] ** 2)

  w, x = jnp.zeros((3, 64, 64)), jnp.zeros((32, 64))
  fwd, vjp = jax.vjp(layer, w, x)
  res = jax.tree.leaves(vjp)
  td = jax.tree.structure(vjp)
  bwd = jax.make_jaxpr(lambda r, ct: jax.tree.unflatten(td, r)(ct))(res, fwd)
  jaxpr_cost.analyze(bwd, [None] * len(bwd.jaxpr.invars), fusion="xla:cpu",
                     free_inputs=[True] * len(res) + [False])
  assert len(seen) >= 2  # the scan's body and the function around it
  assert any(base > 0 for *_, base, _ in seen) and any(n > 0 for *_, n in seen)  # freed inputs, copies
  for top, live, packed, _, _ in seen:
    assert live == top and packed >= live
