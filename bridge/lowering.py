"""Runs nodes of an exported ATen graph in JAX through torchax's op table.

torchax maps each ATen overload to a JAX function; this module walks any subset of a
graph's nodes (a whole graph, or the pre / block / post pieces of it) with that table.
`EXTRA_LOWERINGS` holds the few lowerings torchax lacks or gets wrong for our graphs (among
them `scaled_dot_product_attention`, kept whole by the capture and run as the fused kernel
of `bridge.attention`); each has a test in tests/test_bridge_lowering.py or
tests/test_bridge_attention.py.

Symbolic sizes (the dynamic batch) are not passed between pieces: a node whose value is a
`SymInt` is evaluated from its sympy expression and the sizes of the arrays at hand.
"""
from __future__ import annotations

import operator
import re
from typing import Any, Callable, Iterable, Mapping

import jax
import jax.numpy as jnp
import torch
import torch.fx

from bridge import attention, rewrites, torchax_compat
from bridge.capture import module_path


class UnsupportedOperatorError(NotImplementedError):
  """An ATen operator in the exported graph has no JAX lowering."""


def _to_copy(x, *, dtype=None, **unused):
  """aten._to_copy: torchax's requires `dtype` and fails on device-only copies."""
  del unused  # layout, device, pin_memory, memory_format: meaningless in JAX
  if dtype is None:
    return x
  return x.astype(torchax_compat.t2j_dtype(dtype))


def _softmax(x, dim, half_to_float=False):
  """aten._softmax whose gradient stays finite on fully masked (all -inf) rows.

  torch.export decomposes sdpa into `where(row fully masked, 0, softmax(scores))`; with
  jax.nn.softmax the masked rows' NaN leaks into the gradient through the unused branch
  (NaN * 0). The value here equals torch's (NaN on those rows), but the NaN is selected
  by a `where` whose other branch is finite, so no NaN reaches the gradient.
  """
  if half_to_float and x.dtype == jnp.float16:
    x = x.astype(jnp.float32)
  if x.ndim == 0:
    return jnp.ones_like(x)
  shift = jnp.max(x, axis=dim, keepdims=True)
  shift = jax.lax.stop_gradient(jnp.where(jnp.isfinite(shift), shift, 0))
  e = jnp.exp(x - shift)
  total = jnp.sum(e, axis=dim, keepdims=True)
  ok = total > 0
  return jnp.where(ok, e / jnp.where(ok, total, 1), jnp.nan)


def _gather(x, dim, index, *, sparse_grad=False):
  """aten.gather as `jnp.take_along_axis` where the index spans the input on every other axis
  (a loss picking each token's label logit: `nll_loss`, `cross_entropy`).

  That gather names the other axes as batch dimensions, so GSPMD keeps a batch-sharded gather,
  and its gradient's scatter-add, on each device's own rows. torchax's lowering indexes with
  full index arrays: under data parallelism GSPMD then all-gathers the scatter-add's indices
  and updates over 'data' on every step (tests/test_bridge_lowering.py counts them). An index
  smaller than the input on another axis (torch allows it) takes torchax's lowering.
  """
  del sparse_grad  # a layout hint for torch's backward; the values are the same
  if dim < 0:
    dim += max(x.ndim, 1)
  if x.ndim and index.ndim == x.ndim and all(index.shape) and all(
      i == n for d, (i, n) in enumerate(zip(index.shape, x.shape)) if d != dim):
    return jnp.take_along_axis(x, index, axis=dim, mode="clip")
  return torchax_compat.aten_lowerings()[torch.ops.aten.gather].func(x, dim, index)


def _grouped_mm(input, weight, offs):
  """transformers::grouped_mm_fallback (mixture-of-experts layers): rows [offs[i-1], offs[i]) of
  `input` times `weight[i]`, rows past offs[-1] zero; `jax.lax.ragged_dot` computes exactly that."""
  offs = offs.astype(jnp.int32)
  sizes = jnp.diff(offs, prepend=jnp.zeros((1,), jnp.int32))
  return jax.lax.ragged_dot(input, weight.astype(input.dtype), sizes)


