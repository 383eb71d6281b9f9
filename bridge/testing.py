"""Tiny torch models and batches for the bridge's tests and benchmark (no downloads)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

# Architectures `tiny_causal_lm` builds (transformers 5.x), with their block container, and
# what each adds to the plain Llama-style decoder.
CAUSAL_LMS = {
    "llama": "model.layers",            # RMSNorm, rotary, SwiGLU, grouped-query attention
    "gpt2": "transformer.h",            # Conv1D, learned positions, tied embeddings
    "mistral": "model.layers",          # sliding-window config
    "qwen2": "model.layers",            # q/k/v biases
    "gpt_neox": "gpt_neox.layers",      # parallel residual, partial rotary, fused qkv
    "opt": "model.decoder.layers",      # learned positions with an offset, ReLU, tied embeddings
    "qwen3": "model.layers",            # qk-norm
    "gemma": "model.layers",            # tied embeddings scaled by sqrt(hidden), GeGLU, (1 + w) RMSNorm
    "gemma2": None,                     # soft-capping, alternating sliding/full attention: flat program
    "phi": "model.layers",              # parallel attention/MLP, partial rotary, LayerNorm
    "phi3": "model.layers",             # fused qkv and gate/up projections
    "falcon": "transformer.h",          # parallel attention/MLP, multi-query attention, tied embeddings
    "bloom": "transformer.h",           # ALiBi (eager attention), embedding LayerNorm, tied embeddings
    "stablelm": "model.layers",         # partial rotary (25%), LayerNorm
    "olmo2": "model.layers",            # qk-norm over all heads, norms after attention and MLP
    "starcoder2": "model.layers",       # sliding window, biases, GELU MLP, tied embeddings
    "cohere": "model.layers",           # parallel block, logit scale, bias-free LayerNorm, tied embeddings
    "granite": "model.layers",          # embedding / residual / attention / logit multipliers
    "mixtral": "model.layers",          # mixture of experts (top-2 of 4 experts, grouped matmul)
    "qwen3_moe": "model.layers",        # mixture of experts with qk-norm
    "gpt_oss": None,                    # attention sinks, clamped SwiGLU experts, alternating windows: flat
    "mamba": "backbone.layers",         # selective state space (no attention), tied embeddings
}


# The architectures tests/test_torch_architectures.py trains through ap-xla on every run (the
# others of CAUSAL_LMS: benchmarks/architectures.py), chosen for what people fine-tune and for
# the quirks they bring.
TESTED_CAUSAL_LMS = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi", "phi3", "gpt2",
                     "falcon", "bloom", "starcoder2", "mixtral")

# Architectures whose transformers code has no sdpa path (their own attention code is bridged).
EAGER_ONLY = ("gemma2", "bloom", "gpt_oss", "mamba")


def _configs(tr, vocab, layers, hidden, heads, attn) -> dict:
  common = dict(vocab_size=vocab, num_hidden_layers=layers, num_attention_heads=heads,
                max_position_embeddings=128, attn_implementation=attn)
  llama_like = dict(hidden_size=hidden, intermediate_size=2 * hidden, num_key_value_heads=heads // 2,
                    **common)
  no_dropout = dict(hidden_dropout=0.0, attention_dropout=0.0)
  head_dim = dict(head_dim=hidden // heads)
  gpt2_like = dict(vocab_size=vocab, n_embd=hidden, n_layer=layers, n_head=heads, n_positions=128,
                   attn_implementation=attn, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
  return {
      "llama": (tr.LlamaConfig, tr.LlamaForCausalLM, llama_like),
      "mistral": (tr.MistralConfig, tr.MistralForCausalLM, llama_like),
      "qwen2": (tr.Qwen2Config, tr.Qwen2ForCausalLM, llama_like),
      "gpt2": (tr.GPT2Config, tr.GPT2LMHeadModel, dict(bos_token_id=0, eos_token_id=0, **gpt2_like)),
      "gpt_neox": (tr.GPTNeoXConfig, tr.GPTNeoXForCausalLM,
                   dict(hidden_size=hidden, intermediate_size=2 * hidden, **no_dropout, **common)),
      "opt": (tr.OPTConfig, tr.OPTForCausalLM,
              dict(hidden_size=hidden, ffn_dim=2 * hidden, word_embed_proj_dim=hidden, dropout=0.0,
                   attention_dropout=0.0, bos_token_id=0, eos_token_id=0, pad_token_id=1, **common)),
      "qwen3": (tr.Qwen3Config, tr.Qwen3ForCausalLM, dict(**head_dim, **llama_like)),
      "gemma": (tr.GemmaConfig, tr.GemmaForCausalLM, dict(**head_dim, **llama_like)),
      # transformers picks eager attention for Gemma2 (sdpa cannot soft-cap).
      "gemma2": (tr.Gemma2Config, tr.Gemma2ForCausalLM,
                 dict(**head_dim, sliding_window=8, **{**llama_like, "attn_implementation": None})),
      "phi": (tr.PhiConfig, tr.PhiForCausalLM,
              dict(hidden_size=hidden, intermediate_size=2 * hidden, resid_pdrop=0.0, embd_pdrop=0.0,
                   attention_dropout=0.0, partial_rotary_factor=0.5, **common)),
      "phi3": (tr.Phi3Config, tr.Phi3ForCausalLM,
               dict(resid_pdrop=0.0, embd_pdrop=0.0, attention_dropout=0.0, pad_token_id=0, **llama_like)),
      "falcon": (tr.FalconConfig, tr.FalconForCausalLM,
                 dict(hidden_size=hidden, **no_dropout, **common)),
      # Bloom has no sdpa path: ALiBi runs in its eager attention.
      "bloom": (tr.BloomConfig, tr.BloomForCausalLM,
                dict(vocab_size=vocab, hidden_size=hidden, n_layer=layers, n_head=heads, **no_dropout)),
      "stablelm": (tr.StableLmConfig, tr.StableLmForCausalLM,
                   dict(partial_rotary_factor=0.25, **no_dropout, **llama_like)),
      "olmo2": (tr.Olmo2Config, tr.Olmo2ForCausalLM, dict(pad_token_id=1, **llama_like)),
      "starcoder2": (tr.Starcoder2Config, tr.Starcoder2ForCausalLM,
                     dict(residual_dropout=0.0, embedding_dropout=0.0, attention_dropout=0.0,
                          sliding_window=8, **llama_like)),
      "cohere": (tr.CohereConfig, tr.CohereForCausalLM, llama_like),
      "granite": (tr.GraniteConfig, tr.GraniteForCausalLM,
                  dict(embedding_multiplier=2.0, residual_multiplier=0.5, attention_multiplier=0.3,
                       logits_scaling=2.0, **llama_like)),
      "mixtral": (tr.MixtralConfig, tr.MixtralForCausalLM,
                  dict(num_local_experts=4, num_experts_per_tok=2, **llama_like)),
      "qwen3_moe": (tr.Qwen3MoeConfig, tr.Qwen3MoeForCausalLM,
                    dict(**head_dim, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                         **llama_like)),
      # transformers picks eager attention for gpt-oss (sdpa has no attention sinks).
      "gpt_oss": (tr.GptOssConfig, tr.GptOssForCausalLM,
                  dict(**head_dim, num_local_experts=4, num_experts_per_tok=2, sliding_window=8,
                       **{**llama_like, "attn_implementation": None})),
      "mamba": (tr.MambaConfig, tr.MambaForCausalLM,
                dict(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, state_size=4,
                     use_mambapy=True)),
  }


def tiny_causal_lm(arch: str, *, layers: int = 2, hidden: int = 32, vocab: int = 128,
                   heads: int = 4, attn: str | None = "sdpa", seed: int = 0, device=None) -> torch.nn.Module:
  """A randomly initialized HF causal LM from a tiny config, dropout off, in train mode.

  Args:
    arch: one of `CAUSAL_LMS`.
    layers, hidden, vocab, heads: the config's sizes.
    attn: attn_implementation: 'sdpa' (transformers' default, lowered as fused attention) or
      'eager'; Gemma2 and Bloom always get transformers' own choice (eager).
    seed: torch seed for the weights.
    device: e.g. 'meta' to build without allocating weights.
  """
  import transformers as tr
  configs = _configs(tr, vocab, layers, hidden, heads, attn)
  if arch not in configs:
    raise ValueError(f"arch={arch!r} is not a tiny test architecture; use one of {sorted(configs)}.")
  config_cls, cls, kwargs = configs[arch]
  config = config_cls(**{k: v for k, v in kwargs.items() if v is not None})
  torch.manual_seed(seed)
  if device == "meta":
    with torch.device("meta"):
      model = cls(config)
  else:
    model = cls(config)
  return model.train()


def lm_batch(batch: int = 4, seq: int = 16, vocab: int = 128, *, pad: bool = True,
             seed: int = 0) -> dict:
  """input_ids / attention_mask / labels; with `pad`, rows are left-padded by different amounts
  (row 1 keeps only 2 tokens) and padded labels are -100."""
  g = torch.Generator().manual_seed(seed)
  ids = torch.randint(2, vocab, (batch, seq), generator=g)
  mask = torch.ones(batch, seq, dtype=torch.long)
  if pad:
    for row in range(1, batch):
      mask[row, : (seq - 2) if row == 1 else row] = 0
  labels = ids.masked_fill(mask == 0, -100)
  return {"input_ids": ids, "attention_mask": mask, "labels": labels, "use_cache": False}


class MLP(torch.nn.Module):
  """A plain MLP regressor: forward(x) -> predictions; the loss is passed as loss_fn."""

  def __init__(self, dims=(16, 32, 32, 4)):
    super().__init__()
    self.layers = torch.nn.ModuleList(torch.nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

  def forward(self, x):
    for i, layer in enumerate(self.layers):
      x = layer(x)
      x = torch.tanh(x) if i < len(self.layers) - 1 else x
    return x


def mse_loss(outputs, batch):
  return F.mse_loss(outputs, batch["y"])


class CNN(torch.nn.Module):
  """A small image classifier that returns (loss, logits) when given labels."""

  def __init__(self, classes: int = 5):
    super().__init__()
    self.conv1 = torch.nn.Conv2d(3, 8, 3, padding=1)
    self.norm = torch.nn.GroupNorm(2, 8)
    self.conv2 = torch.nn.Conv2d(8, 16, 3, stride=2, padding=1)
    self.head = torch.nn.Linear(16 * 4 * 4, classes)

  def forward(self, images, labels=None):
    x = F.relu(self.norm(self.conv1(images)))
    x = F.max_pool2d(x, 2)
    x = F.gelu(self.conv2(x))
    logits = self.head(x.flatten(1))
    if labels is None:
      return (logits,)
    return F.cross_entropy(logits, labels), logits


def mlp_batch(batch: int = 8, seed: int = 0) -> dict:
  g = torch.Generator().manual_seed(seed)
  return {"x": torch.randn(batch, 16, generator=g), "y": torch.randn(batch, 4, generator=g)}


def image_batch(batch: int = 6, classes: int = 5, seed: int = 0) -> dict:
  g = torch.Generator().manual_seed(seed)
  return {"images": torch.randn(batch, 3, 16, 16, generator=g),
          "labels": torch.randint(0, classes, (batch,), generator=g)}
