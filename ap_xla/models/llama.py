"""A Llama-style decoder written in flax linen, exposed as a `Program` with its block stack.

Used by the demo, the benchmarks, the notebooks and `ap-xla plan` presets. The block is an
ordinary flax module; its weights are stacked on a leading axis by a vmapped init, and the
program runs them with `lax.scan` (see `passes.program.Layers`). Attention is the fused
kernel the bridge lowers torch's sdpa to (`bridge.attention`): cuDNN flash attention on
GPUs, chunked XLA attention elsewhere, O(seq) saved state either way.
"""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from bridge.attention import dot_product_attention
from ap_xla.models.decoder import decoder_layers, decoder_program, init_stack, token_batch
from ap_xla.models.fused import rms_norm, swiglu
from passes.program import Layers, Program


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  vocab: int = 256
  dim: int = 64
  layers: int = 4
  heads: int = 4
  kv_heads: int | None = None
  ffn: int | None = None
  seq: int = 32
  rope_theta: float = 10000.0

  @property
  def head_dim(self) -> int:
    return self.dim // self.heads

  @property
  def ffn_dim(self) -> int:
    return self.ffn or 4 * self.dim

  @property
  def num_params(self) -> int:
    kv = (self.kv_heads or self.heads) * self.head_dim
    block = self.dim * (self.dim * 2 + kv * 2) + 3 * self.dim * self.ffn_dim + 2 * self.dim
    return self.layers * block + 2 * self.vocab * self.dim + self.dim


class RMSNorm(nn.Module):
  eps: float = 1e-6

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), jnp.float32)
    # (x / rms) in float32, cast back, times the scale; the backward keeps x and 1/rms alone
    return rms_norm(x, scale, self.eps)


def rope_tables(seq: int, head_dim: int, theta: float):
  inv = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  ang = jnp.arange(seq, dtype=jnp.float32)[:, None] * inv[None, :]  # [T, Dh/2]
  return jnp.cos(ang), jnp.sin(ang)


def apply_rope(x, cos, sin):
  # x: [B, T, H, Dh]; cos/sin: [B, T, Dh/2]
  x1, x2 = jnp.split(x, 2, axis=-1)
  c, s = cos[:, :, None, :].astype(x.dtype), sin[:, :, None, :].astype(x.dtype)
  return jnp.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1)


class Block(nn.Module):
  """Pre-norm attention + SwiGLU MLP, Megatron-friendly (no names are relied on)."""
  cfg: LlamaConfig

  @nn.compact
  def __call__(self, h, aux):
    c = self.cfg
    kvh = c.kv_heads or c.heads
    dense = lambda n, name: nn.Dense(n, use_bias=False, name=name, param_dtype=jnp.float32,
                                     dtype=h.dtype)
    x = RMSNorm(name="attn_norm")(h)
    b, t, _ = x.shape
    q = dense(c.heads * c.head_dim, "q")(x).reshape(b, t, c.heads, c.head_dim)
    k = dense(kvh * c.head_dim, "k")(x).reshape(b, t, kvh, c.head_dim)
    v = dense(kvh * c.head_dim, "v")(x).reshape(b, t, kvh, c.head_dim)
    q, k = apply_rope(q, aux["cos"], aux["sin"]), apply_rope(k, aux["cos"], aux["sin"])
    # Fused causal attention (grouped-query when kv_heads < heads): O(t) saved state.
    o = dot_product_attention(q, k, v, is_causal=True).reshape(b, t, c.heads * c.head_dim)
    h = h + dense(c.dim, "o")(o)
    x = RMSNorm(name="mlp_norm")(h)
    g = dense(c.ffn_dim, "gate")(x)
    u = dense(c.ffn_dim, "up")(x)
    return h + dense(c.dim, "down")(swiglu(g, u))


class Embed(nn.Module):
  cfg: LlamaConfig

  @nn.compact
  def __call__(self, tokens):
    return nn.Embed(self.cfg.vocab, self.cfg.dim, name="tok", param_dtype=jnp.float32)(tokens)


class Head(nn.Module):
  cfg: LlamaConfig

  @nn.compact
  def __call__(self, h):
    h = RMSNorm(name="norm")(h)
    return nn.Dense(self.cfg.vocab, use_bias=False, name="lm_head", param_dtype=jnp.float32,
                    dtype=h.dtype)(h)


def llama_layers(cfg: LlamaConfig) -> Layers:
  def rope(tokens):
    cos, sin = rope_tables(tokens.shape[1], cfg.head_dim, cfg.rope_theta)
    b = tokens.shape[0]
    return {"cos": jnp.broadcast_to(cos, (b,) + cos.shape), "sin": jnp.broadcast_to(sin, (b,) + sin.shape)}

  return decoder_layers(Embed(cfg), Block(cfg), Head(cfg), rope)


def init_params(cfg: LlamaConfig, key, abstract: bool = False):
  """Initial `{'pre','blocks','post'}` params; `abstract=True` gives shapes only."""
  cos, sin = rope_tables(cfg.seq, cfg.head_dim, cfg.rope_theta)
  return init_stack(Embed(cfg), Block(cfg), Head(cfg), seq=cfg.seq, dim=cfg.dim, layers=cfg.layers, key=key,
                    aux={"cos": cos[None], "sin": sin[None]}, abstract=abstract)


def synthetic_batch(cfg: LlamaConfig, batch: int, key, abstract: bool = False):
  return token_batch(cfg.vocab, cfg.seq, batch, key, abstract)


def llama_program(cfg: LlamaConfig, batch: int, optimizer=None, key=None, abstract: bool = False,
                  name: str = "llama") -> Program:
  """A Llama-style training program; `abstract=True` allocates nothing (for planning)."""
  key = jax.random.PRNGKey(0) if key is None else key
  k1, k2 = jax.random.split(key)
  return decoder_program(init_params(cfg, k1, abstract), synthetic_batch(cfg, batch, k2, abstract),
                         llama_layers(cfg), optimizer, name)
