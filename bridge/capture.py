"""Captures a torch module and its loss as one core-ATen graph with `torch.export`.

The module is wrapped so that the exported graph returns `(loss, outputs)`: the loss comes
from the model output (`.loss` of a HF ModelOutput, or element 0 of a tuple) or from a
user `loss_fn(outputs, batch)` written in torch. Tensor entries of the batch become graph
inputs with a dynamic leading (batch) dimension, so the lowered functions accept any
micro-batch size; other entries (`use_cache=False`, flags) are closed over as constants.
"""
from __future__ import annotations

import contextlib
import dataclasses
import inspect
import warnings
from typing import Any, Callable, Mapping

import numpy as np
import torch
from torch.export import Dim
from torch.export.graph_signature import InputKind, OutputKind

from bridge import rewrites, torchax_compat

# Prefix of the user's module inside the export wrapper (stripped from every name).
_MODEL_ATTR = "m"

# Ops kept whole through the decomposition: attention runs as one fused kernel
# (bridge.attention), whose backward keeps O(seq) state instead of the scores.
KEPT_WHOLE = (torch.ops.aten.scaled_dot_product_attention.default,)


@dataclasses.dataclass(frozen=True)
class Captured:
  """A decomposed exported graph plus the maps from its placeholders to torch names.

  Attributes:
    exported: the decomposed `torch.export.ExportedProgram`.
    inputs: batch key -> placeholder node, for the tensor entries of the batch.
    params: placeholder node -> torch parameter name (as the model names it, before
      tied names are merged), frozen (`requires_grad=False`) ones included: the bridged
      program holds them as parameters it does not train (`Program.trainable`).
    constants: placeholder node -> name of a buffer or a lifted tensor constant, closed over.
    constant_values: the name -> torch tensor of each constant.
    loss: the graph node holding the scalar loss.
    outputs: the graph nodes of the model outputs (flattened), `out_spec` rebuilds them.
    out_spec: torch pytree spec of the model outputs.
    closed_over: the non-tensor batch entries passed to the model as Python values.
    dynamic_batch: whether the leading batch dimension is symbolic in the graph.
    log: what happened during capture, one line each.
    mutated_buffers: names of the buffers the forward updates in place (BatchNorm running
      statistics in training mode); the lowered program keeps them constant.
  """
  exported: Any
  inputs: dict
  params: dict
  constants: dict
  constant_values: dict
  loss: Any
  outputs: tuple
  out_spec: Any
  closed_over: dict
  dynamic_batch: bool
  log: tuple[str, ...]
  mutated_buffers: tuple[str, ...] = ()

  @property
  def graph(self):
    return self.exported.graph_module.graph

  def __repr__(self):
    n = sum(1 for node in self.graph.nodes if node.op == "call_function")
    return (f"Captured(nodes={n}, inputs={list(self.inputs)}, params={len(self.params)}, "
            f"constants={len(self.constants)}, dynamic_batch={self.dynamic_batch})")


class _LossWrapper(torch.nn.Module):
  """Runs the model on its inputs from the batch and returns `(loss, outputs)`."""

  def __init__(self, model, input_keys, closed_over, loss_fn):
    super().__init__()
    setattr(self, _MODEL_ATTR, model)
    self._input_keys, self._closed_over, self._loss_fn = input_keys, closed_over, loss_fn

  def forward(self, tensors):
    batch = {**tensors, **self._closed_over}
    outputs = getattr(self, _MODEL_ATTR)(**{k: batch[k] for k in self._input_keys})
    loss = self._loss_fn(outputs, batch) if self._loss_fn else loss_from_outputs(outputs)
    return loss, outputs


class NoLossError(TypeError):
  """The model outputs hold no scalar loss and no loss_fn was given."""


def loss_from_outputs(outputs) -> torch.Tensor:
  """The loss inside a model's outputs: `.loss`, element 0 of a tuple, or a scalar tensor."""
  loss = getattr(outputs, "loss", None)
  if loss is None and isinstance(outputs, (tuple, list)) and outputs:
    loss = outputs[0]
  if loss is None and isinstance(outputs, torch.Tensor):
    loss = outputs
  if not isinstance(loss, torch.Tensor) or loss.ndim != 0:
    got = type(outputs).__name__ if loss is None else f"{type(loss).__name__} {getattr(loss, 'shape', '')}"
    raise NoLossError(
        f"Could not find a scalar loss in the model outputs (got {got}). The model must return a "
        "ModelOutput with `.loss` (pass `labels` in the batch), a tuple whose first element is the "
        "loss, or a scalar tensor; otherwise pass loss_fn=lambda outputs, batch: ... (torch code).")
  return loss


