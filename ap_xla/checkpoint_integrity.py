"""Content checksums of a checkpoint's arrays, and the errors a damaged checkpoint raises.

Each array saved gets a 64-bit checksum of its bytes, stored in the checkpoint's metadata and
compared after a restore. It is computed where the array lives, on its devices, in one jitted
pass over the whole state: every element's bits are mixed with its flat index and the mixes
summed modulo 2**32 (two independent lanes). Integer addition is associative, so the sum does
not depend on how the array is sharded: a checkpoint restored onto another plan or another
device count verifies against the checksum taken at save time. Any change of a single element
changes the sum (each mix is a bijection of the element's bits); two changes cancel with odds
of about 2**-64. It is a guard against damage (flipped bits, a bad disk, a partial copy), not
against tampering.

On host (CPU) devices of a single process the same sums are computed with numpy, shard by
shard, from the arrays' memory: no compile (a jitted pass over a small model's state took
1.2-2.3 s to compile here). Elsewhere one jitted pass runs on the devices.

Example:
  >>> sums = checksums({"params": params, "opt_state": opt_state})
  >>> damaged = mismatches(restored, sums)   # [] when the restored arrays are the saved ones
"""
from __future__ import annotations

import functools
import logging
import os
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

PyTree = Any

_K = (0x9E3779B1, 0x85EBCA77, 0xC2B2AE3D, 0x27D4EB2F, 0x165667B1)


class CheckpointError(ValueError):
  """A checkpoint that cannot be used as asked; the message names the path or item and what to do."""


class DamagedCheckpointError(CheckpointError):
  """A checkpoint step whose files are missing, truncated or altered since it was saved.

  Attributes:
    path: the step directory.
    items: the damaged arrays or files (dotted names such as 'params.a.kernel', or paths).
    previous: the newest committed step before this one (None if there is none).
  """

  def __init__(self, message: str, path: str, items=(), previous: int | None = None):
    super().__init__(message)
    self.path, self.items, self.previous = path, tuple(items), previous


def dotted(path) -> str:
  """'opt_state.0.mu.w' for any key kinds: orbax's stored tree turns NamedTuple fields into dict keys."""
  parts = []
  for k in path:
    for attr in ("key", "idx", "name"):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
    else:
      parts.append(str(k))
  return ".".join(parts)


def _words(x: jax.Array) -> jax.Array | None:
  """x's bits as uint32 words (a trailing dim for 8-byte dtypes); None for a dtype not covered."""
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32)
  size = x.dtype.itemsize
  unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}.get(size)
  if unsigned is None:
    return None
  try:
    return lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)
  except (TypeError, ValueError):  # e.g. sub-byte or complex dtypes
    return None


def _leaf_sum(x: jax.Array) -> jax.Array | None:
  w = _words(x)
  if w is None:
    return None
  u = lambda v: jnp.uint32(v)
  idx, stride = jnp.zeros(w.shape, jnp.uint32), 1
  for d in reversed(range(w.ndim)):  # the flat index, built from iotas so nothing is reshaped
    idx = idx + lax.broadcasted_iota(jnp.uint32, w.shape, d) * u(stride % 2**32)
    stride *= w.shape[d]
  a = w * u(_K[0]) + idx * u(_K[1]) + u(_K[2])
  a = (a ^ (a >> 15)) * u(_K[3])
  a = a ^ (a >> 13)
  b = (w ^ (idx * u(_K[4]) + u(_K[1]))) * u(_K[2])
  b = (b ^ (b >> 16)) * u(_K[0])
  b = b ^ (b >> 15)
  return jnp.stack([jnp.sum(a, dtype=jnp.uint32), jnp.sum(b, dtype=jnp.uint32)])


@jax.jit
def _sums(leaves: list) -> list:
  return [_leaf_sum(x) for x in leaves]


