"""Replica groups of HLO collectives: which devices each collective runs over.

XLA prints them three ways: explicit lists (`replica_groups={{0,1},{2,3}}`), iota forms
(`[2,4]<=[8]` or transposed, `[4,2]<=[2,4]T(1,0)`) and mesh axes (`mesh['a'=2,'b'=4] {'b'}`);
collective-permutes give `source_target_pairs`. No groups means all devices.
"""
from __future__ import annotations

import functools
import logging
import math
import re

import numpy as np

from passes.hlo_text import Instr, close_index, ints_in

log = logging.getLogger("ap_xla")

_IOTA_RE = re.compile(r"\[([\d,]+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?")


def _iota(reshape, perm, shape) -> np.ndarray:
  ids = np.arange(math.prod(reshape)).reshape(reshape)
  return (ids.transpose(perm) if perm else ids).reshape(shape)


def _mesh_groups(s: str) -> list[list[int]]:
  """Groups of `mesh['a'=2,'b'=4](, device_ids=(...))? {'b'}` (sub-axes 'a':(1)2 too)."""
  m = re.match(r"mesh\[([^\]]*)\]", s)
  axes = re.findall(r"'?([^'=,\s]+)'?=(\d+)", m.group(1))
  names, sizes = [a for a, _ in axes], [int(n) for _, n in axes]
  rest = s[m.end():]
  ids = np.arange(math.prod(sizes))
  d = re.match(r",\s*device_ids=", rest)
  if d:
    start = d.end()
    end = close_index(rest, start)
    body = rest[start + 1:end - 1].strip()
    it = re.fullmatch(r"\[([\d,]+)\](?:T\(([\d,]+)\))?", body)
    ids = (_iota(ints_in(it.group(1)), ints_in(it.group(2) or ""), -1) if it
           else np.array(ints_in(body)[-math.prod(sizes):]))
    rest = rest[end:]
  ids = ids.reshape(sizes)
  refs = re.findall(r"'?([^'{}:,\s]+)'?(?::\((\d+)\)(\d+))?", rest[rest.find("{") + 1:rest.find("}")])
  groups: dict[tuple, list[int]] = {}
  for coord in np.ndindex(*sizes):
    key = list(coord)
    for axis, pre, size in refs:
      i = names.index(axis)
      if not size:  # the whole axis is in the group
        key[i] = 0
      else:  # XLA reshapes the axis to [pre, size, rest] and groups over `size`
        rest_size = sizes[i] // (int(pre) * int(size))
        key[i] -= (key[i] // rest_size) % int(size) * rest_size
    groups.setdefault(tuple(key), []).append(int(ids[coord]))
  return list(groups.values())


def _spec_len(s: str) -> int:
  """Length of the replica-group spelling at the start of `s` (0: not recognized)."""
  if s.startswith("{"):
    return close_index(s, 0)
  if m := _IOTA_RE.match(s):
    return m.end()
  if s.startswith("mesh["):
    j = close_index(s, 4)
    if d := re.match(r",\s*device_ids=", s[j:]):
      j = close_index(s, j + d.end())
    k = s.find("{", j)
    return close_index(s, k) if k >= 0 else j
  return 0


@functools.lru_cache(maxsize=1024)  # programs repeat a few spellings many times
def _parse_groups(key: str, spec: str, num_devices: int) -> tuple[tuple[tuple[int, ...], ...], int]:
  if key == "source_target_pairs=":
    pairs = tuple(tuple(ints_in(p)) for p in re.findall(r"\{(\d+,\s*\d+)\}", spec))
    return pairs, 2 if pairs else 1
  if spec.startswith("{"):
    groups = [ints_in(g) for g in re.findall(r"\{([\d,\s]*)\}", spec[1:-1])] or [list(range(num_devices))]
  elif m := _IOTA_RE.match(spec):
    groups = _iota(ints_in(m.group(2)), ints_in(m.group(3) or ""), ints_in(m.group(1))).tolist()
  else:
    groups = _mesh_groups(spec)
  groups = tuple(tuple(g) for g in groups)
  return groups, len(groups[0])


def replica_groups(ins: Instr, num_devices: int) -> tuple[tuple[tuple[int, ...], ...], int]:
  """(replica groups, group size) of a collective; no groups means all devices."""
  for key in ("source_target_pairs=", "replica_groups="):
    i = ins.attrs.find(key)
    if i >= 0:
      s = ins.attrs[i + len(key):]
      n = _spec_len(s)
      if n:
        return _parse_groups(key, s[:n], num_devices)
      log.warning("Unrecognized %s%r in %s; assuming all %d devices.", key, s[:60], ins.name, num_devices)
  return (tuple(range(num_devices)),), num_devices
