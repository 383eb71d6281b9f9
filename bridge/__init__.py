"""The PyTorch bridge: a torch nn.Module (+ optimizer) -> the JAX training program.

`bridge_model(model, example_batch, optimizer)` captures the model with torch.export,
lowers it with torchax's op table and returns a `BridgedModel` whose `.program` is the
`passes.program.Program` the search pass consumes (in block form when the model has a
stack of identical blocks).

Modules, one concept each: torchax_compat (torch 2.13 shim), capture (torch.export),
rewrites (graph clean-ups), lowering (ATen -> JAX), attention (the fused attention kernel,
torch-free: the flax models use it too), blocks (block stack split), functions (the JAX
callables), state (torch names, ties, write-back), program (`bridge_model`), optim and
schedules (torch.optim -> optax), testing (tiny models).

The names below are imported on first use, so that `bridge.attention` loads without torch.
"""
import importlib

_EXPORTS = {
    "bridge_model": "bridge.program", "BridgedModel": "bridge.program",
    "UnsupportedOperatorError": "bridge.lowering", "CaptureError": "bridge.capture",
}

__all__ = ["bridge_model", "BridgedModel", "UnsupportedOperatorError", "CaptureError"]


def __getattr__(name):
  if name in _EXPORTS:
    return getattr(importlib.import_module(_EXPORTS[name]), name)
  raise AttributeError(f"module 'bridge' has no attribute {name!r}")
