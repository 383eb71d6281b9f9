"""Models `ap-xla plan` can plan for: built-in presets and Hugging Face `config.json` files.

A `ModelSpec` names a model family ('llama' or 'gpt2') and its config; `build_program` turns
it into a training `Program` for a batch and sequence length, abstract by default (shapes
only: a 70B model costs nothing to plan).
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Union

from ap_xla.models.gpt2 import GPT2Config, gpt2_program
from ap_xla.models.llama import LlamaConfig, llama_program
from passes.program import Program

LLAMA, GPT2 = "llama", "gpt2"

# Hugging Face model_type values that map onto our Llama-style decoder.
LLAMA_TYPES = ("llama", "mistral", "qwen2")
GPT2_TYPES = ("gpt2",)


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """A model to plan for.

  Attributes:
    name: the preset name or the config file's path.
    family: 'llama' or 'gpt2'.
    config: its LlamaConfig or GPT2Config (the `seq` field is replaced by `build_program`).
    default_seq: the sequence length used when none is given.
    note: what the Llama-style approximation leaves out of a Hugging Face model, if anything.
  """
  name: str
  family: str
  config: Union[LlamaConfig, GPT2Config]
  default_seq: int = 2048
  note: str = ""

  @property
  def label(self) -> str:
    """A short name for logs: the preset, or the config's folder."""
    if os.path.basename(self.name) == "config.json":
      return os.path.basename(os.path.dirname(os.path.abspath(self.name))) or self.name
    return os.path.basename(self.name)

  @property
  def max_seq(self) -> int | None:
    return self.config.max_positions if self.family == GPT2 else None


def _llama(vocab, dim, layers, heads, ffn, kv=None, theta=10000.0, seq=2048):
  return LlamaConfig(vocab=vocab, dim=dim, layers=layers, heads=heads, kv_heads=kv, ffn=ffn, seq=seq,
                     rope_theta=theta), seq


def _gpt2(dim, layers, heads, vocab=50257, positions=1024):
  return GPT2Config(vocab=vocab, dim=dim, layers=layers, heads=heads, seq=positions,
                    max_positions=positions), positions


# Sizes from the published model cards / config.json files.
_PRESETS = {
    "llama-tiny": (LLAMA, _llama(256, 64, 4, 4, 128, seq=64)),
    "llama2-7b": (LLAMA, _llama(32000, 4096, 32, 32, 11008, seq=4096)),
    "llama2-13b": (LLAMA, _llama(32000, 5120, 40, 40, 13824, seq=4096)),
    "llama2-70b": (LLAMA, _llama(32000, 8192, 80, 64, 28672, kv=8, seq=4096)),
    "llama3-8b": (LLAMA, _llama(128256, 4096, 32, 32, 14336, kv=8, theta=500000.0, seq=8192)),
    # Llama 3.1 8B has Llama 3 8B's shapes (its rope scaling changes no shape or FLOP).
    "llama3.1-8b": (LLAMA, _llama(128256, 4096, 32, 32, 14336, kv=8, theta=500000.0, seq=8192)),
    "llama3-70b": (LLAMA, _llama(128256, 8192, 80, 64, 28672, kv=8, theta=500000.0, seq=8192)),
    # No Llama 2 34B was released: this is the Llama 2 architecture at CodeLlama-34B's sizes with
    # Llama 2's 32000-token vocabulary, the '34b' of IBM's fms-fsdp (fms_fsdp/utils/config_utils.py).
    "llama2-34b-arch": (LLAMA, _llama(32000, 8192, 48, 64, 22016, kv=8, seq=4096)),
    "mistral-7b": (LLAMA, _llama(32000, 4096, 32, 32, 14336, kv=8, seq=8192)),
    "gpt2-tiny": (GPT2, _gpt2(64, 4, 4, vocab=256, positions=64)),
    "gpt2": (GPT2, _gpt2(768, 12, 12)),
    "gpt2-medium": (GPT2, _gpt2(1024, 24, 16)),
    "gpt2-large": (GPT2, _gpt2(1280, 36, 20)),
    "gpt2-xl": (GPT2, _gpt2(1600, 48, 25)),
}
PRESET_NAMES = tuple(_PRESETS)