def _host_words(a: np.ndarray) -> np.ndarray | None:
  """`_words` in numpy (the same words in the same order)."""
  if a.dtype == np.bool_:
    return a.astype(np.uint32)
  unsigned = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint32}.get(a.dtype.itemsize)
  if unsigned is None or a.dtype.kind == "c":  # complex: not covered on the devices either
    return None
  a = np.ascontiguousarray(a)
  if a.dtype.itemsize == 8:  # as lax.bitcast_convert_type: a trailing dim of 2, low word first
    return a.view(np.uint32).reshape(a.shape + (2,))
  return a.view(unsigned).astype(np.uint32)


def _host_leaf_sum(x: jax.Array) -> np.ndarray | None:
  """`_leaf_sum` from the shards in host memory: each element counted once (replica 0)."""
  total = np.zeros(2, np.uint64)
  for shard in x.addressable_shards:
    if shard.replica_id != 0:
      continue
    w = _host_words(np.asarray(shard.data))
    if w is None:
      return None
    starts = [sl.start or 0 for sl in shard.index] + [0] * (w.ndim - len(shard.index))
    full = list(x.shape) + list(w.shape[x.ndim:])
    idx, stride = np.zeros((), np.uint32), 1
    for d in reversed(range(w.ndim)):  # the element's flat index in the whole array, mod 2**32
      pos = (np.arange(starts[d], starts[d] + w.shape[d], dtype=np.uint64) * stride) % 2**32
      idx = idx + pos.astype(np.uint32).reshape([-1 if i == d else 1 for i in range(w.ndim)])
      stride *= full[d]
    idx = np.broadcast_to(idx, w.shape)
    with np.errstate(over="ignore"):
      a = w * np.uint32(_K[0]) + idx * np.uint32(_K[1]) + np.uint32(_K[2])
      a = (a ^ (a >> 15)) * np.uint32(_K[3])
      a = a ^ (a >> 13)
      b = (w ^ (idx * np.uint32(_K[4]) + np.uint32(_K[1]))) * np.uint32(_K[2])
      b = (b ^ (b >> 16)) * np.uint32(_K[0])
      b = b ^ (b >> 15)
    total += [a.sum(dtype=np.uint64), b.sum(dtype=np.uint64)]
  return (total % 2**32).astype(np.uint32)


def _on_host(leaves) -> bool:
  return jax.process_count() == 1 and all(
      isinstance(x, jax.Array) and all(d.platform == "cpu" for d in x.sharding.device_set) for x in leaves)


def checksums(tree: PyTree, on_host: bool | None = None) -> dict[str, dict]:
  """{dotted path: {'sum': 16 hex digits, 'dtype': str, 'shape': list}} for every array leaf.

  Args:
    tree: jax.Arrays (any sharding).
    on_host: compute with numpy from host memory (default: when every array is on CPU devices
      of this single process) or with one jitted pass on the devices.

  Leaves of a dtype the sum does not cover get no entry (they are not verified).
  """
  flat = jax.tree_util.tree_leaves_with_path(tree)
  leaves = [x for _, x in flat]
  if _on_host(leaves) if on_host is None else on_host:
    out = [_host_leaf_sum(x) for x in leaves]
  else:  # replicated outputs: every process reads its own copy
    out = [None if s is None else np.asarray(s.addressable_data(0)) for s in _sums(leaves)]
  result = {}
  for (path, x), s in zip(flat, out):
    if s is None:
      continue
    lo, hi = (int(v) for v in s)
    result[dotted(path)] = {"sum": f"{hi:08x}{lo:08x}", "dtype": str(x.dtype), "shape": list(x.shape)}
  return result


def mismatches(tree: PyTree, stored: dict) -> list[str]:
  """The dotted paths of `tree`'s arrays whose checksum differs from `stored` (restored as
  saved: an array restored into another dtype is cast, so it is not compared)."""
  now = checksums(tree)
  return [k for k, v in now.items() if k in stored and stored[k].get("dtype") == v["dtype"]
          and stored[k].get("sum") != v["sum"]]


# How TensorStore's errors name the array they were reading: 'Error reading "params.a.kernel/0.0"
# in OCDBT database ...' in the cause, "'path': 'params.a.kernel/'" in the spec orbax prints.
_TS_ARRAY = (re.compile(r'Error reading "([^"/]+)/'), re.compile(r"'path': '([^'/][^']*?)/?',"))


