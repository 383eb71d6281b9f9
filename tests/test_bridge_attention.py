"""Fused attention (bridge.attention) against torch's scaled_dot_product_attention, and its memory.

Equivalence: output and the gradients of a weighted sum of it with respect to q, k, v (and a
float mask), fp32 with matmul precision 'highest', within 2e-6 absolute (the values are O(1);
XLA and torch sum in different orders). Memory: what the backward keeps, read from XLA's
memory analysis of the compiled forward that returns it.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bridge import attention

TOL = 2e-6
B, N, T, E = 2, 4, 16, 8


def _rand(*shape, seed):
  return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _padding_mask():
  """Causal + left padding (row 1 keeps 2 tokens): query rows that see no key at all."""
  keep = torch.ones(B, T, dtype=torch.bool)
  keep[1, :T - 2] = False
  causal = torch.tril(torch.ones(T, T, dtype=torch.bool))
  return causal[None, None] & keep[:, None, None, :]


def _float_mask():
  """Random additive mask with a row of -inf (fully masked) and a row of finfo.min (not masked)."""
  m = _rand(B, 1, T, T, seed=7)
  m[0, 0, 3] = -math.inf
  m[1, 0, 5] = torch.finfo(torch.float32).min
  m[1, 0, 9, ::2] = -math.inf
  return m


CASES = {
    "causal": dict(is_causal=True),
    "padding_fully_masked_rows": dict(attn_mask=_padding_mask()),
    "float_mask_with_inf_rows": dict(attn_mask=_float_mask()),
    "gqa_causal": dict(is_causal=True, enable_gqa=True, kv_heads=2),
    "gqa_padding": dict(attn_mask=_padding_mask(), enable_gqa=True, kv_heads=1),
    "scale_2d_mask": dict(attn_mask=torch.rand(T, T, generator=torch.Generator().manual_seed(3)) > 0.3,
                          scale=0.3),
    "value_dim_differs": dict(is_causal=True, value_dim=12),
    "no_heads": dict(is_causal=True, no_heads=True),
}


def _inputs(kv_heads=N, value_dim=E, no_heads=False):
  heads = () if no_heads else (N,)
  kv = () if no_heads else (kv_heads,)
  return (_rand(B, *heads, T, E, seed=0), _rand(B, *kv, T, E, seed=1), _rand(B, *kv, T, value_dim, seed=2))


def _torch_reference(q, k, v, w, attn_mask, **kw):
  q, k, v = (x.clone().requires_grad_() for x in (q, k, v))
  mask = attn_mask
  if mask is not None and mask.is_floating_point():
    mask = mask.clone().requires_grad_()
  out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, **kw)
  (out * w).sum().backward()
  grads = [q.grad, k.grad, v.grad] + ([mask.grad] if mask is not None and mask.is_floating_point() else [])
  return out.detach().numpy(), [g.numpy() for g in grads]


@pytest.mark.parametrize("chunk", [None, 5], ids=["one_chunk", "chunks_of_5"])
@pytest.mark.parametrize("case", list(CASES))
def test_sdpa_matches_torch(case, chunk, monkeypatch):
  if chunk is not None:  # 16 query rows: 4 chunks, the last padded
    monkeypatch.setattr(attention, "QUERY_CHUNK", chunk)
  kw = dict(CASES[case])
  q, k, v = _inputs(kw.pop("kv_heads", N), kw.pop("value_dim", E), kw.pop("no_heads", False))
  mask = kw.pop("attn_mask", None)
  w = _rand(*q.shape[:-1], v.shape[-1], seed=5)
  want, want_grads = _torch_reference(q, k, v, w, mask, **kw)

  float_mask = mask is not None and mask.is_floating_point()
  args = [jnp.asarray(x.numpy()) for x in (q, k, v)] + ([jnp.asarray(mask.numpy())] if float_mask else [])
  fixed_mask = None if mask is None or float_mask else jnp.asarray(mask.numpy())

  def f(q, k, v, m=fixed_mask):
    return attention.sdpa(q, k, v, m, **kw)

  weights = jnp.asarray(w.numpy())
  out, grads = jax.jit(jax.value_and_grad(lambda *a: (jnp.sum(f(*a) * weights), f(*a)),
                                          argnums=tuple(range(len(args))), has_aux=True))(*args)
  out = out[1]
  np.testing.assert_allclose(np.asarray(out), want, atol=TOL, rtol=0)
  for name, g, g_want in zip(["q", "k", "v", "mask"], grads, want_grads):
    assert np.isfinite(np.asarray(g)).all(), name
    np.testing.assert_allclose(np.asarray(g), g_want, atol=TOL, rtol=0, err_msg=f"d{name}")
  if mask is not None and not float_mask and case.startswith("padding"):
    assert not np.asarray(out)[1, :, : T - 2].any()  # the fully masked rows: zeros, as torch


def test_bf16_inputs_follow_fp32_torch():
  """Mixed precision: bf16 q, k, v (scores and softmax in fp32 inside); within bf16 rounding."""
  q, k, v = _inputs(kv_heads=2)
  mask = _padding_mask()
  want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True).numpy()
  to = lambda x: jnp.asarray(x.numpy(), jnp.bfloat16)
  out = jax.jit(lambda *a: attention.sdpa(*a, enable_gqa=True))(to(q), to(k), to(v), jnp.asarray(mask.numpy()))
  assert out.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(out, np.float32), want, atol=3e-2, rtol=0)


def test_mixed_dtypes_run_in_the_narrowest():
  """A bf16 plan: fp32 rotary tables promote q and k to fp32 while v is bf16 (the projection's
  dtype). Torch's autocast runs sdpa in bf16; so does the kernel, within bf16 rounding."""
  q, k, v = _inputs(kv_heads=2)
  want = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True).numpy()
  f32 = lambda x: jnp.asarray(x.numpy())
  bf16 = lambda x: jnp.asarray(x.numpy(), jnp.bfloat16)
  out = jax.jit(lambda *a: attention.sdpa(*a, is_causal=True, enable_gqa=True))(f32(q), f32(k), bf16(v))
  assert out.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(out, np.float32), want, atol=3e-2, rtol=0)


