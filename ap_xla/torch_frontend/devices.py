"""The accelerator as MoAI presents it: one "cuda" device, on any torch build.

On MoAI a script sees one accelerator, "cuda", and moves its model and batches to it; the
parallel plan runs behind it. ap-xla presents the same, with the plan's devices being JAX's:

  * **Moves are identities on the host.** A `TorchFunctionMode` (`AcceleratorMode`, on the
    torch-function stack while the front end is installed) rewrites the accelerator device to
    "cpu" in every torch call: `model.cuda()`, `model.to("cuda")`, `tensor.cuda()`,
    `tensor.to(device)`, factories with `device="cuda"`, `torch.device("cuda")` as a default
    device. `pin_memory()` returns the tensor itself. The torch-side model is the host copy
    that ap-xla reads and writes; the training state lives in JAX on the plan's devices. On a
    CUDA build of torch this keeps torch from allocating GPU memory (or even a CUDA context)
    that the JAX plan needs.
  * **What a script reads back.** `p.device` is `cpu` and `p.is_cuda` False: the tensors are
    host tensors. That does not send scripts down a wrong path: every device a script names
    is rewritten the same way, so tensors always meet on one device; `torch.autocast("cuda")`
    is honoured as the plan's bf16 (below), not by the device of the tensors; pinning is off
    (there is nothing to pin for); accelerate and the HF Trainer pick "cuda" from
    `torch.cuda.is_available()` and place everything through the rewrite.
  * **`torch.cuda` queries** answer for the presented accelerator (`CUDA_FUNCTIONS`):
    `is_available()` True, `device_count()` 1, `current_device()` 0, `set_device` accepts it,
    `get_device_name()` "ap-xla (8 x cpu)"-style, `get_device_capability()` the GPU's (8.0 on
    CPU: bf16 works), `is_bf16_supported()` True, `synchronize()` waits for the JAX work,
    `empty_cache()` does nothing, the seed and RNG-state functions do nothing (tensors made
    "on cuda" come from torch's CPU generator, which `torch.manual_seed` seeds), `Event`
    times on the host after a synchronize, and the memory functions report the plan's
    per-device figures (`device_memory.py`).
  * **Mixed precision.** `torch.autocast("cuda", dtype=torch.bfloat16)` (or "cpu") around a
    training forward runs that forward's plan in bf16 with fp32 master weights, the plan's
    `mixed_precision`; float16 runs as bf16 too (no loss scaling is needed) and says so.
    `torch.cuda.amp.GradScaler` / `torch.amp.GradScaler("cuda")` are made disabled scalers:
    `scale()` returns the loss, `step()` steps, `update()` does nothing.
  * **DataLoader pinning** is off (`_BaseDataLoaderIter` pins nothing, starts no pin thread).

Everything here is undone by `uninstall()` (the mode popped, every attribute restored).
torch keeps function modes per thread: the rewrite applies on the thread that installed the
front end (a script's main thread, where its loop runs); a worker thread of the script that
moves a tensor to "cuda" on a CPU build of torch fails as it would without ap-xla.
"""
from __future__ import annotations

import contextlib
import inspect
import logging
import threading
import time
import warnings

import torch
from torch.overrides import TorchFunctionMode

from ap_xla.torch_frontend import device_memory
from ap_xla.torch_frontend.patching import Patches

log = logging.getLogger("ap_xla")

ACCELERATOR = "cuda"
_HOST = torch.device("cpu")
# Tensor methods whose positional arguments may name a device.
_DEVICE_ARG_METHODS = {"to", "cuda", "pin_memory", "new_empty", "new_zeros", "new_ones", "new_full",
                       "new_tensor"}
_state = threading.local()


def _is_accelerator(d) -> bool:
  if isinstance(d, torch.device):
    return d.type == ACCELERATOR
  if isinstance(d, str):
    return d.split(":")[0] == ACCELERATOR
  return False


def _host(d):
  return _HOST if _is_accelerator(d) else d


