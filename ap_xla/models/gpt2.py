"""A GPT-2 style decoder written in flax linen, exposed as a `Program` with its block stack.

The same Layers form as `llama.py`: embeddings (token + learned position) -> scan over
pre-LayerNorm blocks (fused-qkv attention with biases, tanh-GELU MLP) -> final LayerNorm and
the vocabulary projection. Parameter names follow Hugging Face's GPT2 (`c_attn`, `c_proj`,
`c_fc`, `ln_1`, ...; the MLP's `c_proj` is `mlp_proj` here, as one block holds both), so its
weights copy over one to one (HF's Conv1D stores kernels as [in, out] like flax's Dense).

One difference from Hugging Face: the output projection `lm_head` is a parameter of its own,
not tied to the token embedding, because a Layers program keeps the 'pre' and 'post'
parameters apart. It adds vocab x dim parameters (80M, 5% of gpt2-xl) to what is planned.
"""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from ap_xla.models.decoder import decoder_layers, decoder_program, init_stack, token_batch
from bridge.attention import dot_product_attention
from passes.program import Layers, Program


@dataclasses.dataclass(frozen=True)
class GPT2Config:
  """Sizes of a GPT-2 style model (Hugging Face names: vocab_size, n_embd, n_layer, n_head, n_inner)."""
  vocab: int = 256
  dim: int = 64
  layers: int = 4
  heads: int = 4
  ffn: int | None = None
  seq: int = 32
  max_positions: int = 1024
  eps: float = 1e-5

  def __post_init__(self):
    if self.dim % self.heads:
      raise ValueError(f"GPT2Config: dim={self.dim} must be divisible by heads={self.heads}.")
    if self.seq > self.max_positions:
      raise ValueError(f"GPT2Config: seq={self.seq} exceeds max_positions={self.max_positions} (the "
                       f"learned position table); use a sequence length of at most {self.max_positions}.")

  @property
  def head_dim(self) -> int:
    return self.dim // self.heads

  @property
  def ffn_dim(self) -> int:
    return self.ffn or 4 * self.dim

  @property
  def num_params(self) -> int:
    d, f = self.dim, self.ffn_dim
    block = 4 * d + (3 * d * d + 3 * d) + (d * d + d) + (d * f + f) + (f * d + d)
    return self.layers * block + self.vocab * d + self.max_positions * d + 2 * d + self.vocab * d


def _dense(n: int, name: str, dtype):
  return nn.Dense(n, name=name, param_dtype=jnp.float32, dtype=dtype,
                  kernel_init=nn.initializers.normal(0.02))


class Block(nn.Module):
  """Pre-LayerNorm causal self-attention and MLP, as in Hugging Face's GPT2Block."""
  cfg: GPT2Config

  @nn.compact
  def __call__(self, h, aux):
    c = self.cfg
    ln = lambda name: nn.LayerNorm(epsilon=c.eps, name=name, param_dtype=jnp.float32, dtype=h.dtype)
    x = ln("ln_1")(h)
    b, t, _ = x.shape
    qkv = _dense(3 * c.dim, "c_attn", h.dtype)(x)
    q, k, v = (y.reshape(b, t, c.heads, c.head_dim) for y in jnp.split(qkv, 3, axis=-1))
    o = dot_product_attention(q, k, v, is_causal=True).reshape(b, t, c.dim)  # fused, as llama.py
    h = h + _dense(c.dim, "c_proj", h.dtype)(o)
    x = ln("ln_2")(h)
    x = jax.nn.gelu(_dense(c.ffn_dim, "c_fc", h.dtype)(x), approximate=True)  # HF's gelu_new
    return h + _dense(c.dim, "mlp_proj", h.dtype)(x)


class Embed(nn.Module):
  cfg: GPT2Config

  @nn.compact
  def __call__(self, tokens):
    c = self.cfg
    init = nn.initializers.normal(0.02)
    wte = nn.Embed(c.vocab, c.dim, name="wte", param_dtype=jnp.float32, embedding_init=init)
    wpe = nn.Embed(c.max_positions, c.dim, name="wpe", param_dtype=jnp.float32, embedding_init=init)
    return wte(tokens) + wpe(jnp.arange(tokens.shape[1]))[None]


