"""The 1F1B pipeline schedule: each stage alternates one forward and one backward micro-batch,
so a stage keeps at most 2S residual sets instead of GPipe's M + S - 1.

Design. As GPipe (`passes.pipeline`), the block stack runs in one partial-manual
`jax.shard_map` over 'stage' and 'data' ('tensor' automatic), stage s holding layers
[s L/S, (s+1) L/S). Unlike GPipe the loss and the gradients are computed here, not by
differentiating through the schedule: a micro-batch's backward has to start as soon as its
forward leaves the last stage, so `post` (head and loss) runs per micro-batch on the last
stage, inside the schedule. In lockstep ticks (T = M + 2S - 1), stage s:

  forward   micro-batch i = t - s: its input (the batch at stage 0, else what stage s-1 sent),
            `jax.vjp` of the stage; the residuals go to slot i mod 2S of a ring buffer (only
            those that are not the stage's weights or side inputs: those are at hand); on the
            last stage `post`'s value and gradient give the micro-batch's loss and cotangent,
            weighted w_i / sum(w) (`Program.loss_weight`, or 1 per micro-batch);
  backward  micro-batch j = t - (2S - 1 - s): its residuals from the ring and its cotangent
            (from post's on the last stage, else from stage s+1) give the stage's weight
            gradient (accumulated), the side inputs' and the input's cotangent (sent to s-1;
            at stage 0 the gradient of the pipeline's input).

Activations move forward and cotangents backward by one `ppermute` each per tick. Out of
range micro-batches compute on filler and are masked. After the ticks the weight gradients
are reduced over 'data' once (reduce-scattered for FSDP leaves, gathered at the top as in
GPipe), post's over 'data' and 'stage'. Every stage runs post on every tick (SPMD: the last
stage's is the one that counts and the ticks wait for it).

`loss_and_grad_1f1b` returns the loss and the gradients of blocks, post parameters (as post
used them), the hidden input and the side inputs; `passes.step` turns them into the
parameters' gradients with the vjp of `pre` and of the casts and gathers. Frozen weights
(`block_trainable`, `post_trainable`) are used as they are: the vjps are taken with respect
to the trainable ones, which alone have accumulators and reductions (None at frozen leaves).
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, PartitionSpec as P

from passes.pipeline import _fsdp_dims, _in_f32, _vary, _zeros_like, check_pipeline, gather_stage_weight
from passes.plan import DATA, STAGE
from passes.program import combine, partition, scan_blocks

PyTree = Any


def ring_slots(num_stages: int) -> int:
  """Residual sets a stage keeps: micro-batches between their forward and their backward."""
  return 2 * num_stages


def loss_and_grad_1f1b(block_fn: Callable, post_fn: Callable, weight_fn: Callable | None, blocks: PyTree,
                       post_params: PyTree, hidden: jax.Array, aux: PyTree, batch: PyTree, *, num_stages: int,
                       num_micro_batches: int, mesh: Mesh, block_specs: PyTree | None = None,
                       gather_dtype=None, compute_dtype=None, block_trainable: PyTree | None = None,
                       post_trainable: PyTree | None = None, run_layers: Callable | None = None):
  """(loss, (d_blocks, d_post, d_hidden, d_aux)) of the block stack and post under 1F1B.

  Call inside `jax.jit`, with `mesh` as the context mesh.

  Args:
    block_fn: `block_fn(block_params, hidden, aux) -> hidden` for one block, on its weights as
      they arrive (gathered, cast to `compute_dtype`): no FSDP gather or cast of its own, which
      would make each tick's residuals hold a copy of the stage's weights.
    post_fn: `post_fn(post_params, hidden, aux, batch) -> loss`, the mean over its examples.
    weight_fn: `weight_fn(batch) -> weight` of a micro-batch (`Program.loss_weight`), or None
      (every micro-batch weighs 1).
    blocks: the stacked block weights [L, ...], leading dim over 'stage'.
    post_params: post's parameters as it uses them (gathered, cast), replicated over 'stage'
      and 'data'.
    hidden, aux, batch: [B, ...] over 'data': the first block's input, the side inputs, the batch.
    num_stages, num_micro_batches, mesh, block_specs, gather_dtype: as `pipeline.run_stages`.
    compute_dtype: the dtype the blocks compute their weights in (bf16 under mixed precision):
      the stage's weights are cast once per step, at hand for every tick; the gradients are
      those of the cast weights, widened and accumulated in the weights' dtype (what
      differentiating a cast inside the block gives).
    block_trainable, post_trainable: bool trees like `blocks` and `post_params` (None: all
      trained); frozen leaves get no gradient (None in d_blocks / d_post).
    run_layers: as `pipeline.run_stages`'s (a stage's blocks under a per-layer policy).

  Returns:
    The loss (the batch's, as `Program.loss` gives it) and its gradients with respect to
    blocks (trainable leaves), post_params (likewise), hidden and aux.
  """
  S, M = num_stages, num_micro_batches
  if STAGE not in mesh.axis_names or mesh.shape[STAGE] != S:
    raise ValueError(f"loss_and_grad_1f1b: num_stages({S}) must equal the size of the mesh's '{STAGE}' "
                     f"axis; mesh has {dict(mesh.shape)}.")
  L, B = jax.tree.leaves(blocks)[0].shape[0], hidden.shape[0]
  dp = mesh.shape[DATA] if DATA in mesh.axis_names else 1
  reason = check_pipeline(L, B, S, M, dp)
  if reason:
    raise ValueError(f"loss_and_grad_1f1b: {reason}.")
  manual = (STAGE, DATA) if DATA in mesh.axis_names else (STAGE,)
  batch_axis = DATA if DATA in manual else None
  fsdp = _fsdp_dims(blocks, block_specs)
  bspecs = jax.tree.map(lambda x, d: P(STAGE, *[DATA if i == d else None for i in range(1, x.ndim)]), blocks, fsdp)
  local = lambda t: jax.tree.map(lambda _: P(batch_axis), t)
  replicated = jax.tree.map(lambda _: P(), post_params)
  a_leaves, a_tree = jax.tree.flatten(aux)
  floats = [jnp.issubdtype(v.dtype, jnp.inexact) for v in a_leaves]
  b_mask = block_trainable if block_trainable is not None else jax.tree.map(lambda _: True, blocks)
  p_mask = post_trainable if post_trainable is not None else jax.tree.map(lambda _: True, post_params)
  run_layers = run_layers or functools.partial(scan_blocks, block_fn)
  body = functools.partial(_body, run_layers, post_fn, weight_fn, fsdp, S, M, manual, gather_dtype, compute_dtype,
                           b_mask, p_mask)
  loss, (d_blocks, d_post, d_hidden, d_float) = jax.shard_map(
      body, mesh=mesh, axis_names=set(manual),
      in_specs=(bspecs, replicated, P(batch_axis), local(aux), local(batch)),
      out_specs=(P(), (partition(bspecs, b_mask)[0], partition(replicated, p_mask)[0], P(batch_axis),
                       [P(batch_axis)] * sum(floats))))(
          blocks, post_params, hidden, aux, batch)
  it = iter(d_float)  # side inputs that are not floats take no cotangent (float0 zeros)
  d_aux = jax.tree.unflatten(a_tree, [next(it) if f else np.zeros(v.shape, jax.dtypes.float0)
                                      for v, f in zip(a_leaves, floats)])
  return loss, (d_blocks, d_post, d_hidden, d_aux)


def _body(run_layers, post_fn, weight_fn, fsdp, S, M, manual, gather_dtype, compute_dtype, b_mask, p_mask,
          blocks, post_params, hidden, aux, batch):
  """Per (stage, data shard): blocks [L/S, ...], hidden/aux/batch [B/dp, ...] (module doc)."""
  s = lax.axis_index(STAGE)
  K = ring_slots(S)
  T = M + 2 * S - 1
  others = tuple(a for a in manual if a != STAGE)

  weights = jax.tree.map(lambda w, d: gather_stage_weight(w, d, gather_dtype), blocks, fsdp)
  weights = jax.tree.map(lambda w: _vary(w, manual), weights)
  acc_like = partition(weights, b_mask)[0]  # gradients accumulate in the weights' own dtype
  if compute_dtype is not None:
    narrow = lambda w: w.astype(compute_dtype) if jnp.issubdtype(w.dtype, jnp.floating) else w
    weights = jax.tree.map(narrow, weights)
  w_train, w_frozen = partition(weights, b_mask)
  post_params = jax.tree.map(lambda w: _vary(w, manual), post_params)
  pp_train, pp_frozen = partition(post_params, p_mask)
  split = lambda x: _vary(x.reshape((M, x.shape[0] // M) + x.shape[1:]), manual)
  xs, auxs, batches = split(hidden), jax.tree.map(split, aux), jax.tree.map(split, batch)
  pick = lambda tree, i: jax.tree.map(lambda v: lax.dynamic_index_in_dim(v, i, keepdims=False), tree)

  # Side inputs that are not floats (masks as ints or bools) get no cotangent: split them off.
  a_leaves, a_tree = jax.tree.flatten(auxs)
  floats = [jnp.issubdtype(v.dtype, jnp.inexact) for v in a_leaves]

  def split_aux(a):
    leaves = jax.tree.leaves(a)
    return [v for v, f in zip(leaves, floats) if f], [v for v, f in zip(leaves, floats) if not f]

  def join_aux(af, ai):
    fi, ii = iter(af), iter(ai)
    return jax.tree.unflatten(a_tree, [next(fi) if f else next(ii) for f in floats])

  def stage(w, x, af, ai):
    return run_layers(w, x, join_aux(af, ai))

  # Piece weights: each micro-batch's share of the batch's loss, over every data shard.
  if weight_fn is None:
    w_i = jnp.ones((M,), jnp.float32)
  else:
    w_i = jax.vmap(lambda b: jnp.asarray(weight_fn(b), jnp.float32))(batches)
  total = lax.psum(jnp.sum(w_i), others) if others else jnp.sum(w_i)

  # The residuals of one micro-batch's stage forward, found by tracing it once: those that
  # are the stage's weights or side inputs are taken at hand, the others go to the ring.
  kinds = []

  def forward(x, a):
    af, ai = split_aux(a)
    y, vjp = jax.vjp(lambda w, x, af: stage(combine(w, w_frozen), x, af, ai), w_train, x, af)
    leaves, tree = jax.tree.flatten(vjp)
    at_hand = jax.tree.leaves((weights, af, ai))
    found = [next((k for k, z in enumerate(at_hand) if z is l), None) for l in leaves]
    if not kinds:
      kinds.append((tree, found))
    return y, [l for l, f in zip(leaves, found) if f is None]

  x0, a0 = xs[0], pick(auxs, 0)
  stored = jax.eval_shape(lambda x, a: forward(x, a)[1], x0, a0)
  tree, found = kinds[0]

  def backward(kept, a, ct):
    """(d weights, d x, d float side inputs) of one micro-batch from its kept residuals."""
    af, ai = split_aux(a)
    at_hand = jax.tree.leaves((weights, af, ai))
    it = iter(kept)
    leaves = [next(it) if f is None else at_hand[f] for f in found]
    return jax.tree.unflatten(tree, leaves)(ct)

  def post_grad(y, a, b, i):
    af, ai = split_aux(a)
    def piece(pp, h, af):
      return post_fn(combine(pp, pp_frozen), h, join_aux(af, ai), b).astype(jnp.float32)
    l, vjp = jax.vjp(piece, pp_train, y, af)
    has = w_i[i] > 0
    scale = jnp.where(has, w_i[i] / total, 0.0)
    dpp, dy, da = vjp(_vary(scale.astype(l.dtype), manual))
    return jnp.where(has, l * scale, 0.0), dpp, dy, da

  zeros = lambda t: jax.tree.map(_zeros_like, t)
  ring = jax.tree.map(lambda r: _vary(jnp.zeros((K,) + r.shape, r.dtype), manual), stored)
  carry0 = dict(
      recv_f=_zeros_like(x0), recv_b=_zeros_like(x0), pending=_zeros_like(x0), ring=ring,
      loss=_vary(jnp.zeros((), jnp.float32), manual), d_w=zeros(acc_like), d_post=zeros(pp_train),
      d_x=_zeros_like(xs), d_aux=zeros(split_aux(auxs)[0]))
  fwd_pairs = [(k, k + 1) for k in range(S - 1)]
  bwd_pairs = [(k + 1, k) for k in range(S - 1)]

  def tick(c, t):
    # forward slot
    i = t - s
    f_ok = (i >= 0) & (i < M)
    ic = jnp.clip(i, 0, M - 1)
    x = jnp.where(s == 0, lax.dynamic_index_in_dim(xs, ic, keepdims=False), c["recv_f"])
    a = pick(auxs, ic)
    y, kept = forward(x, a)
    # An idle tick writes nothing: its index is out of range and the scatter drops it. (Selecting
    # between the new residuals and the slot's old ones read the old slot first: XLA:CPU then
    # held a whole residual set more, 165 MiB (9%) on the 100M Llama's dp=1 tp=4 pp=2 mb=4 'none'.)
    slot = jnp.where(f_ok, ic % K, K)
    ring = jax.tree.map(lambda r, v: r.at[slot].set(v, mode="drop"), c["ring"], kept)
    last = (s == S - 1) & f_ok
    l, dpp, dy, da_post = post_grad(y, a, pick(batches, ic), ic)
    loss = c["loss"] + jnp.where(last, l, 0.0)
    d_post = jax.tree.map(lambda acc, g: acc + jnp.where(last, g, jnp.zeros_like(g)), c["d_post"], dpp)
    # backward slot
    j = t - (2 * S - 1 - s)
    b_ok = (j >= 0) & (j < M)
    jc = jnp.clip(j, 0, M - 1)
    ct = jnp.where(s == S - 1, c["pending"], c["recv_b"])
    aj = pick(auxs, jc)
    kept_j = jax.tree.map(lambda r: lax.dynamic_index_in_dim(r, jc % K, keepdims=False), ring)
    d_w, d_x, d_a = backward(kept_j, aj, ct)
    mask = lambda g: jnp.where(b_ok, g, jnp.zeros_like(g))
    d_wsum = jax.tree.map(lambda acc, g: acc + mask(g).astype(acc.dtype), c["d_w"], d_w)
    d_a = jax.tree.map(mask, d_a)
    d_aux = jax.tree.map(lambda acc, g: lax.dynamic_update_index_in_dim(
        acc, lax.dynamic_index_in_dim(acc, jc, keepdims=False) + g, jc, 0), c["d_aux"], d_a)
    # post's side-input cotangent belongs to the micro-batch of the forward slot
    d_aux = jax.tree.map(lambda acc, g: lax.dynamic_update_index_in_dim(
        acc, lax.dynamic_index_in_dim(acc, ic, keepdims=False) + jnp.where(last, g, jnp.zeros_like(g)), ic, 0),
        d_aux, da_post)
    first = (s == 0) & b_ok
    d_xs = lax.dynamic_update_index_in_dim(c["d_x"], jnp.where(first, d_x, lax.dynamic_index_in_dim(
        c["d_x"], jc, keepdims=False)), jc, 0)
    recv_f = lax.ppermute(y, STAGE, fwd_pairs) if S > 1 else y
    recv_b = lax.ppermute(d_x, STAGE, bwd_pairs) if S > 1 else d_x
    pending = jnp.where(last, dy.astype(x.dtype), c["pending"])
    return dict(recv_f=recv_f, recv_b=recv_b, pending=pending, ring=ring, loss=loss, d_w=d_wsum, d_post=d_post,
                d_x=d_xs, d_aux=d_aux), None

  c, _ = lax.scan(tick, carry0, jnp.arange(T))
  # Once per step: the reductions over 'data' (and 'stage' for what every stage computes).
  def reduce_w(g, d):
    if d is None:
      return _in_f32(lambda v: lax.psum(v, others), g) if others else g
    return _in_f32(lambda v: lax.psum_scatter(v, DATA, scatter_dimension=d, tiled=True), g)
  treedef = jax.tree.structure(b_mask)
  d_blocks = treedef.unflatten([reduce_w(g, d) if m else None for g, d, m in zip(
      treedef.flatten_up_to(c["d_w"]), treedef.flatten_up_to(fsdp), treedef.flatten_up_to(b_mask))])
  everywhere = manual
  d_post = jax.tree.map(lambda g: _in_f32(lambda v: lax.psum(v, everywhere), g), c["d_post"])
  loss = lax.psum(c["loss"], everywhere)
  merge = lambda v: v.reshape((v.shape[0] * v.shape[1],) + v.shape[2:])
  d_hidden = _in_f32(lambda v: lax.psum(v, STAGE), merge(c["d_x"]))
  d_aux = [_in_f32(lambda u: lax.psum(u, STAGE), merge(v)) for v in c["d_aux"]]  # the float side inputs'
  return loss, (d_blocks, d_post, d_hidden, d_aux)
