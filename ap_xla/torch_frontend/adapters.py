"""What libraries wrap around a user's model, optimizer and scheduler, seen through.

A script's one model, optimizer and scheduler often reach ap-xla wrapped:

  * **optimizers**: accelerate's `AcceleratedOptimizer` (what `Accelerator.prepare` and the HF
    Trainer hand out) is itself a `torch.optim.Optimizer` forwarding to the one it wraps in
    `.optimizer`. `unwrap_optimizer` follows `.optimizer` to the innermost one, so a wrapper
    and what it wraps count as one optimizer; the takeover patches the inner one, which the
    wrapper's `step()` / `zero_grad()` / `state_dict()` call.
  * **schedulers**: accelerate's `AcceleratedScheduler` holds the torch scheduler in
    `.scheduler`; the torch scheduler sets the inner optimizer's lr, which each update reads.
  * **models**: `torch.nn.DataParallel` / `DistributedDataParallel` (`.module`) and
    `torch.compile`'s `OptimizedModule` (`._orig_mod`) are called through to the module they
    wrap (`unwrap_module`): on one presented accelerator they would only move or re-trace it.
    accelerate's mixed-precision forward (`model.forward` replaced by an autocast wrapper, the
    original kept in `model._original_forward`) counts as autocast (`amp_dtype`), and the
    model is exported with its own forward (`plain_forward`). A peft `PeftModel` is a
    module like any other: its trainable parameters are the adapters.
  * **the HF loss kwarg**: the Trainer passes `num_items_in_batch` (the labelled tokens of the
    whole accumulated step) so that the model's loss is sum / num_items_in_batch. ap-xla plans
    the model's own mean (sum / the tokens of this batch, which the bridge finds as the loss
    weight) and rescales the loss and its gradients by weight / num_items_in_batch: the same
    value, and micro-batches stay exact (`split_loss_kwargs`).
"""
from __future__ import annotations

import contextlib
import gc

import torch

from ap_xla.torch_frontend.errors import UnsupportedUsageError

# The HF loss kwarg (transformers' Trainer and its models' loss functions).
NUM_ITEMS = "num_items_in_batch"


def unwrap_optimizer(optimizer):
  """The innermost optimizer of a chain of wrappers holding it in `.optimizer`."""
  seen = {id(optimizer)}
  inner = getattr(optimizer, "optimizer", None)
  while isinstance(inner, torch.optim.Optimizer) and id(inner) not in seen:
    optimizer, seen = inner, seen | {id(inner)}
    inner = getattr(optimizer, "optimizer", None)
  return optimizer


def unwrap_module(module: torch.nn.Module) -> torch.nn.Module:
  """The module a DataParallel / DistributedDataParallel / torch.compile wrapper calls."""
  while True:
    if isinstance(module, (torch.nn.DataParallel, torch.nn.parallel.DistributedDataParallel)):
      module = module.module
    elif type(module).__name__ == "OptimizedModule" and isinstance(getattr(module, "_orig_mod", None),
                                                                   torch.nn.Module):
      module = module._orig_mod
    else:
      return module


def find_optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
  """The one live torch optimizer that holds `model`'s trainable parameters (wrappers seen
  through), found among the live objects (`gc.get_objects()`).

  Raises:
    UnsupportedUsageError: none, or more than one.
  """
  ids = {id(p) for p in model.parameters() if p.requires_grad}
  gc.collect()  # optimizers dropped by the script must not count
  found = {}
  # type(o), not isinstance: some live objects warn when their __class__ is read.
  for o in gc.get_objects():
    if issubclass(type(o), torch.optim.Optimizer):
      inner = unwrap_optimizer(o)
      if any(id(p) in ids for g in inner.param_groups for p in g["params"]):
        found[id(inner)] = inner
  found = list(found.values())
  name = type(model).__name__
  if not found:
    raise UnsupportedUsageError(
        f"ap-xla takes {name} over at its first training forward and found no torch.optim "
        f"optimizer holding its parameters. Create the optimizer (e.g. torch.optim.AdamW("
        "model.parameters(), lr=...)) before the first training forward, or call the model under "
        "torch.no_grad() / in eval mode if it is not being trained.")
  if len(found) > 1:
    kinds = ", ".join(type(o).__name__ for o in found)
    raise UnsupportedUsageError(
        f"{len(found)} optimizers ({kinds}) hold parameters of {name}; ap-xla runs one optimizer "
        "per model inside the compiled step and cannot honour a second one over the same "
        "parameters. Use one optimizer (param groups can give parameters different "
        "hyperparameters), or delete the unused one before the first training forward.")
  return found[0]


