"""Imports torchax on every torch ap-xla supports (2.11 to 2.13); the torch/torchax differences.

torchax 0.0.13 (the newest on PyPI) reads about 20 named-tensor overloads
(`aten.prod.dim_Dimname`, `aten.std.names_dim`, ...) while it is imported and while its default
environment builds its op table.
  - torch 2.11 and 2.12 still have them: torchax imports as it is and nothing is patched
    (`named_overloads_removed()` is False; the GPU machine runs torch 2.11).
  - torch 2.13 removed them, so those attribute lookups raise. During those two steps only, a
    missing overload whose name marks it as a named-tensor (Dimname) overload resolves to an
    inert placeholder; the patch is removed as soon as torchax is loaded. The export graphs we
    lower never contain named-tensor ops (torch.export rejects them), so the placeholders are
    never looked up afterwards.
torchax fixed this upstream after 0.0.13 (google/torchax#102, `torchax/_torch_compat.py`: the
two overloads are registered only when present). Remove the shim once a torchax release with
that fix is pinned: `test_bridge_torchax_compat.py::test_shim_still_needed` fails on that day.
Other torch-version checks in torchax 0.0.13 (`torch.__version__ >= "2.2"` in export.py, a
string comparison) take the same branch on 2.11, 2.12 and 2.13.
"""
from __future__ import annotations

import contextlib
import functools
import threading
import warnings
from typing import Any

import torch
import torch._ops

_lock = threading.Lock()


class MissingOverload:
  """Stands in for an ATen overload torch no longer has (hashable, never callable)."""

  def __init__(self, packet: str, name: str):
    self.packet, self.name = packet, name

  def __call__(self, *args, **kwargs):
    raise RuntimeError(f"{self!r} was removed from torch {torch.__version__}; it cannot run.")

  def __repr__(self):
    return f"MissingOverload({self.packet}.{self.name})"


def _is_named_tensor_overload(name: str) -> bool:
  lowered = name.lower()
  return "dimname" in lowered or lowered.startswith("names_") or "_names" in lowered


@contextlib.contextmanager
def _placeholders_for_removed_overloads(log: list[str]):
  """Within the block, missing Dimname overloads resolve to `MissingOverload`s."""
  original = torch._ops.OpOverloadPacket.__getattr__

  def getattr_with_placeholder(self, key):
    try:
      return original(self, key)
    except AttributeError:
      if key.startswith("__") or not _is_named_tensor_overload(key):
        raise
      log.append(f"{self}.{key}")
      return MissingOverload(str(self), key)

  torch._ops.OpOverloadPacket.__getattr__ = getattr_with_placeholder
  try:
    yield
  finally:
    torch._ops.OpOverloadPacket.__getattr__ = original


def named_overloads_removed() -> bool:
  """Whether this torch lacks the named-tensor (Dimname) overloads torchax 0.0.13 names (2.13+)."""
  return not hasattr(torch.ops.aten.prod, "dim_Dimname")


@functools.cache
def _load() -> tuple[Any, tuple[str, ...]]:
  placeholders: list[str] = []
  shim = _placeholders_for_removed_overloads(placeholders) if named_overloads_removed() else contextlib.nullcontext()
  with _lock, shim:
    import torchax
    import torchax.decompositions  # noqa: F401  (reads removed overloads at import)
    import torchax.export  # noqa: F401
    torchax.default_env()  # builds the op table, which reads more of them
  # torchax's lowerings ask JAX for int64 constants; without jax_enable_x64 they are int32,
  # which is what we want. Silence only that warning, only when raised from torchax code.
  warnings.filterwarnings("ignore", message="Explicitly requested dtype int64", category=UserWarning,
                          module=r"torchax\.")
  return torchax, tuple(placeholders)


def torchax_module():
  """Returns the imported `torchax` module with its op table built."""
  return _load()[0]


def placeholders_used() -> tuple[str, ...]:
  """The removed overload names that resolved to placeholders while loading torchax."""
  return _load()[1]


def aten_lowerings() -> dict:
  """torchax's table from ATen overloads (and packets) to its `Operator` records."""
  _load()
  from torchax.ops import ops_registry
  return ops_registry.all_aten_ops


def t2j_dtype(dtype: torch.dtype):
  """torchax's torch -> JAX dtype map."""
  _load()
  from torchax.ops import mappings
  return mappings.t2j_dtype(dtype)


def torchax_decompositions() -> dict:
  """torchax's extra decompositions (run after the core ATen ones, as torchax.export does)."""
  _load()
  from torchax import decompositions
  return decompositions.DECOMPOSITIONS