def test_sdpa_refuses_dropout_and_other_ranks():
  q = jnp.zeros((2, 4, 8, 8))
  with pytest.raises(ValueError, match="dropout_p=0.1 is random"):
    attention.sdpa(q, q, q, dropout_p=0.1)
  with pytest.raises(ValueError, match="ranks 5"):
    attention.sdpa(q[None], q[None], q[None])
  with pytest.raises(ValueError, match="enable_gqa=True"):
    attention.sdpa(q, q[:, :2], q[:, :2])
  with pytest.raises(ValueError, match="implementation must be"):
    attention.dot_product_attention(q, q, q, implementation="flash")


# -- memory: the saved state is O(s) ---------------------------------------------------------

def _materialised(q, k, v):
  """Attention as einsum -> softmax -> einsum (what the bridge ran before)."""
  s = jnp.einsum("btnh,bsnh->bnts", q, k) / math.sqrt(q.shape[-1])
  causal = jnp.tril(jnp.ones((q.shape[1], k.shape[1]), bool))
  p = jax.nn.softmax(jnp.where(causal, s, -1e30), axis=-1)
  return jnp.einsum("bnts,bsnh->btnh", p, v)


def _fused(q, k, v):
  return attention.dot_product_attention(q, k, v, is_causal=True, query_chunk=128)


def _saved_bytes(f, *args) -> int:
  """Bytes the backward of `f` keeps: XLA's output size of the forward returning its vjp residuals."""
  compiled = jax.jit(lambda *a: jax.vjp(f, *a)[1]).lower(*args).compile()
  return compiled.memory_analysis().output_size_in_bytes


