"""What a traced function costs per device, read from its jaxpr: FLOPs, kernels, tensor-axis
collectives and the peak of the values it keeps live, without compiling it.

The analytic screen (`passes.screen`) traces each part of a program (pre, one block, post)
once and reads its costs here; a plan's figures are then sums over parts, layers and
micro-batches. Nothing here knows a model: every figure comes from the jaxpr's shapes.

The walk lowers the jaxpr to its own IR (`passes.jaxpr_ir`: calls inlined, CSE, DCE), follows
the dims sharded over 'tensor' through it (`passes.jaxpr_tp`: the caller says which dim of each
input is sharded, `in_dims`, from the plan's TP rules; a value's per-device bytes are its
bytes / tp when it carries a sharded dim) and charges the collectives those rules need
(`Comm`), combined as XLA's all-reduce and all-gather combiners do: collectives of one kind
that depend on none of each other (the same number of collectives on their longest path from
the function's inputs: a block backward's q, k and v input gradients) run as one, of their
summed bytes. Kernels, for the roofline of `passes.cost_model`: every matmul is one kernel (its
FLOPs; operands and result moved); other ops fuse as `passes.jaxpr_liveness` says. This is
the screen's model of fusion; the screen's calibration against compiled candidates
(`passes.screen_calibration`) absorbs the difference.

Liveness (`passes.jaxpr_liveness`): `peak_bytes` is the most bytes of materialized values
created inside the function that are live at once, walking the equations in order (a loop
adds its body's own peak), per device; `largest` is the largest single such value.
"""
from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Sequence

from jax.extend.core import ClosedJaxpr, Jaxpr

from passes import jaxpr_liveness, jaxpr_tp, memory
from passes.jaxpr_ir import Eqn, Program, dce, nbytes
from passes.jaxpr_tp import PARTIAL


@dataclasses.dataclass(frozen=True)
class Comm:
  """One collective over the 'tensor' axis, per device: its kind, result bytes and run count."""
  kind: str
  bytes: int
  count: int = 1


_SCOPES = itertools.count()  # one per walk of a (sub-)jaxpr: collectives combine within one


def combined(pending) -> list[Comm]:
  """`Comm`s of `(kind, bytes, count, scope, level)` records, those of one kind, run count, walk
  and level merged into one of their summed bytes (module doc), in first-seen order."""
  out: dict[tuple, int] = {}
  for kind, size, count, scope, level in pending:
    key = (kind, count, scope, level)
    out[key] = out.get(key, 0) + size
  return [Comm(kind, size, count) for (kind, count, _, _), size in out.items()]


@dataclasses.dataclass(frozen=True)
class JaxprCost:
  """Per-device costs of one call of a traced function (loops unrolled).

  Attributes:
    flops: FLOPs of its matmuls and convolutions (2 per multiply-add).
    kernels: (flops, bytes moved, count) per kernel (module doc), as `hlo_stats.Kernel`s.
    comms: the 'tensor'-axis collectives the dataflow needs (module doc).
    peak_bytes: the most bytes of materialized values created inside live at once (above the
      inputs `free_inputs` frees, on XLA:CPU).
    largest: (bytes, description) of the largest such value: the temporary a kernel-level
      model (e.g. fused attention) would replace.
    out_bytes: per-device bytes of each output.
    out_sources: per output, the index of the input it passes through unchanged, or -1.
    out_dims: per output, its dim sharded over 'tensor' (None: replicated).
    out_deps: per output, the bitmask of the input groups it depends on (`analyze`'s groups).
    out_repeats: per output, whether it is the same value as an earlier output.
    attention: indices into `kernels` of those traced under `ATTENTION_SCOPE` (the fused
      attention of `bridge.attention`), which a target running flash attention replaces.
    attention_causal: per `attention` entry, whether it ran under the causal scope.
    eigen_dots ('xla:cpu' only): (m, n, k, element bytes) per device of the dots XLA:CPU runs
      as Eigen contractions outside YNNPACK (`jaxpr_liveness.eigen_dots`), each shape once.
  """
  flops: float
  kernels: tuple
  comms: tuple[Comm, ...]
  peak_bytes: int
  largest: tuple[int, str]
  out_bytes: tuple[int, ...]
  out_sources: tuple[int, ...]
  out_dims: tuple
  out_deps: tuple = ()
  out_repeats: tuple = ()
  attention: tuple = ()
  attention_causal: tuple = ()
  eigen_dots: tuple = ()

  @property
  def eigen_scratch(self) -> int:
    """Per-device bytes of the largest Eigen packing of `eigen_dots` (`memory.eigen_packing_bytes`)."""
    return max((memory.eigen_packing_bytes(*d) for d in self.eigen_dots), default=0)

  @property
  def kernel_bytes(self) -> float:
    return sum(k[1] * k[2] for k in self.kernels)


