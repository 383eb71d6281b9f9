"""Which values of a lowered jaxpr XLA materializes, what its fused kernels read, and the peak
of the materialized values live at once.

Kernels, as XLA forms them (approximately): elementwise and shape ops fuse into the kernel of
the value they feed, unless that value is *materialized*: the result of a matmul, reduction,
gather, scatter, sort, loop or collective, an operand of a matmul or of such an op, or an
output. A fused kernel writes its materialized result and reads the materialized values it
depends on. Liveness walks the equations in order: a materialized value is live from the
equation that makes it to its last use (outputs to the end); an equation's own inner peak
(a loop's body) adds to what is live around it.

XLA:CPU ('xla:cpu', `cpu_liveness`) keeps more than that model: a materialized value lives until
the last kernel that reads it, fused chains included (XLA does not recompute it from what it was
made of); and its dot kernels read each operand in one layout (batch dims leading, the left
operand's contracting dims last, the right one's contracting dims next to its batch or last):
an operand in another order is copied into that layout first, a buffer of its own beside the
operand whenever the operand is kept anyway (a dot's result, an input, a value read elsewhere);
a dot reading the copy does not read the operand, whose buffer is freed once its copies are made
and its other readers are done.
The weight gradients of a backward, `dot_general(x, dy)` contracting the leading (token) dims
of both, are such dots: XLA:CPU copies `x` transposed (`copy_bitcast_fusion` in its dumps).
Nor does it fuse an elementwise op into several kernels when the op is expensive (exp, rsqrt,
a division, ...) or one of them is a reduction's (`shared_values`): its result is kept, at the
shape it is broadcast to where that is an expensive op's result or an input's broadcast
(rmsnorm's rsqrt statistic and its weight, [batch, seq, dim] buffers in XLA:CPU's dumps).
Inputs a caller counts whole (a part's residuals) can be freed after their last read: the
peak is then taken above them. Traced on XLA:CPU's buffer assignments and live ranges
(`benchmarks/memory_peak.py`) of three Llamas, full recomputation at TP 2-8.

XLA:CPU's default scheduler runs each computation's kernels in BFS order (`bfs_order`), not in
program order: in a layer's backward every value its residuals alone give is made first, beside
what the program order would have freed by then; in the head's backward the input gradient's
dot runs before the weight gradient's, which reads a transposed copy. A layer loop's backward
reads its residuals as slices of their stacks, which a dot reading them in place gets as
buffers of their own (`slice_copies`). Traced on the 100M Llama's layer loops at TP 1 and 4
(no recomputation) and the small Llama's head backward at dp=4 tp=2.
"""
from __future__ import annotations

import math
from typing import Callable, Iterator, Sequence

from passes.jaxpr_ir import ELEMENTWISE, FUSIBLE, REDUCTIONS, Eqn


# Elementwise ops XLA does not duplicate into several consumers (its `IsExpensive`).
EXPENSIVE = {"div", "exp", "exp2", "expm1", "log", "log1p", "logistic", "pow", "rsqrt", "sqrt", "cbrt",
             "tanh", "sin", "cos", "tan", "atan2", "erf", "erfc", "erf_inv", "rem"}

# How kernels are formed: 'xla' fuses as the module doc says; 'xla:cpu' fuses alike and keeps
# the buffers XLA:CPU adds (module doc, `cpu_liveness`); 'eager' runs every elementwise op and
# reduction as its own kernel, as PyTorch's eager mode does (shape ops are views there).
FUSIONS = ("xla", "xla:cpu", "eager")


def materialized(eqns: Sequence[Eqn], args: Sequence[int], consumers: dict, out_set,
                 fusion: str = "xla") -> set:
  """Ids of the values XLA keeps in memory (module doc): `args`, and every value not made by
  a fusible op, an output, or one consumed by an op that is neither fusible nor a reduction.
  Under 'eager' fusion also every elementwise op's and reduction's result."""
  kept = set(args)
  for e in eqns:
    if fusion == "eager" and (e.name in ELEMENTWISE or e.name in REDUCTIONS):
      kept.update(e.outs)
      continue
    fusible = e.name in FUSIBLE
    for o in e.outs:
      if not fusible or o in out_set or any(c.name not in FUSIBLE and c.name not in REDUCTIONS
                                            for c in consumers.get(o, [])):
        kept.add(o)
  return kept


