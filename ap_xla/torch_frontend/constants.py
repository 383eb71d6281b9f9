"""Buffers of a taken-over model: constants of its compiled programs.

The bridge closes over every buffer (and lifted tensor constant) the forward reads: their
values at bridging are baked into the programs. Frozen (`requires_grad=False`) parameters
are not constants: the programs hold them as untrained parameters (`Program.trainable`),
kept in step with torch like the trained ones (`sync.py`). Two things would then train
silently wrong, and are handled here:

  * a forward that updates buffers (BatchNorm running statistics in training mode): the
    programs would keep them at their initial values. `check_no_buffer_updates` refuses
    the model at the takeover.
  * a constant changed later in torch (`load_state_dict`, an in-place edit, a new tensor
    assigned): `ConstantWatch.changed()` notices it before every call (identity, storage
    and `_version` of each tensor), and the session bridges the model again with the new
    values (the plan is kept). A frozen parameter made trainable is refused.
"""
from __future__ import annotations

import torch

from ap_xla.torch_frontend.errors import UnsupportedUsageError


def check_no_buffer_updates(model: torch.nn.Module, mutated: tuple[str, ...]) -> None:
  """Raises if the captured training forward of `model` updates the buffers `mutated`.

  Raises:
    UnsupportedUsageError: naming the buffers, their modules, why, and what to do.
  """
  if not mutated:
    return
  owners: dict[str, list[str]] = {}
  for name in mutated:
    path = name.rpartition(".")[0]
    owners.setdefault(path, []).append(name.rpartition(".")[2])
  where = "; ".join(f"{type(model.get_submodule(p)).__name__} {p or '<root>'!r}: {', '.join(b)}"
                    for p, b in owners.items())
  first = next(iter(owners))
  example = f"model.{first}.eval()" if first else "model.eval()"
  raise UnsupportedUsageError(
      f"{type(model).__name__}'s training forward updates buffers in place ({where}). ap-xla "
      "compiles the training step with buffers as constants, so these (e.g. BatchNorm running "
      "statistics) would silently stay at their values of the first call and evaluation would "
      "use stale statistics. Before the first training forward, either call .eval() on those "
      f"modules (e.g. {example}: they then normalize with their fixed running statistics), build "
      "them with track_running_stats=False (batch statistics only, no buffers to update), or use "
      "a normalization without running statistics (LayerNorm, GroupNorm); or run the script "
      "without enable_advanced_parallelization().")


class ConstantWatch:
  """Notices changes in torch to the buffers and frozen parameters a bridged program baked in.

  Args:
    model: the taken-over module.
    names: the torch names of the buffers and frozen parameters the programs read.
  """

  def __init__(self, model: torch.nn.Module, names):
    self.model = model
    self.names = tuple(names)
    self._seen: dict = {}
    self.record()

  def _tensors(self) -> dict:
    found = dict(self.model.named_parameters(remove_duplicate=False))
    found.update(self.model.named_buffers(remove_duplicate=False))
    return found

  @staticmethod
  def _stamp(t: torch.Tensor) -> tuple:
    return t._version, t.data_ptr(), tuple(t.shape), t.dtype

  def record(self) -> None:
    """Takes the current tensors as the values the programs hold."""
    tensors = self._tensors()
    self._seen = {n: (tensors[n], self._stamp(tensors[n])) for n in self.names if n in tensors}

  def changed(self) -> list[str]:
    """Names of the constants changed in torch since `record()` (edited, replaced or removed).

    Raises:
      UnsupportedUsageError: a frozen parameter the programs read was made trainable.
    """
    tensors = self._tensors()
    thawed = [n for n in self.names if isinstance(tensors.get(n), torch.nn.Parameter)
              and tensors[n].requires_grad]
    if thawed:
      raise UnsupportedUsageError(
          f"requires_grad of {thawed[:3]} changed to True after ap-xla took the model over; the "
          "compiled program holds these frozen parameters as constants and trains the parameters "
          "that were trainable at the first training call. Freeze or unfreeze parameters before "
          "the first training forward.")
    out = []
    for n in self.names:
      t = tensors.get(n)
      seen = self._seen.get(n)
      if t is None or seen is None or t is not seen[0] or self._stamp(t) != seen[1]:
        out.append(n)
    return out
