"""The torch one-liner: an unchanged PyTorch training loop runs with the plan AP chose.

    import torch, ap_xla
    ap_xla.enable_advanced_parallelization()
    model = ...; optim = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for batch in loader:
      loss = model(**batch).loss        # first call: bridge, search, log the plan
      loss.backward()                   # adds the gradients computed with the loss
      optim.step(); optim.zero_grad()   # the compiled update; clears the accumulator
      print(loss.item())                # the real loss

The one patch is `torch.nn.Module.__call__` (see `intercept.py`). Importing this package
does not import torch; `install()` and the functions below do.
"""
from __future__ import annotations

from ap_xla.torch_frontend.errors import UnsupportedUsageError


def install(default_plan: bool = False) -> None:
  """Patches `torch.nn.Module.__call__` so that training calls run through ap-xla.

  Args:
    default_plan: also take models over without `enable_advanced_parallelization()`, with
      MoAI's default plan (plain data parallelism); `ap-xla run` sets it.
  """
  from ap_xla.torch_frontend import intercept
  intercept.install(default_plan)


def uninstall() -> None:
  """Removes the patch and gives every taken-over model back to torch (weights written back)."""
  import sys
  if "ap_xla.torch_frontend.intercept" in sys.modules:
    sys.modules["ap_xla.torch_frontend.intercept"].uninstall()


def on_enable() -> None:
  """Called by `enable_advanced_parallelization()`: installs the patch when torch is installed."""
  import importlib.util
  if importlib.util.find_spec("torch") is not None:
    install()


def on_disable() -> None:
  """Called by `disable_advanced_parallelization()`."""
  uninstall()


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
  from ap_xla.torch_frontend import intercept
  session = intercept.session_of(model)
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
  from ap_xla.torch_frontend import intercept
  session = intercept.session_of(model)
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


__all__ = ["install", "uninstall", "sync_to_torch", "release", "on_enable", "on_disable",
           "save_checkpoint", "load_checkpoint", "UnsupportedUsageError"]