def fused_kernels(eqns: Sequence[Eqn], kept: set, producer: dict, size: Callable) -> Iterator[tuple]:
  """(equation, bytes moved) of each fused kernel: a materialized value made by a fusible op or
  a reduction, reading the materialized values it depends on through fusible producers."""
  for e in eqns:
    if e.name not in FUSIBLE and e.name not in REDUCTIONS:
      continue
    for o in e.outs:
      if o in kept:
        yield e, sum(size(a) for a in _reads(e, kept, producer)) + size(o)


def _chain(e: Eqn, kept: set, producer: dict) -> tuple[set, set]:
  """(the materialized values and inputs the kernel of `e` reads, the values of the fusible
  ops fused into it): one walk of its fused chain."""
  seen, stack, read = set(), list(e.ins), set()
  while stack:
    a = stack.pop()
    if a is None or a in seen:
      continue
    seen.add(a)
    if a in kept or a not in producer:
      read.add(a)
    else:
      stack.extend(producer[a].ins)
  return read, seen - read


def _reads(e: Eqn, kept: set, producer: dict) -> set:
  """The materialized values (and inputs) the kernel of `e` reads, through the fusible ops
  fused into it."""
  return _chain(e, kept, producer)[0]


def _is_kernel(e: Eqn, kept: set) -> bool:
  """Whether `e` is a kernel of its own: not fusible, or making a materialized value."""
  return e.name not in FUSIBLE or any(o in kept for o in e.outs)


def kernel_last_reads(eqns: Sequence[Eqn], kept: set, producer: dict, via: set = frozenset()) -> dict[int, int]:
  """value id -> index of the last kernel (an equation that is not fusible, or makes a
  materialized value) that reads it, through the fusible ops fused into that kernel; `via`:
  (index, value) of dots reading the value through a copy (`dot_layout_copies`), not counted."""
  last: dict[int, int] = {}
  for i, e in enumerate(eqns):
    if _is_kernel(e, kept):
      for a in _reads(e, kept, producer):
        if (i, a) not in via:
          last[a] = i
  return last


def shared_values(eqns: Sequence[Eqn], args: Sequence[int], kept: set, producer: dict, consumers: dict,
                  nbytes: Callable) -> dict[int, int]:
  """Values XLA:CPU keeps that the fusion model recomputes in each kernel reading them: the
  result of an elementwise op (or of an input's broadcast) read by several kernels, where the
  op is expensive (EXPENSIVE) or one of those kernels is a reduction's. Value id -> the id whose bytes it is
  kept at: an expensive op's result broadcast by its consumers (rmsnorm's rsqrt statistic),
  or a broadcast of an input (rmsnorm's weight), is kept at the largest shape a consumer
  broadcasts it to; any other at its own. Values of constants alone (masks) are left out."""
  inputs = set(args)
  const = set()
  for e in eqns:
    if e.name in FUSIBLE and all(a is None or a in const or (a not in producer and a not in inputs)
                                 for a in e.ins):
      const.update(e.outs)
  readers: dict[int, list] = {}
  for e in eqns:
    if _is_kernel(e, kept):
      for a in _chain(e, kept, producer)[1]:
        readers.setdefault(a, []).append(e.name in REDUCTIONS)
  out = {}
  for a, red in readers.items():
    e = producer[a]
    bcast_input = e.name == "broadcast_in_dim" and e.ins[0] in inputs
    if len(red) < 2 or a in const or not (e.name in EXPENSIVE or any(red)) or not (
        e.name in ELEMENTWISE or bcast_input):
      continue
    out[a] = a
    if e.name in EXPENSIVE or bcast_input:
      wide = [o for c in consumers.get(a, []) if c.name in ELEMENTWISE for o in c.outs]
      out[a] = max(wide + [a], key=nbytes)
  return out


