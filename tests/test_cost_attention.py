"""Fused attention is reported apart by both analyses (the jaxpr's and the compiled HLO's), so a
GPU profile charges it as one flash kernel instead of the CPU's chunked score blocks."""
import jax
import jax.numpy as jnp
import pytest

from bridge.attention import dot_product_attention
from passes import jaxpr_cost
from passes.cost_model import estimate_step_time
from passes.hardware import get_profile
from passes.hlo_stats import analyze_hlo
from passes.plan import Plan

B, T, N, H = 1, 256, 2, 16


def _loss(causal):
  def f(q, k, v, w):
    o = dot_product_attention(q @ w, k, v, is_causal=causal, query_chunk=64)
    return jnp.sum(o * o)
  return jax.grad(f, argnums=(0, 1, 2, 3))


def _args():
  s = jax.ShapeDtypeStruct((B, T, N, H), jnp.float32)
  return s, s, s, jax.ShapeDtypeStruct((H, H), jnp.float32)


@pytest.mark.parametrize("causal", [True, False])
def test_jaxpr_and_hlo_report_the_attention_kernels(causal):
  closed = jax.make_jaxpr(_loss(causal))(*_args())
  c = jaxpr_cost.analyze(closed, [None] * 4)
  att = [c.kernels[i] for i in c.attention]
  assert att and all(x == causal for x in c.attention_causal)
  # the projection q @ w (and its gradients) are outside the scope; the chunks' dots inside:
  # forward q k^T and p v, backward recomputation and gradients, all T x T blocks computed
  att_flops = sum(k[0] * k[2] for k in att)
  assert 3 * 4 * B * N * T * T * H <= att_flops < c.flops
  stats = analyze_hlo(jax.jit(_loss(causal)).lower(*_args()).compile().as_text())
  assert stats.attention and stats.attention_causal == causal
  assert sum(k.flops * k.count for k in stats.attention) < stats.flops


def test_a_gpu_profile_charges_flash_the_cpu_profile_the_chunks():
  stats = analyze_hlo(jax.jit(_loss(True)).lower(*_args()).compile().as_text())
  h100 = get_profile("h100")
  flash = estimate_step_time(stats, Plan(), h100)
  chunked = estimate_step_time(stats, Plan(), get_profile("h100", flash_attention=False))
  att_flops = sum(k.flops * k.count for k in stats.attention)
  assert flash.compute_s < chunked.compute_s
  # the flash kernel: half the FLOPs (causal) at attention_efficiency of the f32 peak
  assert flash.compute_s >= 0.5 * att_flops / h100.attention_rate("f32")
