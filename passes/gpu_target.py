"""Compiling candidates for a GPU that is not here: XLA:GPU without a device (ahead of time).

`ap-xla plan --hardware h100` and `search(..., hardware='h100')` on CPU devices plan for a GPU
cluster. With jax's CUDA plugin installed (`jax-cuda12-plugin` and `jax-cuda12-pjrt` at jaxlib's
version: no CUDA library, driver or GPU is needed), each candidate is compiled by XLA:GPU for a
compile-only topology of the target: its `GpuTargetConfigProto` (shipped in
`passes/gpu_targets/`, one per profile in `TARGET_CONFIGS`) on `nodes x devices_per_node` GPUs
(the profile's `devices_per_node`). SPMD partitioning, fusion, Triton gemms, cuDNN flash
attention, the collective schedule and the buffer assignment are then XLA:GPU's: memory is that
buffer assignment's (`compiled.memory_analysis()`), FLOPs, bytes and collectives are read from
the GPU module (`passes.hlo_stats`). Without the plugin, or for a profile without a target
config, candidates compile for the given CPU devices (XLA:CPU) as before, and the search logs why.

Where each figure comes from (the report's `route`):
  xla:gpu (deviceless)   XLA:GPU for the target config, no device
  xla:<platform>         the devices given (GPUs that are here; CPU devices)
  predicted              the analytic screen, calibrated on the compiled candidates (not compiled)

What a program traces to can depend on the platform it is for: attention is cuDNN's flash kernel
on GPUs (`bridge.attention`), which decides by `target_platform()`. `tracing_for(devices)` makes
that the devices' platform while a candidate is lowered (and while the screen traces), where
`jax.default_backend()` would say 'cpu'. Inside it, for a deviceless GPU target, jax's cuDNN
version check answers the version the target config declares instead of asking the cuDNN
library, which a deviceless machine does not have (`_install_cudnn_version_hook`: the one place
ap-xla replaces a jax function; outside `tracing_for` it calls jax's own).

Example:
  >>> route = compile_route(get_profile('h100'), jax.devices('cpu')[:16])
  >>> route
  CompileRoute('xla:gpu (deviceless)', 16 x NVIDIA H100 80GB HBM3, h100_sxm.txtpb, topology 1x2x8)
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import importlib.metadata
import importlib.util
import logging
import os
import re
import threading

import jax

from passes.hardware import HardwareProfile, is_host_profile

log = logging.getLogger("ap_xla")

DEVICELESS_GPU = "xla:gpu (deviceless)"
CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "gpu_targets")
# Built-in hardware profile -> XLA:GPU target config (passes/gpu_targets/; each file names its
# source in openxla/xla and the edits made). A profile whose name contains a key takes its config.
TARGET_CONFIGS = {"h200": "h200.txtpb", "h100": "h100_sxm.txtpb", "a100": "a100_sxm_80.txtpb"}
_PLUGINS = (("jax_plugins.xla_cuda12", "jax-cuda12-plugin", "jax-cuda12-pjrt"),
            ("jax_plugins.xla_cuda13", "jax-cuda13-plugin", "jax-cuda13-pjrt"))


@dataclasses.dataclass(frozen=True)
class CompileRoute:
  """Where a search compiles its candidates.

  Attributes:
    name: the route as the report names it (module doc).
    devices: the devices candidates are compiled for (a compile-only topology for a deviceless
      route, else the devices given).
    target: the target config file of a deviceless route ('' otherwise).
    topology: '<slices>x<nodes>x<devices per node>' of a deviceless route ('' otherwise).
    note: why the route was taken when a GPU profile compiles on CPU devices ('' otherwise).
  """
  name: str
  devices: tuple = dataclasses.field(repr=False)
  target: str = ""
  topology: str = ""
  note: str = ""

  @property
  def platform(self) -> str:
    return self.devices[0].platform

  @property
  def deviceless(self) -> bool:
    return self.name == DEVICELESS_GPU

  def describe(self) -> str:
    """One line for logs and reports."""
    if self.deviceless:
      return f"{self.name}: {self.target}, topology {self.topology}"
    return self.name + (f" ({self.note})" if self.note else "")

  def __repr__(self):
    extra = f", {self.target}, topology {self.topology}" if self.deviceless else ""
    return f"CompileRoute({self.name!r}, {len(self.devices)} x {self.devices[0].device_kind}{extra})"


def target_config_name(profile: HardwareProfile) -> str | None:
  """The target config file of a GPU profile ('h100' -> 'h100_sxm.txtpb'), None if it has none."""
  name = profile.name.lower()
  return next((f for key, f in TARGET_CONFIGS.items() if key in name), None)


def read_target_config(name: str) -> str:
  """The text of a shipped target config (`TARGET_CONFIGS` values)."""
  with open(os.path.join(CONFIG_DIR, name)) as f:
    return f.read()


def cudnn_version(config_text: str) -> int | None:
  """The cuDNN version a target config declares, as cuDNN encodes it (9.10.0 -> 91000)."""
  m = re.search(r"dnn_version_info\s*\{([^}]*)\}", config_text)
  if not m:
    return None
  part = lambda k: int((re.search(rf"\b{k}:\s*(\d+)", m.group(1)) or [0, 0])[1])
  return part("major") * 10000 + part("minor") * 100 + part("patch")


def topology_shape(num_devices: int, per_node: int) -> str:
  """'1x<nodes>x<per node>' for `num_devices` GPUs, `per_node` to a node (one node if they do
  not fill whole nodes)."""
  if num_devices > per_node and num_devices % per_node == 0:
    return f"1x{num_devices // per_node}x{per_node}"
  return f"1x1x{num_devices}"


def _plugin_problem() -> str | None:
  """Why jax's CUDA plugin cannot compile here, as far as the installed packages tell."""
  jaxlib_version = importlib.metadata.version("jaxlib")
  for module, plugin, pjrt in _PLUGINS:
    if importlib.util.find_spec("jax_plugins") is None or importlib.util.find_spec(module) is None:
      continue
    try:
      versions = {importlib.metadata.version(p) for p in (plugin, pjrt)}
    except importlib.metadata.PackageNotFoundError as e:
      return f"{e.name} is not installed beside {module}"
    if versions != {jaxlib_version}:
      return (f"{plugin}/{pjrt} {sorted(versions)} do not match jaxlib {jaxlib_version}; install "
              f"{plugin}=={jaxlib_version} {pjrt}=={jaxlib_version}")
    return None
  return (f"jax's CUDA plugin is not installed (pip install jax-cuda12-plugin=={jaxlib_version} "
          f"jax-cuda12-pjrt=={jaxlib_version}; no CUDA libraries are needed)")


