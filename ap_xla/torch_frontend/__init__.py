"""The torch one-liner: an unchanged PyTorch training script runs with the plan AP chose.

    import torch, ap_xla
    ap_xla.enable_advanced_parallelization()
    model = ...cuda(); optim = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for batch in loader:
      loss = model(**batch).loss        # first call: bridge, search, log the plan
      loss.backward()                   # adds the gradients computed with the loss
      torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)   # compiled into the update
      optim.step(); optim.zero_grad()   # the compiled update; clears the accumulator
      print(loss.item())                # the real loss

Modules, one concern each (imports go down this list, never up):
  errors         `UnsupportedUsageError`, what cannot be honoured
  patching       the record of every patched attribute (`Patches`), undone at uninstall
  registry       the live sessions (model -> `Session`)
  device_memory  `torch.cuda` memory figures from the plan's devices
  devices        the accelerator as MoAI presents it ("cuda"; moves are host identities)
  adapters       accelerate / HF Trainer / DataParallel / torch.compile wrappers seen through
  calls          the inputs of one forward call, named as the bridge takes them
  outputs        what a training forward returns (a real loss, other outputs lazily)
  constants      buffers and frozen parameters baked into the programs
  optim_state    torch optimizer state <-> optax state
  sync           `APParam`: torch parameters kept consistent with the JAX state
  grads          `p.grad` as a read-only view of the accumulated gradient
  clipping       `clip_grad_norm_` / `clip_grad_value_` compiled into the update
  accumulator    the gradient accumulator (backward adds, zero_grad clears, p.grad and clips read it)
  optimizer      the optimizer instance standing in for the compiled update
  phases         a plan compiled for one batch; the plan choice
  bridges        the bridged programs of a model, per input signature
  checkpoints    `save_checkpoint` / `load_checkpoint` (orbax)
  session        one taken-over model's training state and calls
  intercept      model takeover at `torch.nn.Module.__call__`
  installer      `install()` / `uninstall()`: every patch (listed there)

Importing this package does not import torch; `install()` and the functions below do.
"""
from __future__ import annotations

from ap_xla.torch_frontend.errors import UnsupportedUsageError


def install(default_plan: bool = False) -> None:
  """Installs the front end (every patch is listed in `installer.py`; `uninstall()` undoes them).

  Args:
    default_plan: also take models over without `enable_advanced_parallelization()`, with
      MoAI's default plan (plain data parallelism); `ap-xla run` sets it.
  """
  from ap_xla.torch_frontend import installer
  installer.install(default_plan)


def uninstall() -> None:
  """Gives every taken-over model back to torch (weights written back) and undoes every patch."""
  import sys
  if "ap_xla.torch_frontend.installer" in sys.modules:
    sys.modules["ap_xla.torch_frontend.installer"].uninstall()


def sync_to_torch(model) -> bool:
  """Writes the weights ap-xla trained into `model`'s torch parameters.

  Any torch operation on a parameter (and `model.state_dict()`) already does this; call it
  before reading parameter storage some other way (e.g. a numpy view taken earlier).

  Returns:
    True if `model` is trained by ap-xla (False: nothing to do).

  Example:
    >>> loss = model(**batch).loss; loss.backward(); optim.step()
    >>> ap_xla.sync_to_torch(model)
  """
  from ap_xla.torch_frontend import registry
  session = registry.session_of(model)
  if session is None:
    return False
  session.sync_to_torch()
  return True


def plan_report(model):
  """The search report behind the plan `model` trains with, or None if ap-xla does not train it.

  A `SearchResult`: `.plan`, and `.candidates`, every candidate with its per-device memory,
  estimated step time and verdict or rejection reason (`.table()` prints them).

  Example:
    >>> loss = model(**batch).loss   # the first training call searches the plan
    >>> print(ap_xla.plan_report(model).table(limit=10))
  """
  from ap_xla.torch_frontend import registry
  session = registry.session_of(model)
  if session is None or session.current is None:
    return None
  return session.phase.report


def save_checkpoint(model, optimizer, directory, *, data_position=None, max_to_keep=None) -> str:
  """Saves the training state of a model trained by the one-liner (orbax, atomic, sharded).

  Parameters, optimizer state, step, plan, param-group hyperparameters and `data_position`;
  see `ap_xla.torch_frontend.checkpoints.save_checkpoint`.

  Example:
    >>> ap_xla.save_checkpoint(model, optim, "/ckpt", data_position=step)
  """
  from ap_xla.torch_frontend import checkpoints
  return checkpoints.save_checkpoint(model, optimizer, directory, data_position=data_position,
                                     max_to_keep=max_to_keep)


def load_checkpoint(model, optimizer, directory, *, step=None):
  """Restores a `save_checkpoint` checkpoint into a trained or a fresh model and optimizer.

  Returns the `ap_xla.checkpoint.Checkpoint` (`.step`, `.plan`, `.data_position`); see
  `ap_xla.torch_frontend.checkpoints.load_checkpoint`.

  Example:
    >>> ckpt = ap_xla.load_checkpoint(model, optim, "/ckpt")   # before the first training call
    >>> start = ckpt.data_position
  """
  from ap_xla.torch_frontend import checkpoints
  return checkpoints.load_checkpoint(model, optimizer, directory, step=step)


def release(model) -> bool:
  """Writes the trained weights back and gives `model` and its optimizer back to plain torch.

  Returns:
    True if `model` was taken over.
  """
  from ap_xla.torch_frontend import intercept
  return intercept.release(model)


__all__ = ["install", "uninstall", "sync_to_torch", "release", "plan_report", "save_checkpoint",
           "load_checkpoint", "UnsupportedUsageError"]