class AcceleratorMode(TorchFunctionMode):
  """Rewrites the presented accelerator to the host in every torch call (see the module docstring)."""

  def __torch_function__(self, func, types, args=(), kwargs=None):
    kwargs = kwargs or {}
    name = getattr(func, "__name__", "")
    if "device" in kwargs:
      kwargs = dict(kwargs, device=_host(kwargs["device"]))
    if name in _DEVICE_ARG_METHODS and args and isinstance(args[0], torch.Tensor):
      if name == "cuda" or name == "pin_memory":
        return args[0]  # already on the host, as `.to()` returns a tensor already on its device
      if name == "to":
        args = (args[0],) + tuple(_HOST if (_is_accelerator(a) or (isinstance(a, int) and not
                                                                      isinstance(a, bool))) else a
                                  for a in args[1:])
    return func(*args, **kwargs)


# -- the torch.cuda namespace -----------------------------------------------------------------

def _devices():
  return device_memory.plan_devices()


def device_name() -> str:
  devs = _devices()
  return f"ap-xla ({len(devs)} x {devs[0].device_kind})"


def device_capability() -> tuple[int, int]:
  cap = getattr(_devices()[0], "compute_capability", None)
  if cap:
    major, _, minor = str(cap).partition(".")
    return int(major), int(minor or 0)
  return (8, 0)  # bf16-capable: the plan's bf16 runs on any JAX backend


class DeviceProperties:
  """What `torch.cuda.get_device_properties()` returns for the presented accelerator."""

  def __init__(self):
    self.name = device_name()
    self.major, self.minor = device_capability()
    self.total_memory = device_memory.capacity()
    self.multi_processor_count = len(_devices())
    self.is_integrated = False
    self.is_multi_gpu_board = False

  def __repr__(self):
    return (f"_CudaDeviceProperties(name='{self.name}', major={self.major}, minor={self.minor}, "
            f"total_memory={self.total_memory // 2**20}MB, multi_processor_count={self.multi_processor_count})")


class Event:
  """`torch.cuda.Event`: `record()` waits for the JAX work and stamps the host clock."""

  def __init__(self, enable_timing: bool = False, blocking: bool = False, interprocess: bool = False,
               external: bool = False):
    self.enable_timing, self._time = enable_timing, None

  def record(self, stream=None):
    device_memory.synchronize()
    self._time = time.perf_counter()

  def wait(self, stream=None):
    return None

  def query(self) -> bool:
    return True

  def synchronize(self):
    device_memory.synchronize()

  def elapsed_time(self, end: "Event") -> float:
    if self._time is None or end._time is None:
      raise RuntimeError("Both events must be recorded before calculating elapsed time.")
    return (end._time - self._time) * 1e3


class device(contextlib.ContextDecorator):  # noqa: N801 (torch.cuda.device's name)
  """`torch.cuda.device(i)`: the one presented accelerator is always current."""

  def __init__(self, device=None):
    self.idx = 0

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    return False


def set_device(device) -> None:
  index = device.index if isinstance(device, torch.device) else (
      int(device.split(":")[1]) if isinstance(device, str) and ":" in device else device)
  if index not in (None, 0, "cuda") and not (isinstance(device, str) and device == ACCELERATOR):
    raise ValueError(
        f"torch.cuda.set_device({device!r}): ap-xla presents one accelerator (index 0), as MoAI does; "
        "the plan spreads the work over its devices. Use device 0 (or just 'cuda').")


def _does_nothing(name: str):
  # One function object per name: torch._dynamo's trace rules refuse an object under two names.
  def fn(*args, **kwargs):
    return None
  fn.__name__ = fn.__qualname__ = name
  return fn


def _rng_state(device="cuda"):
  return torch.empty(0, dtype=torch.uint8)


