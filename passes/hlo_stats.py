"""FLOPs, memory traffic and collectives of a compiled program, read from its optimized HLO.

`compiled.cost_analysis()` counts a while body once; here every computation is counted as
often as it runs: a while body `known_trip_count` times (nested loops multiply), fusions
and calls where they are called, the costliest branch of a conditional. All figures are
per device (the HLO of an SPMD program is the program of one partition).

Kernels: every instruction the program runs on its own (a fusion, a dot, a copy...; not a
collective, not bookkeeping such as tuple or bitcast) with its FLOPs and the bytes it moves
to and from memory, for the cost model's roofline. The bytes follow what the kernel touches:
a slice reads and writes the slice; a dynamic-update-slice writes its update in place; a
fusion reads each parameter in full unless the parameter is only sliced (then the slices)
or is the buffer a dynamic-update-slice updates in place (then nothing), and writes its
result, or only the updates where its root is (a tuple of) dynamic-update-slices.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import re
from typing import NamedTuple

from passes.hlo_groups import replica_groups
from passes.hlo_text import Instr, dtype_bits, ints_in, parse_arrays, parse_module, shape_bytes

log = logging.getLogger("ap_xla")

COLLECTIVE_KINDS = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
# The name scope `bridge.attention` runs fused attention under (with CAUSAL_SUFFIX when causal):
# the kernels it compiles to are reported apart (`HloStats.attention`), so a cost model can
# charge them as the flash-attention kernel a GPU runs in their place.
ATTENTION_SCOPE = "fused_attention"
CAUSAL_SUFFIX = "_causal"


@dataclasses.dataclass(frozen=True)
class Collective:
  """One collective instruction of the program.

  Attributes:
    kind: one of COLLECTIVE_KINDS (an async -start/-done pair counts as one).
    bytes: size of the result per device (tuple results summed): the full gathered array
      for all-gather, the scattered shard for reduce-scatter.
    group_size: devices per replica group (2 for collective-permute: sender and receiver).
    count: how many times it runs per step (the product of the enclosing trip counts).
    groups: the replica groups as partition ids (source-target pairs for collective-permute).
  """
  kind: str
  bytes: int
  group_size: int
  count: int = 1
  groups: tuple = dataclasses.field(default=(), repr=False, compare=False)


class Kernel(NamedTuple):
  """Kernels of one kind: FLOPs and bytes moved per run, and runs per step (module doc)."""
  flops: int
  bytes: int
  count: int


class Dot(NamedTuple):
  """A dot instruction outside any fusion: m x n result (its last two dims), k contracted."""
  name: str
  m: int
  n: int
  k: int
  dtype_bytes: int


@dataclasses.dataclass(frozen=True)
class HloStats:
  """What one step costs per device.

  Attributes:
    flops: FLOPs of dots and convolutions (2 per multiply-add), loops unrolled.
    collectives: every collective instruction with its run count.
    unknown_trip_counts: while loops without a known trip count (their bodies counted once).
    kernels: the kernels a step runs (module doc), equal ones merged with their counts added.
    unfused_dots: the dots run as kernels of their own (`unfused_dots`), every branch's.
    attention: the kernels of `kernels` run under ATTENTION_SCOPE (part of `kernels` too).
    attention_causal: whether every such kernel ran under the causal scope.
  """
  flops: int
  collectives: tuple[Collective, ...] = ()
  unknown_trip_counts: int = 0
  kernels: tuple[Kernel, ...] = dataclasses.field(default=(), repr=False)
  unfused_dots: tuple[Dot, ...] = dataclasses.field(default=(), repr=False)
  attention: tuple[Kernel, ...] = dataclasses.field(default=(), repr=False)
  attention_causal: bool = False

  @property
  def kernel_bytes(self) -> int:
    """Bytes all kernels move to and from memory over one step."""
    return sum(k.bytes * k.count for k in self.kernels)

  @property
  def comm_bytes(self) -> int:
    """Result bytes of all collectives over one step."""
    return sum(c.bytes * c.count for c in self.collectives)

  def bytes_by_kind(self) -> dict[str, int]:
    out: dict[str, int] = {}
    for c in self.collectives:
      out[c.kind] = out.get(c.kind, 0) + c.bytes * c.count
    return out

  def __repr__(self):
    calls = sum(c.count for c in self.collectives)
    return (f"HloStats(flops={self.flops:.4g}, collectives={len(self.collectives)} sites/{calls} calls, "
            f"comm={self.comm_bytes / 2**20:.4g} MiB, unknown_trip_counts={self.unknown_trip_counts})")


# ---------------------------------------------------------------- FLOPs

def _operand_dims(ins: Instr, k: int, shapes: dict) -> tuple[int, ...]:
  head, name = ins.operands[k]
  arrays = parse_arrays(head) or parse_arrays(shapes.get(name, ""))
  if not arrays:
    raise ValueError(f"analyze_hlo: no shape for operand {name!r} of {ins.name!r}.")
  return arrays[0][1]



def _conv_flops(out_dims, kernel_dims, attrs) -> int:
  m = re.search(r"dim_labels=\w+_(\w+)->", attrs)
  o = m.group(1).index("o") if m and "o" in m.group(1) else len(kernel_dims) - 1
  return 2 * math.prod(out_dims) * math.prod(kernel_dims) // max(kernel_dims[o], 1)


def _flops(ins: Instr, shapes: dict) -> int:
  op = ins.opcode
  if op == "dot":
    m = re.search(r"lhs_contracting_dims=\{([^}]*)\}", ins.attrs)
    lhs = _operand_dims(ins, 0, shapes)
    k = math.prod(lhs[d] for d in ints_in(m.group(1))) if m else 1
    return 2 * math.prod(parse_arrays(ins.shape)[0][1]) * k
  if op == "convolution":
    return _conv_flops(parse_arrays(ins.shape)[0][1], _operand_dims(ins, 1, shapes), ins.attrs)
  if op != "custom-call":
    return 0
  target = re.search(r'custom_call_target="([^"]*)"', ins.attrs)
  target = target.group(1) if target else ""
  result = parse_arrays(ins.shape)[0][1]  # library calls return (output, workspace)
  if target.startswith("__cudnn$fmha"):  # flash attention: QK^T and PV forward, 5 such matmuls backward
    return _fmha_flops(ins, target, shapes)
  if "dot_dimension_numbers" in ins.attrs:  # cuBLAS / cuBLASLt / hipBLAS gemm
    m = re.search(r'"lhs_contracting_dimensions":\[([^\]]*)\]', ins.attrs)
    lhs = _operand_dims(ins, 0, shapes)
    return 2 * math.prod(result) * math.prod(lhs[d] for d in ints_in(m.group(1) if m else ""))
  if target.startswith("__cudnn$conv"):  # forward output x kernel, whichever pass this is
    if "BackwardInput" in target:
      return _conv_flops(_operand_dims(ins, 0, shapes), _operand_dims(ins, 1, shapes), ins.attrs)
    if "BackwardFilter" in target:
      return _conv_flops(_operand_dims(ins, 1, shapes), result, ins.attrs)
    return _conv_flops(result, _operand_dims(ins, 1, shapes), ins.attrs)
  return 0


_FMHA_SCORES_RE = re.compile(r'"intermediate_tensor_shape":\s*\{[^{}]*?"dimensions":\s*\[([^\]]*)\]')


def _fmha_flops(ins: Instr, target: str, shapes: dict) -> int:
  """FLOPs of a cuDNN fused-attention call, all scores counted (a causal mask's skipped half is
  the cost model's to take off): the scores [B, N, T, S] come from its backend config, the
  head dim from the query ([B, T, N, H]); forward 2 matmuls (QK^T, PV), backward 5 (QK^T again,
  dP, dV, dQ, dK)."""
  m = _FMHA_SCORES_RE.search(ins.attrs)
  if not m:
    return 0
  scores = math.prod(ints_in(m.group(1)))
  head = _operand_dims(ins, 0, shapes)[-1]
  matmuls = 5 if "Backward" in target else 2
  return 2 * matmuls * scores * head


# ---------------------------------------------------------------- walking the call graph

_TRIP_RE = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')


def _callees(ins: Instr) -> list[str]:
  a = re.sub(r"metadata=\{[^}]*\}", "", ins.attrs)
  names = re.findall(r"\b(?:calls|called_computations)=\{?([^},]+(?:,\s*%[\w.\-]+)*)\}?", a)
  if ins.opcode == "call":
    names += re.findall(r"\bto_apply=(%?[\w.\-]+)", a)
  return [n.strip().lstrip("%") for group in names for n in group.split(",") if n.strip()]


def _branches(ins: Instr) -> list[str]:
  """The branch computations of a conditional."""
  m = re.search(r"branch_computations=\{([^}]*)\}", ins.attrs)
  if m:
    return [b.strip().lstrip("%") for b in m.group(1).split(",")]
  return re.findall(r"(?:true|false)_computation=%?([\w.\-]+)", ins.attrs)


def analyze_hlo(hlo_text: str) -> HloStats:
  """Per-device FLOPs and collectives of `compiled.as_text()`, with loops unrolled.

  Example:
    >>> stats = analyze_hlo(jax.jit(f).lower(x).compile().as_text())
    >>> stats.flops, stats.bytes_by_kind()
  """
  if not isinstance(hlo_text, str):
    raise TypeError(f"analyze_hlo takes the HLO text (compiled.as_text()), got {type(hlo_text).__name__}.")
  comps, entry, shapes, num_devices = parse_module(hlo_text)
  memo: dict[str, tuple[int, list[Collective], int]] = {}

  def visit(name: str) -> tuple[int, list[Collective], int]:
    if name in memo:
      return memo[name]
    flops, colls, unknown = 0, [], 0
    starts: dict[str, Instr] = {}

    def add(callee: str, times: int):
      nonlocal flops, unknown
      f, c, u = visit(callee)
      flops += f * times
      colls.extend(dataclasses.replace(x, count=x.count * times) for x in c)
      unknown += u

    for ins in comps.get(name, ()):
      op = ins.opcode
      flops += _flops(ins, shapes)
      kind = op[:-len("-done")] if op.endswith("-done") else op
      if op in COLLECTIVE_KINDS or (op.endswith("-done") and kind in COLLECTIVE_KINDS):
        # An async pair: the -done result is the output; the -start holds the groups.
        src = starts.pop(ins.operands[0][1], ins) if op.endswith("-done") and ins.operands else ins
        groups, size = replica_groups(src, num_devices)
        colls.append(Collective(kind, shape_bytes(ins.shape), size, 1, groups))
      elif op.endswith("-start") and op[:-len("-start")] in COLLECTIVE_KINDS:
        starts[ins.name] = ins
      elif op == "while":
        body = re.search(r"\bbody=%?([\w.\-]+)", ins.attrs).group(1)
        trip = _TRIP_RE.search(ins.attrs)
        unknown += trip is None
        add(body, int(trip.group(1)) if trip else 1)
      elif op == "conditional":
        branches = _branches(ins)
        if branches:
          add(max(branches, key=lambda b: visit(b)[0]), 1)
      elif op in ("async-update", "async-done"):
        continue  # the async-start already counted the wrapped computation
      else:
        for callee in _callees(ins):
          add(callee, 1)
    memo[name] = (flops, colls, unknown)
    return memo[name]

  flops, colls, unknown = visit(entry)
  kernels, dots, attention, causal = _kernels(comps, entry, shapes, lambda c: visit(c)[0])
  return HloStats(int(flops), tuple(colls), unknown, kernels, dots, attention, causal)


# ---------------------------------------------------------------- kernels (memory traffic)

_BOOKKEEPING = frozenset({"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "after-all",
                          "partition-id", "replica-id", "async-update", "async-done", "opt-barrier"})
_SLICES = frozenset({"dynamic-slice", "slice", "gather"})
_SEE_THROUGH = frozenset({"bitcast", "convert", "reshape"})


def _operand_bytes(ins: Instr, k: int, shapes: dict) -> int:
  head, name = ins.operands[k]
  return shape_bytes(head or shapes.get(name, ""))


def _fusion_bytes(ins: Instr, body: list, shapes: dict) -> int:
  """Bytes a fusion moves (module doc): its parameters as they are used, and its result.

  Bitcasts and converts are looked through: XLA:CPU updates a bf16 buffer as
  convert(dynamic-update-slice(convert(buffer), ...)), which a GPU does in place.
  """
  users: dict[str, list[tuple[Instr, int]]] = {}
  for i in body:
    for k, (_, name) in enumerate(i.operands):
      users.setdefault(name, []).append((i, k))

  def uses(name: str) -> list[tuple[Instr, int]]:
    out = []
    for u, k in users.get(name, []):
      out.extend(uses(u.name) if u.opcode in _SEE_THROUGH else [(u, k)])
    return out

  moved = 0
  for p in (i for i in body if i.opcode == "parameter"):
    full = shape_bytes(p.shape)
    part = 0
    for u, k in uses(p.name):
      if u.opcode in _SLICES and k == 0:
        part += shape_bytes(u.shape)
      elif not (u.opcode == "dynamic-update-slice" and k == 0):
        part = full
        break
    moved += min(part, full)
  by_name = {i.name: i for i in body}

  def source(i: Instr | None) -> Instr | None:
    while i is not None and i.opcode in _SEE_THROUGH and i.operands:
      i = by_name.get(i.operands[0][1])
    return i

  root = body[-1] if body else None  # HLO text prints a computation's ROOT last
  outs = [by_name.get(n) for _, n in root.operands] if root is not None and root.opcode == "tuple" else [root]
  for o in outs:
    src = source(o)
    if src is not None and src.opcode == "dynamic-update-slice":
      moved += _operand_bytes(src, 1, shapes)  # written in place: only the update moves
    elif o is not None:
      moved += shape_bytes(o.shape)
  return moved


def _dot(ins: Instr, shapes: dict) -> Dot:
  arrays = parse_arrays(ins.shape)
  dtype, dims = arrays[0] if arrays else ("f32", ())
  m, n = (dims[-2], dims[-1]) if len(dims) >= 2 else (1, dims[0] if dims else 1)
  lhs = _operand_dims(ins, 0, shapes)
  cd = re.search(r"lhs_contracting_dims=\{([^}]*)\}", ins.attrs)
  k = math.prod(lhs[c] for c in ints_in(cd.group(1))) if cd else 1
  return Dot(ins.name, m, n, k, max(dtype_bits(dtype) // 8, 1))


_SCOPE_RE = re.compile(r'op_name="[^"]*\b' + ATTENTION_SCOPE + r'(' + CAUSAL_SUFFIX + r')?\b')


def _scope(ins: Instr, body: list | None = None) -> str | None:
  """'causal' or 'full' when the instruction (or, for a fusion, any instruction it fuses) ran
  under ATTENTION_SCOPE; None otherwise. XLA:CPU leaves some fusions without metadata: the
  scope of the loops they run in is inherited by the caller (`_kernels`)."""
  for i in [ins] + list(body or ()):
    if i.opcode == "custom-call" and '"__cudnn$fmha' in i.attrs:  # cuDNN's flash attention itself
      return "causal" if '"mask_type": "CAUSAL"' in i.attrs or '"mask_type":"CAUSAL"' in i.attrs else "full"
    m = _SCOPE_RE.search(i.attrs)
    if m:
      return "causal" if m.group(1) else "full"
  return None


def _kernels(comps: dict, entry: str, shapes: dict, comp_flops):
  """The step's kernels (module doc), its unfused dots from every branch, the kernels run
  under ATTENTION_SCOPE and whether all of those were causal."""
  counts: dict[tuple[int, int], int] = {}
  attention: dict[tuple[int, int], int] = {}
  scopes: set = set()
  dots: list[Dot] = []

  def walk(name: str, times: int, into: dict, att: str | None = None, att_into: dict | None = None):
    att_into = attention if att_into is None else att_into
    for ins in comps.get(name, ()):
      op = ins.opcode
      if op in _BOOKKEEPING or op.endswith("-done"):
        continue
      if op == "while":
        body = re.search(r"\bbody=%?([\w.\-]+)", ins.attrs).group(1)
        trip = _TRIP_RE.search(ins.attrs)
        walk(body, times * (int(trip.group(1)) if trip else 1), into, att or _scope(ins), att_into)
        continue
      if op == "conditional":
        runs = []
        for b in _branches(ins):
          runs.append(({}, {}))
          walk(b, times, runs[-1][0], att or _scope(ins), runs[-1][1])
        if runs:  # the costliest branch, as for FLOPs
          costly = max(runs, key=lambda r: (sum(f * c for (f, _), c in r[0].items()),
                                            sum(b * c for (_, b), c in r[0].items())))
          for mine, theirs in zip(costly, (into, att_into)):
            for key, c in mine.items():
              theirs[key] = theirs.get(key, 0) + c
        continue
      if op == "call":
        for callee in _callees(ins):
          walk(callee, times, into, att or _scope(ins), att_into)
        continue
      kind = op[:-len("-start")] if op.endswith("-start") else op
      if kind in COLLECTIVE_KINDS:
        continue  # the ring model charges collectives
      if op == "dot":
        dots.append(_dot(ins, shapes))
      callees = _callees(ins)
      flops = _flops(ins, shapes) + sum(comp_flops(c) for c in callees)
      if op == "fusion" and callees:
        moved = _fusion_bytes(ins, comps.get(callees[0], []), shapes)
      elif op in _SLICES:
        moved = 2 * shape_bytes(ins.shape)
      elif op == "dynamic-update-slice":
        moved = 2 * _operand_bytes(ins, 1, shapes)
      else:
        moved = sum(_operand_bytes(ins, k, shapes) for k in range(len(ins.operands))) + shape_bytes(ins.shape)
      key = (int(flops), int(moved))
      into[key] = into.get(key, 0) + times
      scope = att or _scope(ins, comps.get(callees[0], []) if op == "fusion" and callees else None)
      if scope:
        scopes.add(scope)
        att_into[key] = att_into.get(key, 0) + times

  walk(entry, 1, counts)
  as_kernels = lambda d: tuple(Kernel(f, b, c) for (f, b), c in sorted(d.items()))
  return as_kernels(counts), tuple(dots), as_kernels(attention), scopes == {"causal"}


def unfused_dots(hlo_text: str) -> list[Dot]:
  """The `dot` instructions a compiled program runs as their own kernels (not in a fusion).

  Only computations reached through control flow (the entry, while bodies, every branch of a
  conditional, calls) are searched; a fusion's computation is not. On XLA:CPU these are the
  dots its YNNPACK fusions do not take (a left operand contracted on dim 0, e.g. weight
  gradients `x.T @ g`; which ones: `passes.screen_scratch`), run as Eigen contractions
  (`memory.cpu_dot_scratch`). The same list
  is `analyze_hlo(hlo_text).unfused_dots`.
  """
  if not isinstance(hlo_text, str):
    raise TypeError(f"unfused_dots takes the HLO text (compiled.as_text()), got {type(hlo_text).__name__}.")
  return list(analyze_hlo(hlo_text).unfused_dots)


def xla_cost_analysis(compiled) -> tuple[float, float]:
  """(flops, bytes accessed) from XLA's own `cost_analysis()`: loop bodies counted once."""
  ca = compiled.cost_analysis()
  if isinstance(ca, (list, tuple)):  # older jax returned one dict per program
    ca = ca[0] if ca else {}
  ca = ca or {}
  return float(ca.get("flops", 0.0)), float(ca.get("bytes accessed", 0.0))
