"""Builds a plan's sharded training step: value_and_grad + optimizer update, jitted on its mesh.

Frozen parameters (`Program.trainable`) are inputs of the loss like the others, sharded by
the same specs, but the gradient is taken with respect to the trainable ones alone: the
gradients, their accumulators and the optimizer state are trees of the trainable leaves
(None elsewhere), and the step passes the frozen leaves through unchanged.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, PartitionSpec as P

from passes import recompute as rc
from passes import shardings as sh
from passes.plan import DATA, Plan
from passes.program import BLOCKS, POST, PRE, Program, combine, partition
from passes.regather import regathers

PyTree = Any



@dataclasses.dataclass(frozen=True)
class BuiltStep:
  """A plan made concrete: its mesh, shardings and jitted functions.

  Attributes:
    step: `step(params, opt_state, batch) -> (params, opt_state, loss)`, params and state donated.
    loss_and_grad: `loss_and_grad(params, batch) -> (loss, grads)`; grads of the trainable
      leaves (None at frozen ones), placed by `grad_shardings`.
    init_opt: `init_opt(params) -> opt_state` of the trainable leaves, placed by `opt_shardings`.
    grad_shardings: the trainable part of `param_shardings` (None at frozen leaves).
  """
  plan: Plan
  mesh: Mesh
  param_shardings: PyTree
  opt_shardings: PyTree
  batch_shardings: PyTree
  step: Callable
  loss_and_grad: Callable
  init_opt: Callable
  grad_shardings: PyTree = None

  def abstract_inputs(self, program: Program):
    """ShapeDtypeStructs with shardings for lowering `step` without allocating anything."""
    def sds(x, s):
      return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)
    params = jax.tree.map(sds, program.params, self.param_shardings)
    opt = jax.eval_shape(program.init_optimizer, program.params)
    opt = jax.tree.map(sds, opt, self.opt_shardings)
    batch = jax.tree.map(sds, program.batch, self.batch_shardings)
    return params, opt, batch

  def lower(self, program: Program):
    return self.step.lower(*self.abstract_inputs(program))


def _is_float(x) -> bool:
  return jnp.issubdtype(x.dtype, jnp.floating)


def _to_bf16(tree):
  return jax.tree.map(lambda x: x.astype(jnp.bfloat16) if _is_float(x) else x, tree)


def _gather(tree, specs):
  """Constrains FSDP-sharded leaves to their spec without 'data': the all-gather before use."""
  return jax.tree.map(lambda x, s: jax.lax.with_sharding_constraint(x, sh.without_axis(s, DATA)),
                      tree, specs, is_leaf=lambda x: isinstance(x, P) or hasattr(x, "shape"))


def make_loss(program: Program, plan: Plan, pspecs: PyTree, mesh: Mesh) -> Callable:
  """`loss(params, batch)` for a plan: mixed precision, FSDP gathers, recomputation, pipeline."""
  prepare, cast_batch, cast_early = _prepare_fns(plan)

  if program.layers is None:
    def flat_loss(params, batch):
      return program.loss_fn(prepare(params, pspecs), cast_batch(batch)).astype(jnp.float32)
    return flat_loss

  layers = program.layers
  block_specs = jax.tree.map(sh.drop_leading, pspecs[BLOCKS], is_leaf=lambda x: isinstance(x, P))

  def block_fn(p, h, aux):
    return layers.block(prepare(p, block_specs), h, aux)

  # regathers: the backward gathers each layer's weights again
  run_layers = rc.layer_runner(layers.block, plan.recompute, lambda p: prepare(p, block_specs), regathers(plan))

  def layered_loss(params, batch):
    batch = cast_batch(batch)
    h, aux = layers.pre(prepare(params[PRE], pspecs[PRE]), batch)
    if plan.pp > 1:
      from passes import pipeline
      h = pipeline.run_stages(block_fn, params[BLOCKS], h, aux, num_stages=plan.pp,
                              num_micro_batches=plan.mb, mesh=mesh, block_specs=pspecs[BLOCKS],
                              gather_dtype=jnp.bfloat16 if cast_early and plan.fsdp else None,
                              run_layers=run_layers)
    else:
      h = run_layers(params[BLOCKS], h, aux)
    return layers.post(prepare(params[POST], pspecs[POST]), h, aux, batch).astype(jnp.float32)

  return layered_loss


def _split_micro_batches(batch, mb: int, axes=DATA):
  """[B, ...] -> [mb, B/mb, ...], keeping the data sharding on the per-micro-batch dim.

  Micro-batch j takes rows j, j + mb, j + 2mb, ...: reshaping to [B/mb, mb] and swapping
  keeps each device's contiguous rows on it (no data moves), where [mb, B/mb] directly
  would spread the data shards over the micro-batch dim and reshard. The gradient is a sum
  over micro-batches, so which rows share one does not change it.
  """
  def split(x):
    y = jnp.swapaxes(x.reshape((x.shape[0] // mb, mb) + x.shape[1:]), 0, 1)
    return jax.lax.with_sharding_constraint(y, P(None, axes, *([None] * (x.ndim - 1))))
  return jax.tree.map(split, batch)


def _weighted_piece(vg: Callable, weight_fn: Callable | None) -> Callable:
  """`(params, piece) -> (w * loss, w * grads, w)` for one piece of the batch.

  Without `Program.loss_weight` every piece weighs 1 (equal pieces of a mean over examples).
  With it, w is the piece's weight (e.g. its labelled tokens), so that summing the pieces and
  dividing by the summed weight gives the whole batch's loss and gradient exactly. A piece
  of weight 0 has the loss 0/0: its NaN loss and gradients are selected away (`where`, not
  differentiated through) and count for nothing, as in the whole-batch loss.
  """
  def piece(params, mbatch):
    l, g = vg(params, mbatch)
    if weight_fn is None:
      return l, g, jnp.ones((), jnp.float32)
    w = jnp.asarray(weight_fn(mbatch), jnp.float32)
    has = w > 0
    l = jnp.where(has, l * w, jnp.zeros_like(l))
    g = jax.tree.map(lambda x: jnp.where(has, x * w.astype(x.dtype), jnp.zeros_like(x)), g)
    return l, g, w
  return piece


def _prepare_fns(plan: Plan):
  """(prepare, cast_batch, cast_early): the casts and FSDP gathers `make_loss` applies."""
  cast_early = plan.bf16 and (not plan.fsdp or plan.low_prec)  # bf16 before the gather

  def prepare(p, specs):
    if cast_early:
      # The barrier keeps the cast before the gather: without it XLA:GPU moved the convert of
      # most weights after the backward's re-gather under recomputation (fp32 gathered).
      p = jax.lax.optimization_barrier(_to_bf16(p)) if plan.fsdp else _to_bf16(p)
    if plan.fsdp:
      p = _gather(p, specs)
    return _to_bf16(p) if plan.bf16 else p

  def cast_batch(batch):
    return _to_bf16(batch) if plan.bf16 else batch
  return prepare, cast_batch, cast_early


def _one_f_one_b(program: Program, plan: Plan, pspecs: PyTree, mesh: Mesh) -> Callable:
  """`(params, batch) -> (loss, grads)` of a 1F1B pipeline (`passes.pipeline_1f1b`): the
  schedule computes the blocks' and post's gradients itself; pre's, and those of the casts
  and gathers, come from their vjps."""
  from passes import pipeline_1f1b
  layers = program.layers
  prepare, cast_batch, cast_early = _prepare_fns(plan)
  # The schedule gathers and casts the stage's weights once (compute_dtype): the block takes
  # them as they come.
  block_fn = layers.block
  run_layers = rc.layer_runner(block_fn, plan.recompute)

  mask = program.trainable_mask
  tspecs = program.split(pspecs)[0]

  def loss_and_grad(params, batch):
    batch = cast_batch(batch)
    pre_t, pre_f = partition(params[PRE], mask[PRE])
    (h, aux), pre_vjp = jax.vjp(
        lambda p: layers.pre(prepare(combine(p, pre_f), pspecs[PRE]), batch), pre_t)
    # post's frozen weights are prepared (cast, gathered) outside the vjp: no gradient
    post_t, post_f = partition(params[POST], mask[POST])
    post_spec_t, post_spec_f = partition(pspecs[POST], mask[POST])
    post_ready, post_vjp = jax.vjp(lambda p: prepare(p, post_spec_t), post_t)
    post_params = combine(post_ready, prepare(post_f, post_spec_f))
    loss, (d_blocks, d_post, d_h, d_aux) = pipeline_1f1b.loss_and_grad_1f1b(
        block_fn, layers.post, program.loss_weight, params[BLOCKS], post_params, h, aux, batch,
        num_stages=plan.pp, num_micro_batches=plan.mb, mesh=mesh, block_specs=pspecs[BLOCKS],
        gather_dtype=jnp.bfloat16 if cast_early and plan.fsdp else None,
        compute_dtype=jnp.bfloat16 if plan.bf16 else None,
        block_trainable=mask[BLOCKS], post_trainable=mask[POST], run_layers=run_layers)
    grads = {PRE: pre_vjp((d_h.astype(h.dtype), d_aux))[0], BLOCKS: d_blocks, POST: post_vjp(d_post)[0]}
    return loss.astype(jnp.float32), jax.lax.with_sharding_constraint(grads, tspecs)
  return loss_and_grad


def make_loss_and_grad(program: Program, plan: Plan, pspecs: PyTree, mesh: Mesh) -> Callable:
  """`(params, batch) -> (loss, grads)`, grads of the trainable leaves; micro-batches
  accumulate gradients when pp == 1."""
  if plan.pp > 1 and plan.schedule == "1f1b":
    return _one_f_one_b(program, plan, pspecs, mesh)
  loss = make_loss(program, plan, pspecs, mesh)
  split = program.split
  tspecs = split(pspecs)[0]
  by_part = jax.value_and_grad(lambda t, f, batch: loss(combine(t, f), batch))

  def vg(params, batch):  # differentiated with respect to the trainable leaves alone
    return by_part(*split(params), batch)

  def constrain(g):
    return jax.lax.with_sharding_constraint(g, tspecs)

  if plan.mb == 1 or plan.pp > 1:
    # The loss runs on the whole batch (with a pipeline, `post` does): exact for any mean.
    def loss_and_grad(params, batch):
      l, g = vg(params, batch)
      return l, constrain(g)
    return loss_and_grad
  piece = _weighted_piece(vg, program.loss_weight)
  if plan.dp > 1 and not plan.fsdp:
    return _accumulate_per_data_shard(piece, plan, mesh, tspecs, split)

  # FSDP (or no data axis): gradients accumulate in their sharded layout, so each micro-batch's
  # are reduce-scattered over 'data' as the backward makes them (per layer, per micro-batch):
  # ZeRO-3's trade, which keeps the accumulator sharded instead of holding a full local copy.
  def accumulated(params, batch):
    micro = _split_micro_batches(batch, plan.mb, plan.data_axes)
    zeros = constrain(jax.tree.map(jnp.zeros_like, split(params)[0]))

    def body(carry, mbatch):
      tot, acc, wsum = carry
      l, g, w = piece(params, mbatch)
      return (tot + l, constrain(jax.tree.map(jnp.add, acc, g)), wsum + w), None

    zero = jnp.zeros((), jnp.float32)
    (tot, acc, wsum), _ = jax.lax.scan(body, (zero, zeros, zero), micro)
    return tot / wsum, jax.tree.map(lambda g: g / wsum.astype(g.dtype), acc)

  return accumulated


def _accumulate_per_data_shard(piece: Callable, plan: Plan, mesh: Mesh, tspecs: PyTree,
                               split: Callable) -> Callable:
  """Gradient accumulation with replicated weights: one all-reduce over 'data' per step.

  Under GSPMD the weight gradients of each micro-batch come out replicated, i.e. all-reduced
  over 'data' inside the micro-batch loop (and inside the layer loop: mb x L reductions).
  Here the loop runs in a partial-manual `shard_map` over 'data' ('tensor' stays automatic):
  each data shard takes the weighted loss and gradient of its own slice of each micro-batch
  (`_weighted_piece`), at the weights made 'data'-varying once, accumulates them locally,
  and one psum after the loop sums the shards; dividing by the summed weight gives the
  whole batch's mean (over examples, or over what `Program.loss_weight` counts). Only the
  trainable leaves (`split`, with `tspecs` their specs) have accumulators and reductions.
  """
  mb = plan.mb

  def region(params, batch):  # params: replicated over 'data'; batch: this shard's [B/dp, ...]
    micro = jax.tree.map(lambda x: jnp.swapaxes(x.reshape((x.shape[0] // mb, mb) + x.shape[1:]), 0, 1),
                         batch)  # [mb, B/(dp mb), ...]
    local = jax.tree.map(lambda w: jax.lax.pcast(w, (DATA,), to="varying"), params)

    def body(carry, mbatch):
      tot, acc, wsum = carry
      l, g, w = piece(local, mbatch)
      return (tot + l, jax.tree.map(jnp.add, acc, g), wsum + w), None

    zeros = jax.tree.map(jnp.zeros_like, split(local)[0])
    zero = jax.lax.pcast(jnp.zeros((), jnp.float32), (DATA,), to="varying")
    (tot, acc, wsum), _ = jax.lax.scan(body, (zero, zeros, zero), micro)
    # After both loops: the one reduction of the step. In fp32: the CPU compiler aborts on a
    # bf16 reduction inside a partial-manual shard_map.
    total = jax.lax.psum(wsum, DATA)
    def mean(g):
      return (jax.lax.psum(g.astype(jnp.promote_types(g.dtype, jnp.float32)), DATA) / total).astype(g.dtype)
    return mean(tot), jax.tree.map(mean, acc)

  def accumulated(params, batch):
    replicated = jax.tree.map(lambda _: P(), params)
    run = jax.shard_map(region, mesh=mesh, axis_names={DATA},
                        in_specs=(replicated, jax.tree.map(lambda _: P(DATA), batch)),
                        out_specs=(P(), split(replicated)[0]))
    l, g = run(params, batch)
    return l, jax.lax.with_sharding_constraint(g, tspecs)

  return accumulated


class _MeshBound:
  """A jitted function called (and lowered) with its mesh as the context mesh, so the
  PartitionSpec constraints inside it resolve against that mesh."""

  def __init__(self, mesh: Mesh, jitted):
    self.mesh, self.jitted = mesh, jitted

  def __call__(self, *args):
    with jax.set_mesh(self.mesh):
      return self.jitted(*args)

  def lower(self, *args):
    with jax.set_mesh(self.mesh):
      return self.jitted.lower(*args)


def build_step(program: Program, plan: Plan, devices, tp_dims: PyTree | None = None) -> BuiltStep:
  """Builds the jitted, sharded training step of `plan` for `program`.

  Args:
    program: the training program (arrays or ShapeDtypeStructs).
    plan: the plan to build.
    devices: at least `plan.num_devices` devices.
    tp_dims: per-parameter dim to shard over 'tensor' (see `shardings.param_specs`).
  """
  mesh = sh.make_mesh(plan, devices)
  pspecs = sh.param_specs(program, plan, tp_dims)
  split = program.split
  tspecs = split(pspecs)[0]
  opt_shapes = jax.eval_shape(program.init_optimizer, program.params)
  ospecs = sh.opt_state_specs(opt_shapes, split(program.params)[0], tspecs)
  bspecs = sh.batch_specs(program.batch, plan.data_axes)
  pshard, oshard, bshard, gshard = (sh.named(mesh, s) for s in (pspecs, ospecs, bspecs, tspecs))
  loss_and_grad = make_loss_and_grad(program, plan, pspecs, mesh)
  tx = program.optimizer

  def step(params, opt_state, batch):
    loss, grads = loss_and_grad(params, batch)
    trained, frozen = split(params)
    updates, opt_state = tx.update(grads, opt_state, trained)
    return combine(optax.apply_updates(trained, updates), frozen), opt_state, loss

  replicated = jax.sharding.NamedSharding(mesh, P())
  return BuiltStep(
      plan=plan, mesh=mesh, param_shardings=pshard, opt_shardings=oshard, batch_shardings=bshard,
      step=_MeshBound(mesh, jax.jit(step, in_shardings=(pshard, oshard, bshard),
                                    out_shardings=(pshard, oshard, replicated), donate_argnums=(0, 1))),
      loss_and_grad=_MeshBound(mesh, jax.jit(loss_and_grad, in_shardings=(pshard, bshard),
                                             out_shardings=(replicated, gshard))),
      init_opt=_MeshBound(mesh, jax.jit(program.init_optimizer, in_shardings=(pshard,), out_shardings=oshard)),
      grad_shardings=gshard,
  )