def check_schedulers(optimizer: torch.optim.Optimizer) -> None:
  """Refuses a live LR scheduler of `optimizer` that also cycles momentum or betas.

  ap-xla follows each param group's lr at every step; the other hyperparameters are compiled
  into the update. (A cycling scheduler made after the takeover is caught by the param-group
  check at `optimizer.step()`.)

  Raises:
    UnsupportedUsageError: OneCycleLR or CyclicLR with cycle_momentum=True.
  """
  found = [o for o in gc.get_objects() if issubclass(type(o), torch.optim.lr_scheduler.LRScheduler)
           and unwrap_optimizer(getattr(o, "optimizer", None)) is optimizer
           and getattr(o, "cycle_momentum", False)]
  if found:
    name, opt = type(found[0]).__name__, type(optimizer).__name__
    what = "betas[0]" if "betas" in optimizer.defaults else "momentum"
    raise UnsupportedUsageError(
        f"{name}(cycle_momentum=True) changes {what} of {opt}'s param groups at every step; ap-xla "
        f"compiles {what} into the optimizer update and follows only a changing lr. Create the "
        f"scheduler with cycle_momentum=False (the lr still follows its schedule), or run the script "
        "without enable_advanced_parallelization().")


def _accelerate_amp(model: torch.nn.Module) -> str | None:
  """accelerate's mixed precision ('bf16', 'fp16') when it wrapped `model.forward`, else None."""
  if "_original_forward" not in model.__dict__ or "forward" not in model.__dict__:
    return None
  try:
    from accelerate.state import AcceleratorState
    mode = str(AcceleratorState().mixed_precision)
  except Exception:  # accelerate absent or its state reset: no wrapper of ours to honour
    return None
  return mode if mode in ("bf16", "fp16", "fp8") else None


def amp_dtype(model: torch.nn.Module) -> torch.dtype | None:
  """The autocast dtype accelerate's forward wrapper would run `model` under, if any."""
  mode = _accelerate_amp(model)
  return None if mode is None else torch.float16 if mode == "fp16" else torch.bfloat16


@contextlib.contextmanager
def plain_forward(model: torch.nn.Module):
  """`model.forward` is its own inside (accelerate's autocast wrapper removed), for torch.export."""
  if _accelerate_amp(model) is None:
    yield
    return
  wrapped = model.__dict__["forward"]
  model.forward = model._original_forward
  try:
    yield
  finally:
    model.forward = wrapped


def split_loss_kwargs(batch: dict) -> tuple[dict, float | None]:
  """`batch` without the HF loss kwarg, and its value (None when absent).

  Raises:
    UnsupportedUsageError: `num_items_in_batch` is not a number or a one-element tensor.
  """
  if NUM_ITEMS not in batch or batch[NUM_ITEMS] is None:
    return batch, None
  value = batch[NUM_ITEMS]
  if isinstance(value, torch.Tensor):
    if value.numel() != 1:
      raise UnsupportedUsageError(
          f"{NUM_ITEMS} has shape {tuple(value.shape)}; ap-xla plans one global batch and takes "
          f"{NUM_ITEMS} as the number of items of the whole step (a number). Pass one number.")
    value = value.item()
  rest = {k: v for k, v in batch.items() if k != NUM_ITEMS}
  return rest, float(value)
