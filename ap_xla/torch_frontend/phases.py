"""A phase: one plan compiled for one batch shape, split the way a torch loop calls it.

torch runs a step in three calls: the forward (+ `loss.backward()`), then `optimizer.step()`.
A phase compiles the plan's pieces to match: `loss_and_grad` (from `passes.step`) at the
training forward, `accumulate` at each backward (scaled by the backward's grad_output, as
torch accumulates `.grad`), and `update` at `optimizer.step()` (the gradients times the clip
coefficient of any `clip_grad_norm_`, then the optax transform of the torch optimizer built
at lr 1, each param group's update multiplied by that group's lr at this step, which honours
any torch LR scheduler exactly: for SGD, Adam and AdamW the lr multiplies the final update).

`choose_plan` picks the plan: AP's search with the options of `enable_advanced_parallelization`
(through the plan cache), or MoAI's plain data parallelism when AP is off; a forward under
autocast asks for the plan's bf16 mixed precision either way.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from ap_xla import config, env, plan_cache
from passes import search as search_pass
from passes.build import build_plan
from passes.plan import RECOMPUTE_POLICIES, Plan
from passes.program import Program, combine
from passes.report import OutOfMemoryError, SearchResult, out_of_memory_message
from passes.space import SearchOptions, divisors
from passes.step import BuiltStep, _MeshBound

log = logging.getLogger("ap_xla")
PyTree = Any

# Without enable_advanced_parallelization (MoAI's default): plain data parallelism, fp32.
PLAIN_OPTIONS = SearchOptions(pipeline_parallel=False, num_stages=1, num_micro_batches=1,
                              activation_recomputation=False, distribute_parameter=False,
                              mixed_precision=False, tensor_parallel=1)


@dataclasses.dataclass(frozen=True)
class Phase:
  """A plan compiled for one batch size.

  Attributes:
    plan: the plan.
    devices: the devices its mesh is made of.
    program: the program with this phase's example batch.
    built: the plan's mesh, shardings and jitted loss_and_grad.
    report: the search report that chose the plan.
    accumulate: `accumulate(acc, grads, scale) -> acc + scale * grads` (acc donated).
    scale: `scale(grads, s) -> s * grads`.
    update: `update(params, opt_state, grads, group_lrs, grad_scale) -> (params, opt_state)`
      (params and state donated; the gradients are multiplied by `grad_scale` first).
    zeros: `zeros(params) -> zeros like the trainable params` with the gradient shardings.

  Gradients (and the optimizer state) are trees of the trainable leaves only, None at the
  frozen ones (`Program.trainable`), placed by `grad_shardings`.
  """
  plan: Plan
  devices: tuple
  program: Program
  built: BuiltStep
  report: SearchResult | None
  accumulate: Callable
  scale: Callable
  update: Callable
  zeros: Callable

  @property
  def param_shardings(self):
    return self.built.param_shardings

  @property
  def grad_shardings(self):
    return self.built.grad_shardings

  def batch_ok(self, batch_size: int) -> str | None:
    """Why this phase's plan cannot run a batch of `batch_size` (None: it can)."""
    return plan_accepts(self.plan, batch_size, self.program.num_blocks)

  def __repr__(self):
    return f"Phase({self.plan}, batch={self.program.batch_size})"


def plan_accepts(plan: Plan, batch_size: int, num_blocks: int) -> str | None:
  if batch_size % (plan.dp * plan.mb):
    return f"batch {batch_size} does not divide by dp x mb = {plan.dp} x {plan.mb}"
  if plan.pp > 1:
    from passes import pipeline
    return pipeline.check_pipeline(num_blocks, batch_size, plan.pp, plan.mb, plan.dp)
  return None