# Custom (non-ATen) ops of libraries' models, by their registered name.
NAMED_LOWERINGS: dict[str, Callable] = {
    "transformers::grouped_mm_fallback": _grouped_mm,
}

# ATen overloads whose torchax lowering is missing or wrong for export graphs, and the
# functions bridge.rewrites puts into graphs. The values take JAX arrays (and the graph's
# Python constants) like torchax's own lowerings.
EXTRA_LOWERINGS: dict[Any, Callable] = {
    torch.ops.aten._to_copy.default: _to_copy,
    torch.ops.aten._softmax.default: _softmax,
    torch.ops.aten.gather.default: _gather,
    torch.ops.aten.scaled_dot_product_attention.default: attention.sdpa,
    rewrites.batched_matmul: rewrites.batched_matmul,
}


def _sdpa_refusal(node) -> str | None:
  dropout = node.kwargs.get("dropout_p", node.args[4] if len(node.args) > 4 else 0.0)
  if dropout:
    return (f"dropout_p={dropout} (random: the bridged program is deterministic; set the attention "
            "dropout to 0 or call model.eval())")
  return None


# Overloads the bridge lowers only for some arguments: node -> why not, or None.
_REFUSALS: dict[Any, Callable] = {
    torch.ops.aten.scaled_dot_product_attention.default: _sdpa_refusal,
}

# Python functions export records for SymInt arithmetic and multi-output ops.
_PYTHON_TARGETS = {operator.getitem, operator.add, operator.sub, operator.mul, operator.floordiv,
                   operator.truediv, operator.mod, operator.neg, operator.pow}