def get_preset(name: str) -> ModelSpec:
  """A built-in model by name ('llama2-7b', 'gpt2-xl', ...; see PRESET_NAMES)."""
  key = name.strip().lower() if isinstance(name, str) else name
  if key not in _PRESETS:
    raise ValueError(f"Unknown model preset {name!r}; allowed: {list(PRESET_NAMES)}, or the path of a "
                     "Hugging Face config.json (model_type llama, mistral, qwen2 or gpt2).")
  family, (cfg, seq) = _PRESETS[key]
  note = _tied_head_note(cfg) if family == GPT2 else ""
  return ModelSpec(key, family, cfg, default_seq=min(seq, 2048), note=note)


def _tied_head_note(cfg: GPT2Config) -> str:
  """GPT-2 ties lm_head to wte; our Layers program keeps 'pre' and 'post' apart, so plans hold both."""
  extra = cfg.vocab * cfg.dim
  return (f"the tied lm_head is planned as its own matrix: +{extra / 1e6:,.1f}M parameters "
          f"({100 * extra / (cfg.num_params - extra):.0f}% over the model's own count), so memory is "
          "slightly over-estimated")


def _field(d: dict, path: str, *names, default=None, required=True, real=False):
  """The first of `names` present in `d`: a positive int (a positive number with `real`)."""
  for n in names:
    if d.get(n) is not None:
      v = d[n]
      ok = isinstance(v, (int, float)) if real else isinstance(v, int)
      if isinstance(v, bool) or not ok or v <= 0:
        what = "a positive number" if real else "a positive integer"
        raise ValueError(f"{path}: field {n!r} must be {what}, got {v!r}.")
      return v
  if required:
    raise ValueError(f"{path}: missing field {names[0]!r} (needed for model_type {d.get('model_type')!r}).")
  return default


def from_hf_config(path: str) -> ModelSpec:
  """A ModelSpec from a Hugging Face `config.json` (or a folder holding one).

  model_type llama, mistral and qwen2 map to the Llama-style decoder; gpt2 to the GPT-2 one.

  Raises:
    ValueError: the file is missing or unreadable, not a JSON object, lacks a size field, or
      has a model_type we cannot plan for; the message names the file and the field.
  """
  if os.path.isdir(path):
    path = os.path.join(path, "config.json")
  try:
    with open(path) as f:
      d = json.load(f)
  except FileNotFoundError:
    raise ValueError(f"Model config file {path!r} does not exist; pass a Hugging Face config.json or "
                     f"a preset name ({', '.join(PRESET_NAMES)}).") from None
  except json.JSONDecodeError as e:
    raise ValueError(f"Model config file {path!r} is not valid JSON: {e}.") from None
  except (OSError, UnicodeDecodeError) as e:
    raise ValueError(f"Cannot read the model config file {path!r}: {e}.") from None
  if not isinstance(d, dict):
    raise ValueError(f"Model config file {path!r} must hold a JSON object, got {type(d).__name__}.")
  mtype = d.get("model_type")
  if mtype in LLAMA_TYPES:
    return _llama_spec(d, path, mtype)
  if mtype in GPT2_TYPES:
    return _gpt2_spec(d, path)
  raise ValueError(f"Model config file {path!r} has model_type {mtype!r}; supported: "
                   f"{list(LLAMA_TYPES + GPT2_TYPES)}.")


