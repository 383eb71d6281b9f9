"""The inputs of one forward call of a taken-over model, named as the bridge takes them."""
from __future__ import annotations

import dataclasses
import inspect

import torch

from ap_xla.torch_frontend.adapters import split_loss_kwargs
from ap_xla.torch_frontend.errors import UnsupportedUsageError


@dataclasses.dataclass(frozen=True)
class Call:
  """The inputs of one forward call, as the bridge takes them.

  Attributes:
    batch: forward argument name -> value (tensors lead with the batch).
    forced: arguments ap-xla added (use_cache=False), with why their outputs are missing.
    loss_divisor: the HF loss kwarg `num_items_in_batch` (taken out of `batch`; see
      `adapters.split_loss_kwargs`), or None.
  """
  batch: dict
  forced: dict
  loss_divisor: float | None = None

  @property
  def tensors(self) -> dict:
    return {k: v for k, v in self.batch.items() if isinstance(v, torch.Tensor)}

  @property
  def batch_size(self) -> int:
    sizes = {int(v.shape[0]) for v in self.tensors.values() if v.ndim}
    return sizes.pop() if len(sizes) == 1 else -1

  def shape_key(self, with_batch: bool) -> tuple:
    """What a bridged program is specialized to: keys, non-batch shapes, dtypes, constants."""
    tensors = tuple(sorted((k, tuple(v.shape[0 if with_batch else 1:]), str(v.dtype))
                           for k, v in self.tensors.items()))
    consts = tuple(sorted((k, repr(v)) for k, v in self.batch.items() if not isinstance(v, torch.Tensor)))
    return tensors, consts


def bind_call(model: torch.nn.Module, args: tuple, kwargs: dict) -> Call:
  """Names the positional and keyword arguments of a call of `model` by its forward signature."""
  sig = inspect.signature(model.forward)
  try:
    bound = sig.bind(*args, **kwargs)
  except TypeError as e:
    raise TypeError(f"{type(model).__name__}.forward{sig}: {e}") from None
  batch = {}
  for name, value in bound.arguments.items():
    kind = sig.parameters[name].kind
    if kind is inspect.Parameter.VAR_KEYWORD:
      batch.update(value)
    elif kind is inspect.Parameter.VAR_POSITIONAL:
      if value:
        raise UnsupportedUsageError(
            f"{type(model).__name__}.forward takes *{name} and was called with {len(value)} extra "
            "positional argument(s); ap-xla passes model inputs by name. Pass them as keyword "
            "arguments.")
    else:
      batch[name] = value
  forced = {}
  takes_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values())
  has_cache = "use_cache" in sig.parameters or (  # e.g. a peft PeftModel passing **kwargs on
      takes_kwargs and hasattr(getattr(model, "config", None), "use_cache"))
  if has_cache and "use_cache" not in batch:
    # A KV cache is an output torch.export cannot return and training does not use.
    batch["use_cache"] = False
    forced["past_key_values"] = (
        "the training forward run by ap-xla is called with use_cache=False (a KV cache is not "
        "part of a training step); past_key_values is not available. Call the model under "
        "torch.no_grad() (or in eval mode) to get one.")
  for k, v in batch.items():
    if isinstance(v, torch.Tensor) and v.requires_grad:
      raise UnsupportedUsageError(
          f"model input {k!r} requires grad; ap-xla computes gradients of the parameters only. "
          "Pass inputs without requires_grad (e.g. .detach()).")
  batch, divisor = split_loss_kwargs(batch)
  return Call(batch, forced, divisor)


def jax_batch(call: Call) -> dict:
  """The tensor inputs as JAX arrays."""
  from bridge.lowering import to_jax
  return {k: to_jax(v) for k, v in call.tensors.items()}


def describe(call: Call) -> str:
  return ", ".join(f"{k}{list(v.shape)}" for k, v in call.tensors.items())