def _grad_temp_bytes(f, *args) -> int:
  grad = jax.grad(lambda *a: jnp.sum(f(*a)), argnums=(0, 1, 2))
  return jax.jit(grad).lower(*args).compile().memory_analysis().temp_size_in_bytes


def test_saved_state_per_call_is_linear_in_sequence_length():
  heads, dim = 4, 16
  saved, temp = {}, {}
  for s in (512, 1024):
    q = jax.ShapeDtypeStruct((1, s, heads, dim), jnp.float32)
    for name, f in (("fused", _fused), ("materialised", _materialised)):
      saved[name, s] = _saved_bytes(f, q, q, q)
      temp[name, s] = _grad_temp_bytes(f, q, q, q)
    qkv = 3 * s * heads * dim * 4
    scores = heads * s * s * 4
    # The fused call keeps q, k and v (plus the chunk offsets); the materialised one keeps
    # the probabilities and the mask on top: more than one [N, T, S] score array.
    assert qkv <= saved["fused", s] <= qkv + 1024, (s, saved["fused", s])
    assert saved["materialised", s] > scores
  assert saved["fused", 1024] / saved["fused", 512] < 2.01
  assert saved["materialised", 1024] / saved["materialised", 512] > 3.5
  # Temporaries of the whole forward + backward: a few chunks' scores at a time, against
  # several whole score arrays.
  assert temp["fused", 1024] / temp["fused", 512] < 2.1
  assert temp["fused", 1024] < scores < temp["materialised", 1024] / 2


def _block_saved_bytes(block, blocks, hidden, aux) -> int:
  """What the backward of one block keeps (its weights, input and side inputs included)."""
  abstract = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype)
  one = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype), blocks)
  return _saved_bytes(block, one, *jax.tree.map(abstract, (hidden, aux)))


def test_flax_llama_saves_linear_state_per_layer_without_recomputation():
  from ap_xla.models.llama import LlamaConfig, llama_program
  per_layer = {}
  for seq in (256, 512):
    cfg = LlamaConfig(vocab=64, dim=32, layers=2, heads=4, kv_heads=2, ffn=64, seq=seq)
    prog = llama_program(cfg, 1, abstract=True)
    hidden, aux = jax.eval_shape(prog.layers.pre, prog.params["pre"], prog.batch)
    per_layer[seq] = _block_saved_bytes(prog.layers.block, prog.params["blocks"], hidden, aux)
    assert per_layer[seq] < cfg.heads * seq * seq * 4  # less than one [N, T, T] score array
  assert per_layer[512] / per_layer[256] < 2.05
  # The search's 'dots' recomputation (passes/step.py) saves the dots without batch dimensions:
  # the projections, not the attention's (batched) score dots, which its backward recomputes.
  dots = jax.checkpoint(prog.layers.block, policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable)
  assert _block_saved_bytes(dots, prog.params["blocks"], hidden, aux) < cfg.heads * 512 * 512 * 4


def test_bridged_hf_llama_in_sdpa_attention_saves_linear_state_per_layer():
  """transformers' default attention ('sdpa') is kept whole through export and fused."""
  from bridge import testing
  from bridge.program import bridge_model
  import optax
  seq = 512
  model = testing.tiny_causal_lm("llama", attn="sdpa", layers=2, hidden=32, heads=4)
  bridged = bridge_model(model, testing.lm_batch(1, seq, pad=False), optax.sgd(0.1))
  ops = [str(n.target) for n in bridged.split.block_nodes]
  assert ops.count("aten.scaled_dot_product_attention.default") == 1
  assert any("grouped-query attention" in line for line in bridged.structure_log)
  prog = bridged.program
  hidden, aux = jax.eval_shape(prog.layers.pre, prog.params["pre"], prog.batch)
  per_layer = _block_saved_bytes(prog.layers.block, prog.params["blocks"], hidden, aux)
  assert per_layer < 4 * seq * seq * 4, per_layer  # less than one [N, T, T] score array
