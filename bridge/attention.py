"""Fused attention: torch's `scaled_dot_product_attention` on `jax.nn.dot_product_attention`.

`dot_product_attention` (JAX layout, [batch, seq, heads, head_dim]) is the kernel of both
the bridged torch models (`sdpa`, the lowering of `aten.scaled_dot_product_attention`) and
the flax models of `ap_xla.models`. What its backward keeps from the forward is O(s) per
call, on every backend:

- GPU, bf16/fp16 inputs, no additive float bias: `jax.nn.dot_product_attention(...,
  implementation='cudnn')`, cuDNN's flash attention. It saves q, k, v, the output and the
  softmax statistics ([B, N, T] floats); scores never reach device memory. "GPU" is the
  platform the program is traced for (`passes.gpu_target.target_platform`): jax's default
  backend, or the GPU a search compiles for without a device (`ap-xla plan --hardware h100`).
- otherwise (CPU, fp32, float biases, inside a `shard_map`'s manual axes: `_in_manual_region`):
  `implementation='xla'`, which materialises the
  scores [B, N, T, S] of what it is given. It runs on chunks of `query_chunk` query rows
  (scores of one chunk, [B, N, chunk, S], at a time), each under `jax.checkpoint` saving
  nothing: the backward recomputes a chunk's scores from q, k and v (as flash attention
  does), so the saved state is q, k, v; the mask and bias are inputs of the call, not
  state it adds. Peak temporary memory is one chunk's scores and probabilities.

Rows that no key may attend to (every mask entry False, or every bias entry -inf) come out
as zeros with zero gradients, as torch returns them; jax's kernels alone would average the
values of all keys there.
"""
from __future__ import annotations

import functools
import logging
import math

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from passes.gpu_target import target_platform
from passes.hlo_stats import ATTENTION_SCOPE, CAUSAL_SUFFIX
from passes.recompute import ATTENTION_OUT

log = logging.getLogger("bridge")

# Query rows per chunk of the XLA path: scores of [B, N, QUERY_CHUNK, S] at a time.
QUERY_CHUNK = 512

_CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)


def dot_product_attention(query, key, value, *, mask=None, bias=None, is_causal: bool = False,
                          scale: float | None = None, query_chunk: int | None = None,
                          implementation: str | None = None):
  """softmax(q k^T * scale + bias, masked) v with torch's treatment of fully masked rows.

  Args:
    query: [B, T, N, H].
    key, value: [B, S, K, H] with N a multiple of K (grouped-query attention when K < N).
    mask: optional boolean, True where a query may attend to a key; broadcastable to
      [B, N, T, S] (rank 4, or lower ranks aligned on the right as in numpy).
    bias: optional float added to the scaled scores, broadcastable like `mask`; -inf
      entries are masked out.
    is_causal: query i attends to keys j <= i (top-left aligned, as torch's is_causal).
    scale: multiplies q k^T; default 1 / sqrt(H).
    query_chunk: query rows per chunk on the XLA path (the temporary scores' extent);
      default `QUERY_CHUNK`.
    implementation: 'cudnn', 'xla', or None to choose by backend and dtype (see the module
      docstring).

  Returns:
    [B, T, N, H] in the dtype of `query`.

  Raises:
    ValueError: shapes that do not fit, or an unknown implementation.

  Example:
    >>> out = dot_product_attention(q, k, v, is_causal=True)   # q [B,T,N,H], k/v [B,S,K,H]
  """
  if query.ndim != 4 or key.ndim != 4 or value.shape != key.shape:
    raise ValueError(f"dot_product_attention takes query [B, T, N, H] and key, value [B, S, K, H] of "
                     f"one shape; got query {query.shape}, key {key.shape}, value {value.shape}.")
  if query.shape[2] % key.shape[2]:
    raise ValueError(f"the query heads ({query.shape[2]}) must be a multiple of the key/value heads "
                     f"({key.shape[2]}).")
  if implementation not in (None, "xla", "cudnn"):
    raise ValueError(f"implementation must be None, 'xla' or 'cudnn', got {implementation!r}.")
  query, key, value = _common_dtype(query, key, value)
  scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else float(scale)
  mask = None if mask is None else _rank4(jnp.asarray(mask), "mask").astype(bool)
  if bias is not None:
    bias = _rank4(jnp.asarray(bias), "bias")
    finite = bias != -jnp.inf  # torch: a -inf entry is masked; jax would compute inf - inf
    mask = finite if mask is None else mask & finite
    bias = jnp.where(finite, bias, jnp.zeros((), bias.dtype))

  if _use_cudnn(query, bias, implementation):
    try:
      out = jax.nn.dot_product_attention(query, key, value, mask=mask, scale=scale,
                                         is_causal=is_causal, implementation="cudnn")
      out = out if mask is None else out * _live_rows(mask, is_causal, 0, query.shape[1], key.shape[1], out.dtype)
      return checkpoint_name(out, ATTENTION_OUT)
    except (NotImplementedError, ValueError, RuntimeError) as e:
      if implementation == "cudnn":
        raise
      log.warning("cuDNN attention is not available for query %s %s (%s); using the XLA path.",
                  query.shape, query.dtype, e)
  # Named for the recomputation policies that keep the fused kernel's output ('selective_op').
  return checkpoint_name(_chunked_xla(query, key, value, mask, bias, is_causal, scale, query_chunk), ATTENTION_OUT)


