"""The analytic screen's time terms: a candidate's kernels and collectives per device.

Methods of `passes.screen.Screen` (a mixin, so each concern has its file): the parts' kernels
read from their jaxprs (`passes.jaxpr_cost`) times their runs, the optimizer update, the
data movement of the loops around the blocks, and the collectives per mesh axis and kind.
The screen costs them with `passes.cost_model.estimate_step_time`, as a compiled
candidate's; a target can refine one kind of collective or one traffic term here without
touching the others.
"""
from __future__ import annotations

import jax
import numpy as np

from passes import jaxpr_cost
from passes.hardware import HardwareProfile
from passes.hlo_stats import Collective, Kernel
from passes.plan import DATA, STAGE, TENSOR, Plan
from passes.program import BLOCKS
from passes.recompute import recomputed_fraction
from passes.regather import regathers


def nbytes(x) -> int:
  """Bytes of an array or ShapeDtypeStruct."""
  return int(np.prod(x.shape, dtype=np.int64)) * np.dtype(x.dtype).itemsize


def fsdp_grad_kind(platform: str) -> str:
  """The collective the backend emits for a sharded gradient's reduction: XLA:CPU an
  all-reduce (then a slice), XLA:GPU a reduce-scatter."""
  return "all-reduce" if platform == "cpu" else "reduce-scatter"