def _llama_spec(d: dict, path: str, mtype: str) -> ModelSpec:
  dim = _field(d, path, "hidden_size")
  heads = _field(d, path, "num_attention_heads")
  head_dim = d.get("head_dim")
  if dim % heads or (head_dim is not None and head_dim != dim // heads):
    raise ValueError(f"{path}: head_dim {head_dim} with hidden_size {dim} and {heads} heads is not "
                     "supported; the Llama-style model needs head_dim == hidden_size / num_attention_heads.")
  kv = _field(d, path, "num_key_value_heads", required=False)
  if kv is not None and heads % kv:
    raise ValueError(f"{path}: num_attention_heads={heads} must be a multiple of num_key_value_heads={kv}.")
  positions = _field(d, path, "max_position_embeddings", required=False, default=2048)
  rope = d.get("rope_parameters") if isinstance(d.get("rope_parameters"), dict) else {}  # transformers 5
  theta = (_field(rope, path, "rope_theta", required=False, real=True) or
           _field(d, path, "rope_theta", required=False, default=10000.0, real=True))
  cfg = LlamaConfig(vocab=_field(d, path, "vocab_size"), dim=dim, layers=_field(d, path, "num_hidden_layers"),
                    heads=heads, kv_heads=kv, ffn=_field(d, path, "intermediate_size"),
                    rope_theta=float(theta))
  notes = ["rope scaling is not modelled"] if rope.get("rope_type", "default") != "default" or d.get(
      "rope_scaling") else []
  if mtype == "qwen2":
    notes.append("qwen2's q/k/v biases are not modelled")
  if d.get("tie_word_embeddings"):
    notes.append("tied embeddings are planned as two matrices")
  return ModelSpec(path, LLAMA, cfg, default_seq=min(int(positions), 2048), note="; ".join(notes))


def _gpt2_spec(d: dict, path: str) -> ModelSpec:
  positions = int(_field(d, path, "n_positions", "max_position_embeddings", required=False, default=1024))
  cfg = GPT2Config(vocab=_field(d, path, "vocab_size"), dim=_field(d, path, "n_embd", "hidden_size"),
                   layers=_field(d, path, "n_layer", "num_hidden_layers"),
                   heads=_field(d, path, "n_head", "num_attention_heads"),
                   ffn=_field(d, path, "n_inner", required=False), seq=min(positions, 1024),
                   max_positions=positions, eps=float(_field(d, path, "layer_norm_epsilon", required=False,
                                                             default=1e-5, real=True)))
  note = _tied_head_note(cfg) if d.get("tie_word_embeddings", True) else ""  # HF's default is tied
  return ModelSpec(path, GPT2, cfg, default_seq=min(positions, 1024), note=note)


def resolve_model(model: str) -> ModelSpec:
  """A preset name, or the path of a config.json (or of a folder holding one)."""
  if model.strip().lower() in _PRESETS:
    return get_preset(model)
  if model.endswith(".json") or os.sep in model or os.path.exists(model):
    return from_hf_config(model)
  return get_preset(model)  # raises with the list of presets


def build_program(spec: ModelSpec, batch: int, seq: int | None = None, abstract: bool = True,
                  optimizer=None) -> Program:
  """The training Program of `spec` for a global batch and sequence length.

  Raises:
    ValueError: batch or seq is not a positive int, or seq exceeds the model's position table.

  Example:
    >>> prog = build_program(get_preset('llama2-7b'), batch=64, seq=2048)  # shapes only
  """
  seq = spec.default_seq if seq is None else seq
  for name, v in (("batch", batch), ("seq", seq)):
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
      raise ValueError(f"build_program: {name} must be a positive int, got {v!r}.")
  if spec.max_seq is not None and seq > spec.max_seq:
    raise ValueError(f"seq={seq} exceeds {spec.name}'s {spec.max_seq} learned positions; use at most "
                     f"{spec.max_seq}.")
  cfg = dataclasses.replace(spec.config, seq=seq)
  make = llama_program if spec.family == LLAMA else gpt2_program
  return make(cfg, batch, optimizer=optimizer, abstract=abstract, name=spec.label)
