"""Which values of a lowered jaxpr XLA materializes, what its fused kernels read, and the peak
of the materialized values live at once.

Kernels, as XLA forms them (approximately): elementwise and shape ops fuse into the kernel of
the value they feed, unless that value is *materialized*: the result of a matmul, reduction,
gather, scatter, sort, loop or collective, an operand of a matmul or of such an op, or an
output. A fused kernel writes its materialized result and reads the materialized values it
depends on. Liveness walks the equations in order: a materialized value is live from the
equation that makes it to its last use (outputs to the end); an equation's own inner peak
(a loop's body) adds to what is live around it.
"""
from __future__ import annotations

from typing import Callable, Iterator, Sequence

from passes.jaxpr_ir import ELEMENTWISE, FUSIBLE, REDUCTIONS, Eqn


# How kernels are formed: 'xla' fuses as the module doc says; 'eager' runs every elementwise op
# and reduction as its own kernel, as PyTorch's eager mode does (shape ops are views there).
FUSIONS = ("xla", "eager")


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
      if o not in kept:
        continue
      seen, stack, read = set(), list(e.ins), 0
      while stack:
        a = stack.pop()
        if a is None or a in seen:
          continue
        seen.add(a)
        if a in kept or a not in producer:
          read += size(a)
        else:
          stack.extend(producer[a].ins)
      yield e, read + size(o)


def peak(eqns: Sequence[Eqn], kept: set, producer: dict, out_set, inner_peak: Sequence[int],
         size: Callable, describe: Callable) -> tuple[int, tuple[int, str]]:
  """(the most bytes of materialized values created here live at once, (bytes, description)
  of the largest such value); `inner_peak[i]`: equation i's own peak (a loop's body)."""
  last_use: dict[int, int] = {}
  for i, e in enumerate(eqns):
    for a in e.ins:
      if a is not None:
        last_use[a] = i
  frees: dict[int, list] = {}
  for a, i in last_use.items():
    if a in producer and a in kept and a not in out_set:
      frees.setdefault(i, []).append(a)
  live = top = 0
  largest = (0, "")
  for i, e in enumerate(eqns):
    created = 0
    for o in e.outs:
      if o in kept and (o in last_use or o in out_set):
        b = size(o)
        created += b
        if b > largest[0]:
          largest = (b, describe(e, o))
    top = max(top, live + inner_peak[i] + created)
    live += created
    for a in frees.get(i, []):
      live -= size(a)
  return top, largest