def _layout(shape, batch, contracting) -> tuple[list, list, list, list]:
  """(dims in order, batch, contracting, free) of a dot operand, size-1 dims left out (XLA
  bitcasts them away)."""
  dims = [d for d in range(len(shape)) if shape[d] != 1]
  b = [d for d in batch if shape[d] != 1]
  c = [d for d in contracting if shape[d] != 1]
  return dims, b, c, [d for d in dims if d not in b and d not in c]


def _reads_as_lhs(shape, batch, contracting) -> bool:
  """Whether XLA:CPU's dot kernel reads this operand in place as its left operand."""
  dims, b, c, f = _layout(shape, batch, contracting)
  return dims == b + f + c


def _reads_as_rhs(shape, batch, contracting) -> bool:
  """Whether XLA:CPU's dot kernel reads this operand in place as its right operand."""
  dims, b, c, f = _layout(shape, batch, contracting)
  return dims in (b + c + f, b + f + c)


def _dot_copies(e: Eqn, shape: Callable) -> list[tuple]:
  """(operand, side, batch dims, contracting dims) of each operand of the dot `e` that XLA:CPU
  copies into the layout its dot kernel reads (`dot_layout_copies`)."""
  (lc, rc), (lb, rb) = e.params["dimension_numbers"]
  lhs, rhs = e.ins
  ls, rs = shape(lhs), shape(rhs)
  if ((_reads_as_lhs(ls, lb, lc) and _reads_as_rhs(rs, rb, rc))
      or (_reads_as_lhs(rs, rb, rc) and _reads_as_rhs(ls, lb, lc))):
    return []
  need = [(lhs, "lhs", tuple(lb), tuple(lc))]
  if not _reads_as_rhs(rs, rb, rc):
    need.append((rhs, "rhs", tuple(rb), tuple(rc)))
  return need


# Shape ops XLA lowers to a bitcast (no kernel, the same buffer).
BITCASTS = {"reshape", "squeeze", "expand_dims"}


def slice_copies(eqns: Sequence[Eqn], sliced: set, producer: dict, shape: Callable) -> list[tuple[int, int, int]]:
  """(input id, -1, index of the last dot reading it) of each input of a loop's body that the
  loop reads as a slice of a stacked operand (`sliced`: the layer's residuals; its weights are
  sliced alike, which `passes.screen_profile` leaves to FSDP's term) and a dot reads in place: XLA:CPU's dot kernels do not fuse the dynamic slice, which is
  written to a buffer of its own (`dynamic-slice_bitcast_fusion` in its dumps), made at the
  body's start (BFS depth one: it reads only the loop's operand, `bfs_order`) and live to the
  last dot reading it. A dot copying the operand into its layout fuses the slice into that
  copy (`dot_layout_copies`: one buffer), an elementwise kernel into itself (no buffer).
  Traced on the 100M Llama's layer loops at TP 4 (XLA:CPU's live ranges,
  `benchmarks/memory_peak.py`): the backward slices its residuals of [batch, seq, dim] and the
  layer's weights, the forward its weights."""
  last: dict[int, int] = {}
  for i, e in enumerate(eqns):
    if e.name != "dot_general" or None in e.ins:
      continue
    copied = {n[1] for n in _dot_copies(e, shape)}
    for a, side in zip(e.ins, ("lhs", "rhs")):
      if side in copied:
        continue
      while a in producer and producer[a].name in BITCASTS:
        a = producer[a].ins[0]
      if a in sliced:
        last[a] = i
  return [(a, -1, i) for a, i in last.items()]


