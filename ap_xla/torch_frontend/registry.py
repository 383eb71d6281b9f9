"""The live sessions: which torch models ap-xla trains (model -> `Session`)."""
from __future__ import annotations

import weakref

_SESSIONS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def session_of(model):
  """The `Session` training `model`, or None."""
  return _SESSIONS.get(model)


def register(model, session) -> None:
  _SESSIONS[model] = session


def pop(model):
  return _SESSIONS.pop(model, None)


def sessions() -> list:
  """Every live session."""
  return list(_SESSIONS.values())


def models() -> list:
  return list(_SESSIONS.keys())