@functools.cache
def _topology(config: str, shape: str):
  """A compile-only topology of `config` (a TARGET_CONFIGS file) shaped `shape`; cached."""
  from jax.experimental import topologies
  text = read_target_config(config)
  topo = topologies.get_topology_desc(platform="cuda", target_config=text, topology=shape)
  version = cudnn_version(text)
  with _LOCK:
    for d in topo.devices:
      _CUDNN_VERSIONS[d] = version
  return topo


def compile_route(hardware: HardwareProfile, devices) -> CompileRoute:
  """The route a search of `devices` for `hardware` compiles its candidates on (module doc).

  GPUs that are here compile for themselves; CPU devices standing for a GPU profile with a
  target config compile deviceless for that GPU when jax's CUDA plugin works, else for the CPU
  devices with `note` saying why.
  """
  devices = tuple(devices)
  platform = devices[0].platform
  if platform != "cpu" or is_host_profile(hardware):
    return CompileRoute(f"xla:{platform}", devices)
  config = target_config_name(hardware)
  if config is None:
    return CompileRoute("xla:cpu", devices, note=f"no XLA:GPU target config for the profile {hardware.name!r} "
                        f"(configs exist for {sorted(TARGET_CONFIGS)})")
  problem = _plugin_problem()
  shape = topology_shape(len(devices), hardware.devices_per_node)
  if problem is None:
    try:
      topo = _topology(config, shape)
    except NotImplementedError:  # jax did not register the plugin's 'cuda' topology factory
      problem = ("jax's CUDA plugin did not start: without a GPU it needs JAX_PLATFORMS=cpu (or "
                 "JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1) set before jax starts")
    except Exception as e:  # a config this jaxlib cannot parse, an unknown topology: say it, go on
      problem = f"XLA:GPU could not make the {shape} topology of {config}: {type(e).__name__}: {e}"[:500]
  if problem is not None:
    return CompileRoute("xla:cpu", devices, note=f"XLA:GPU deviceless compilation unavailable: {problem}")
  return CompileRoute(DEVICELESS_GPU, tuple(topo.devices), config, shape)


# ---------------------------------------------------------------- tracing for a target

@dataclasses.dataclass(frozen=True)
class _Target:
  platform: str
  cudnn_version: int | None  # set for a deviceless GPU: what jax's cuDNN check answers


_TARGET: contextvars.ContextVar[_Target | None] = contextvars.ContextVar("ap_xla_target", default=None)
_LOCK = threading.Lock()
_CUDNN_VERSIONS: dict = {}  # deviceless device -> the cuDNN version its target config declares
_HOOKED = False


def target_platform() -> str:
  """The platform the program being traced is for: the devices of `tracing_for`, else jax's
  default backend ('gpu', 'cpu', 'tpu')."""
  t = _TARGET.get()
  return t.platform if t is not None else jax.default_backend()


@contextlib.contextmanager
def tracing_for(devices):
  """Traces inside are for `devices` (a `CompileRoute`'s or any jax devices): see the module doc.

  Example:
    >>> with tracing_for(route.devices):
    ...   lowered = jax.jit(step).lower(*abstract_args)
  """
  devices = devices.devices if isinstance(devices, CompileRoute) else tuple(devices)
  version = _CUDNN_VERSIONS.get(devices[0])
  if version is not None:
    _install_cudnn_version_hook()
  token = _TARGET.set(_Target(devices[0].platform, version))
  try:
    yield
  finally:
    _TARGET.reset(token)


def _install_cudnn_version_hook() -> None:
  """Makes jax's cuDNN version check answer the deviceless target's version inside `tracing_for`.

  `jax.nn.dot_product_attention(implementation='cudnn')` asks the cuDNN library for its version
  (`fused_attention_stablehlo.check_cudnn_version`) before emitting the custom call that XLA:GPU
  compiles; a machine without cuDNN raises there. Installed once; outside a deviceless target
  it is jax's own check.
  """
  global _HOOKED
  with _LOCK:
    if _HOOKED:
      return
    try:
      from jax._src.cudnn import fused_attention_stablehlo as fas
      original = fas.check_cudnn_version
    except (ImportError, AttributeError) as e:  # another jax: cuDNN attention may not lower deviceless
      log.debug("No cuDNN version check to answer for deviceless targets: %s", e)
      _HOOKED = True
      return

    def check_cudnn_version():
      t = _TARGET.get()
      return t.cudnn_version if t is not None and t.cudnn_version is not None else original()

    fas.check_cudnn_version = check_cudnn_version
    _HOOKED = True