def dot_layout_copies(eqns: Sequence[Eqn], kept: set, producer: dict, consumers: dict,
                      shape: Callable, via: set | None = None) -> list[tuple[int, int, int]]:
  """(operand id, index of the equation that makes it or -1, index of its last dot) of each
  copy XLA:CPU makes of a dot operand into the layout its dot kernel reads (module doc).

  A dot whose operands both read in place (or do after swapping them: XLA then computes the
  transposed product) needs none; else the left operand is copied, and the right one too when
  it does not read in place as the right operand. A copy is its own buffer beside the operand,
  but for an operand a fusible op makes for dots alone, none of which reads it in place: its
  producing kernel writes the first layout they need (XLA:CPU's dumps: the attention's score
  gradient written twice, once per dot, and not a third time in its own layout).

  `via`, if given, gets (equation index, operand id) of each dot that reads the operand
  through a copy of its own: that dot does not read the operand's buffer, which is freed once
  its copies are made and its other readers are done (XLA:CPU's dumps: the grouped-query
  attention's probabilities at TP 8, freed after their transposed copy is written)."""
  copies: dict[tuple, list] = {}
  readers: dict[tuple, list] = {}  # copy key -> the dots reading through it
  in_place: set = set()  # operands some dot reads in place
  made_at = {o: j for j, x in enumerate(eqns) for o in x.outs}
  for i, e in enumerate(eqns):
    if e.name != "dot_general" or None in e.ins:
      continue
    need = _dot_copies(e, shape)
    copied = {n[1] for n in need}
    in_place.update(a for a, side in zip(e.ins, ("lhs", "rhs")) if side not in copied)
    for a, side, b, c in need:
      key = (a, side, b, c)
      readers.setdefault(key, []).append(i)
      if key in copies:
        copies[key][2] = i
      else:
        copies[key] = [a, made_at.get(a, -1), i]
  # A value a fusible op makes for dots alone, none reading it in place, is written by its
  # producing kernel in the first layout they need: that one is no extra buffer. A shape op's
  # (pad, concatenate) is not fused into the copy: where a dot also reads it in place, the copy
  # reads a materialization of its own (post's backward: the logits' gradient, padded, three
  # times in XLA:CPU's dumps: in place, for the copy, the copy).
  out, written = [], set()
  for key, (a, made, last) in copies.items():
    shape_op = a in producer and producer[a].name in FUSIBLE and producer[a].name not in ELEMENTWISE
    if shape_op and a in in_place:
      out.append((a, made, made + 1))
    if (a not in written and a not in in_place and a in producer and producer[a].name in FUSIBLE
        and all(c.name == "dot_general" for c in consumers.get(a, []))):
      written.add(a)
      continue
    out.append((a, made, last))
    if via is not None:
      via.update((i, a) for i in readers[key])
  return out


def eigen_dots(eqns: Sequence[Eqn], consumers: dict, shape: Callable) -> list[tuple[int, int, int, int]]:
  """(m, n, k, result id) of each dot XLA:CPU runs as an Eigen contraction, outside its YNNPACK
  fusions (module doc): a `dot_general` without batch dims whose one consumer transposes its
  result to (right operand's free dims, left operand's): JAX's weight gradient
  `transpose(dot_general(dy, x))`, contracting the token dims. XLA's algebraic simplifier folds
  that into `dot(x, dy)`, whose left operand is contracted on its leading dims, which
  `IsDotSupportedByYnn` rejects (xla/backends/cpu/ynn_support.cc). Where a collective sits
  between the dot and the transpose (a gradient reduced over 'data' by GSPMD) nothing folds:
  the caller decides that (`passes.screen`). `shape`: per-device shapes."""
  out = []
  for e in eqns:
    if e.name != "dot_general":
      continue
    users = consumers.get(e.outs[0], [])
    (lc, rc), (lb, _) = e.params["dimension_numbers"]
    if lb or len(users) != 1 or users[0].name != "transpose" or None in e.ins:
      continue
    ls, rs = shape(e.ins[0]), shape(e.ins[1])
    nl = len(ls) - len(lc)
    nr = len(rs) - len(rc)
    if tuple(users[0].params["permutation"]) != tuple(range(nl, nl + nr)) + tuple(range(nl)):
      continue
    prod = lambda s, skip: math.prod(x for d, x in enumerate(s) if d not in skip)
    out.append((prod(rs, rc), prod(ls, lc), math.prod(ls[d] for d in lc), e.outs[0]))
  return out


