"""The public switches and the JAX-native API: turn AP on or off, search a program's plans, or
search and train."""
from __future__ import annotations

import dataclasses
import importlib.util
import logging

from ap_xla import config, env, plan_cache, torch_frontend
from ap_xla.trainer import Trainer
from passes import search as search_pass
from passes.program import Program
from passes.report import SearchResult
from passes.space import SearchOptions

log = logging.getLogger("ap_xla")

_SETTING_NAMES = {f.name for f in dataclasses.fields(search_pass.SearchSettings)}
_OPTION_NAMES = {f.name for f in dataclasses.fields(SearchOptions)}


def enable_advanced_parallelization(pipeline_parallel=True, num_stages="auto", num_micro_batches="auto",
                                    activation_recomputation="auto", distribute_parameter="auto",
                                    mixed_precision=True) -> SearchOptions:
  """Turns on Advanced Parallelization with MoAI's signature; returns the validated options.

  With torch installed it also installs the torch one-liner (`ap_xla.torch_frontend.install`):
  the next training forward of a model is planned and trained by ap-xla.

  Args:
    pipeline_parallel: allow pipeline stages (False removes the dimension).
    num_stages: pipeline stages, or 'auto'.
    num_micro_batches: micro-batches per step, or 'auto'.
    activation_recomputation: True, False or 'auto' (also a policy of `passes.recompute`: 'full',
      'dots', 'selective_op' (torchtitan's per-op SAC), 'selective_layer' (every 2nd block)), or a tuple
      of policies to search among.
    distribute_parameter: shard parameters, gradients and optimizer state over data (ZeRO-3), or 'auto'.
    mixed_precision: bf16 compute with fp32 master weights.

  Raises:
    ValueError, TypeError: a value is not allowed; the message names the parameter.

  Example:
    >>> import ap_xla
    >>> ap_xla.enable_advanced_parallelization(num_stages=2, mixed_precision=False)
  """
  opts = SearchOptions(pipeline_parallel=pipeline_parallel, num_stages=num_stages,
                       num_micro_batches=num_micro_batches,
                       activation_recomputation=activation_recomputation,
                       distribute_parameter=distribute_parameter, mixed_precision=mixed_precision)
  config.set_options(opts)
  log.info("Advanced Parallelization enabled: %s", opts)
  if importlib.util.find_spec("torch") is not None:
    torch_frontend.install()
  return opts


def disable_advanced_parallelization() -> None:
  """Turns AP off and uninstalls the torch one-liner (every taken-over model goes back to torch)."""
  config.set_options(None)
  torch_frontend.uninstall()


def _split(kwargs: dict) -> tuple[SearchOptions, search_pass.SearchSettings]:
  unknown = set(kwargs) - _SETTING_NAMES - _OPTION_NAMES
  if unknown:
    raise TypeError(f"unknown argument(s) {sorted(unknown)}; options: {sorted(_OPTION_NAMES)}; "
                    f"settings: {sorted(_SETTING_NAMES)}.")
  opts = {k: v for k, v in kwargs.items() if k in _OPTION_NAMES}
  base = config.current_options() or SearchOptions()
  options = dataclasses.replace(base, **opts)
  settings = env.read_settings(**{k: v for k, v in kwargs.items() if k in _SETTING_NAMES})
  return options, settings


def search(program: Program, devices=None, **kwargs) -> SearchResult:
  """Searches parallel plans for `program` and returns the ranked report (nothing is trained).

  Args:
    program: a `Program` (parameters may be `jax.ShapeDtypeStruct`s: nothing is allocated).
    devices: devices to plan for (default: all).
    **kwargs: search options (`num_stages`, `num_micro_batches`, `activation_recomputation`,
      `distribute_parameter`, `mixed_precision`, `pipeline_parallel`, `tensor_parallel`) and
      settings (`memory_ratio`, `capacity_bytes`, `hardware`, `max_threads`, `detailed_log`, ...).
      Unset options come from `enable_advanced_parallelization` if it was called, and settings
      from the AP_XLA_* environment variables. A search that ran before with the same program,
      devices, hardware and options is read from the plan cache (`ap_xla.plan_cache`;
      AP_XLA_PLAN_CACHE=0 turns it off) and comes back with `from_cache=True`.

  Example:
    >>> result = ap_xla.search(program, capacity_bytes=256 * 2**20, mixed_precision=False)
    >>> print(result.plan); print(result.table())
  """
  options, settings = _split(kwargs)
  return plan_cache.cached_search(program, devices, options, settings)


def parallelize(program: Program, devices=None, **kwargs) -> Trainer:
  """Searches the best plan for `program` and returns a `Trainer` holding its sharded state.

  Takes the same arguments as `search`. The program's parameters must be concrete arrays.

  Example:
    >>> trainer = ap_xla.parallelize(program, mixed_precision=False)
    >>> loss = trainer.step(batch)
    >>> trainer.plan, trainer.report.table()
  """
  result = search(program, devices, **kwargs)
  return Trainer(program, result.plan, devices, report=result)