CUDA_FUNCTIONS = {
    "is_available": lambda: True,
    "device_count": lambda: 1,
    "current_device": lambda: 0,
    "set_device": set_device,
    "get_device_name": lambda device=None: device_name(),
    "get_device_capability": lambda device=None: device_capability(),
    "get_device_properties": lambda device=None: DeviceProperties(),
    "is_bf16_supported": lambda including_emulation=True: True,
    "is_current_stream_capturing": lambda: False,
    "synchronize": lambda device=None: device_memory.synchronize(),
    "empty_cache": _does_nothing("empty_cache"),
    "ipc_collect": _does_nothing("ipc_collect"),
    "set_per_process_memory_fraction": _does_nothing("set_per_process_memory_fraction"),
    "manual_seed": _does_nothing("manual_seed"),
    "manual_seed_all": _does_nothing("manual_seed_all"),
    "seed": _does_nothing("seed"),
    "seed_all": _does_nothing("seed_all"),
    "initial_seed": lambda: 0,
    "get_rng_state": _rng_state,
    "get_rng_state_all": lambda: [],
    "set_rng_state": _does_nothing("set_rng_state"),
    "set_rng_state_all": _does_nothing("set_rng_state_all"),
    "memory_allocated": device_memory.memory_allocated,
    "max_memory_allocated": device_memory.max_memory_allocated,
    "memory_reserved": device_memory.memory_reserved,
    "max_memory_reserved": device_memory.max_memory_reserved,
    "reset_peak_memory_stats": device_memory.reset_peak_memory_stats,
    "reset_max_memory_allocated": lambda device=None: device_memory.reset_peak_memory_stats(),
    "reset_accumulated_memory_stats": _does_nothing("reset_accumulated_memory_stats"),
    "memory_stats": device_memory.memory_stats,
    "memory_summary": device_memory.memory_summary,
    "mem_get_info": device_memory.mem_get_info,
    "Event": Event,
    "device": device,
}


# -- autocast and the gradient scaler ----------------------------------------------------------

def autocast_dtype() -> torch.dtype | None:
  """The dtype of an autocast region around this call ("cuda" or "cpu"), or None."""
  for dev in (ACCELERATOR, "cpu"):
    if torch.is_autocast_enabled(dev):
      return torch.get_autocast_dtype(dev)
  return None


def _disabled_scaler_init(original):
  signature = inspect.signature(original)

  def __init__(self, *args, **kwargs):
    bound = signature.bind(self, *args, **kwargs)
    bound.apply_defaults()
    if bound.arguments.get("device") == ACCELERATOR and bound.arguments.get("enabled"):
      bound.arguments["enabled"] = False
      if not getattr(_state, "scaler_logged", False):
        _state.scaler_logged = True
        log.info("ap-xla: GradScaler('cuda') is a disabled scaler (scale() returns the loss, step() "
                 "steps): the plan's mixed precision is bf16, which needs no loss scaling.")
    original(*bound.args, **bound.kwargs)
  return __init__


def _unpinned_iter_init(original):
  def __init__(self, loader):
    with warnings.catch_warnings():  # torch's "no accelerator is found" for pin_memory=True: by design here
      warnings.filterwarnings("ignore", message="'pin_memory' argument is set as true")
      original(self, loader)
    self._pin_memory = False  # nothing to pin for: batches stay host tensors
  return __init__


# -- install / uninstall -----------------------------------------------------------------------

_mode: AcceleratorMode | None = None


def install(patches: Patches) -> None:
  """Presents the accelerator: pushes `AcceleratorMode`, patches `torch.cuda`, the scaler, pinning."""
  global _mode
  import torch.cuda.memory
  import torch.cuda.random
  from torch.amp import grad_scaler
  from torch.utils.data import dataloader
  for name, fn in CUDA_FUNCTIONS.items():
    for module in (torch.cuda, torch.cuda.memory, torch.cuda.random):
      if module is torch.cuda or name in module.__dict__:
        patches.set(module, name, fn)
  patches.set(grad_scaler.GradScaler, "__init__", _disabled_scaler_init(grad_scaler.GradScaler.__init__))
  patches.set(dataloader._BaseDataLoaderIter, "__init__",
              _unpinned_iter_init(dataloader._BaseDataLoaderIter.__init__))
  if _mode is None:
    _mode = AcceleratorMode()
    torch._C._push_on_torch_function_stack(_mode)


def uninstall() -> None:
  """Pops `AcceleratorMode` (the attribute patches are undone by the caller's `Patches`)."""
  global _mode
  if _mode is not None:
    above = _pop_through(_mode)
    for m in reversed(above or []):
      torch._C._push_on_torch_function_stack(m)
    _mode = None


def _pop_through(mode) -> list | None:
  """Pops the torch-function stack down to and including `mode`; returns the modes that were
  above it, top first (None, and the stack unchanged, when `mode` is not on it)."""
  above = []
  while torch._C._len_torch_function_stack():
    top = torch._C._pop_torch_function_stack()
    if top is mode:
      return above
    above.append(top)
  for m in reversed(above):
    torch._C._push_on_torch_function_stack(m)
  return None


def is_installed() -> bool:
  return _mode is not None
