"""A record of the attributes ap-xla replaced in torch (and friends), so that all are undone.

Every patch the torch front end makes goes through one `Patches` object (`install.PATCHES`):
`set(owner, name, value)` remembers the original and `undo()` restores every one, newest
first. Nothing is patched outside it.
"""
from __future__ import annotations

from typing import Any

_MISSING = object()


class Patches:
  """Attributes replaced on modules and classes, with their originals."""

  def __init__(self):
    self._saved: list[tuple[Any, str, Any]] = []

  def set(self, owner: Any, name: str, value: Any) -> None:
    """Replaces `owner.name` by `value` (the first original is kept if patched twice)."""
    self._saved.append((owner, name, owner.__dict__.get(name, _MISSING) if hasattr(owner, "__dict__")
                        else getattr(owner, name, _MISSING)))
    setattr(owner, name, value)

  def original(self, owner: Any, name: str) -> Any:
    """What `owner.name` was before the first patch of it (its current value if unpatched)."""
    for o, n, v in self._saved:
      if o is owner and n == name:
        return getattr(owner, name) if v is _MISSING else v
    return getattr(owner, name)

  def undo(self) -> None:
    """Restores every patched attribute, newest first."""
    while self._saved:
      owner, name, value = self._saved.pop()
      if value is _MISSING:
        try:
          delattr(owner, name)
        except AttributeError:
          pass
      else:
        setattr(owner, name, value)

  def __len__(self):
    return len(self._saved)

  def describe(self) -> list[str]:
    """`module.attr` of every patch in place (for logs and tests)."""
    return [f"{getattr(o, '__name__', type(o).__name__)}.{n}" for o, n, _ in self._saved]