def build_phase(program: Program, plan: Plan, devices: Sequence, labels: PyTree,
                report: SearchResult | None = None) -> Phase:
  """Compiles (lazily, at first call) the three pieces of `plan` for `program`.

  Args:
    program: the bridged program (its optimizer built at lr 1).
    plan: the plan to run.
    devices: the devices the plan's mesh is taken from.
    labels: pytree like the trainable params (None at frozen leaves); each leaf the index
      of its torch param group.
    report: the search report, kept for inspection.
  """
  built = build_plan(program, plan, devices)
  pshard, oshard, gshard = built.param_shardings, built.opt_shardings, built.grad_shardings
  split = program.split
  replicated = NamedSharding(built.mesh, P())
  tx = program.optimizer

  def accumulate(acc, grads, s):
    return jax.tree.map(lambda a, g: a + s.astype(g.dtype) * g, acc, grads)

  def scale(grads, s):
    return jax.tree.map(lambda g: s.astype(g.dtype) * g, grads)

  def update(params, opt_state, grads, lrs, grad_scale):
    grads = jax.tree.map(lambda g: g * grad_scale.astype(g.dtype), grads)
    trained, frozen = split(params)
    updates, opt_state = tx.update(grads, opt_state, trained)
    updates = jax.tree.map(lambda u, i: u * lrs[i].astype(u.dtype), updates, labels)
    return combine(optax.apply_updates(trained, updates), frozen), opt_state

  def zeros(params):
    return jax.tree.map(jnp.zeros_like, split(params)[0])

  mesh = built.mesh
  return Phase(
      plan=plan, devices=tuple(devices), program=program, built=built, report=report,
      accumulate=_MeshBound(mesh, jax.jit(accumulate, in_shardings=(gshard, gshard, replicated),
                                          out_shardings=gshard, donate_argnums=(0,))),
      scale=_MeshBound(mesh, jax.jit(scale, in_shardings=(gshard, replicated), out_shardings=gshard)),
      update=_MeshBound(mesh, jax.jit(update, in_shardings=(pshard, oshard, gshard, replicated, replicated),
                                      out_shardings=(pshard, oshard), donate_argnums=(0, 1))),
      zeros=_MeshBound(mesh, jax.jit(zeros, in_shardings=(pshard,), out_shardings=gshard)),
  )


def choose_plan(program: Program, devices: Sequence, advanced: bool,
                mixed_precision: bool = False, checkpointing: bool = False) -> tuple[SearchResult, tuple]:
  """The plan for `program`'s batch: AP's search, or MoAI's default plain data parallelism.

  Args:
    program: the bridged program with this batch.
    devices: the devices to plan over.
    advanced: AP's search (False: plain data parallelism, memory checked).
    mixed_precision: the forward runs under autocast: bf16 compute with fp32 master weights
      (else the AP options' own `mixed_precision`, or fp32 for plain data parallelism).
    checkpointing: the model asked for gradient checkpointing (`gradient_checkpointing_enable()`):
      the plan recomputes each block's activations in its backward (`with_checkpointing`).

  Returns:
    (report, devices the plan runs on).

  Raises:
    OutOfMemoryError: nothing fits; the message gives memory needed and available per device.
  """
  devices = tuple(devices)
  batch = program.batch_size
  settings = env.read_settings()
  if advanced:
    options = config.current_options() or SearchOptions()
    if mixed_precision:
      options = dataclasses.replace(options, mixed_precision=True)
    options = with_checkpointing(options, checkpointing, program)
    try:
      return plan_cache.cached_search(program, devices, options, settings), devices
    except OutOfMemoryError as e:
      usable = _largest_divisor(len(devices), batch)
      if any(r.memory_bytes is not None for r in e.results) or usable == len(devices):
        raise
      # No plan of all devices divides this batch (e.g. a last batch of 3 on 8 devices).
      log.info("No plan over %d devices divides batch %d; planning on %d of them.", len(devices),
               batch, usable)
      return plan_cache.cached_search(program, devices[:usable], options, settings), devices[:usable]
  dp = _largest_divisor(len(devices), batch)
  options = with_checkpointing(dataclasses.replace(PLAIN_OPTIONS, mixed_precision=mixed_precision),
                               checkpointing, program)
  log.info("Advanced Parallelization is off: running %s on %d device(s) with plain data parallelism "
           "(Plan(dp=%d)%s), checking that it fits.", program.name, dp, dp,
           ", bf16 under autocast" if mixed_precision else "")
  try:
    return search_pass.search(program, devices[:dp], options, settings), devices[:dp]
  except OutOfMemoryError as e:
    raise OutOfMemoryError(_plain_out_of_memory_message(e.results, settings, devices[:dp], batch),
                           e.results) from None