class _Walker:
  """Abstract interpretation of a jaxpr for one tensor-parallel degree (module doc)."""

  def __init__(self, tp: int, prog: Program, fusion: str = "xla"):
    self.tp, self.prog, self.fusion = tp, prog, fusion
    self.flops = 0.0
    self.kernels: list[tuple] = []  # (flops, bytes, count), in walk order
    self.attention: list[tuple] = []  # (index, causal) of the kernels under ATTENTION_SCOPE
    self.att = False  # walking a sub-jaxpr under ATTENTION_SCOPE: 'causal' or 'full'; else False
    self.comms: list[tuple] = []  # (kind, bytes, count, scope, level): `combined` makes the Comms
    self.level: dict[int, int] = {}  # value id -> collectives on its longest path from the inputs
    self.scope = 0  # the walk being walked
    self.largest = (0, "")
    self.deps: dict[int, int] = {}  # value id -> bitmask of the input groups it depends on
    self.out_hints: list = []  # dims the caller shards the top-level outputs on
    self.free_inputs: list = []  # XLA:CPU: top-level inputs reclaimed after their last read
    self.sliced_inputs: list = []  # XLA:CPU: top-level inputs the loop slices out of stacked operands
    self.eigen_dots: set = set()  # XLA:CPU: (m, n, k, bytes) of its Eigen dots (jaxpr_liveness.eigen_dots)
    self.reduced: set = set()  # dots whose result is reduced over 'tensor' (nothing folds across it)

  def size(self, i, dims) -> int:
    if i is None:
      return 0
    b = nbytes(self.prog.avals[i])
    return b // self.tp if isinstance(dims.get(i), int) and self.tp > 1 else b

  def shape(self, i) -> tuple:
    return tuple(getattr(self.prog.avals[i], "shape", ()))

  def device_shape(self, i, dims) -> tuple:
    """The per-device shape: its dim sharded over 'tensor' divided by the degree."""
    s, d = list(self.shape(i)), dims.get(i)
    if self.tp > 1 and isinstance(d, int) and 0 <= d < len(s):
      s[d] //= self.tp
    return tuple(s)

  def comm(self, kind, size, count, level: int = 0):
    """Charges a collective at `level` (collectives on the longest path to its operand, + 1)."""
    if self.tp > 1 and size:
      self.comms.append((kind, int(size), count, self.scope, level))

  def kernel(self, flops, size, count, att=False):
    if att:
      self.attention.append((len(self.kernels), att == "causal"))
    self.kernels.append((float(flops), float(size), count))

  def walk(self, jaxpr: Jaxpr, in_dims: Sequence, count: float, args=None) -> tuple[list, list, int]:
    """Walks `jaxpr` run `count` times; returns (output ids, their dims, its own peak bytes)."""
    top = args is not None  # the caller's function (nested loops and calls get fresh ids)
    args = args if args is not None else [self.prog.new(v.aval) for v in jaxpr.invars]
    outer, self.scope = self.scope, next(_SCOPES)
    try:
      return self._walk(jaxpr, in_dims, count, args, top)
    finally:
      self.scope = outer

  def _walk(self, jaxpr: Jaxpr, in_dims: Sequence, count: float, args, top: bool):
    eqns, outs = self.prog.lower(jaxpr, args, self.att)
    eqns = dce(eqns, outs)
    dims: dict = dict(zip(args, in_dims))
    consumers: dict[int, list] = {}
    for e in eqns:
      for a in e.ins:
        if a is not None:
          consumers.setdefault(a, []).append(e)
    out_set = {o for o in outs if o is not None}
    producer: dict[int, Eqn] = {o: e for e in eqns for o in e.outs}
    inner_peak = []
    level = self.level
    for e in eqns:
      ins = [dims.get(a) if a is not None else None for a in e.ins]
      if PARTIAL in ins and not jaxpr_tp.keeps_partial(e, ins):
        for a, d in zip(e.ins, ins):
          if d == PARTIAL:
            level[a] = level.get(a, 0) + 1
            self.comm("all-reduce", nbytes(self.prog.avals[a]), count, level[a])
            dims[a] = None
        ins = [dims.get(a) if a is not None else None for a in e.ins]
      lv = max((level.get(a, 0) for a in e.ins if a is not None), default=0)
      charged = len(self.comms)
      if PARTIAL in ins:  # kept partial: reduced where it is consumed
        out_dims, peak = [PARTIAL] * len(e.outs), 0
      else:
        out_dims, peak = self.eqn(e, ins, count, dims, lv + 1)
      for o in e.outs:  # after a collective of its own (or inside its loop): one level on
        level[o] = lv + (len(self.comms) > charged)
      inner_peak.append(peak)
      mask = 0
      for a in e.ins:
        if a is not None:
          mask |= self.deps.get(a, 0)
      for o in e.outs:
        self.deps[o] = mask
      for o, d in zip(e.outs, out_dims):
        dims[o] = d
    if top and self.out_hints:
      for o, d in zip(outs, self.out_hints):
        if o is not None and d is not None and dims.get(o) is None and d < len(self.shape(o)):
          dims[o] = d
      self.out_hints = []
    if self.tp > 1:
      jaxpr_tp.shard_backward(eqns, dims, consumers, out_set, self.shape)
    kept = jaxpr_liveness.materialized(eqns, args, consumers, out_set, self.fusion)
    size = lambda i: self.size(i, dims)
    for e, moved in jaxpr_liveness.fused_kernels(eqns, kept, producer, size):
      self.kernel(0, moved, count, e.att)
    live_kept, live_size, cpu = kept, size, {}
    if self.fusion == "xla:cpu":  # the buffers XLA:CPU adds (passes.jaxpr_liveness module doc)
      freed = [a for a, f in zip(args, self.free_inputs) if f] if top else []
      sliced = [a for a, f in zip(args, self.sliced_inputs) if f] if top else []
      live_kept, live_size, cpu = jaxpr_liveness.cpu_liveness(eqns, args, kept, producer, consumers, size,
                                                              lambda i: self.device_shape(i, dims), freed,
                                                              sliced)
      self.eigen_dots.update(
          (m, n, k, max(self.prog.avals[o].dtype.itemsize, 4))  # XLA:CPU runs non-library dots in f32
          for m, n, k, o in jaxpr_liveness.eigen_dots(eqns, consumers, lambda i: self.device_shape(i, dims))
          if o not in self.reduced)
    peak, largest = jaxpr_liveness.peak(eqns, live_kept, producer, out_set, inner_peak, live_size,
                                        lambda e, o: f"{e.name} -> {self.prog.avals[o].str_short()}", **cpu)
    if largest[0] > self.largest[0]:
      self.largest = largest
    for o in outs:  # a partial sum leaving the function is reduced there
      if o is not None and dims.get(o) == PARTIAL:
        self.comm("all-reduce", nbytes(self.prog.avals[o]), count, level.get(o, 0) + 1)
        dims[o] = None
    return outs, [dims.get(o) if o is not None else None for o in outs], peak

  def eqn(self, e: Eqn, ins, count, dims, level: int = 1) -> tuple[list, int]:
    """(dims of `e`'s outputs, its own inner peak bytes); charges its FLOPs, kernels, comms
    (a collective it needs itself at `level`: one more than the most on its operands' paths)."""
    name, p = e.name, e.params
    n = len(e.outs)
    if name in ("scan", "while", "cond") and e.att and not self.att:
      self.att = e.att  # its body runs under the scope too
      try:
        return self.eqn(e, ins, count, dims, level)
      finally:
        self.att = False
    if name == "scan":
      nc, nk, length = p["num_consts"], p["num_carry"], p["length"]
      inner = list(ins[:nc + nk]) + [(d - 1 if d else None) for d in ins[nc + nk:]]
      _, outs, peak = self.walk(p["jaxpr"].jaxpr, inner, count * length)
      return [outs[j] if j < nk else (outs[j] + 1 if outs[j] is not None else None)
              for j in range(len(outs))], peak
    if name == "while":
      cc = p["cond_nconsts"]
      _, outs, peak = self.walk(p["body_jaxpr"].jaxpr, ins[cc:], count)  # trip count unknown: once
      return outs, peak
    if name == "cond":
      best = None
      for br in p["branches"]:
        sub = _Walker(self.tp, self.prog, self.fusion)
        sub.att = self.att
        _, outs, peak = sub.walk(br.jaxpr, ins[1:], count)
        cost = sub.flops + sum(k[1] * k[2] for k in sub.kernels)
        if best is None or cost > best[0]:
          best = (cost, sub, outs, peak)
      self.merge(best[1])
      return best[2], best[3]
    if name == "dot_general":
      return [self.dot(e, ins, count, dims)], 0
    if name == "conv_general_dilated":
      out = e.outs[0]
      rhs = self.shape(e.ins[1])
      o = p["dimension_numbers"].rhs_spec[0] if p.get("dimension_numbers") is not None else 0
      fl = 2.0 * math.prod(self.shape(out)) * math.prod(rhs) / max(rhs[o], 1) / p.get("feature_group_count", 1)
      sharded = self.tp > 1 and any(d is not None for d in ins)
      fl = fl / self.tp if sharded else fl
      self.flops += fl * count
      self.kernel(fl, sum(self.size(a, dims) for a in e.ins) + nbytes(self.prog.avals[out]) //
                  (self.tp if sharded else 1), count, e.att)
      return [None], 0
    if self.tp == 1:
      return [None] * n, 0
    out_dims, comms = jaxpr_tp.op_dims(e, ins, self.prog.avals)
    for kind, size in comms:
      self.comm(kind, size, count, level)
    return out_dims, 0

  def dot(self, e: Eqn, ins, count, dims):
    lhs, rhs = e.ins
    out = e.outs[0]
    (lc, _), _ = e.params["dimension_numbers"]
    k = math.prod(self.shape(lhs)[d] for d in lc)
    flops = 2.0 * math.prod(self.shape(out)) * k
    dl, dr = ins
    out_dim, reduce = None, False
    if self.tp > 1:
      out_dim, reduce = jaxpr_tp.dot_dims(e.params["dimension_numbers"], len(self.shape(lhs)),
                                         len(self.shape(rhs)), dl, dr)
    sharded = self.tp > 1 and (dl is not None or dr is not None)
    if sharded:
      flops /= self.tp
    self.flops += flops * count
    out_b = nbytes(self.prog.avals[out]) // (self.tp if out_dim is not None and self.tp > 1 else 1)
    self.kernel(flops, self.size(lhs, dims) + self.size(rhs, dims) + out_b, count, e.att)
    if reduce:
      self.reduced.add(out)
    return PARTIAL if reduce else out_dim

  def merge(self, other: "_Walker"):
    self.flops += other.flops
    self.attention += [(i + len(self.kernels), c) for i, c in other.attention]
    self.kernels += other.kernels
    self.comms += other.comms
    if other.largest[0] > self.largest[0]:
      self.largest = other.largest
    self.eigen_dots |= other.eigen_dots


