"""The analytic screen: every candidate's per-device memory and step time, without compiling.

Each figure is a sum of named terms, each its own function of the plan, the program's traced
parts (`passes.screen_profile`) and the hardware profile, so that a target can refine one
term without touching the others (e.g. a GPU's fused attention replacing the attention-score
temporaries, or a topology-aware cost for one collective kind):

memory (per device)
  params, opt_state, batch   the training state under the plan's shardings: exact, from the
                             shapes and partition specs (XLA's argument + output - alias)
  grads                      the gradient buffers (one set; two under gradient accumulation:
                             the accumulator and the micro-batch's), of the trainable
                             parameters only: frozen ones (`Program.trainable`) have none,
                             nor optimizer state
  saved_activations          the residuals each block keeps for its backward under the plan's
                             recomputation policy (read from the block's jaxpr), times the
                             layers a device runs, plus pre and post's
  gathered_params            under FSDP, the layer at work's gathered block weights (the
                             backward gathers them again, `passes.regather`)
  temporaries                the largest working set of any part's forward or backward (the
                             attention scores, the logits), `temporaries_detail` says which
  scratch                    on XLA:CPU, the packing memory of the largest dot it runs as an
                             Eigen contraction outside YNNPACK (`passes.screen_scratch`)

A pipelined plan's grads, saved_activations, gathered_params and temporaries (its stash of
micro-batches in flight, the stage's accumulators) are `passes.screen_pipeline`'s; without
pipelining on XLA:CPU they are the largest of the step's phases (`passes.screen_phases`).

time: the step's kernels (matmuls with their FLOPs, fused elementwise kernels with the bytes
they move) and collectives per mesh axis, costed by the same roofline and collective model
as a compiled candidate (`passes.cost_model.estimate_step_time`), so screened and compiled
estimates are comparable term by term.

The raw screen is then corrected by `Calibration`, fitted per program on the candidates the
search compiled; its stated error is what the search's bounds use.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax

from passes import cost_model, screen_phases, screen_pipeline, screen_scratch, shardings as sh
from passes.hardware import HardwareProfile
from passes.hlo_stats import HloStats
from passes.plan import DATA, Plan
from passes.recompute import LAYER_SAC_EVERY
from passes.regather import regathers
from passes.program import BLOCKS, POST, PRE, Program
from passes.screen_profile import ProgramProfile
from passes.screen_time import TimeTerms, nbytes

PyTree = Any
MEMORY_TERMS = ("params", "opt_state", "batch", "grads", "saved_activations", "gathered_params", "temporaries",
                "scratch")


@dataclasses.dataclass(frozen=True)
class Screened:
  """A candidate's screened figures (per device), before calibration.

  Attributes:
    plan: the candidate.
    memory: bytes per term (MEMORY_TERMS).
    cost: the time estimate (`cost_model.CostEstimate`) of the screened kernels and collectives.
    temporaries_detail: what the largest temporary is (part and value).
    flops: FLOPs per device per step (matmuls and convolutions, recomputation included).
  """
  plan: Plan
  memory: dict
  cost: cost_model.CostEstimate
  temporaries_detail: str = ""
  flops: float = 0.0

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


_nbytes = nbytes


class Screen(TimeTerms):
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
    self.opt_shapes = jax.eval_shape(program.init_optimizer, program.params)
    self._opt = None
    self._spec_cache: dict = {}
    self._roof_cache: dict = {}

  # ---------------------------------------------------------------- exact terms

  def _specs(self, plan: Plan):
    """(param specs, optimizer-state specs) of the plan, shared by plans of the same layout."""
    key = (plan.dp, plan.tp, plan.pp, plan.fsdp, plan.fsdp_group)
    if key not in self._spec_cache:
      pspecs = sh.param_specs(self.program, plan, self.tp_dims_fn(plan.tp) if plan.tp > 1 else None)
      split = self.program.split
      self._spec_cache[key] = (pspecs, sh.opt_state_specs(self.opt_shapes, split(self.program.params)[0],
                                                          split(pspecs)[0]))
    return self._spec_cache[key]

  def state(self, plan: Plan) -> dict:
    """Per-device bytes of params, optimizer state and batch under the plan's specs (exact)."""
    mesh = plan.mesh_shape
    pspecs, ospecs = self._specs(plan)
    is_spec = lambda x: isinstance(x, jax.sharding.PartitionSpec)
    pleaves, specs = jax.tree.leaves(self.program.params), jax.tree.leaves(pspecs, is_leaf=is_spec)
    params = sum(_nbytes(x) // sh.num_shards(s, mesh) for x, s in zip(pleaves, specs))
    opt = sum(_nbytes(x) // sh.num_shards(s, mesh) for x, s in
              zip(jax.tree.leaves(self.opt_shapes), jax.tree.leaves(ospecs, is_leaf=is_spec)))
    batch = sum(_nbytes(x) // plan.dp for x in jax.tree.leaves(self.program.batch))
    # The step's outputs that do not alias a donated input: the loss, and the output tuple's
    # table of pointers (8 bytes per output).
    outputs = len(pleaves) + len(jax.tree.leaves(self.opt_shapes)) + 1
    return {"params": params, "opt_state": opt, "batch": batch + 4 + 8 * outputs}

  def trainable_bytes(self, plan: Plan, part: str | None = None, gathered: bool = False) -> int:
    """Per-device bytes of the trainable parameters (of one `part`; as gathered over 'data')."""
    mesh = plan.mesh_shape
    pspecs, _ = self._specs(plan)
    is_spec = lambda x: isinstance(x, jax.sharding.PartitionSpec)
    total = 0
    flat = jax.tree_util.tree_leaves_with_path(self.program.params)
    flags = jax.tree.leaves(self.program.trainable_mask)
    for (path, x), s, t in zip(flat, jax.tree.leaves(pspecs, is_leaf=is_spec), flags):
      where = str(getattr(path[0], "key", "")) if self.program.layers is not None else PRE
      if t and (part is None or where == part):
        total += _nbytes(x) // sh.num_shards(sh.without_axis(s, DATA) if gathered else s, mesh)
    return total

  def trained_bytes(self, plan: Plan, layout, part: str | None = None, gathered: bool = False) -> float:
    """`trainable_bytes`, read from the plan's `leaf_layout` where every parameter trains."""
    if self.program.has_frozen:
      return self.trainable_bytes(plan, part, gathered=gathered)
    return sum((g if gathered else s) for q, s, g, _ in layout if part is None or q == part)

  @staticmethod
  def layer_residuals(plan: Plan, blk) -> float:
    """The residuals one layer keeps for its backward; the re-gathering blocks redo their
    weights' casts with the re-gather instead of keeping them (`passes.regather`)."""
    return blk.saved + blk.saved_input - (blk.saved_weights if regathers(plan) else 0)

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
      stored = _nbytes(x) // sh.num_shards(s, mesh)
      gathered = _nbytes(x) // sh.num_shards(sh.without_axis(s, DATA), mesh)
      out.append((part, stored, gathered, x.shape[0] if part == BLOCKS else 1))
    return out

  # ---------------------------------------------------------------- parts

  pipeline_shape = staticmethod(screen_pipeline.pipeline_shape)

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
      if plan.schedule == "1f1b":  # post runs per micro-batch, on every tick (`_edge_runs`)
        post_b = b
      else:  # post runs once, on the output scattered over the stages when it divides
        post_b = local // plan.pp if local % plan.pp == 0 else local
      pre = p.part(PRE, "none", plan.bf16, local, plan.tp)
      post = p.part(POST, "none", plan.bf16, post_b, plan.tp)
      blk = p.part(BLOCKS, plan.recompute, plan.bf16, b, plan.tp)
      return pre, blk, post, 1, ticks * (L // plan.pp)
    pre = p.part(PRE, "none", plan.bf16, b, plan.tp)
    post = p.part(POST, "none", plan.bf16, b, plan.tp)
    blk = p.part(BLOCKS, plan.recompute, plan.bf16, b, plan.tp)
    return pre, blk, post, plan.mb, plan.mb * L

  # ---------------------------------------------------------------- memory terms
  # Without pipelining; a pipelined plan's are `passes.screen_pipeline`'s, and on XLA:CPU
  # these are split into phases (`passes.screen_phases`).

  def grads(self, plan: Plan, state: dict) -> float:
    """Gradient buffers of the trainable parameters: one set sharded like them; two under
    gradient accumulation (the accumulator and the micro-batch's)."""
    trained = self.trainable_bytes(plan) if self.program.has_frozen else state["params"]
    return (2 if plan.mb > 1 else 1) * trained

  def saved_activations(self, plan: Plan, pre, blk, post) -> float:
    """Residuals kept for the backward: per layer x layers, plus pre's and post's."""
    if blk is None:
      return pre.saved + pre.saved_input
    edges = pre.saved + pre.saved_input + post.saved + post.saved_input
    return self.program.num_blocks * self.layer_residuals(plan, blk) + blk.saved_invariant + edges

  def gathered_params(self, plan: Plan, blk, layout) -> float:
    """Gathered weights held beyond the stored shards: under FSDP the layer at work's (the
    backward gathers each layer's again: the block re-gathers, `passes.regather`, or is
    recomputed)."""
    blocks = [(s, g, n) for part, s, g, n in layout if part == BLOCKS]
    if blk is None:
      return 0.0
    if not plan.fsdp or plan.shard_degree == 1:
      return 0.0
    # 'selective_layer' runs a group of blocks per loop step and gathers the group's weights
    # together (XLA:GPU, deviceless H100, FSDP-8 Llamas of 8 and 16 layers: the compiled
    # memory grows as the mean of 'none' and 'full' per layer, and stands a constant above it)
    at_work = LAYER_SAC_EVERY if plan.recompute == "selective_layer" else 1
    return at_work * sum(g / n for _, g, n in blocks)

  def temporaries(self, plan: Plan, pre, blk, post, layout) -> tuple[float, str]:
    """The largest working set of one part (its forward or backward), and what it is; under
    FSDP plus one layer's whole gradient before its reduction."""
    best, what = 0.0, ""
    for name, c in (("pre", pre), ("block", blk), ("post", post)):
      if c is None:
        continue
      for phase, jc in (("forward", c.fwd), ("backward", c.bwd)):
        if jc.peak_bytes > best:
          best, what = jc.peak_bytes, f"{name} {phase}: largest {jc.largest[1]}"
    if plan.fsdp and plan.shard_degree > 1 and blk is not None:
      best += sum(g / n for part, _, g, n in layout if part == BLOCKS)
    return best, what

  def _scratch(self, plan: Plan, pre, blk, post) -> float:
    return screen_scratch.eigen_scratch(plan, pre, blk, post, self.program.batch_size)

  # ---------------------------------------------------------------- the screen

  def __call__(self, plan: Plan, hw: HardwareProfile) -> Screened:
    state = self.state(plan)
    layout = self.leaf_layout(plan)
    pre, blk, post, runs_edge, runs_block = self._parts(plan)
    if plan.pp > 1:
      steps, what = screen_pipeline.pipeline_memory(self, plan, pre, blk, post, state, layout)
      memory = dict(state, **steps, scratch=self._scratch(plan, pre, blk, post))
    elif blk is not None and self.platform == "cpu":
      steps, what = screen_phases.phase_peak(self, plan, pre, blk, post, layout)
      memory = dict(state, **steps, scratch=self._scratch(plan, pre, blk, post))
    else:
      temp, what = self.temporaries(plan, pre, blk, post, layout)
      memory = dict(state, grads=self.grads(plan, state),
                    saved_activations=self.saved_activations(plan, pre, blk, post),
                    gathered_params=self.gathered_params(plan, blk, layout), temporaries=temp,
                    scratch=self._scratch(plan, pre, blk, post))
    ks = self.kernels(plan, pre, blk, post, runs_edge, runs_block, state, layout, hw)
    att, causal = self.attention_kernels(plan, pre, blk, post, runs_edge, runs_block) if hw.flash_attention \
        else ([], False)
    colls = self.collectives(plan, pre, blk, post, runs_edge, runs_block, layout)
    flops = sum(k.flops * k.count for k in ks + att)
    stats = HloStats(int(flops), tuple(colls), 0, kernels=tuple(ks + att), attention=tuple(att),
                     attention_causal=causal)
    return Screened(plan, memory, cost_model.estimate_step_time(stats, plan, hw), what, flops)


def build_screen(program: Program, devices, tp_rules, plans, fusion: str = "xla") -> Screen:
  """The screen of `program` on `devices` for `plans` (traces the micro-batch sizes they use).

  Args:
    program: the abstract program.
    devices: the devices planned for.
    tp_rules: the program's TP rules (None: no tensor parallelism).
    plans: the candidates to screen (their micro-batch sizes are traced).
    fusion: 'xla' (ap-xla's programs; 'xla:cpu' on CPU devices), or 'eager' to cost the
      model as PyTorch eager runs it (`passes.screen_profile.ProgramProfile`).
  """
  from passes.build import tp_dims
  dims_cache: dict = {}

  def dims(tp):
    if tp not in dims_cache:
      dims_cache[tp] = tp_dims(program, tp_rules, tp)
    return dims_cache[tp]

  devices = tuple(devices)
  if fusion == "xla" and devices[0].platform == "cpu":  # XLA:CPU's own buffers (passes.jaxpr_liveness)
    fusion = "xla:cpu"
  profile = ProgramProfile(program, dims, fusion)
  B = program.batch_size
  sizes = {B // (p.dp * p.mb) for p in plans}
  for p in plans:
    if p.pp > 1:
      local = B // p.dp
      sizes |= {local, local // p.pp if local % p.pp == 0 else local}
  profile.set_sizes(sizes)
  return Screen(program, profile, len(devices), devices[0].platform, dims)