class TimeTerms:
  """The time terms of `passes.screen.Screen` (module doc)."""

  def _optimizer(self):
    """(flops, bytes moved) of the optimizer update per parameter byte (traced once)."""
    if self._opt is None:
      tx, params = self.program.optimizer, self.program.split(self.program.params)[0]
      def update(g, s, p):
        import optax
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s
      closed = jax.make_jaxpr(update)(params, self.opt_shapes, params)
      c = jaxpr_cost.analyze(closed, [None] * len(closed.jaxpr.invars), fusion=self.profile.fusion)
      total = sum(nbytes(x) for x in jax.tree.leaves(params)) or 1
      self._opt = (sum(k[0] * k[2] for k in c.kernels) / total, c.kernel_bytes / total)
    return self._opt

  def _rooflined(self, part, hw: HardwareProfile, dtype: str) -> tuple:
    """A part's kernels as two: those bound by compute and those bound by memory on `hw`.

    The roofline of each group's sums is the sum of its members' rooflines (each member is
    bound the same way), so the step's estimate is unchanged and a plan sums two kernels
    per part instead of hundreds.
    """
    key = (id(part), hw.name, dtype, hw.flash_attention)
    if key not in self._roof_cache:
      peak, bw = hw.matmul_rate(dtype), hw.streaming_bandwidth
      fc = bc = fm = bm = 0.0
      flash = set(part.attention) if hw.flash_attention else set()
      for i, (f, b, n) in enumerate(part.kernels):
        if i in flash:  # costed apart (`attention_kernels`)
          continue
        if f / peak >= b / bw:
          fc, bc = fc + f * n, bc + b * n
        else:
          fm, bm = fm + f * n, bm + b * n
      self._roof_cache[key] = (part, (fc, bc), (fm, bm))  # the part is kept: its id stays its own
    return self._roof_cache[key][1:]

  def kernels(self, plan: Plan, pre, blk, post, runs_edge, runs_block, state, layout,
              hw: HardwareProfile | None = None) -> list:
    """The step's kernels per device: the parts' own (from their jaxprs) times their runs,
    the optimizer update, and the data movement of the loops that run them (`loop_traffic`)."""
    ks = []
    dtype = "bf16" if plan.bf16 else "f32"
    for c, runs in ((pre, runs_edge), (post, self._edge_runs(plan, runs_edge)), (blk, runs_block)):
      if c is None or not runs:
        continue
      if hw is None:
        ks += [Kernel(f, b, n * runs) for f, b, n in c.kernels]
      else:
        ks += [Kernel(f, b, runs) for f, b in self._rooflined(c, hw, dtype) if f or b]
    fl, by = self._optimizer()
    trained = self.trainable_bytes(plan) if self.program.has_frozen else state["params"]
    ks.append(Kernel(fl * trained, by * trained, 1))
    ks += self.loop_traffic(plan, blk, runs_block, state, layout)
    return ks

  def attention_kernels(self, plan: Plan, pre, blk, post, runs_edge, runs_block) -> tuple[list, bool]:
    """The fused attention's kernels per device (`PartCost.attention`) times their runs, and
    whether all of them are causal: `cost_model.estimate_step_time` charges them as one flash
    kernel on a profile with `flash_attention`."""
    ks, causal = [], True
    for c, runs in ((pre, runs_edge), (post, self._edge_runs(plan, runs_edge)), (blk, runs_block)):
      if c is None or not runs or not c.attention:
        continue
      f = sum(c.kernels[i][0] * c.kernels[i][2] for i in c.attention)
      b = sum(c.kernels[i][1] * c.kernels[i][2] for i in c.attention)
      ks.append(Kernel(f, b, runs))
      causal = causal and all(c.attention_causal)
    return ks, bool(ks) and causal

  def loop_traffic(self, plan: Plan, blk, runs_block, state, layout) -> list:
    """Bytes the loops around the blocks move, per run of a block: its weights sliced out of
    the stack (forward, backward, recomputation), its weight gradients written into the
    stack (accumulated through a pipeline's ticks), its residuals written into and read
    back from their stack; gradient accumulation over micro-batches; a pipeline's per-tick
    staging of the micro-batch and of the output."""
    out = []
    if plan.pp == 1 and plan.mb > 1:  # acc + grads per micro-batch
      trained = self.trainable_bytes(plan) if self.program.has_frozen else state["params"]
      out.append(Kernel(0, 3 * trained, plan.mb))
    if blk is None or not runs_block:
      return out
    stored = sum(s / n for part, s, _, n in layout if part == BLOCKS)
    used = sum(g / n for part, _, g, n in layout if part == BLOCKS)
    passes = 2 + recomputed_fraction(plan.recompute)
    grads = 3 * used if plan.pp > 1 else 2 * stored
    saved = blk.saved + blk.saved_input
    # a pipeline's residuals are stacked twice: over a stage's layers, then over the ticks.
    # Without one, XLA:CPU moves each residual 4 more times than the kernels that make and use
    # it; XLA:GPU 3: it zero-fills the stack, copies the residual in (dynamic-update-slice:
    # read + write) and fuses the backward's slices into their consumers. Measured on the
    # deviceless H100 compile of a 4- and 8-layer Llama (`stacking_passes` in RESULTS.md):
    # per layer, 'none' moves 3.1 residual passes more than 'full' on XLA:GPU.
    stacking = 8 if plan.pp > 1 else (4 if self.platform == "cpu" else 3)
    out.append(Kernel(0, 2 * stored * passes + grads + stacking * saved, runs_block))
    if plan.pp > 1:
      h = self._hidden_bytes(plan)
      ticks = self.pipeline_shape(plan)[0]
      out.append(Kernel(0, 2 * (2 * plan.mb * h + 2 * h), ticks))
    return out

  def _edge_runs(self, plan: Plan, runs_edge: int) -> int:
    """Runs of post per step: per micro-batch on every tick under 1F1B."""
    return self.pipeline_shape(plan)[0] if plan.pp > 1 and plan.schedule == "1f1b" else runs_edge

  def _groups(self, plan: Plan, axis) -> tuple:
    """The device groups of a mesh axis (or of several, e.g. HSDP's ('replica', 'data'))."""
    shape = plan.mesh_shape
    ids = np.arange(plan.num_devices).reshape(tuple(shape.values()))
    axes = [list(shape).index(a) for a in (axis if isinstance(axis, tuple) else (axis,))]
    size = int(np.prod([ids.shape[d] for d in axes]))
    moved = np.moveaxis(ids, axes, list(range(ids.ndim - len(axes), ids.ndim)))
    return tuple(tuple(g) for g in moved.reshape(-1, size).tolist())

  def collectives(self, plan: Plan, pre, blk, post, runs_edge, runs_block, layout) -> list[Collective]:
    """The step's collectives per mesh axis (module doc)."""
    out = []
    if plan.tp > 1:
      g = self._groups(plan, TENSOR)
      for c, runs in ((pre, runs_edge), (post, self._edge_runs(plan, runs_edge)), (blk, runs_block)):
        if c is None or not runs:
          continue
        out += [Collective(x.kind, x.bytes, plan.tp, x.count * runs, g) for x in c.comms]
    if plan.dp > 1:
      out += self.data_collectives(plan, layout)
    if plan.pp > 1 and blk is not None:
      out += self.stage_collectives(plan)
    return out

  def data_collectives(self, plan: Plan, layout) -> list[Collective]:
    """Gradient reductions (and FSDP's gathers) over 'data', the leaves of one layer (or of
    pre and post) combined into one collective, as XLA's combiners do.

    Replicated weights: the gradient is all-reduced once per step, per layer when GSPMD
    reduces inside the layer loop (pp=1, one micro-batch). FSDP: weights are gathered before
    use (again in the backward under recomputation) and gradients reduced to shards, per
    layer and micro-batch; a pipeline gathers and reduces a stage's blocks once per step.
    The backward gathers each layer's block weights again (`passes.regather`) or recomputes them.
    HSDP: gathers within each FSDP group ('data'); the gradients all-reduced over every rank.
    """
    g = self._groups(plan, plan.data_axes)  # every data-parallel rank
    fg = self._groups(plan, DATA) if plan.hsdp else g  # one FSDP group
    L = max(1, self.program.num_blocks)
    # frozen leaves (`Program.trainable`) are gathered like the others but have no gradient
    flags = jax.tree.leaves(self.program.trainable_mask)
    blocks = [(s, gb, n, t) for (part, s, gb, n), t in zip(layout, flags) if part == BLOCKS]
    edges = [(s, gb, None, t) for (part, s, gb, _), t in zip(layout, flags) if part != BLOCKS]
    out = []
    low = plan.low_prec and plan.bf16 and self.platform != "cpu"  # XLA:CPU widens bf16 collectives to fp32
    kind = fsdp_grad_kind(self.platform)

    def add(colls):
      out.extend(c for c in colls if c.bytes > 0 and c.count > 0)

    for group, layers in ((edges, 1), (blocks, L if blocks else 1)):
      if not group:
        continue
      pairs = [(x[0], x[1], x[3]) for x in group]
      rep = sum(gb for s, gb, t in pairs if t and (s == gb or not plan.fsdp))
      shard = [(s, gb, t) for s, gb, t in pairs if plan.fsdp and s != gb]
      per_layer = group is blocks and plan.pp == 1
      n = layers if per_layer else 1
      if rep:  # combined per layer; once per step under accumulation or in a pipeline
        runs = n if plan.mb == 1 else 1
        add([Collective("all-reduce", int(rep // runs), plan.dp, runs, g)])
      if shard:
        reps = 1 if plan.pp > 1 and group is blocks else plan.mb
        # the backward gathers a layer's weights again where it re-gathers or recomputes the layer
        regather = (2 if regathers(plan) else 1 + recomputed_fraction(plan.recompute)) if per_layer else 1
        for _, gb, _ in shard:  # one gather per leaf (and layer)
          add([Collective("all-gather", int((gb // 2 if low else gb) // n), plan.shard_degree,
                          n * reps * regather, fg)])
        # the pipeline reduce-scatters its blocks' gradients itself (psum_scatter)
        k = "reduce-scatter" if plan.pp > 1 and group is blocks else kind
        if plan.hsdp:
          # Both compilers (XLA:CPU, and XLA:GPU compiled without a device, measured on a tiny Llama)
          # reduce an HSDP gradient with one all-reduce over every data rank, then a slice, not
          # PyTorch HSDP's reduce-scatter in the group plus all-reduce across groups.
          add([Collective("all-reduce", int(sum(gb for s, gb, t in shard if t) // n), plan.dp, n * reps, g)])
          continue
        total = sum(gb if k == "all-reduce" else s for s, gb, t in shard if t)
        add([Collective(k, int(total // n), plan.shard_degree, n * reps, fg)])
    return out

  def stage_collectives(self, plan: Plan) -> list[Collective]:
    """Activations passed between stages each tick (forward and backward) and the output's
    reduce-scatter over 'stage'."""
    pairs = []
    for grp in self._groups(plan, STAGE):
      pairs += [(grp[i], grp[i + 1]) for i in range(len(grp) - 1)]
    hb = self._hidden_bytes(plan)
    ticks = self.pipeline_shape(plan)[0]
    out_b = hb * plan.mb
    return [Collective("collective-permute", hb, 2, 2 * ticks, tuple(pairs)),
            Collective("all-reduce", out_b, plan.pp, 2, self._groups(plan, STAGE))]

  def _hidden_bytes(self, plan: Plan) -> int:
    """Bytes of one micro-batch's activations between two blocks, per device."""
    h, _ = self.profile.hidden(plan.bf16, self.micro_batch(plan))
    return nbytes(h)