def _common_dtype(query, key, value):
  """q, k and v in one float dtype: the narrowest of theirs.

  Under a bf16 plan the projections come out in bf16 while rotary embeddings computed from
  fp32 tables promote q and k to fp32; the kernels take one dtype. torch's autocast runs
  sdpa in its lower precision, so the narrowest of the three is the one torch would use.
  """
  dtypes = {x.dtype for x in (query, key, value)}
  if len(dtypes) == 1:
    return query, key, value
  dt = min(dtypes, key=lambda d: (jnp.dtype(d).itemsize, str(d)))
  return query.astype(dt), key.astype(dt), value.astype(dt)


def _rank4(x, name: str):
  if x.ndim > 4:
    raise ValueError(f"attention {name} must have rank <= 4 (broadcastable to [B, N, T, S]), got "
                     f"shape {x.shape}.")
  return x.reshape((1,) * (4 - x.ndim) + x.shape)


def _use_cudnn(query, bias, implementation) -> bool:
  if implementation is not None:
    return implementation == "cudnn"
  # cuDNN's flash attention takes fp16/bf16 only. A float bias may depend on parameters and
  # cuDNN returns its gradient only for some bias shapes: such calls take the XLA path.
  return (target_platform() == "gpu" and query.dtype in _CUDNN_DTYPES and bias is None
          and not _in_manual_region())


def _in_manual_region() -> bool:
  """Whether the trace is inside a `shard_map`'s manual axes (a pipeline stage, the per-data-shard
  gradient accumulation). jax's cuDNN attention is a `custom_partitioning` op, which jax 0.10
  cannot partition there (an assertion on a manual sharding, found compiling for an H100 without
  a device): such calls take the XLA path."""
  return bool(getattr(jax.sharding.get_abstract_mesh(), "manual_axes", ()))


def _causal_and(mask, is_causal: bool, start, rows: int, keys: int):
  """`mask` (rows [start, start + rows) of it) and, if causal, query >= key; [b, n, rows, S]."""
  if not is_causal:
    return mask
  q_pos = start + jnp.arange(rows)[:, None]
  causal = (q_pos >= jnp.arange(keys)[None, :])[None, None]
  return causal if mask is None else mask & causal


def _rows(x, start, size: int, axis: int = 2):
  """Rows [start, start + size) along `axis` of a [b, n, T, S] mask/bias (one row broadcasts
  to all) or of a [b, T, n, h] query (axis 1)."""
  if x is None or x.shape[axis] == 1 or (isinstance(start, int) and start == 0 and size == x.shape[axis]):
    return x
  return jax.lax.dynamic_slice_in_dim(x, start, size, axis=axis)


def _live_rows(mask, is_causal: bool, start, rows: int, keys: int, dtype):
  """1 for the query rows [start, start + rows) that see a key, 0 for fully masked ones: [b, rows, n, 1]."""
  live = _causal_and(mask, is_causal, start, rows, keys).any(axis=-1)  # [b, n, rows]
  return jnp.swapaxes(live, 1, 2)[..., None].astype(dtype)


def _chunked_xla(query, key, value, mask, bias, is_causal, scale, query_chunk):
  """jax.nn.dot_product_attention('xla') over query chunks, each recomputed in the backward.

  Runs under the name scope `passes.hlo_stats.ATTENTION_SCOPE`: a cost model for a GPU target
  planned on CPU devices charges its kernels as the flash attention the GPU runs instead.
  """
  scope = ATTENTION_SCOPE + (CAUSAL_SUFFIX if is_causal else "")
  with jax.named_scope(scope):
    return _chunks(query, key, value, mask, bias, is_causal, scale, query_chunk)


