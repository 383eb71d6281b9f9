"""The analytic screen: every candidate's per-device memory and step time, without compiling.

Each figure is a sum of named terms, each its own function of the plan, the program's traced
parts (`passes.screen_profile`) and the hardware profile, so that a target can refine one
term without touching the others (e.g. a GPU's fused attention replacing the attention-score
temporaries, or a topology-aware cost for one collective kind):

memory (per device)
  params, opt_state, batch   the training state under the plan's shardings: exact, from the
                             shapes and partition specs (XLA's argument + output - alias)
  grads                      the gradient buffers (one set; two under gradient accumulation:
                             the accumulator and the micro-batch's)
  saved_activations          the residuals each block keeps for its backward under the plan's
                             recomputation policy (read from the block's jaxpr), times the
                             layers a device runs, times the micro-batches in flight (all
                             M + S - 1 ticks of the GPipe schedule), plus pre and post's
  gathered_params            under FSDP, gathered block weights the backward keeps (no
                             recomputation), or a pipeline stage's gathered weights
  temporaries                the largest working set of any part's forward or backward (the
                             attention scores, the logits), `temporaries_detail` says which

time: the step's kernels (matmuls with their FLOPs, fused elementwise kernels with the bytes
they move) and collectives per mesh axis, costed by the same roofline and collective model
as a compiled candidate (`passes.cost_model.estimate_step_time`), so screened and compiled
estimates are comparable term by term.

The raw screen is then corrected by `Calibration`, fitted per program on the candidates the
search compiled; its stated error is what the search's bounds use.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from passes import cost_model, jaxpr_cost, shardings as sh
from passes.hardware import HardwareProfile
from passes.hlo_stats import Collective, HloStats, Kernel
from passes.plan import DATA, STAGE, TENSOR, Plan
from passes.program import BLOCKS, POST, PRE, Program
from passes.screen_profile import ProgramProfile

PyTree = Any
MEMORY_TERMS = ("params", "opt_state", "batch", "grads", "saved_activations", "gathered_params", "temporaries")


@dataclasses.dataclass(frozen=True)
class Screened:
  """A candidate's screened figures (per device), before calibration.

  Attributes:
    plan: the candidate.
    memory: bytes per term (MEMORY_TERMS).
    cost: the time estimate (`cost_model.CostEstimate`) of the screened kernels and collectives.
    temporaries_detail: what the largest temporary is (part and value).
  """
  plan: Plan
  memory: dict
  cost: cost_model.CostEstimate
  temporaries_detail: str = ""
  _peak: float = dataclasses.field(default=0.0, repr=False)

  @property
  def memory_bytes(self) -> int:
    return int(sum(self.memory.values()))

  @property
  def persistent_bytes(self) -> int:
    """Parameters, optimizer state and batch: what no recomputation or micro-batching shrinks."""
    return int(self.memory["params"] + self.memory["opt_state"] + self.memory["batch"])

  @property
  def est_time_s(self) -> float:
    return self.cost.total_s

  @property
  def flops(self) -> float:
    """FLOPs per device per step (matmuls and convolutions, recomputation included)."""
    return self.cost.flops_s * self._peak if self._peak else 0.0


def _nbytes(x) -> int:
  return int(math.prod(x.shape)) * jnp.dtype(x.dtype).itemsize


def _shards(spec, mesh: dict) -> int:
  n = 1
  for a in tuple(spec):
    for ax in (a if isinstance(a, tuple) else (a,)):
      if ax is not None:
        n *= mesh[ax]
  return n


def _fsdp_grad_kind(platform: str) -> str:
  """The collective the backend emits for a sharded gradient's reduction: XLA:CPU an
  all-reduce (then a slice), XLA:GPU a reduce-scatter."""
  return "all-reduce" if platform == "cpu" else "reduce-scatter"


class Screen:
  """Screens plans of one program on one device set and hardware profile.

  Args:
    program: the abstract program.
    profile: its traced parts.
    num_devices, platform: the devices planned for.
    tp_dims_fn: `tp -> per-leaf 'tensor' dims` (as `passes.build.tp_dims`).

  Example:
    >>> s = Screen(program, ProgramProfile(program, dims), 8, 'cpu', dims)
    >>> s(Plan(dp=8), get_profile('cpu')).memory_bytes
  """

  def __init__(self, program: Program, profile: ProgramProfile, num_devices: int, platform: str,
               tp_dims_fn: Callable):
    self.program = program
    self.profile = profile
    self.num_devices = num_devices
    self.platform = platform
    self.tp_dims_fn = tp_dims_fn
    self.opt_shapes = jax.eval_shape(program.optimizer.init, program.params)
    self._opt = None
    self._spec_cache: dict = {}
    self._roof_cache: dict = {}
    self.last_kernels = {}

  # ---------------------------------------------------------------- exact terms

  def _specs(self, plan: Plan):
    """(param specs, optimizer-state specs) of the plan, shared by plans of the same layout."""
    key = (plan.dp, plan.tp, plan.pp, plan.fsdp)
    if key not in self._spec_cache:
      pspecs = sh.param_specs(self.program, plan, self.tp_dims_fn(plan.tp) if plan.tp > 1 else None)
      self._spec_cache[key] = (pspecs, sh.opt_state_specs(self.opt_shapes, self.program.params, pspecs))
    return self._spec_cache[key]

  def state(self, plan: Plan) -> dict:
    """Per-device bytes of params, optimizer state and batch under the plan's specs (exact)."""
    mesh = plan.mesh_shape
    pspecs, ospecs = self._specs(plan)
    is_spec = lambda x: isinstance(x, jax.sharding.PartitionSpec)
    pleaves, specs = jax.tree.leaves(self.program.params), jax.tree.leaves(pspecs, is_leaf=is_spec)
    params = sum(_nbytes(x) // _shards(s, mesh) for x, s in zip(pleaves, specs))
    opt = sum(_nbytes(x) // _shards(s, mesh) for x, s in
              zip(jax.tree.leaves(self.opt_shapes), jax.tree.leaves(ospecs, is_leaf=is_spec)))
    batch = sum(_nbytes(x) // plan.dp for x in jax.tree.leaves(self.program.batch))
    # The step's outputs that do not alias a donated input: the loss, and the output tuple's
    # table of pointers (8 bytes per output).
    outputs = len(pleaves) + len(jax.tree.leaves(self.opt_shapes)) + 1
    return {"params": params, "opt_state": opt, "batch": batch + 4 + 8 * outputs}

  def leaf_layout(self, plan: Plan) -> list[tuple[str, int, int, int]]:
    """Per parameter leaf: (part, per-device bytes as stored, bytes gathered over 'data',
    bytes per layer for a block leaf)."""
    mesh = plan.mesh_shape
    pspecs, _ = self._specs(plan)
    is_spec = lambda x: isinstance(x, jax.sharding.PartitionSpec)
    out = []
    flat = jax.tree_util.tree_leaves_with_path(self.program.params)
    for (path, x), s in zip(flat, jax.tree.leaves(pspecs, is_leaf=is_spec)):
      part = str(getattr(path[0], "key", "")) if self.program.layers is not None else PRE
      stored = _nbytes(x) // _shards(s, mesh)
      gathered = _nbytes(x) // _shards(sh.without_axis(s, DATA), mesh)
      out.append((part, stored, gathered, x.shape[0] if part == BLOCKS else 1))
    return out

  # ---------------------------------------------------------------- parts

  @staticmethod
  def pipeline_shape(plan: Plan) -> tuple[int, int]:
    """(ticks, micro-batches whose residuals a stage keeps at once) of a pipelined plan:
    GPipe in SPMD runs M + S - 1 ticks and keeps every tick's residuals; 1F1B runs
    M + 2S - 1 ticks, each with a forward and a backward, and keeps 2S
    (`passes.pipeline_1f1b`)."""
    S, M = plan.pp, plan.mb
    if plan.schedule == "1f1b":
      return M + 2 * S - 1, 2 * S
    return M + S - 1, M + S - 1

  def micro_batch(self, plan: Plan) -> int:
    return self.program.batch_size // (plan.dp * plan.mb)

  def _parts(self, plan: Plan):
    """(pre, block, post, runs of pre/post, runs of a block) per device per step."""
    p = self.profile
    b = self.micro_batch(plan)
    L = self.program.num_blocks
    if self.program.layers is None:
      flat = p.part(PRE, "none", plan.bf16, b, plan.tp)
      return flat, None, None, plan.mb, 0
    if plan.pp > 1:
      local = self.program.batch_size // plan.dp
      ticks, _ = self.pipeline_shape(plan)
      if plan.schedule == "1f1b":  # post runs per micro-batch, on every tick (module doc)
        post_b, post_runs = b, ticks
      else:  # post runs once, on the output scattered over the stages when it divides
        post_b, post_runs = (local // plan.pp if local % plan.pp == 0 else local), 1
      pre = p.part(PRE, "none", plan.bf16, local, plan.tp)
      post = p.part(POST, "none", plan.bf16, post_b, plan.tp)
      blk = p.part(BLOCKS, plan.recompute, plan.bf16, b, plan.tp)
      return pre, blk, post, 1, ticks * (L // plan.pp)
    pre = p.part(PRE, "none", plan.bf16, b, plan.tp)
    post = p.part(POST, "none", plan.bf16, b, plan.tp)
    blk = p.part(BLOCKS, plan.recompute, plan.bf16, b, plan.tp)
    return pre, blk, post, plan.mb, plan.mb * L

  # ---------------------------------------------------------------- memory terms

  def grads(self, plan: Plan, state: dict, layout) -> float:
    """Gradient buffers: one set sharded like the parameters; two under gradient accumulation
    (the accumulator and the micro-batch's); a pipeline stage also accumulates its blocks'
    gradients whole (not sharded over 'data') through its loops."""
    if plan.pp > 1:
      return state["params"] + sum(g for part, _, g, _ in layout if part == BLOCKS)
    return (2 if plan.mb > 1 else 1) * state["params"]

  def saved_activations(self, plan: Plan, pre, blk, post) -> float:
    """Residuals kept for the backward: per layer x layers x micro-batches in flight."""
    if blk is None:
      return pre.saved + pre.saved_input
    per_layer = blk.saved + blk.saved_input
    L = self.program.num_blocks
    if plan.pp > 1:
      layers = L // plan.pp
      in_flight = self.pipeline_shape(plan)[1]
    else:
      layers, in_flight = L, 1
    edges = pre.saved + pre.saved_input + post.saved + post.saved_input
    return in_flight * layers * per_layer + blk.saved_invariant + edges

  def gathered_params(self, plan: Plan, blk, layout) -> float:
    """Gathered weights held beyond the stored shards: under FSDP the block weights the
    backward keeps (no recomputation: every layer's; else the layer at work); a pipeline
    stage's block weights as its loops use them (gathered once per step)."""
    blocks = [(s, g, n) for part, s, g, n in layout if part == BLOCKS]
    if blk is None:
      return 0.0
    if not plan.fsdp or plan.dp == 1:
      return 0.0
    if plan.pp > 1:
      return sum(g for _, g, _ in blocks)
    layer = sum(g / n for _, g, n in blocks)
    return self.program.num_blocks * layer if plan.recompute == "none" else layer

  def temporaries(self, plan: Plan, pre, blk, post, layout) -> tuple[float, str]:
    """The largest working set of one part (its forward or backward), and what it is; under
    FSDP plus one layer's whole gradient before its reduction. In a pipeline the blocks'
    working set (per micro-batch, inside the stage loops) comes on top of pre's and post's
    (on the whole local batch, outside them)."""
    best, what = 0.0, ""
    for name, c in (("pre", pre), ("block", blk), ("post", post)):
      if c is None or (plan.pp > 1 and c is blk):
        continue
      for phase, jc in (("forward", c.fwd), ("backward", c.bwd)):
        if jc.peak_bytes > best:
          best, what = jc.peak_bytes, f"{name} {phase}: largest {jc.largest[1]}"
    if plan.pp > 1 and blk is not None:
      best += blk.temp_peak
      what += f"; per micro-batch in the stages: block {blk.bwd.largest[1]}"
    if plan.fsdp and plan.dp > 1 and plan.pp == 1 and blk is not None:
      best += sum(g / n for part, _, g, n in layout if part == BLOCKS)
    return best, what

  # ---------------------------------------------------------------- time terms

  def _optimizer(self):
    """(flops, bytes moved) of the optimizer update per parameter byte (traced once)."""
    if self._opt is None:
      tx, params = self.program.optimizer, self.program.params
      def update(g, s, p):
        import optax
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s
      closed = jax.make_jaxpr(update)(params, self.opt_shapes, params)
      c = jaxpr_cost.analyze(closed, [None] * len(closed.jaxpr.invars))
      total = sum(_nbytes(x) for x in jax.tree.leaves(params)) or 1
      self._opt = (sum(k[0] * k[2] for k in c.kernels) / total, c.kernel_bytes / total)
    return self._opt

  def _rooflined(self, part, hw: HardwareProfile, dtype: str) -> tuple:
    """A part's kernels as two: those bound by compute and those bound by memory on `hw`.

    The roofline of each group's sums is the sum of its members' rooflines (each member is
    bound the same way), so the step's estimate is unchanged and a plan sums two kernels
    per part instead of hundreds.
    """
    key = (id(part), hw.name, dtype)
    if key not in self._roof_cache:
      peak, bw = hw.peak(dtype), hw.memory_bandwidth
      fc = bc = fm = bm = 0.0
      for f, b, n in part.kernels:
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
    ks.append(Kernel(fl * state["params"], by * state["params"], 1))
    ks += self.loop_traffic(plan, blk, runs_block, state, layout)
    return ks

  def loop_traffic(self, plan: Plan, blk, runs_block, state, layout) -> list:
    """Bytes the loops around the blocks move, per run of a block: its weights sliced out of
    the stack (forward, backward, recomputation), its weight gradients written into the
    stack (accumulated through a pipeline's ticks), its residuals written into and read
    back from their stack; gradient accumulation over micro-batches; a pipeline's per-tick
    staging of the micro-batch and of the output."""
    out = []
    if plan.pp == 1 and plan.mb > 1:  # acc + grads per micro-batch
      out.append(Kernel(0, 3 * state["params"], plan.mb))
    if blk is None or not runs_block:
      return out
    stored = sum(s / n for part, s, _, n in layout if part == BLOCKS)
    used = sum(g / n for part, _, g, n in layout if part == BLOCKS)
    passes = 2 + (plan.recompute != "none")
    grads = 3 * used if plan.pp > 1 else 2 * stored
    saved = blk.saved + blk.saved_input
    # a pipeline's residuals are stacked twice: over a stage's layers, then over the ticks
    stacking = 8 if plan.pp > 1 else 4
    out.append(Kernel(0, 2 * stored * passes + grads + stacking * saved, runs_block))
    if plan.pp > 1:
      h = self._hidden_bytes(plan)
      ticks = self.pipeline_shape(plan)[0]
      out.append(Kernel(0, 2 * (2 * plan.mb * h + 2 * h), ticks))
    return out

  def _edge_runs(self, plan: Plan, runs_edge: int) -> int:
    """Runs of post per step: per micro-batch on every tick under 1F1B."""
    return self.pipeline_shape(plan)[0] if plan.pp > 1 and plan.schedule == "1f1b" else runs_edge

  def _groups(self, plan: Plan, axis: str) -> tuple:
    ids = np.arange(plan.num_devices).reshape(plan.pp, plan.dp, plan.tp)
    d = ("stage", "data", "tensor").index(axis)
    return tuple(tuple(g) for g in np.moveaxis(ids, d, -1).reshape(-1, ids.shape[d]).tolist())

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
    """
    g = self._groups(plan, DATA)
    L = max(1, self.program.num_blocks)
    blocks = [(s, gb, n) for part, s, gb, n in layout if part == BLOCKS]
    edges = [(s, gb) for part, s, gb, _ in layout if part != BLOCKS]
    out = []
    low = plan.low_prec and plan.bf16
    kind = _fsdp_grad_kind(self.platform)

    def add(colls):
      out.extend(c for c in colls if c.bytes > 0 and c.count > 0)

    for group, layers in ((edges, 1), (blocks, L if blocks else 1)):
      if not group:
        continue
      pairs = [(x[0], x[1]) for x in group]
      rep = sum(gb for s, gb in pairs if s == gb or not plan.fsdp)
      shard = [(s, gb) for s, gb in pairs if plan.fsdp and s != gb]
      per_layer = group is blocks and plan.pp == 1
      n = layers if per_layer else 1
      if rep:  # combined per layer; once per step under accumulation or in a pipeline
        runs = n if plan.mb == 1 else 1
        add([Collective("all-reduce", int(rep // runs), plan.dp, runs, g)])
      if shard:
        reps = 1 if plan.pp > 1 and group is blocks else plan.mb
        regather = 2 if (plan.recompute != "none" and per_layer) else 1
        for _, gb in shard:  # one gather per leaf (and layer)
          add([Collective("all-gather", int((gb // 2 if low else gb) // n), plan.dp, n * reps * regather, g)])
        # the pipeline reduce-scatters its blocks' gradients itself (psum_scatter)
        k = "reduce-scatter" if plan.pp > 1 and group is blocks else kind
        total = sum(gb if k == "all-reduce" else s for s, gb in shard)
        add([Collective(k, int(total // n), plan.dp, n * reps, g)])
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
    return _nbytes(h)

  # ---------------------------------------------------------------- the screen

  def __call__(self, plan: Plan, hw: HardwareProfile) -> Screened:
    state = self.state(plan)
    layout = self.leaf_layout(plan)
    pre, blk, post, runs_edge, runs_block = self._parts(plan)
    temp, what = self.temporaries(plan, pre, blk, post, layout)
    memory = dict(state, grads=self.grads(plan, state, layout),
                  saved_activations=self.saved_activations(plan, pre, blk, post),
                  gathered_params=self.gathered_params(plan, blk, layout), temporaries=temp)
    ks = self.kernels(plan, pre, blk, post, runs_edge, runs_block, state, layout, hw)
    self.last_kernels[plan] = ks
    colls = self.collectives(plan, pre, blk, post, runs_edge, runs_block, layout)
    flops = sum(k.flops * k.count for k in ks)
    stats = HloStats(int(flops), tuple(colls), 0, kernels=tuple(ks))
    cost = cost_model.estimate_step_time(stats, plan, hw)
    return Screened(plan, memory, cost, what, hw.peak(cost.dtype))


def build_screen(program: Program, devices, tp_rules, plans) -> Screen:
  """The screen of `program` on `devices` for `plans` (traces the micro-batch sizes they use).

  Args:
    program: the abstract program.
    devices: the devices planned for.
    tp_rules: the program's TP rules (None: no tensor parallelism).
    plans: the candidates to screen (their micro-batch sizes are traced).
  """
  from passes.build import tp_dims
  dims_cache: dict = {}

  def dims(tp):
    if tp not in dims_cache:
      dims_cache[tp] = tp_dims(program, tp_rules, tp)
    return dims_cache[tp]

  profile = ProgramProfile(program, dims)
  B = program.batch_size
  sizes = {B // (p.dp * p.mb) for p in plans}
  for p in plans:
    if p.pp > 1:
      local = B // p.dp
      sizes |= {local, local // p.pp if local % p.pp == 0 else local}
  profile.set_sizes(sizes)
  devices = tuple(devices)
  return Screen(program, profile, len(devices), devices[0].platform, dims)