def _chain(error: BaseException) -> list[BaseException]:
  seen = []
  while error is not None and error not in seen:
    seen.append(error)
    error = error.__cause__ or error.__context__
  return seen


def failed_array(error: BaseException) -> str | None:
  """The array a TensorStore read error was about (its name inside the checkpoint), if it says."""
  for pattern in _TS_ARRAY:
    for e in _chain(error):
      names = pattern.findall(str(e))
      if names:
        return names[-1]
  return None


def short_error(error: BaseException) -> str:
  """The most specific line of an error and its causes (TensorStore's cause, not orbax's spec dump)."""
  e = _chain(error)[-1]
  text = str(e).split("See full TensorStore details")[0].strip()
  line = text.splitlines()[0].rstrip(".") if text else ""
  return f"{type(e).__name__}: {line[:300]}" if line else type(e).__name__


def read_failure(error: BaseException, state_dir: str) -> tuple[str, list[str]]:
  """(what went wrong, damaged items) for an error reading a step's arrays."""
  name = failed_array(error)
  if name:
    return (f"reading the array {name} failed ({short_error(error)}); a file of it is missing, truncated or "
            "altered", [name])
  described = os.path.join(state_dir, "_METADATA")  # orbax's description of the stored tree
  if os.path.isdir(state_dir) and not os.path.exists(described):
    return f"the description of its arrays ({described}) is missing", [described]
  return f"reading its arrays failed ({short_error(error)}); a file is missing, truncated or altered", [state_dir]


def damaged(directory: str, step: int, available, what: str, items=()) -> DamagedCheckpointError:
  """The error for a damaged step: what is wrong, then the previous committed step to use instead."""
  path = os.path.join(directory, str(step))
  earlier = [s for s in available if s < step]
  previous = earlier[-1] if earlier else None
  if previous is not None:
    offer = (f"The previous committed step {previous} is still there: restore it with step={previous} (e.g. "
             f"trainer.restore({directory!r}, step={previous})), and move {path} aside so later restores and "
             "saves skip it.")
  else:
    offer = "No earlier step is in this directory: restore a copy of the checkpoint, or train from the start."
  return DamagedCheckpointError(f"checkpoint step {step} in {directory} is damaged: {what}. {offer}", path,
                                items, previous)


def check_items(directory: str, step: int, available, items: tuple[str, str]) -> None:
  """Raises when the step folder is not one `save` wrote (both items) or lost one of its items."""
  path = os.path.join(directory, str(step))
  have = [i for i in items if os.path.isdir(os.path.join(path, i))]
  if not have:
    held = sorted(os.listdir(path)) if os.path.isdir(path) else []
    raise CheckpointError(f"{directory} is not a checkpoint directory written by ap_xla: its step folder {path} "
                          f"holds {held[:8]}, not the items {list(items)}. Pass the directory given to "
                          "save() (it holds one folder per step).")
  if len(have) == 1:
    gone = next(i for i in items if i not in have)
    raise damaged(directory, step, available, f"its item {gone!r} ({os.path.join(path, gone)}) is missing",
                  [os.path.join(path, gone)])


def verify(state: PyTree, meta: dict, fail) -> None:
  """Compares the restored arrays with the checksums saved with them; `fail(what, items)` makes the error."""
  sums = meta.get("checksums")
  if sums is None:
    logging.getLogger("ap_xla").warning("Checkpoint step %s was saved without checksums (by an older ap-xla): "
                                        "its contents are not verified.", meta.get("step"))
    return
  if not isinstance(sums, dict):
    raise fail("the checksums in its metadata are not readable", ["checksums"])
  bad = mismatches(state, sums)
  if bad:
    more = f" and {len(bad) - 6} more" if len(bad) > 6 else ""
    raise fail(f"{len(bad)} array(s) differ from the checksums saved with them ({', '.join(bad[:6])}{more}): "
                  "their bytes changed after the save", bad)
