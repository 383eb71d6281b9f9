"""Finds the repeated block stack of an exported graph and splits it into pre / block / post.

Each node of a torch.export graph records the module that ran it
(`meta['nn_module_stack']`). The block container is found in the model itself: a
`ModuleList` (or `Sequential`) of at least two modules of one class, whatever its
attribute name; candidates are tried from the one covering the most graph nodes down.
Nodes inside child i belong to block i; the other nodes are post when they depend on a
block node, and pre otherwise (topological position says nothing: export interleaves
them). The blocks must be isomorphic: same op sequence, same constant arguments, same
shapes, parameters of the same relative names. Then block 0's nodes, run with layer i's
weights, compute layer i, so the stack runs as one function under `lax.scan`.

A block receives the hidden state from the previous block plus side inputs every block
reads (the mask, rotary tables: `aux`); it must hand exactly one value to the next block.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Iterable

import torch
import torch.fx
from torch.fx import Node

from bridge.capture import Captured, module_path
from bridge.lowering import is_symbolic


class NoBlockStack(Exception):
  """Why a candidate container cannot be run as a block stack (logged, not raised to users)."""


@dataclasses.dataclass(frozen=True)
class BlockSplit:
  """The graph cut into pre / one block (block 0's nodes) / post.

  Attributes:
    container: module path of the block container, e.g. 'model.layers'.
    block_class: class name of the blocks.
    num_blocks: L.
    pre_nodes, block_nodes, post_nodes: call_function nodes of each piece in graph order
      (post also recomputes the pre nodes it reads, so it needs only the batch).
    hidden_in: the node block 0 reads as its hidden state (made by pre).
    hidden_out: block 0's output node.
    last_out: the last block's output node (post reads it as the hidden state).
    aux: side inputs of block 0 (pre nodes or batch placeholders), in order of first use.
    aux_batched: per aux node, whether its leading dimension is the batch; the others are
      broadcast to the batch by pre and un-broadcast by the block.
    block_params: name inside the block -> torch names of the L layers' tensors.
    block_param_nodes: block 0's parameter placeholders -> name inside the block.
    pre_params, post_params: placeholder -> torch name for the parameters pre / post read.
  """
  container: str
  block_class: str
  num_blocks: int
  pre_nodes: tuple
  block_nodes: tuple
  post_nodes: tuple
  hidden_in: Node
  hidden_out: Node
  last_out: Node
  aux: tuple
  aux_batched: tuple
  block_params: dict
  block_param_nodes: dict
  pre_params: dict
  post_params: dict

  def __repr__(self):
    return (f"BlockSplit(container={self.container!r}, block_class={self.block_class!r}, "
            f"num_blocks={self.num_blocks}, pre={len(self.pre_nodes)}, block={len(self.block_nodes)}, "
            f"post={len(self.post_nodes)}, aux={len(self.aux)})")


def candidate_containers(model: torch.nn.Module) -> list[tuple[str, list[str], str]]:
  """(path, child paths, class name) of every ModuleList/Sequential of >= 2 same-class modules."""
  out = []
  for path, mod in model.named_modules():
    if not isinstance(mod, (torch.nn.ModuleList, torch.nn.Sequential)):
      continue
    children = list(mod.named_children())
    if len(children) < 2 or len({type(c) for _, c in children}) != 1:
      continue
    prefix = f"{path}." if path else ""
    out.append((path, [prefix + name for name, _ in children], type(children[0][1]).__name__))
  return out


def find_blocks(captured: Captured, model: torch.nn.Module,
                canonical: dict[str, str]) -> tuple[BlockSplit | None, list[str]]:
  """Finds and splits the block stack; returns (split or None, the reasons, one line each).

  Args:
    captured: the captured graph.
    model: the torch module (its module tree names the containers).
    canonical: torch parameter name -> name of the tensor's first name (ties).
  """
  nodes = [n for n in captured.graph.nodes if n.op == "call_function"]
  paths = {n: module_path(n) for n in nodes}
  scored = []
  for path, children, cls in candidate_containers(model):
    covered = sum(1 for n in nodes if _child_index(paths[n], children) is not None)
    if covered:
      scored.append((covered, path, children, cls))
  if not scored:
    return None, ["no ModuleList/Sequential of two or more same-class modules runs in the graph"]
  notes = []
  for covered, path, children, cls in sorted(scored, key=lambda s: -s[0]):
    try:
      split = _split(captured, nodes, paths, path, children, cls, canonical)
    except NoBlockStack as e:
      notes.append(f"'{path}' ({len(children)} x {cls}, {covered} ops) is not a block stack: {e}")
      continue
    notes.append(f"block stack '{path}': {len(children)} x {cls}, {len(split.block_nodes)} ops per "
                 f"block, {len(split.pre_nodes)} pre ops, {len(split.post_nodes)} post ops, "
                 f"{len(split.aux)} aux inputs")
    return split, notes
  return None, notes


def _child_index(path: str, children: list[str]) -> int | None:
  for i, child in enumerate(children):
    if path == child or path.startswith(child + "."):
      return i
  return None


def _inputs(node: Node) -> list[Node]:
  return [a for a in node.all_input_nodes if not is_symbolic(a)]


def _describe(node: Node) -> str:
  return f"{node.name} (module '{module_path(node) or '<top>'}')"


def _split(captured, nodes, paths, container, children, cls, canonical) -> BlockSplit:
  num = len(children)
  label = {}
  for n in nodes:
    if not is_symbolic(n):
      i = _child_index(paths[n], children)
      if i is not None:
        label[n] = i
  blocks = [[n for n in nodes if label.get(n) == i] for i in range(num)]
  empty = [children[i] for i, b in enumerate(blocks) if not b]
  if empty:
    raise NoBlockStack(f"{empty} run no ops (skipped layers)")

  after = set()  # non-block nodes that depend on a block: the post side
  for n in nodes:
    if n not in label and not is_symbolic(n) and any(a in label or a in after for a in _inputs(n)):
      after.add(n)

  exts, outs = [], []
  for i, blk in enumerate(blocks):
    inside = set(blk)
    ext = []
    for n in blk:
      for a in _inputs(n):
        if a in inside or a in ext:
          continue
        if a in after:
          raise NoBlockStack(f"block {i} reads {_describe(a)}, which is computed outside the blocks "
                             "from an earlier block's output")
        if a in label and label[a] != i - 1:
          raise NoBlockStack(f"block {i} reads block {label[a]} directly ({_describe(a)})")
        ext.append(a)
    out = [n for n in blk if any(u not in inside and not is_symbolic(u) for u in n.users)]
    if len(out) != 1:
      raise NoBlockStack(f"block {i} hands {len(out)} values to later code "
                         f"({[o.name for o in out][:4]}); a block must return one hidden state")
    exts.append(ext)
    outs.append(out[0])
  for i in range(num - 1):
    readers = {label.get(u) for u in outs[i].users if not is_symbolic(u)}
    if readers != {i + 1}:
      raise NoBlockStack(f"the output of block {i} is read outside block {i + 1}")
  for i in range(1, num):
    prev = [a for a in exts[i] if label.get(a) == i - 1]
    if prev != [outs[i - 1]]:
      raise NoBlockStack(f"block {i} reads {len(prev)} values of block {i - 1}")
  hidden_pos = exts[1].index(outs[0])

  sig0 = _signature(blocks[0], exts[0])
  for i in range(1, num):
    sig = _signature(blocks[i], exts[i])
    if len(sig) != len(sig0):
      raise NoBlockStack(f"the blocks are not isomorphic: block {i} has {len(sig)} ops, block 0 "
                         f"has {len(sig0)}")
    for k, (a, b) in enumerate(zip(sig0, sig)):
      if a != b:
        raise NoBlockStack(f"the blocks are not isomorphic: block {i} differs from block 0 at op {k} "
                           f"({blocks[i][k].name}: {b[0]} vs {blocks[0][k].name}: {a[0]})")
    if len(exts[i]) != len(exts[0]):
      raise NoBlockStack(f"block {i} reads {len(exts[i])} outside values, block 0 {len(exts[0])}")

  block_params, block_param_nodes, aux = {}, {}, []
  for p, node0 in enumerate(exts[0]):
    column = [ext[p] for ext in exts]
    if p == hidden_pos:
      if node0 in captured.params or node0 in captured.constants:
        raise NoBlockStack("block 0 reads a weight where later blocks read the hidden state")
      continue
    if node0 in captured.params:
      rel, names = _stacked_param(column, children, captured, canonical)
      block_params[rel], block_param_nodes[node0] = names, rel
    elif node0 in captured.constants:
      _check_constant(column, children, captured)
    elif any(n is not node0 for n in column):
      raise NoBlockStack(f"blocks read different side inputs at the same place ({[n.name for n in column][:4]}); "
                         "per-layer side inputs (e.g. alternating masks) need a flat program")
    else:
      aux.append(node0)

  hidden_in = exts[0][hidden_pos]
  batch = _batch_size_sym(captured)
  for what, n in (("the hidden state entering the blocks", hidden_in), ("the block output", outs[-1])):
    if not _leads_with(n, batch):
      raise NoBlockStack(f"{what} ({_describe(n)}, shape {_shape(n)}) does not lead with the batch")

  block_nodes = set().union(*map(set, blocks))
  pre_nodes = ancestors([hidden_in, *aux], stop=set(), nodes=nodes)
  post_nodes = ancestors([captured.loss], stop={outs[-1]}, nodes=nodes)
  bad = [n for n in post_nodes if n in block_nodes]
  if bad:
    raise NoBlockStack(f"the loss reads block nodes other than the last output ({_describe(bad[0])})")

  pre_params = _params_read(pre_nodes, captured)
  post_params = _params_read(post_nodes, captured)
  in_blocks = {canonical[n] for names in block_params.values() for n in names}
  shared = in_blocks & {canonical[n] for n in [*pre_params.values(), *post_params.values()]}
  if shared:
    raise NoBlockStack(f"block weights {sorted(shared)[:3]} are also read outside the blocks")
  return BlockSplit(
      container=container, block_class=cls, num_blocks=num, pre_nodes=tuple(pre_nodes),
      block_nodes=tuple(blocks[0]), post_nodes=tuple(post_nodes), hidden_in=hidden_in,
      hidden_out=outs[0], last_out=outs[-1], aux=tuple(aux),
      aux_batched=tuple(_leads_with(a, batch) for a in aux), block_params=block_params,
      block_param_nodes=block_param_nodes, pre_params=pre_params, post_params=post_params)


def _signature(blk: list[Node], ext: list[Node]) -> list[tuple]:
  """Per op: target, arguments (nodes as positions), output shapes/dtypes."""
  pos = {n: k for k, n in enumerate(blk)}
  ext_pos = {n: k for k, n in enumerate(ext)}

  def canon(a):
    if a in pos:
      return ("op", pos[a])
    if is_symbolic(a):
      return ("size", str(a.meta["val"].node.expr))
    return ("in", ext_pos[a])

  return [(str(n.target), repr(torch.fx.node.map_arg((n.args, n.kwargs), canon)),
           _meta_signature(n.meta.get("val"))) for n in blk]


def _meta_signature(val) -> Any:
  if isinstance(val, torch.Tensor):
    return (tuple(str(d) for d in val.shape), str(val.dtype))
  if isinstance(val, (tuple, list)):
    return tuple(_meta_signature(v) for v in val)
  return type(val).__name__


def _relative(name: str, child: str) -> str | None:
  return name[len(child) + 1:] if name.startswith(child + ".") else None


def _stacked_param(column, children, captured, canonical) -> tuple[str, tuple[str, ...]]:
  names = [canonical[captured.params[n]] for n in column]
  rels = [_relative(n, c) for n, c in zip(names, children)]
  if None in rels:
    outside = names[rels.index(None)]
    raise NoBlockStack(f"blocks read the weight {outside!r}, which lives outside the block "
                       "(weights shared across layers cannot be stacked)")
  if len(set(rels)) != 1:
    raise NoBlockStack(f"blocks read differently named weights at the same place: {rels[:4]}")
  return rels[0], tuple(names)


def _check_constant(column, children, captured) -> None:
  if all(n is column[0] for n in column):
    return  # one buffer shared by every block: closed over once
  names = [captured.constants[n] for n in column]
  rels = {_relative(n, c) for n, c in zip(names, children)}
  values = [captured.constant_values[n] for n in names]
  same = all(v.shape == values[0].shape and v.dtype == values[0].dtype and
             (v.is_meta or values[0].is_meta or torch.equal(v, values[0])) for v in values)
  # Same values under each layer's own name; or lifted constants (e.g. torch.tensor([-2])
  # made in a forward) that export names per layer, compared by value.
  compared = not any(v.is_meta for v in values)
  if not same or (not compared and (None in rels or len(rels) != 1)):
    raise NoBlockStack(f"blocks read buffers that differ across layers ({names[:3]}); buffers are "
                       "closed over, so every block must read the same values")


def _batch_size_sym(captured: Captured):
  val = next(iter(captured.inputs.values())).meta["val"]
  return val.shape[0]


def _leads_with(node: Node, batch) -> bool:
  val = node.meta.get("val")
  if not isinstance(val, torch.Tensor) or val.ndim == 0:
    return False
  if isinstance(batch, torch.SymInt):
    return isinstance(val.shape[0], torch.SymInt) and str(val.shape[0].node.expr) == str(batch.node.expr)
  return val.shape[0] == batch  # static export: best effort


def _shape(node: Node):
  val = node.meta.get("val")
  return tuple(val.shape) if isinstance(val, torch.Tensor) else None


def ancestors(roots: Iterable[Node], stop: set, nodes: list[Node]) -> list[Node]:
  """call_function ancestors of `roots` (inclusive), not crossing `stop`, in graph order."""
  seen, todo = set(), [r for r in roots if r.op == "call_function" and r not in stop]
  while todo:
    n = todo.pop()
    if n in seen:
      continue
    seen.add(n)
    todo.extend(a for a in n.all_input_nodes if a.op == "call_function" and a not in stop
                and not is_symbolic(a))
  return [n for n in nodes if n in seen]


def _params_read(piece: Iterable[Node], captured: Captured) -> dict[Node, str]:
  out = {}
  for n in piece:
    for a in n.all_input_nodes:
      if a in captured.params:
        out[a] = captured.params[a]
  return out