class Head(nn.Module):
  cfg: GPT2Config

  @nn.compact
  def __call__(self, h):
    h = nn.LayerNorm(epsilon=self.cfg.eps, name="ln_f", param_dtype=jnp.float32, dtype=h.dtype)(h)
    return nn.Dense(self.cfg.vocab, use_bias=False, name="lm_head", param_dtype=jnp.float32,
                    dtype=h.dtype, kernel_init=nn.initializers.normal(0.02))(h)


def gpt2_layers(cfg: GPT2Config) -> Layers:
  return decoder_layers(Embed(cfg), Block(cfg), Head(cfg))


def init_params(cfg: GPT2Config, key, abstract: bool = False):
  """Initial `{'pre','blocks','post'}` params; `abstract=True` gives shapes only."""
  return init_stack(Embed(cfg), Block(cfg), Head(cfg), seq=cfg.seq, dim=cfg.dim, layers=cfg.layers, key=key,
                    abstract=abstract)


def synthetic_batch(cfg: GPT2Config, batch: int, key, abstract: bool = False):
  return token_batch(cfg.vocab, cfg.seq, batch, key, abstract)


def gpt2_program(cfg: GPT2Config, batch: int, optimizer=None, key=None, abstract: bool = False,
                 name: str = "gpt2") -> Program:
  """A GPT-2 style training program; `abstract=True` allocates nothing (for planning).

  Example:
    >>> prog = gpt2_program(GPT2Config(vocab=50257, dim=1600, layers=48, heads=25, seq=1024), 32,
    ...                     abstract=True)
  """
  key = jax.random.PRNGKey(0) if key is None else key
  k1, k2 = jax.random.split(key)
  return decoder_program(init_params(cfg, k1, abstract), synthetic_batch(cfg, batch, k2, abstract),
                         gpt2_layers(cfg), optimizer, name)


def params_from_hf(state_dict, cfg: GPT2Config):
  """Our parameter tree from a Hugging Face GPT2LMHeadModel state dict (numpy arrays).

  `lm_head` gets the transposed token embedding, as Hugging Face ties them.

  Example:
    >>> sd = {k: v.numpy() for k, v in hf_model.state_dict().items()}
    >>> params = params_from_hf(sd, cfg)
  """
  sd = {k.removeprefix("transformer."): v for k, v in state_dict.items()}
  missing = [k for k in ("wte.weight", "wpe.weight", "ln_f.weight", "h.0.attn.c_attn.weight") if k not in sd]
  if missing:
    raise ValueError(f"params_from_hf: the state dict lacks {missing}; pass the state_dict() of a "
                     "transformers GPT2Model or GPT2LMHeadModel, converted to numpy.")
  stack = lambda name: jnp.stack([jnp.asarray(sd[f"h.{i}.{name}"]) for i in range(cfg.layers)])
  pair = lambda a, b: {a[0]: stack(f"{b}.weight"), a[1]: stack(f"{b}.bias")}
  blocks = {"ln_1": pair(("scale", "bias"), "ln_1"), "ln_2": pair(("scale", "bias"), "ln_2"),
            "c_attn": pair(("kernel", "bias"), "attn.c_attn"), "c_proj": pair(("kernel", "bias"), "attn.c_proj"),
            "c_fc": pair(("kernel", "bias"), "mlp.c_fc"), "mlp_proj": pair(("kernel", "bias"), "mlp.c_proj")}
  wte = jnp.asarray(sd["wte.weight"])
  return {"pre": {"wte": {"embedding": wte}, "wpe": {"embedding": jnp.asarray(sd["wpe.weight"])}},
          "blocks": blocks,
          "post": {"ln_f": {"scale": jnp.asarray(sd["ln_f.weight"]), "bias": jnp.asarray(sd["ln_f.bias"])},
                   "lm_head": {"kernel": wte.T}}}