def model_input_keys(model: torch.nn.Module, batch: Mapping[str, Any]) -> tuple[str, ...]:
  """The batch keys `model.forward` accepts (all of them if it takes **kwargs)."""
  params = inspect.signature(model.forward).parameters
  if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
    return tuple(batch)
  keys = tuple(k for k in batch if k in params)
  if not keys:
    raise ValueError(f"None of the batch keys {sorted(batch)} is an argument of "
                     f"{type(model).__name__}.forward{inspect.signature(model.forward)}. Name the "
                     "batch entries after the forward arguments.")
  return keys


def split_batch(example_batch: Mapping[str, Any]) -> tuple[dict, dict]:
  """Splits a batch into tensors (traced, batch-leading) and other values (closed over)."""
  if not isinstance(example_batch, Mapping):
    raise TypeError(f"example_batch must be a dict of model inputs, got "
                    f"{type(example_batch).__name__}. Use e.g. {{'input_ids': ids, 'labels': ids}}.")
  tensors, closed = {}, {}
  for key, value in example_batch.items():
    if isinstance(value, np.ndarray) or type(value).__module__.startswith("jax"):
      value = torch.from_numpy(np.asarray(value))
    if isinstance(value, torch.Tensor):
      if value.ndim == 0:
        raise ValueError(f"example_batch[{key!r}] is a 0-d tensor; every tensor of the batch must have "
                         "the batch as its leading dimension. Pass scalars as Python values.")
      tensors[key] = value
    else:
      closed[key] = value
  sizes = {k: int(v.shape[0]) for k, v in tensors.items()}
  if len(set(sizes.values())) > 1:
    raise ValueError(f"Every tensor of example_batch must have the same leading (batch) size, got {sizes}.")
  if not tensors:
    raise ValueError("example_batch has no tensors; the model needs at least one tensor input.")
  return tensors, closed


def capture(model: torch.nn.Module, example_batch: Mapping[str, Any],
            loss_fn: Callable | None = None) -> Captured:
  """Exports `model` with its loss to a core-ATen graph (decomposed as torchax expects).

  Args:
    model: the torch module (its parameters may live on the meta device).
    example_batch: dict of model inputs (and labels); tensors lead with the batch dimension.
    loss_fn: optional torch function `loss_fn(outputs, batch) -> scalar tensor`.

  Returns:
    A `Captured` graph.
  """
  tensors, closed = split_batch(example_batch)
  input_keys = model_input_keys(model, example_batch)
  if loss_fn is not None and not callable(loss_fn):
    raise TypeError(f"loss_fn must be callable as loss_fn(outputs, batch), got {type(loss_fn).__name__}.")
  wrapper = _LossWrapper(model, input_keys, closed, loss_fn)
  notes = [f"model inputs {list(input_keys)}; closed over {sorted(closed)}"]
  on_meta = any(p.is_meta for p in model.parameters())
  if on_meta:  # fake tracing cannot mix meta weights with real inputs; values are unused
    tensors = {k: v.to("meta") for k, v in tensors.items()}

  batch_dim = Dim("batch")
  dynamic = {k: {0: batch_dim} for k in tensors}
  try:
    exported = torch.export.export(wrapper, (dict(tensors),), dynamic_shapes=(dynamic,))
    dynamic_batch = True
  except NoLossError:
    raise
  except Exception as e:  # the model specializes its batch size (e.g. batch 1): keep it static
    notes.append(f"dynamic batch export failed ({_first_line(e)}); exported with a static batch: "
                 "the program only runs at the example batch size")
    with _explain(model, "torch.export.export"):
      exported = torch.export.export(wrapper, (dict(tensors),))
    dynamic_batch = False
  # Core ATen plus torchax's extra decompositions, in one pass (two passes retrace twice).
  table = torch.export.default_decompositions()
  table.update(torchax_compat.torchax_decompositions())
  for op in KEPT_WHOLE:  # lowered as one fused op (bridge.lowering), not as its decomposition
    table.pop(op, None)
  with warnings.catch_warnings(), _explain(model, "run_decompositions"):
    warnings.filterwarnings("ignore", ".*LeafSpec.*", FutureWarning)  # torch's own noise
    exported = exported.run_decompositions(table)

  folded = rewrites.fold_batched_matmuls(exported.graph)
  if folded:
    notes.append(f"{folded} view-bmm-view chains folded into batched matmuls")
  fused = sum(1 for n in exported.graph.nodes if n.op == "call_function" and n.target in KEPT_WHOLE)
  if fused:
    notes.append(f"{fused} attention calls run as fused attention (bridge.attention)")
  grouped = rewrites.fold_repeat_kv(exported.graph)
  if grouped:
    notes.append(f"{grouped} attention calls on repeated key/value heads run as grouped-query attention")
  return _index(exported, model, tensors, closed, dynamic_batch, notes)