def bfs_order(eqns: Sequence[Eqn], kept: set, producer: dict, shape: Callable,
              sliced: set = frozenset()) -> list[int]:
  """The order XLA:CPU runs the equations' kernels in: its default scheduler
  (`xla_cpu_enable_concurrency_optimized_scheduler`, on by default) is the BFS scheduler of
  xla/service/hlo_memory_scheduler.cc, a first-in-first-out topological sort of each
  computation, which runs the kernels by their depth (the longest chain of kernels from the
  computation's parameters), not in program order. A kernel's depth is one more than the
  deepest kernel it reads (through its fused chain); an operand a dot reads through a copy
  (`dot_layout_copies`, `slice_copies`: kernels of their own) counts one level deeper; a fused
  equation takes the depth of what it reads and comes before its kernel. Ties keep the program
  order. Traced on XLA:CPU's schedules (`benchmarks/memory_peak.py`, the live-range dump's
  instruction sequence): the 100M Llama's layer backward at TP 4 computes every value its
  residuals alone give (the slices of the stacked residuals, rmsnorm's statistics, the
  attention's probabilities) before the FFN's gradient, which the program order runs first;
  the small Llama's head backward runs the input-gradient dot, which reads the padded logits'
  gradient in place, before the weight gradient's, which reads its transposed copy."""
  depth: dict[int, int] = {}
  key = []
  for i, e in enumerate(eqns):
    copied = set()
    if e.name == "dot_general" and None not in e.ins:
      copied = {n[0] for n in _dot_copies(e, shape)} | (set(e.ins) & sliced)
    base = max((depth.get(a, 0) + (a in copied) for a in e.ins if a is not None), default=0)
    d = base + 1 if _is_kernel(e, kept) else base
    for o in e.outs:
      depth[o] = d
    key.append((d, i))
  return [i for _, i in sorted(key)]


def _last_uses(eqns: Sequence[Eqn], last_reads: dict | None, copies: Sequence[tuple[int, int, int]],
               via: set) -> dict[int, int]:
  """Value id -> the step of its last read (`peak`'s arguments): its direct uses but those
  through a copy (`via`), its kernel's later reads, and the copies made of it."""
  last_use: dict[int, int] = {}
  for i, e in enumerate(eqns):
    for a in e.ins:
      if a is not None and (i, a) not in via:
        last_use[a] = i
  for a, i in (last_reads or {}).items():
    if a in last_use and i > last_use[a]:
      last_use[a] = i
  read_via = {a for _, a in via}
  for a, start, _ in copies:  # a copy reads its operand when it is made
    if a in read_via and last_use.get(a, -1) < start + 1:
      last_use[a] = start + 1
  return last_use


def peak(eqns: Sequence[Eqn], kept: set, producer: dict, out_set, inner_peak: Sequence[int],
         size: Callable, describe: Callable, last_reads: dict | None = None,
         copies: Sequence[tuple[int, int, int]] = (),
         freed: Sequence[int] = (), order: Sequence[int] | None = None,
         via: set = frozenset()) -> tuple[int, tuple[int, str]]:
  """(the most bytes of materialized values created here live at once, (bytes, description)
  of the largest such value); `inner_peak[i]`: equation i's own peak (a loop's body).

  Args (XLA:CPU's, `cpu_liveness`):
    last_reads: value id -> the last equation whose kernel reads it, where that is later than
      its last direct use.
    copies: (value id, made at or -1, last read): buffers of the value's size beside it, from
      the equation after the one that makes the value.
    freed: inputs whose buffers are reclaimed after their last read (a part's own residuals,
      which the caller counts whole): the peak is then the most bytes above all of them, and
      can be negative where the function's peak comes after their last reads.
    order: the order the equations run in (`bfs_order`); the other arguments' indices are
      into that order.
    via: (index, value) of dots that read the value through one of `copies`, not the value's
      own buffer, which then lives until its copies are made and its other readers are done."""
  if order is not None:
    eqns, inner_peak = [eqns[i] for i in order], [inner_peak[i] for i in order]
  last_use = _last_uses(eqns, last_reads, copies, via)
  frees: dict[int, list] = {}
  for a, i in last_use.items():
    if a in producer and a in kept and a not in out_set:
      frees.setdefault(i, []).append(size(a))
  for a in freed:
    if a in last_use:
      frees.setdefault(last_use[a], []).append(size(a))
  made: dict[int, int] = {}
  for a, start, end in copies:  # made once the value is (its own inputs freed), read by `end`
    made[start + 1] = made.get(start + 1, 0) + size(a)
    frees.setdefault(end, []).append(size(a))
  live = 0
  top = None
  largest = (0, "")
  for i, e in enumerate(eqns):
    created = made.get(i, 0)
    for o in e.outs:
      if o in kept and (o in last_use or o in out_set):
        b = size(o)
        created += b
        if b > largest[0]:
          largest = (b, describe(e, o))
    top = live + inner_peak[i] + created if top is None else max(top, live + inner_peak[i] + created)
    live += created
    for b in frees.get(i, []):
      live -= b
  return (top or 0) if freed else max(top or 0, 0), largest


