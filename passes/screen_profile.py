"""What the analytic screen knows about a program, traced once per search and never compiled.

A layered program is three parts: `pre` (embedding), one `block` (run L times) and `post`
(head and loss). For each part, each recomputation policy and each per-device micro-batch
size, the part's forward and backward are traced to jaxprs (`jax.vjp`; abstract shapes,
nothing runs) and read by `passes.jaxpr_cost`: FLOPs, kernels, 'tensor' collectives, the
residuals the backward keeps and the peak of the temporaries. A flat program (no `Layers`)
is one part, its whole loss.

Tracing costs ~0.01-0.1 s per part; the sizes of a search's plans are served by tracing two
micro-batch sizes and interpolating linearly (every size in a part is an affine function of
its batch), checked to have the same structure, else traced exactly.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any

import jax
import jax.numpy as jnp

from passes import jaxpr_cost
from passes import recompute as recompute_policies
from passes.jaxpr_cost import Comm, JaxprCost
from passes.program import BLOCKS, POST, PRE, Program

log = logging.getLogger("ap_xla")
PyTree = Any

# 'selective_layer' is not traced: a block's costs under it are the mean of 'none' and
# 'full' (`_layer_mix`), as every 2nd block of the stack recomputes fully.
POLICIES = ("none", "full", "dots", "selective_op")
# Input groups of a part's forward (bits of JaxprCost.out_deps).
PARAMS, HIDDEN, AUX, BATCH = 0, 1, 2, 3


@dataclasses.dataclass(frozen=True)
class PartCost:
  """One part's per-device costs for one micro-batch at one TP degree.

  Attributes:
    fwd: the forward, computing what the backward keeps (`jax.vjp`'s forward).
    bwd: the backward, recomputation included.
    saved: bytes of residuals computed from its parameters or its input activations: kept per
      call (per layer, per micro-batch in flight).
    saved_params: bytes of residuals that are the parameters themselves: free when the
      parameters are stored whole on the device, a gathered copy under FSDP.
    saved_input: bytes of residuals that are the hidden input itself (the layer's input,
      kept by the loop that runs the layers).
    saved_invariant: bytes of residuals computed from side inputs only (masks, rotary
      tables): the same for every layer, kept once.
    saved_weights: the part of `saved` computed from the parameters alone (their bf16 casts):
      what FSDP's re-gather in the backward does not keep (`passes.regather`).
  """
  fwd: JaxprCost
  bwd: JaxprCost
  saved: float
  saved_params: float
  saved_input: float
  saved_invariant: float
  saved_weights: float = 0.0

  @property
  def flops(self) -> float:
    return self.fwd.flops + self.bwd.flops

  @property
  def kernels(self) -> tuple:
    return self.fwd.kernels + self.bwd.kernels

  @property
  def comms(self) -> tuple:
    return self.fwd.comms + self.bwd.comms

  @property
  def attention(self) -> tuple:
    """Indices into `kernels` of the fused attention's kernels (`JaxprCost.attention`)."""
    return self.fwd.attention + tuple(i + len(self.fwd.kernels) for i in self.bwd.attention)

  @property
  def attention_causal(self) -> tuple:
    return self.fwd.attention_causal + self.bwd.attention_causal

  @property
  def temp_peak(self) -> float:
    """The larger of the forward's and the backward's own temporaries."""
    return max(self.fwd.peak_bytes, self.bwd.peak_bytes)


def _lerp(a, b, t):
  return a + (b - a) * t


def _lerp_cost(a: JaxprCost, b: JaxprCost, t: float) -> JaxprCost:
  kernels = tuple((_lerp(x[0], y[0], t), _lerp(x[1], y[1], t), x[2]) for x, y in zip(a.kernels, b.kernels))
  comms = tuple(Comm(x.kind, int(_lerp(x.bytes, y.bytes, t)), x.count) for x, y in zip(a.comms, b.comms))
  largest = (int(_lerp(a.largest[0], b.largest[0], t)), a.largest[1])
  return JaxprCost(_lerp(a.flops, b.flops, t), kernels, comms, int(_lerp(a.peak_bytes, b.peak_bytes, t)), largest,
                   tuple(int(_lerp(x, y, t)) for x, y in zip(a.out_bytes, b.out_bytes)), a.out_sources,
                   a.out_dims, a.out_deps, a.out_repeats, a.attention, a.attention_causal,
                   tuple(tuple(int(_lerp(u, v, t)) for u, v in zip(x, y))
                         for x, y in zip(a.eigen_dots, b.eigen_dots)))


def _mix_cost(a: JaxprCost, b: JaxprCost, w: float) -> JaxprCost:
  """Per block of a stack where a fraction `w` of the blocks runs `b` and the rest `a`: the
  kernels and collectives of both, their counts weighted; the larger peak."""
  kernels = tuple((f, by, n * (1 - w)) for f, by, n in a.kernels) + tuple((f, by, n * w) for f, by, n in b.kernels)
  comms = (tuple(Comm(c.kind, c.bytes, c.count * (1 - w)) for c in a.comms)
           + tuple(Comm(c.kind, c.bytes, c.count * w) for c in b.comms))
  top = a if a.peak_bytes >= b.peak_bytes else b
  return dataclasses.replace(
      a, flops=(1 - w) * a.flops + w * b.flops, kernels=kernels, comms=comms, peak_bytes=top.peak_bytes,
      largest=max(a.largest, b.largest), attention=a.attention + tuple(i + len(a.kernels) for i in b.attention),
      attention_causal=a.attention_causal + b.attention_causal,
      eigen_dots=tuple(sorted(set(a.eigen_dots) | set(b.eigen_dots))))


def _layer_mix(none: "PartCost", full: "PartCost", w: float) -> "PartCost":
  """A block's costs under per-layer selective recomputation: a fraction `w` of the blocks
  under 'full', the others under 'none' (per block, averaged over the stack)."""
  mix = lambda x, y: (1 - w) * x + w * y
  return PartCost(_mix_cost(none.fwd, full.fwd, w), _mix_cost(none.bwd, full.bwd, w),
                  mix(none.saved, full.saved), mix(none.saved_params, full.saved_params),
                  mix(none.saved_input, full.saved_input), max(none.saved_invariant, full.saved_invariant),
                  mix(none.saved_weights, full.saved_weights))


def _same_structure(a: JaxprCost, b: JaxprCost) -> bool:
  return (len(a.kernels) == len(b.kernels) and [c.kind for c in a.comms] == [c.kind for c in b.comms]
          and len(a.out_bytes) == len(b.out_bytes) and a.out_sources == b.out_sources
          and len(a.eigen_dots) == len(b.eigen_dots))


def _is_float(x) -> bool:
  return jnp.issubdtype(x.dtype, jnp.floating)


def _cast(tree, bf16: bool):
  if not bf16:
    return tree
  return jax.tree.map(lambda x: x.astype(jnp.bfloat16) if _is_float(x) else x, tree)


def _sds(tree, bf16=False):
  def one(x):
    dt = jnp.bfloat16 if bf16 and _is_float(x) else x.dtype
    return jax.ShapeDtypeStruct(tuple(x.shape), dt)
  return jax.tree.map(one, tree)


def _slice_batch(batch, b: int):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct((b,) + tuple(x.shape[1:]), x.dtype), batch)


