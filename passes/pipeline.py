"""GPipe pipeline parallelism of a `Layers` program over the 'stage' mesh axis.

Design. The block stack runs inside one partial-manual `jax.shard_map`, manual over 'stage'
and 'data' ('tensor' stays automatic, so tensor-parallel block weights and sharding
constraints inside the block keep working). Each stage holds a contiguous chunk of L/S
blocks (the leading dim of every 'blocks' leaf sharded over 'stage'). The local batch of a
data shard is cut into M micro-batches that stream through the stages over M+S-1 ticks
(fill and drain), with `lax.ppermute` passing activations to the next stage. Both loops,
ticks and the layers of a stage, are `lax.scan`, so compile time is flat in depth and M.
The last stage's output leaves the manual region by one reduce-scatter over 'stage' (the
batch then sharded over 'data' and 'stage', so `post` is not computed S times over), or a
psum when B/dp does not divide by S.

Why 'data' is manual too: with 'data' automatic, GSPMD reduces (FIELD_NOTES) each weight gradient over
'data' inside the backward loop, once per layer per tick. Here each non-FSDP weight enters
the loops already cast to 'data'-varying (`lax.pcast`) outside them; the weight gradient
then accumulates per data shard through both loops and the transpose of that one cast is
the single psum over 'data', after the loops, once per step. The same holds for the input
activations and `aux` over 'stage' (every stage reads them; their gradients are summed over
'stage' once, not per tick). The caller's `jax.value_and_grad` gets this for free.

FSDP: a block weight with a non-leading dim sharded over 'data' (pass `block_specs`) is
all-gathered once per step at the top of the manual region, outside both loops; the
transpose of that gather is one reduce-scatter of the accumulated gradient after them.
With distribute_low_prec_param (`gather_dtype=bf16`) the gather sends bf16 and widens the
result at once: half the bytes, while the gradient still accumulates through the loops and
is reduce-scattered in fp32 (accumulating over M + S - 1 ticks in bf16 would lose digits). The
stage so holds its full weights and gradient accumulators during the step (as without
FSDP); FSDP still shards the persistent parameters, gradients and optimizer state. Gathering
per layer inside the scan does not save memory here: the backward keeps each gathered
weight as a residual, JAX's scan partial eval hoists those loop-invariant residuals into a
full [L/S, ...] stack anyway (measured); refusing them needs a remat policy, and the
name-based one (`save_anything_except_these_names`) saves everything in jax 0.10.2 while a
per-primitive one misses the copies the block makes itself (its bf16 cast). It would also
reduce-scatter per layer per tick.

bf16: reductions inside the manual region (the pcast/gather transposes, the output psum)
run in float32; the CPU compiler aborts on bf16 ones there (`_in_f32`).

Placement rule: every 'blocks' leaf has its leading (layer) dim sharded over 'stage' and
no other dim over 'stage' (`stage_param_specs`); other dims may be sharded over 'data'
(FSDP) or 'tensor'. The number of blocks must divide by the number of stages and the batch
by dp * M (`check_pipeline` says why a combination is invalid).
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import Mesh, PartitionSpec as P

from passes.plan import DATA, STAGE
from passes.program import BLOCKS, POST, PRE, Layers, scan_blocks

PyTree = Any


def bubble_fraction(num_stages: int, num_micro_batches: int) -> float:
  """Idle fraction of a GPipe schedule: (S - 1) / (M + S - 1)."""
  return (num_stages - 1) / (num_micro_batches + num_stages - 1)


def check_pipeline(num_blocks: int, batch_size: int, num_stages: int, num_micro_batches: int,
                   dp: int = 1) -> str | None:
  """Why a pipeline configuration is invalid, or None when it is valid.

  Args:
    num_blocks: depth L of the block stack.
    batch_size: the global batch B.
    num_stages: pipeline stages S.
    num_micro_batches: micro-batches M.
    dp: size of the 'data' axis (the batch is split over it before the micro-batches).
  Returns:
    The reason as one sentence (for a rejected candidate), or None.
  """
  for name, v in (("num_stages", num_stages), ("num_micro_batches", num_micro_batches), ("dp", dp)):
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
      return f"{name} must be a positive int, got {v!r}"
  if num_blocks % num_stages:
    return (f"num_blocks({num_blocks}) is not divisible by num_stages({num_stages}); stages "
            f"hold equal chunks of blocks, pick a num_stages dividing {num_blocks}")
  if batch_size % (dp * num_micro_batches):
    return (f"batch_size({batch_size}) is not divisible by dp({dp}) * "
            f"num_micro_batches({num_micro_batches}) = {dp * num_micro_batches}")
  return None


def stage_param_specs(blocks: PyTree, specs: PyTree | None = None) -> PyTree:
  """PartitionSpecs for params['blocks']: the leading (layer) dim over 'stage'.

  Args:
    blocks: the stacked block weights (arrays or ShapeDtypeStructs).
    specs: optional specs of the same leaves for their other dims ('data' for FSDP, 'tensor'
      for TP); their leading entry is replaced.
  Returns:
    A PartitionSpec per leaf, `P('stage', *rest)`.
  """
  if specs is None:
    return jax.tree.map(lambda x: P(STAGE, *([None] * (len(x.shape) - 1))), blocks)

  def one(x, s):
    rest = list(tuple(s)[1:]) + [None] * (len(x.shape) - len(tuple(s)))
    if any(a == STAGE or (isinstance(a, tuple) and STAGE in a) for a in rest):
      raise ValueError(f"stage_param_specs: only the leading dim of a block weight may use "
                       f"'{STAGE}', got spec {s} for shape {tuple(x.shape)}.")
    return P(STAGE, *rest)
  return jax.tree.map(one, blocks, specs, is_leaf=lambda x: isinstance(x, P))


def _fsdp_dims(blocks: PyTree, block_specs: PyTree | None) -> PyTree:
  """Per leaf, the dim sharded over 'data' (None if none)."""
  if block_specs is None:
    return jax.tree.map(lambda _: None, blocks)

  def one(x, s):
    s = tuple(s)
    if s and s[0] not in (STAGE, None):
      raise ValueError(f"run_stages: the leading dim of a block weight must be sharded over "
                       f"'{STAGE}' (see stage_param_specs), got spec {P(*s)}.")
    dims = [d for d, a in enumerate(s) if a == DATA or (isinstance(a, tuple) and DATA in a)]
    if not dims:
      return None
    d = dims[0]
    if d == 0 or s[d] != DATA:
      raise ValueError(f"run_stages: a block weight may be sharded over '{DATA}' alone on one "
                       f"non-leading dim (FSDP), got spec {P(*s)} for shape {tuple(x.shape)}.")
    return d
  return jax.tree.map(one, blocks, block_specs, is_leaf=lambda x: isinstance(x, P))


def _varying(x) -> frozenset:
  return jax.typeof(x).manual_axis_type.varying


def _in_f32(f, x):
  """`f(x)` computed in float32 when `x` is a narrower float.

  The CPU compiler aborts on a bf16 reduction inside a partial-manual shard_map (its
  AllReducePromotion pass chokes on the sharding constraint JAX puts in the reducer), and
  the transposes of `_vary` and of the FSDP gather are such reductions.
  """
  if jnp.issubdtype(x.dtype, jnp.floating) and jnp.finfo(x.dtype).bits < 32:
    return f(x.astype(jnp.float32)).astype(x.dtype)
  return f(x)


def _vary(x, axes):
  """`x` made varying over those of `axes` it is not yet varying over."""
  axes = tuple(a for a in axes if a not in _varying(x))
  return _in_f32(lambda v: lax.pcast(v, axes, to="varying"), x) if axes else x


def _zeros_like(x):
  """Zeros with the shape, dtype and varying axes of `x` (a scan carry must keep its type)."""
  return _vary(jnp.zeros(x.shape, x.dtype), tuple(_varying(x)))


def run_stages(block_fn: Callable, blocks: PyTree, hidden: jax.Array, aux: PyTree, *,
               num_stages: int, num_micro_batches: int, mesh: Mesh,
               block_specs: PyTree | None = None, gather_dtype=None,
               run_layers: Callable | None = None) -> jax.Array:
  """Runs the block stack as a GPipe pipeline; the result equals `scan_blocks`.

  Call inside `jax.jit`. Differentiate through it with `jax.grad`: the weight gradients are
  reduced over 'data' once per step (see the module docstring).

  Args:
    block_fn: `block_fn(block_params, hidden, aux) -> hidden` for one block.
    blocks: the stacked block weights [L, ...], leading dim over 'stage'.
    hidden: [B, ...] activations entering the first block, batch over 'data'.
    aux: pytree of side inputs, each leaf with the batch B as leading dim (or None).
    num_stages: S, the size of the mesh's 'stage' axis.
    num_micro_batches: M.
    mesh: the (stage, data, tensor) mesh with Auto axis types.
    block_specs: PartitionSpecs of `blocks` (e.g. `shardings.param_specs(...)['blocks']`);
      a leaf with a non-leading dim over 'data' (FSDP) then enters sharded, is gathered in
      the manual region and its gradient reduce-scattered, once per step. Without them
      every leaf is taken as `P('stage')`: jit gathers FSDP leaves on entry and their
      gradient is all-reduced (still once per step) then sliced.
    gather_dtype: gather the FSDP leaves in this narrower dtype (bf16 with
      distribute_low_prec_param): half the all-gather bytes. The gathered weights are
      widened back at once, so the loops and the gradient (reduce-scattered in the
      weights' own dtype) are as without it; the block sees the same bf16 values when it
      casts to bf16 itself. None: gather in the weights' dtype.
    run_layers: `run_layers(blocks, hidden, aux) -> hidden` running a stage's blocks
      (`passes.recompute.layer_runner`, for per-layer recomputation); default: `block_fn`
      over them by `scan_blocks`.
  Returns:
    [B, ...] the output of the last block.

  Example:
    >>> h = run_stages(layers.block, params['blocks'], h, aux, num_stages=2,
    ...                num_micro_batches=4, mesh=mesh)
  """
  S, M = num_stages, num_micro_batches
  if STAGE not in mesh.axis_names or mesh.shape[STAGE] != S:
    raise ValueError(f"run_stages: num_stages({S}) must equal the size of the mesh's '{STAGE}' "
                     f"axis; mesh has {dict(mesh.shape)}.")
  leaves = jax.tree.leaves(blocks)
  if not leaves:
    raise ValueError("run_stages: `blocks` has no arrays.")
  L, B = leaves[0].shape[0], hidden.shape[0]
  dp = mesh.shape[DATA] if DATA in mesh.axis_names else 1
  reason = check_pipeline(L, B, S, M, dp)
  if reason:
    raise ValueError(f"run_stages: {reason}.")
  for path, a in jax.tree_util.tree_leaves_with_path(aux):
    if jnp.ndim(a) == 0 or a.shape[0] != B:
      raise ValueError(f"run_stages: every aux leaf needs the batch ({B}) as leading dim, got "
                       f"aux{jax.tree_util.keystr(path)} of shape {jnp.shape(a)}; broadcast it.")
  manual = (STAGE, DATA) if DATA in mesh.axis_names else (STAGE,)
  batch_axis = DATA if DATA in manual else None
  fsdp = _fsdp_dims(blocks, block_specs)
  bspecs = jax.tree.map(
      lambda x, d: P(STAGE, *[DATA if i == d else None for i in range(1, x.ndim)]), blocks, fsdp)
  # The output leaves batch-sharded over 'stage' as well when it divides, so that `post`
  # (an LM head, the loss) is not computed S times over.
  scatter = (B // dp) % S == 0
  out_spec = P((batch_axis, STAGE) if batch_axis else STAGE) if scatter else P(batch_axis)
  run_layers = run_layers or functools.partial(scan_blocks, block_fn)
  body = functools.partial(_pipeline_body, run_layers, fsdp, S, M, manual, scatter, gather_dtype)
  return jax.shard_map(body, mesh=mesh, axis_names=set(manual),
                       in_specs=(bspecs, P(batch_axis), jax.tree.map(lambda _: P(batch_axis), aux)),
                       out_specs=out_spec)(blocks, hidden, aux)


def _gather_narrow(w, axis: int, dtype):
  """All-gather of `w` over 'data' sent in `dtype`, returned in w's dtype; the gradient is
  reduce-scattered in w's dtype (a bf16 reduction would also abort the CPU compiler here)."""
  @jax.custom_vjp
  def gather(v):
    return lax.all_gather(v.astype(dtype), DATA, axis=axis, tiled=True).astype(v.dtype)

  def fwd(v):
    return gather(v), None

  def bwd(_, ct):
    return (lax.psum_scatter(ct, DATA, scatter_dimension=axis, tiled=True),)

  gather.defvjp(fwd, bwd)
  return gather(w)


def gather_stage_weight(w, d, gather_dtype):
  """A stage's weight whole: all-gathered over 'data' along its FSDP dim `d` (None: not
  sharded), in `gather_dtype` where that is narrower than the weight's own dtype."""
  if d is None:
    return w
  if gather_dtype is not None and jnp.finfo(gather_dtype).bits < jnp.finfo(w.dtype).bits:
    return _gather_narrow(w, d, gather_dtype)
  return _in_f32(lambda v: lax.all_gather(v, DATA, axis=d, tiled=True), w)


def _pipeline_body(run_layers, fsdp, S, M, manual, scatter, gather_dtype, blocks, hidden, aux):
  """Per (stage, data shard): blocks [L/S, ...], hidden [B/dp, ...], aux leaves [B/dp, ...].

  Returns the last stage's output [B/dp, ...], or with `scatter` this stage's slice of it
  [B/dp/S, ...].
  """
  s = lax.axis_index(STAGE)
  # Gathers and casts outside the loops: their transposes are the once-per-step gradient
  # reductions (reduce-scatter for FSDP leaves, psum over 'data' for the others).
  blocks = jax.tree.map(lambda w, d: gather_stage_weight(w, d, gather_dtype), blocks, fsdp)
  blocks = jax.tree.map(lambda w: _vary(w, manual), blocks)
  split = lambda x: _vary(x.reshape((M, x.shape[0] // M) + x.shape[1:]), manual)
  xs = split(hidden)                       # [M, mb, ...]
  aux = jax.tree.map(split, aux)           # leaves [M, mb, ...]
  def stage(x, a):
    return run_layers(blocks, x, a)

  def tick(carry, t):
    state, out = carry
    # Stage s works on micro-batch t - s; outside [0, M) it computes on filler (the bubble).
    x = jnp.where(s == 0, lax.dynamic_index_in_dim(xs, jnp.minimum(t, M - 1), keepdims=False), state)
    i = jnp.clip(t - s, 0, M - 1)
    y = stage(x, jax.tree.map(lambda v: lax.dynamic_index_in_dim(v, i, keepdims=False), aux))
    # The last stage finishes micro-batch t - (S-1); earlier ticks write slot 0, overwritten later.
    out = lax.dynamic_update_index_in_dim(out, y, jnp.clip(t - (S - 1), 0, M - 1), 0)
    state = lax.ppermute(y, STAGE, [(k, k + 1) for k in range(S - 1)]) if S > 1 else y
    return (state, out), None

  (_, out), _ = lax.scan(tick, (_zeros_like(xs[0]), _zeros_like(xs)), jnp.arange(M + S - 1))
  out = out.reshape((out.shape[0] * out.shape[1],) + out.shape[2:])  # [B/dp, ...]
  last = lambda v: jnp.where(s == S - 1, v, jnp.zeros_like(v))
  if scatter:  # only the last stage holds the result: a sum over 'stage' moves it
    return _in_f32(lambda v: lax.psum_scatter(last(v), STAGE, scatter_dimension=0, tiled=True), out)
  return _in_f32(lambda v: lax.psum(last(v), STAGE), out)


def pipeline_loss(layers: Layers, block_fn: Callable, params: PyTree, batch: PyTree, *,
                  num_stages: int, num_micro_batches: int, mesh: Mesh,
                  block_specs: PyTree | None = None, gather_dtype=None) -> jax.Array:
  """The program's loss with its block stack pipelined; equals `Program.loss`.

  Args:
    layers: the program's `Layers`.
    block_fn: the block to run (e.g. `layers.block` wrapped in `jax.checkpoint`).
    params: `{'pre', 'blocks', 'post'}`, 'blocks' placed by `stage_param_specs`.
    batch: the batch, leading dim over 'data'.
    num_stages, num_micro_batches, mesh, block_specs, gather_dtype: as in `run_stages`.
  Returns:
    The scalar loss; `post` runs once on the whole batch.

  Example:
    >>> loss, grads = jax.jit(jax.value_and_grad(functools.partial(
    ...     pipeline_loss, layers, layers.block, num_stages=2, num_micro_batches=4, mesh=mesh)))(
    ...     params, batch)
  """
  hidden, aux = layers.pre(params[PRE], batch)
  hidden = run_stages(block_fn, params[BLOCKS], hidden, aux, num_stages=num_stages,
                      num_micro_batches=num_micro_batches, mesh=mesh, block_specs=block_specs,
                      gather_dtype=gather_dtype)
  return layers.post(params[POST], hidden, aux, batch)