def _chunks(query, key, value, mask, bias, is_causal, scale, query_chunk):
  b, t, n, h = query.shape
  s = key.shape[1]
  chunk = min(t, max(1, int(QUERY_CHUNK if query_chunk is None else query_chunk)))
  num = -(-t // chunk)

  # Saves nothing of a chunk (its backward recomputes the scores); q, k, v, mask and bias
  # are its inputs, invariant over the chunks, so they are saved once, not per chunk.
  def one(start, q, k, v, m, bias_):
    q = _rows(q, start, chunk, axis=1)
    given = m is not None  # a causal mask alone leaves every query row a key
    m = _causal_and(_rows(m, start, chunk), is_causal, start, chunk, s)
    out = jax.nn.dot_product_attention(q, k, v, bias=_rows(bias_, start, chunk), mask=m,
                                       scale=scale, implementation="xla")
    if not given:
      return out
    return out * _live_rows(m, False, 0, chunk, s, out.dtype)  # torch's zeros, not jax's mean

  if num == 1:  # the start is a constant: the recomputation repeats the forward exactly (CSE'd)
    return jax.checkpoint(functools.partial(one, 0))(query, key, value, mask, bias)
  one = jax.checkpoint(one)
  pad = num * chunk - t  # the padded query rows are computed and dropped
  if pad:
    query = jnp.pad(query, ((0, 0), (0, pad), (0, 0), (0, 0)))
    mask = _pad_rows(mask, pad, True)
    bias = _pad_rows(bias, pad, 0)
  starts = jnp.arange(num, dtype=jnp.int32) * chunk
  out = jax.lax.map(lambda start: one(start, query, key, value, mask, bias), starts)
  return jnp.moveaxis(out, 0, 1).reshape(b, num * chunk, n, h)[:, :t]


def _pad_rows(x, pad: int, value):
  if x is None or x.shape[2] == 1:
    return x
  return jnp.pad(x, ((0, 0), (0, 0), (0, pad), (0, 0)), constant_values=value)


def sdpa(query, key, value, attn_mask=None, dropout_p: float = 0.0, is_causal: bool = False, *,
         scale: float | None = None, enable_gqa: bool = False):
  """`aten.scaled_dot_product_attention` on JAX arrays ([..., heads, seq, head_dim], torch's layout).

  Args are torch's: a boolean `attn_mask` is True where attention is allowed, a float one is
  added to the scores; `enable_gqa` lets key/value have fewer heads than the query. Value
  head dims other than the query's are padded to one size (exact: zero columns).

  Raises:
    ValueError: dropout_p != 0 (the bridged program is deterministic), or ranks other than 3 or 4.
  """
  if dropout_p:
    raise ValueError(f"scaled_dot_product_attention with dropout_p={dropout_p} is random; the bridged "
                     "program is deterministic. Set the attention dropout to 0 or call model.eval().")
  if query.ndim not in (3, 4) or key.ndim != query.ndim or value.ndim != query.ndim:
    raise ValueError(f"scaled_dot_product_attention on ranks {query.ndim}, {key.ndim}, {value.ndim}: "
                     "the bridge lowers [batch, seq, dim] or [batch, heads, seq, dim] inputs.")
  no_heads = query.ndim == 3
  mask = bias = None
  if attn_mask is not None:
    attn_mask = jnp.asarray(attn_mask)
    attn_mask = attn_mask.reshape((1,) * (query.ndim - attn_mask.ndim) + attn_mask.shape)
    if no_heads:
      attn_mask = attn_mask[:, None]
    mask, bias = (attn_mask, None) if attn_mask.dtype == jnp.bool_ else (None, attn_mask)
  if no_heads:
    query, key, value = query[:, None], key[:, None], value[:, None]
  b, n = query.shape[:2]
  kh = key.shape[1]
  if not enable_gqa and kh != n and kh != 1:
    raise ValueError(f"scaled_dot_product_attention: key has {kh} heads and query {n}; torch needs "
                     "enable_gqa=True for that.")
  key = jnp.broadcast_to(key, (b,) + key.shape[1:])  # torch broadcasts a batch of 1
  value = jnp.broadcast_to(value, (b,) + value.shape[1:])
  e, ev = query.shape[-1], value.shape[-1]
  scale = 1.0 / math.sqrt(e) if scale is None else scale
  if ev < e:
    value = jnp.pad(value, ((0, 0),) * 3 + ((0, e - ev),))
  elif ev > e:
    query = jnp.pad(query, ((0, 0),) * 3 + ((0, ev - e),))
    key = jnp.pad(key, ((0, 0),) * 3 + ((0, ev - e),))
  t = lambda x: jnp.swapaxes(x, 1, 2)  # [B, N, T, H] <-> [B, T, N, H]
  out = dot_product_attention(t(query), t(key), t(value), mask=mask, bias=bias, is_causal=is_causal,
                              scale=scale)
  out = t(out)[..., :ev]
  return out[:, 0] if no_heads else out