def _depends_on_params(program: Program) -> bool:
  """Whether `pre`'s side inputs (aux) depend on its parameters (then they need gradients)."""
  closed = jax.make_jaxpr(program.layers.pre)(program.params[PRE], program.batch)
  n = len(jax.tree.leaves(program.params[PRE]))
  c = jaxpr_cost.analyze(closed, [None] * len(closed.jaxpr.invars),
                         groups=[0] * n + [1] * (len(closed.jaxpr.invars) - n))
  return any(d & 1 for d in c.out_deps[1:])


class ProgramProfile:
  """Per-part costs of a program, traced on demand and cached (module doc).

  Args:
    program: the abstract program.
    tp_rules: its tensor-parallel rules (None: no tensor parallelism).
    tp_dims: `tp -> per-leaf dims over 'tensor'` (passes.build.tp_dims) for the parts' inputs.
    fusion: how the kernels are formed (`passes.jaxpr_liveness.FUSIONS`): 'xla' for ap-xla's
      own programs; 'eager' to cost a PyTorch eager run of the same model (benchmarks).
  """

  def __init__(self, program: Program, tp_dims_fn, fusion: str = "xla"):
    self.program = program
    self.tp_dims_fn = tp_dims_fn
    self.fusion = fusion
    self.layered = program.layers is not None
    self.aux_grad = self.layered and _depends_on_params(program)
    self._traces: dict = {}
    self._costs: dict = {}
    self.sizes: tuple[int, ...] = ()
    self.traced = 0

  def set_sizes(self, sizes) -> None:
    """The per-device micro-batch sizes the plans need (the two extremes are traced)."""
    self.sizes = tuple(sorted(set(sizes)))

  # ---------------------------------------------------------------- tracing

  def _fns(self, part: str, recompute: str, bf16: bool):
    """(fn, args, groups): the part's vjp traced as forward jaxpr + backward jaxpr."""
    layers = self.program.layers
    if not self.layered:
      def flat(p, batch):
        return self.program.loss_fn(_cast(p, bf16), _cast(batch, bf16)).astype(jnp.float32)
      return flat, ("params",)
    if part == PRE:
      def pre(p, batch):
        return layers.pre(_cast(p, bf16), _cast(batch, bf16))
      return pre, ("params",) + (("aux",) if self.aux_grad else ())
    if part == BLOCKS:
      def block(p, h, aux):
        return layers.block(_cast(p, bf16), h, aux)
      return recompute_policies.checkpointed(block, recompute), ("params", "hidden") + (("aux",) if self.aux_grad else ())
    def post(p, h, aux, batch):
      return layers.post(_cast(p, bf16), h, aux, _cast(batch, bf16)).astype(jnp.float32)
    return post, ("params", "hidden") + (("aux",) if self.aux_grad else ())

  def hidden(self, bf16: bool, b: int):
    """The shapes `pre` gives a micro-batch of `b` examples: (hidden, aux)."""
    key = ("hidden", bf16, b)
    if key not in self._traces:
      batch = _slice_batch(self.program.batch, b)
      pre = lambda p, bt: self.program.layers.pre(_cast(p, bf16), _cast(bt, bf16))
      self._traces[key] = jax.eval_shape(pre, self.program.params[PRE], batch)
    return self._traces[key]

  def _inputs(self, part: str, bf16: bool, b: int):
    """Abstract inputs of a part for a micro-batch of `b` examples."""
    prog = self.program
    batch = _slice_batch(prog.batch, b)
    if not self.layered:
      return (prog.params, batch)
    pre_p = prog.params[PRE]
    h, aux = self.hidden(bf16, b)
    if part == PRE:
      return (pre_p, batch)
    if part == BLOCKS:
      block0 = jax.tree.map(lambda x: jax.ShapeDtypeStruct(tuple(x.shape[1:]), x.dtype), prog.params[BLOCKS])
      return (block0, h, aux)
    return (prog.params[POST], h, aux, batch)

  def _names(self, part: str) -> tuple[str, ...]:
    """The part's arguments, in order."""
    if not self.layered:
      return ("params", "batch")
    return {PRE: ("params", "batch"), BLOCKS: ("params", "hidden", "aux"),
            POST: ("params", "hidden", "aux", "batch")}[part]

  def _trace(self, part: str, recompute: str, bf16: bool, b: int):
    key = (part, recompute, bf16, b)
    if key in self._traces:
      return self._traces[key]
    fn, wrt = self._fns(part, recompute, bf16)
    args = self._inputs(part, bf16, b)
    names = self._names(part)
    diff = [i for i, n in enumerate(names) if n in wrt]

    def forward(*a):
      def f(*d):
        full = list(a)
        for i, x in zip(diff, d):
          full[i] = x
        return fn(*full)
      return jax.vjp(f, *[a[i] for i in diff])

    fwd, shape = jax.make_jaxpr(forward, return_shape=True)(*args)
    out_shape, vjp_shape = shape
    res_leaves = jax.tree.leaves(vjp_shape)
    td = jax.tree.structure(vjp_shape)
    bwd = jax.make_jaxpr(lambda leaves, ct: jax.tree.unflatten(td, leaves)(ct))(res_leaves, out_shape)
    group_of = {"params": PARAMS, "hidden": HIDDEN, "aux": AUX, "batch": BATCH}
    leaf_groups = []
    for n, a in zip(names, args):
      leaf_groups += [group_of[n]] * len(jax.tree.leaves(a))
    n_out = len(jax.tree.leaves(out_shape))
    self.traced += 1
    self._traces[key] = (fwd, bwd, leaf_groups, n_out, names, args)
    return self._traces[key]

  def _in_dims(self, part: str, names, args, tp: int) -> list:
    dims = self.tp_dims_fn(tp) if tp > 1 else None
    out = []
    for n, a in zip(names, args):
      leaves = jax.tree.leaves(a)
      if n == "params" and dims is not None:
        pd = dims if not self.layered else dims[part]
        flat = jax.tree.leaves(pd, is_leaf=lambda x: x is None)
        if part == BLOCKS:
          flat = [None if d is None else d - 1 for d in flat]
        out += flat
      else:
        out += [None] * len(leaves)
    return out

  def _exact(self, part: str, recompute: str, bf16: bool, b: int, tp: int) -> PartCost:
    fwd, bwd, groups, n_out, names, args = self._trace(part, recompute, bf16, b)
    in_dims = self._in_dims(part, names, args, tp)
    cf = jaxpr_cost.analyze(fwd, in_dims, tp, groups, fusion=self.fusion)
    res = list(range(n_out, len(cf.out_bytes)))
    ct_dims = list(cf.out_dims[:n_out])
    n_params = len(jax.tree.leaves(args[0]))  # the cotangents of the parameters come first
    saved = saved_params = saved_input = saved_invariant = saved_weights = 0.0
    counted = []  # per residual: whether `saved` or `saved_input` counts it
    # Per residual: whether the layer loop's backward slices it out of a stack of residuals
    # (`jaxpr_liveness.slice_copies`): those computed from the hidden state. The weights' slices
    # (and residuals of the weights alone) are left out: XLA:CPU makes them alike (the 100M's
    # layer backward at TP 1: 111 MiB above its loop's operands, 110 with them, 89 without),
    # but FSDP's assembly counts the layer's gathered weights whole (`gathered_params`), and
    # this profile serves replicated and FSDP plans alike.
    stacked = []
    for i in res:
      src, nbytes, deps = cf.out_sources[i], cf.out_bytes[i], cf.out_deps[i]
      counted.append(False)
      stacked.append(not cf.out_repeats[i] and (bool(deps & (1 << HIDDEN)) if src < 0 else groups[src] == HIDDEN))
      if cf.out_repeats[i]:
        continue  # the same value saved twice is stored once
      if src >= 0:
        g = groups[src]
        if g == PARAMS:
          saved_params += nbytes
        elif g == HIDDEN:
          saved_input += nbytes
          counted[-1] = True
        elif g in (AUX, BATCH):
          saved_invariant += nbytes
      elif deps & ((1 << PARAMS) | (1 << HIDDEN)):
        saved += nbytes
        counted[-1] = True
        if deps == 1 << PARAMS:
          saved_weights += nbytes
      elif deps:
        saved_invariant += nbytes
      # else: a constant (a broadcast zero, an iota mask): XLA folds it, nothing is stored
    # On XLA:CPU a backward's peak is taken above its residuals, which `saved_activations`
    # counts whole: pre's and post's are freed after their last read (XLA:CPU's buffer
    # assignment: the small Llama's post backward peaks with its logits residual dead); a
    # block's stay in the layer loop's stack until the loop ends.
    free = counted if part != BLOCKS else []
    cb = jaxpr_cost.analyze(bwd, [cf.out_dims[i] for i in res] + ct_dims, tp,  # sharded like them
                            out_hints=in_dims[:n_params], fusion=self.fusion, free_inputs=free,
                            sliced_inputs=stacked if part == BLOCKS and self.layered else ())
    return PartCost(cf, cb, saved, saved_params, saved_input, saved_invariant, saved_weights)

  def part(self, part: str, recompute: str, bf16: bool, b: int, tp: int) -> PartCost:
    """The part's costs for a per-device micro-batch of `b` examples at TP degree `tp`."""
    key = (part, recompute if part == BLOCKS else "none", bf16, b, tp)
    if key in self._costs:
      return self._costs[key]
    if key[1] == "selective_layer":
      every = recompute_policies.LAYER_SAC_EVERY
      cost = _layer_mix(self.part(part, "none", bf16, b, tp), self.part(part, "full", bf16, b, tp),
                        1.0 / every)
      self._costs[key] = cost
      return cost
    lo, hi = (min(self.sizes), max(self.sizes)) if self.sizes else (b, b)
    if b in (lo, hi) or not lo < b < hi:
      cost = self._exact(part, key[1], bf16, b, tp)
    else:
      a, z = self.part(part, key[1], bf16, lo, tp), self.part(part, key[1], bf16, hi, tp)
      if _same_structure(a.fwd, z.fwd) and _same_structure(a.bwd, z.bwd):
        t = (b - lo) / (hi - lo)
        cost = PartCost(_lerp_cost(a.fwd, z.fwd, t), _lerp_cost(a.bwd, z.bwd, t), _lerp(a.saved, z.saved, t),
                        _lerp(a.saved_params, z.saved_params, t), _lerp(a.saved_input, z.saved_input, t),
                        _lerp(a.saved_invariant, z.saved_invariant, t),
                        _lerp(a.saved_weights, z.saved_weights, t))
      else:
        cost = self._exact(part, key[1], bf16, b, tp)
    self._costs[key] = cost
    return cost
