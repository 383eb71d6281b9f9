"""Reading XLA's optimized HLO text: instructions, computations, shapes and their bytes.

The parser behind `passes.hlo_stats` and `passes.hlo_groups`: it reads what `compiled.as_text()`
prints (one instruction per line, computations in braces) into light records, without jaxlib's
HLO bindings (whose API changes between versions).
"""
from __future__ import annotations

import math
import re
from typing import NamedTuple


class Instr(NamedTuple):
  """One HLO instruction: its name, result shape, opcode, operands and the rest of its line."""
  name: str
  shape: str
  opcode: str
  operands: list  # [(inline shape or '', name)]
  attrs: str


_ARRAY_RE = re.compile(r"\b([a-z][a-z0-9]*)\[([^\]]*)\]")
_BITS_RE = re.compile(r"[a-z]+?(\d+)")


def parse_arrays(shape: str) -> list[tuple[str, tuple[int, ...]]]:
  """(dtype, dims) of every array in a shape string, tuples flattened."""
  out = []
  for dtype, dims in _ARRAY_RE.findall(shape):
    out.append((dtype, tuple(int(d.strip().lstrip("<=")) for d in dims.split(",") if d.strip())))
  return out


def dtype_bits(dtype: str) -> int:
  """Bits per element of an HLO element type ('f32' -> 32, 'pred' -> 8, tokens -> 0)."""
  if dtype == "pred":
    return 8
  m = _BITS_RE.match(dtype)
  return int(m.group(1)) if m else 0  # token, opaque: no data


def shape_bytes(shape: str) -> int:
  """Bytes of an HLO shape string such as 'f32[8,32]{1,0}' or '(s32[], bf16[4])'."""
  return sum(math.prod(dims) * dtype_bits(dt) // 8 for dt, dims in parse_arrays(shape))


def close_index(s: str, i: int) -> int:
  """Index just past the bracket that closes the one at s[i]."""
  depth = 0
  for j in range(i, len(s)):
    depth += (s[j] in "([{") - (s[j] in ")]}")
    if depth == 0:
      return j + 1
  raise ValueError(f"unbalanced brackets in HLO text: {s[i:i + 80]!r}")


def _split_top(s: str) -> list[str]:
  parts, depth, start = [], 0, 0
  for j, ch in enumerate(s):
    depth += ch in "([{"
    depth -= ch in ")]}"
    if ch == "," and depth == 0:
      parts.append(s[start:j])
      start = j + 1
  parts.append(s[start:])
  return [p.strip() for p in parts if p.strip()]


_LHS_RE = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*")
_OPCODE_RE = re.compile(r"([\w\-]+)\(")


def _parse_instr(line: str) -> Instr | None:
  m = _LHS_RE.match(line)
  if not m:
    return None
  rest = line[m.end():]
  end = close_index(rest, 0) if rest.startswith("(") else rest.find(" ")
  if end <= 0:
    return None
  shape, rest = rest[:end], rest[end:].lstrip()
  m2 = _OPCODE_RE.match(rest)
  if not m2:
    return None
  close = close_index(rest, m2.end() - 1)
  operands = []
  for op in _split_top(rest[m2.end():close - 1]):
    head, _, name = op.rpartition(" ")
    operands.append((head, name.lstrip("%")))
  return Instr(m.group(1), shape, m2.group(1), operands, rest[close:])


def parse_module(text: str):
  """({computation: [instr]}, entry name, {instr name: shape}, number of devices)."""
  comps: dict[str, list[Instr]] = {}
  entry, cur = None, None
  for line in text.splitlines():
    s = line.strip()
    if cur is None:
      if s.endswith("{") and " = " not in s and not s.startswith("HloModule"):
        is_entry = s.startswith("ENTRY")
        m = re.match(r"%?([\w.\-]+)", s[len("ENTRY"):].strip() if is_entry else s)
        if m:
          cur = m.group(1)
          comps[cur] = []
          entry = cur if is_entry else entry
    elif s == "}":
      cur = None
    else:
      ins = _parse_instr(s)
      if ins is not None:
        comps[cur].append(ins)
  if entry is None:
    raise ValueError("analyze_hlo: no ENTRY computation found; pass the text of "
                     "`jax.jit(f).lower(...).compile().as_text()`.")
  shapes = {i.name: i.shape for instrs in comps.values() for i in instrs}
  header = text.split("\n", 1)[0]
  n = math.prod(int(m.group(1)) for k in ("num_partitions", "replica_count")
                if (m := re.search(k + r"=(\d+)", header)))
  return comps, entry, shapes, n


def ints_in(s: str) -> list[int]:
  """Every non-negative integer written in `s`, in order."""
  return [int(x) for x in re.findall(r"\d+", s)]