class CaptureError(RuntimeError):
  """torch.export could not capture the model (the torch error is chained as __cause__)."""


def _first_line(e: Exception) -> str:
  text = str(e).strip()
  return f"{type(e).__name__}: {text.splitlines()[0][:300]}" if text else type(e).__name__


@contextlib.contextmanager
def _explain(model, step: str):
  try:
    yield
  except NoLossError:
    raise
  except Exception as e:
    raise CaptureError(
        f"{step} failed for {type(model).__name__}: {_first_line(e)}. The bridge needs a model "
        "torch.export can capture; for transformers models set dropout to 0 or call model.eval(), "
        "and try another attn_implementation ('sdpa' or 'eager').") from e


def _strip(name: str) -> str:
  return name[len(_MODEL_ATTR) + 1:] if name.startswith(_MODEL_ATTR + ".") else name


def module_path(node) -> str:
  """The innermost module path of a node (from `meta['nn_module_stack']`), wrapper-free."""
  stack = node.meta.get("nn_module_stack") or {}
  for path, _cls in reversed(list(stack.values())):
    if path == _MODEL_ATTR:
      return ""
    if path.startswith(_MODEL_ATTR + "."):
      return _strip(path)
  return ""


def _index(exported, model, tensors, closed, dynamic_batch, notes) -> Captured:
  sig = exported.graph_signature
  placeholders = {n.name: n for n in exported.graph.nodes if n.op == "placeholder"}
  user_keys = list(_in_spec(exported).child(0).child(0).context)
  user_specs = [s for s in sig.input_specs if s.kind == InputKind.USER_INPUT]
  if len(user_keys) != len(user_specs):
    raise RuntimeError(f"export produced {len(user_specs)} user inputs for batch keys {user_keys}.")
  inputs = {k: placeholders[s.arg.name] for k, s in zip(user_keys, user_specs)}

  all_tensors = dict(model.named_parameters(remove_duplicate=False))
  all_tensors.update(model.named_buffers(remove_duplicate=False))
  params, constants, constant_values = {}, {}, {}
  for spec in sig.input_specs:
    node = placeholders[spec.arg.name]
    if spec.kind == InputKind.PARAMETER:  # frozen ones too: held and sharded, not trained
      params[node] = _strip(spec.target)
    elif spec.kind == InputKind.BUFFER:
      constants[node] = _strip(spec.target)
      constant_values[_strip(spec.target)] = all_tensors[_strip(spec.target)].detach()
    elif spec.kind == InputKind.CONSTANT_TENSOR:
      constants[node] = f"<constant {spec.target}>"
      constant_values[constants[node]] = exported.constants[spec.target].detach()
    elif spec.kind != InputKind.USER_INPUT:
      raise NotImplementedError(f"torch.export input of kind {spec.kind.name} ({spec.target}) is not "
                                "supported by the bridge.")

  output_node = next(n for n in exported.graph.nodes if n.op == "output")
  outs = list(output_node.args[0])
  mutated = [s.target for s in sig.output_specs if s.kind == OutputKind.BUFFER_MUTATION]
  if mutated:
    notes.append(f"buffer updates are not carried over (kept constant): {[_strip(t) for t in mutated]}")
  user = [o for o, s in zip(outs, sig.output_specs) if s.kind == OutputKind.USER_OUTPUT]
  if len(user) != len(sig.output_specs) - len(mutated):
    kinds = sorted({s.kind.name for s in sig.output_specs})
    raise NotImplementedError(f"torch.export outputs of kinds {kinds} are not supported by the bridge.")
  loss = user[0]
  val = loss.meta.get("val")
  if not isinstance(val, torch.Tensor) or val.ndim != 0 or not val.dtype.is_floating_point:
    raise TypeError(f"The loss must be a scalar floating tensor, got {val!r}.")
  out_spec = _out_spec(exported).child(1)
  return Captured(exported=exported, inputs=inputs, params=params, constants=constants,
                  constant_values=constant_values, loss=loss, outputs=tuple(user[1:]),
                  out_spec=out_spec, closed_over=dict(closed), dynamic_batch=dynamic_batch,
                  log=tuple(notes), mutated_buffers=tuple(_strip(t) for t in mutated))


def _in_spec(exported):
  return exported.module_call_graph[0].signature.in_spec


def _out_spec(exported):
  return exported.module_call_graph[0].signature.out_spec
