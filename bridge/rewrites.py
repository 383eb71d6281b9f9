"""Meaning-preserving rewrites of the exported graph, done before it is split and lowered.

Grouped-query attention written as `repeat_kv` (Hugging Face: unsqueeze -> expand ->
reshape of key and value to the query's head count, then `scaled_dot_product_attention`)
becomes one attention call with `enable_gqa=True` on the unrepeated key and value
(`fold_repeat_kv`): the same numbers (query head n reads key head n // G either way),
without the G-fold copies of key and value in memory and in the saved state.

Core-ATen decomposition turns a batched matmul `q @ k^T` of shape [B, H, T, d] into
`view(q, [B*H, T, d])`, `bmm`, `view(out, [B, H, T, T])`. Merging the batch with the heads
is harmless on one device, but it hides the head dimension from XLA's sharding propagation
and from the tensor-parallel analysis (`passes/tp_rules.py`): heads sharded over 'tensor'
cannot be block-sharded inside B*H. `fold_batched_matmuls` puts the batched matmul back as
one `jnp.matmul` over the original leading dimensions.
"""
from __future__ import annotations

import jax.numpy as jnp
import torch
import torch.fx


def batched_matmul(a, b):
  """`a @ b` over shared leading dimensions (the lowering of a folded view-bmm-view)."""
  return jnp.matmul(a, b)


def _shape(node):
  val = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
  return tuple(val.shape) if isinstance(val, torch.Tensor) else None


def _same(a, b) -> bool:
  return a is not None and b is not None and len(a) == len(b) and all(str(x) == str(y) for x, y in zip(a, b))


def _unfold(view):
  """For view(x, [P, M, K]) with x of shape [*lead, M, K], returns (x, lead)."""
  if not (isinstance(view, torch.fx.Node) and view.op == "call_function"
          and view.target in (torch.ops.aten.view.default, torch.ops.aten._unsafe_view.default)):
    return None
  source = view.args[0]
  src, out = _shape(source), _shape(view)
  if src is None or out is None or len(src) < 3 or len(out) != 3 or not _same(src[-2:], out[-2:]):
    return None
  return source, src[:-2]


def fold_batched_matmuls(graph: torch.fx.Graph) -> int:
  """Replaces view -> bmm -> view chains by one `batched_matmul`; returns how many."""
  folded = 0
  for bmm in list(graph.nodes):
    if bmm.op != "call_function" or bmm.target != torch.ops.aten.bmm.default or len(bmm.users) != 1:
      continue
    views = bmm.args[:2]
    left, right = _unfold(views[0]), _unfold(views[1])
    out = next(iter(bmm.users))
    if left is None or right is None or not _same(left[1], right[1]):
      continue
    if out.target not in (torch.ops.aten.view.default, torch.ops.aten._unsafe_view.default):
      continue
    if not _same(_shape(out), left[1] + _shape(bmm)[-2:]):
      continue
    with graph.inserting_before(out):
      new = graph.call_function(batched_matmul, (left[0], right[0]))
    new.meta = dict(out.meta)
    new.meta["stack_trace"] = bmm.meta.get("stack_trace", out.meta.get("stack_trace"))
    out.replace_all_uses_with(new)
    for dead in (out, bmm, *views):  # in this order: each frees the next
      if not dead.users:
        graph.erase_node(dead)
    folded += 1
  return folded


_VIEWS = (torch.ops.aten.view.default, torch.ops.aten._unsafe_view.default, torch.ops.aten.reshape.default)
_SDPA = torch.ops.aten.scaled_dot_product_attention.default


def _call(node, targets) -> bool:
  return isinstance(node, torch.fx.Node) and node.op == "call_function" and node.target in targets


def _repeated(node):
  """For reshape(expand(unsqueeze(x, 2), [B, K, G, S, D]), [B, K*G, S, D]), returns (x, G)."""
  if not _call(node, _VIEWS):
    return None
  inner = node.args[0]
  if _call(inner, (torch.ops.aten.clone.default,)):
    inner = inner.args[0]
  if not _call(inner, (torch.ops.aten.expand.default,)):
    return None
  unsq = inner.args[0]
  if not _call(unsq, (torch.ops.aten.unsqueeze.default,)) or unsq.args[1] != 2:
    return None
  src, wide, out = _shape(unsq.args[0]), _shape(inner), _shape(node)
  if src is None or wide is None or out is None or len(src) != 4 or len(wide) != 5 or len(out) != 4:
    return None
  if not (_same(wide[:2], src[:2]) and _same(wide[3:], src[2:]) and _same(out[:1], src[:1])
          and _same(out[2:], src[2:])):
    return None
  groups = wide[2]
  if not isinstance(groups, int) or not isinstance(src[1], int) or out[1] != src[1] * groups:
    return None
  return unsq.args[0], groups


def fold_repeat_kv(graph: torch.fx.Graph) -> int:
  """Rewrites sdpa(q, repeat_kv(k), repeat_kv(v)) as sdpa(q, k, v, enable_gqa=True); returns how many."""
  folded = 0
  for node in list(graph.nodes):
    if not _call(node, (_SDPA,)) or node.kwargs.get("enable_gqa", False):
      continue
    key, value = _repeated(node.args[1]), _repeated(node.args[2])
    if key is None or value is None or key[1] != value[1] or key[1] < 2:
      continue
    chains = node.args[1:3]
    node.args = (node.args[0], key[0], value[0], *node.args[3:])
    node.kwargs = {**node.kwargs, "enable_gqa": True}
    for dead in chains:  # reshape -> clone -> expand -> unsqueeze, each freeing the next
      while dead is not key[0] and dead is not value[0] and not dead.users:
        source = dead.args[0]
        graph.erase_node(dead)
        dead = source
    folded += 1
  return folded