def analyze(closed: ClosedJaxpr, in_dims: Sequence, tp: int = 1, groups: Sequence[int] | None = None,
            out_hints: Sequence | None = None, fusion: str = "xla",
            free_inputs: Sequence[bool] = (), sliced_inputs: Sequence[bool] = ()) -> JaxprCost:
  """Per-device costs of one call of `closed` (module doc).

  Args:
    closed: the function's jaxpr (`jax.make_jaxpr(f)(*args)`).
    in_dims: per input (flattened), the dim sharded over 'tensor' or None.
    tp: the size of the 'tensor' axis.
    groups: per input, a group number (0-30); `out_deps` then says which groups each output
      depends on (default: every input its own group, up to 31).
    out_hints: per output (or a prefix of them), the dim the caller shards it on over
      'tensor' (a gradient constrained like its parameter), or None; what makes it is then
      sharded alike (GSPMD propagates shardings backwards too).
    fusion: how kernels are formed (`passes.jaxpr_liveness.FUSIONS`): 'xla' (default),
      'xla:cpu' (XLA's fusion, with the buffers XLA:CPU adds to the liveness), or 'eager',
      every elementwise op and reduction its own kernel (PyTorch eager).
    free_inputs ('xla:cpu' only): per input, whether its buffer is freed after its last read
      (the caller counts it whole: `peak_bytes` is then the peak above it, and can be
      negative; `jaxpr_liveness.peak`).
    sliced_inputs ('xla:cpu' only): per input, whether the function is a loop's body that reads
      it as a slice of a stacked operand (a layer's residuals; `jaxpr_liveness.slice_copies`).

  Example:
    >>> c = analyze(jax.make_jaxpr(f)(x, w), [None, 1], tp=4)
    >>> c.flops, c.peak_bytes
  """
  jaxpr = closed.jaxpr
  if len(in_dims) != len(jaxpr.invars):
    raise ValueError(f"analyze: in_dims has {len(in_dims)} entries for a jaxpr of {len(jaxpr.invars)} inputs.")
  if fusion not in jaxpr_liveness.FUSIONS:
    raise ValueError(f"analyze: fusion={fusion!r}; allowed: {jaxpr_liveness.FUSIONS}.")
  prog = Program()
  w = _Walker(tp, prog, fusion)
  args = [prog.new(v.aval) for v in jaxpr.invars]
  groups = groups if groups is not None else [min(i, 30) for i in range(len(args))]
  for a, g in zip(args, groups):
    w.deps[a] = 1 << g
  w.out_hints = list(out_hints or [])
  w.free_inputs = list(free_inputs) + [False] * (len(args) - len(free_inputs))
  w.sliced_inputs = list(sliced_inputs) + [False] * (len(args) - len(sliced_inputs))
  outs, out_dims, peak = w.walk(jaxpr, list(in_dims), 1, args)
  arg_set = set(args)
  out_b = []
  for o, d in zip(outs, out_dims):
    b = 0 if o is None else nbytes(prog.avals[o])
    out_b.append(b // tp if d is not None and tp > 1 else b)
  sources = [args.index(o) if o is not None and o in arg_set else -1 for o in outs]
  deps = tuple(w.deps.get(o, 0) if o is not None else 0 for o in outs)
  seen, repeats = set(), []
  for o in outs:
    repeats.append(o is not None and o in seen)
    seen.add(o)
  return JaxprCost(w.flops, tuple(w.kernels), tuple(combined(w.comms)), peak, w.largest, tuple(out_b),
                   tuple(sources), tuple(out_dims), deps, tuple(repeats),
                   tuple(i for i, _ in w.attention), tuple(c for _, c in w.attention),
                   tuple(sorted(w.eigen_dots)))