def live_intervals(eqns: Sequence[Eqn], kept: set, producer: dict, out_set, inner_peak: Sequence[int],
                   size: Callable, last_reads: dict | None = None, copies: Sequence[tuple[int, int, int]] = (),
                   freed: Sequence[int] = (), order: Sequence[int] | None = None,
                   via: set = frozenset()) -> tuple[list[tuple[int, int, int]], int]:
  """([(bytes, first step, last step)] of each buffer `peak` counts, the bytes of `freed`
  among them): the same walk as `peak` (same arguments), as intervals over the equations'
  steps instead of a running sum. A value is live from the step that makes it to its last
  read (outputs to one past the last step), a copy from the step after its operand's to its
  last dot, an equation's inner peak at its own step, a freed input from before the first
  step to its last read; `benchmarks.heap_packing.live_peak` of them less the freed bytes is
  `peak`'s first result. For `benchmarks.heap_packing.pack`: where XLA's best fit would place them
  (`benchmarks/heap_packing_replay.py`)."""
  if order is not None:
    eqns, inner_peak = [eqns[i] for i in order], [inner_peak[i] for i in order]
  last_use = _last_uses(eqns, last_reads, copies, via)
  out = []
  for i, e in enumerate(eqns):
    for o in e.outs:
      if o in kept and (o in last_use or o in out_set):
        out.append((size(o), i, len(eqns) if o in out_set else max(i, last_use[o])))
    if inner_peak[i]:
      out.append((inner_peak[i], i, i))
  for a, start, end in copies:
    out.append((size(a), start + 1, max(start + 1, end)))
  base = 0
  for a in freed:
    if a in last_use:
      out.append((size(a), -1, last_use[a]))
      base += size(a)
  return out, base


def cpu_liveness(eqns: Sequence[Eqn], args: Sequence[int], kept: set, producer: dict, consumers: dict,
                 size: Callable, shape: Callable, freed: Sequence[int] = (),
                 sliced: Sequence[int] = ()) -> tuple[set, Callable, dict]:
  """(materialized set, size function, `peak` keyword arguments) of XLA:CPU's liveness (module
  doc) over the fusion model's `kept` set, its equations in XLA:CPU's order (`bfs_order`);
  `shape`: per-device shapes; `freed`: inputs freed after their last read; `sliced`: inputs a
  loop's body reads as slices of stacked operands (`slice_copies`)."""
  wide = shared_values(eqns, args, kept, producer, consumers, size)
  live = kept | set(wide)
  order = bfs_order(eqns, live, producer, shape, set(sliced))
  eqns = [eqns[i] for i in order]
  via: set = set()
  copies = dot_layout_copies(eqns, live, producer, consumers, shape, via)
  return live, (lambda i: size(wide.get(i, i))), dict(
      last_reads=kernel_last_reads(eqns, live, producer, via),
      copies=copies + slice_copies(eqns, set(sliced), producer, shape), freed=list(freed), order=order,
      via=via)