def lowering_for(target) -> Callable | None:
  """The JAX function for an fx node target, or None if there is none."""
  if target in EXTRA_LOWERINGS:
    return EXTRA_LOWERINGS[target]
  if target in _PYTHON_TARGETS:
    return target
  if isinstance(target, torch._ops.OpOverload) and target.name() in NAMED_LOWERINGS:
    return NAMED_LOWERINGS[target.name()]
  if not isinstance(target, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
    return None
  table = torchax_compat.aten_lowerings()
  op = table.get(target)
  if op is None and isinstance(target, torch._ops.OpOverload):
    op = table.get(target.overloadpacket)
  if op is None or not op.is_jax_function or op.needs_env:
    return None  # torch-level decompositions and env-bound (random) ops cannot run on arrays
  return op.func


def source_line(node: torch.fx.Node) -> str | None:
  """The innermost `File ..., line N` of the node's recorded stack trace, with its code."""
  trace = node.meta.get("stack_trace") or ""
  lines = [l.strip() for l in trace.strip().splitlines()]
  for i in range(len(lines) - 1, -1, -1):
    if lines[i].startswith("File "):
      code = lines[i + 1] if i + 1 < len(lines) and not lines[i + 1].startswith("File ") else ""
      return f"{lines[i]}: {code}" if code else lines[i]
  return None


def _is_random(target) -> bool:
  # sdpa is tagged random for its dropout; _REFUSALS checks its dropout_p instead.
  return (isinstance(target, torch._ops.OpOverload) and target not in _REFUSALS
          and torch.Tag.nondeterministic_seeded in target.tags)


def check_supported(nodes: Iterable[torch.fx.Node]) -> None:
  """Raises `UnsupportedOperatorError` naming every operator without a lowering.

  Each operator is reported once, with the module path and source line of its first use.
  """
  first: dict[str, tuple[torch.fx.Node, str]] = {}
  for node in nodes:
    if node.op != "call_function" or is_symbolic(node):
      continue
    refusal = _REFUSALS[node.target](node) if node.target in _REFUSALS else None
    if refusal:
      first.setdefault(_op_name(node.target), (node, f" with {refusal}"))
    elif lowering_for(node.target) is None or _is_random(node.target):
      hint = (" (random: the bridged program is deterministic; set dropout probabilities to 0 or "
              "call model.eval())") if _is_random(node.target) else ""
      first.setdefault(_op_name(node.target), (node, hint))
  if not first:
    return
  lines = []
  for name, (node, hint) in first.items():
    where = module_path(node) or "<top level>"
    src = source_line(node)
    lines.append(f"  {name}{hint} in module '{where}'" + (f" at {src}" if src else ""))
  raise UnsupportedOperatorError(
      f"{len(first)} ATen operator(s) of the exported model cannot be lowered to JAX:\n" + "\n".join(lines)
      + "\nAdd a lowering to bridge.lowering.EXTRA_LOWERINGS (a function of JAX arrays), or change "
      "the model code at the lines above.")


def _op_name(target) -> str:
  return target.name() if hasattr(target, "name") else getattr(target, "__name__", str(target))


def is_symbolic(node: torch.fx.Node) -> bool:
  """Whether the node computes a size (SymInt/SymFloat/SymBool), not a tensor."""
  return isinstance(node.meta.get("val"), (torch.SymInt, torch.SymFloat, torch.SymBool))


def bind_symbols(pairs: Iterable[tuple[Any, Any]]) -> dict:
  """Symbol -> int from (meta value, array) pairs: a dimension traced as `s0` gives `s0`."""
  bindings = {}
  for meta, value in pairs:
    if not isinstance(meta, torch.Tensor) or not hasattr(value, "shape"):
      continue
    for sym, size in zip(meta.shape, value.shape):
      if isinstance(sym, torch.SymInt):
        expr = sym.node.expr
        if expr.is_Symbol:
          bindings[expr] = int(size)
  return bindings


def symbolic_value(node: torch.fx.Node, bindings: Mapping) -> int | float | bool:
  """The value of a SymInt/SymFloat node under `bindings` (no graph inputs needed)."""
  val = node.meta["val"]
  expr = val.node.expr
  missing = expr.free_symbols - set(bindings)
  if missing:
    raise ValueError(f"Cannot size node {node.name} ({expr}): no input carries {sorted(map(str, missing))}.")
  out = expr.subs(bindings)
  return {torch.SymInt: int, torch.SymFloat: float, torch.SymBool: bool}[type(val)](out)


def evaluate(nodes: Iterable[torch.fx.Node], env: dict, bindings: Mapping) -> dict:
  """Runs `nodes` (in graph order) in JAX, reading and filling `env` (node -> value).

  Args:
    nodes: call_function nodes; placeholders and other inputs must already be in `env`.
    env: values of the nodes computed so far; updated in place.
    bindings: symbol -> size, from `bind_symbols`.

  Returns:
    `env`.
  """
  def fetch(arg):
    if arg in env:
      return env[arg]
    if is_symbolic(arg):
      env[arg] = symbolic_value(arg, bindings)
      return env[arg]
    raise KeyError(f"node {arg.name} (module '{module_path(arg)}') is not computed in this piece of "
                   "the graph; this is a bridge bug.")

  for node in nodes:
    if node in env or node.op != "call_function":
      continue
    if is_symbolic(node):
      env[node] = symbolic_value(node, bindings)
      continue
    fn = lowering_for(node.target)
    if fn is None or node.target in _REFUSALS:
      check_supported([node])
    args, kwargs = torch.fx.node.map_arg((node.args, node.kwargs), fetch)
    with jax.named_scope(_scope_name(node)):
      env[node] = fn(*args, **kwargs)
  return env


def _scope_name(node) -> str:
  return re.sub(r"[^A-Za-z0-9_.]", "_", f"{module_path(node) or 'top'}/{_op_name(node.target)}")


def to_jax(value) -> jax.Array:
  """A copy of a torch tensor as a JAX array (a ShapeDtypeStruct for meta tensors)."""
  if isinstance(value, torch.Tensor):
    dtype = jax.dtypes.canonicalize_dtype(torchax_compat.t2j_dtype(value.dtype))  # int64 -> int32 without x64
    if value.is_meta:
      return jax.ShapeDtypeStruct(tuple(value.shape), dtype)
    host = value.detach().cpu()
    host = host.float() if value.dtype == torch.bfloat16 else host  # numpy has no bfloat16
    # A copy: jnp.asarray may alias the numpy buffer, which torch updates in place.
    return jnp.array(host.numpy(), dtype=dtype, copy=True)
  return value