def fp32_masters(program: Program) -> Program:
  """The program with fp32 master weights for its bf16/fp16 trainable parameters.

  The rule for a model loaded in low precision (`from_pretrained(..., torch_dtype=torch.bfloat16)`):
  without mixed precision it trains in its own dtype, as torch does (weights, gradients and
  optimizer state in bf16); with mixed precision on (autocast, or the AP option
  `mixed_precision=True`) its trainable weights are held in fp32 (master weights, with fp32
  optimizer state), cast to bf16 for the compute by the plan, and written back to torch in
  the model's dtype. Frozen weights stay in their dtype: they are never updated.
  """
  low = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))

  def master(x, trained):
    return jax.ShapeDtypeStruct(x.shape, jnp.float32) if trained and jnp.dtype(x.dtype) in low else x

  params = jax.tree.map(master, program.params, program.trainable_mask)
  if all(a.dtype == b.dtype for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(program.params))):
    return program
  return dataclasses.replace(program, params=params)


def with_checkpointing(options: SearchOptions, checkpointing: bool, program: Program) -> SearchOptions:
  """The options with the model's gradient checkpointing as recomputation.

  torch's gradient checkpointing recomputes each decoder layer's forward in the backward;
  the plan's per-block recomputation is that: the options' `activation_recomputation`
  becomes True ('full') unless it already names a recomputing policy ('full', 'dots',
  'selective_op', 'selective_layer': `passes.recompute`). A program
  without a block stack has no blocks to recompute: it is planned as it is (logged).
  """
  pinned = options.activation_recomputation
  if not checkpointing or (isinstance(pinned, str) and pinned in RECOMPUTE_POLICIES and pinned != "none"):
    return options
  if not program.num_blocks:
    log.info("%s asked for gradient checkpointing, but it has no block stack to recompute per block; "
             "planning it without recomputation.", program.name)
    return options
  if options.activation_recomputation is not True:
    log.info("%s has gradient checkpointing on: the plan recomputes each block's activations in the "
             "backward (activation_recomputation=True instead of %r).", program.name,
             options.activation_recomputation)
  return dataclasses.replace(options, activation_recomputation=True)


# The remedy a script without the AP line has first; the search's own message would instead
# list un-pinning PLAIN_OPTIONS, which such a script never set.
_ENABLE_AP = (
    "  - enable Advanced Parallelization, which searches pipeline, tensor and sharded-parameter "
    "plans that need less memory per device: add torch.moreh.option.enable_advanced_parallelization() "
    "(or ap_xla.enable_advanced_parallelization()) before the training loop;")


def _plain_out_of_memory_message(results, settings, devices: tuple, batch: int) -> str:
  """The out-of-memory message of the plain data-parallel plan: memory requested and available
  per device, then what to do (enable AP, add devices, reduce the batch)."""
  _, capacity = search_pass.resolve_hardware(settings, devices)
  budget = int(capacity * settings.memory_ratio / 100)
  text = out_of_memory_message(results, budget, capacity, settings.memory_ratio, len(devices), batch, {})
  lines = text.splitlines()
  at = next((i + 1 for i, line in enumerate(lines) if line.strip() == "what would make it fit:"), len(lines))
  lines.insert(at, _ENABLE_AP)
  return "\n".join(lines)


def _largest_divisor(n: int, batch: int) -> int:
  return max(d for d in divisors(n) if batch % d == 0)


def group_lrs(optimizer) -> jax.Array:
  """The current lr of every param group (what a torch scheduler set for this step)."""
  return jnp.asarray([_float(g["lr"]) for g in optimizer.param_groups], jnp.float32)


def _float(x) -> float:
  v = float(x.item()) if hasattr(x, "item") else float(x)
  if not math.isfinite(v):
    raise ValueError(f"optimizer lr must be finite, got {v!r}.")
  return v
