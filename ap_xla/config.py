"""The one explicit AP configuration: the options `enable_advanced_parallelization` set.

A leaf: it holds the state and installs nothing (`ap_xla.api.enable_advanced_parallelization`
sets it and installs the torch one-liner).
"""
from __future__ import annotations

import threading

from passes.space import AUTO, SearchOptions

_lock = threading.Lock()
_current: SearchOptions | None = None


def set_options(options: SearchOptions | None) -> None:
  """Sets the AP options (None: AP is off)."""
  global _current
  with _lock:
    _current = options


def current_options() -> SearchOptions | None:
  """The options set by `enable_advanced_parallelization`, or None when AP is off."""
  return _current


def is_enabled() -> bool:
  return _current is not None


__all__ = ["AUTO", "set_options", "current_options", "is_enabled"]
