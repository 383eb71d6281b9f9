"""Environment variables, read under the `AP_XLA_` prefix and under MoAI's prefix.

A variable under either prefix that ap-xla does not know (a misspelling such as
AP_XLA_MEMORY_RATIO) is warned about once per process, with the closest known name.
"""
from __future__ import annotations

import difflib
import logging
import os
from typing import Callable, Mapping

from passes import hardware
from passes.search import SearchSettings

log = logging.getLogger("ap_xla")

PREFIXES = ("AP_XLA_", "MOREH_ADVANCED_PARALLELIZATION_")


def _get(name: str, environ: Mapping[str, str]) -> tuple[str, str] | None:
  """(full variable name, value) of the first prefix set; both set and different is an error."""
  found = [(p + name, environ[p + name]) for p in PREFIXES if environ.get(p + name, "") != ""]
  if len(found) == 2 and found[0][1].strip() != found[1][1].strip():
    raise ValueError(f"{found[0][0]}={found[0][1]!r} and {found[1][0]}={found[1][1]!r} disagree; "
                     "set only one of them.")
  return found[0] if found else None


def _int(var: str, value: str, lo: int, hi: int | None = None) -> int:
  try:
    v = int(value.strip())
  except ValueError:
    v = None
  if v is None or v < lo or (hi is not None and v > hi):
    rng = f"{lo}..{hi}" if hi is not None else f">= {lo}"
    raise ValueError(f"{var}={value!r} is not valid: expected an integer {rng}.")
  return v


def _float(var: str, value: str, lo: float, hi: float, with_lo: bool = False) -> float:
  """A number in (lo, hi], or [lo, hi] `with_lo`."""
  try:
    v = float(value.strip())
  except ValueError:
    v = None
  if v is None or not (lo <= v <= hi if with_lo else lo < v <= hi):
    raise ValueError(f"{var}={value!r} is not valid: expected a number in {'[' if with_lo else '('}{lo:g}, {hi:g}].")
  return v


def _bytes(var: str, value: str) -> int:
  try:
    v = hardware.parse_bytes(value)
  except ValueError as e:
    raise ValueError(f"{var}={value!r} is not valid: {e}") from None
  if v <= 0:
    raise ValueError(f"{var}={value!r} is not valid: expected a positive size such as '256MiB'.")
  return v


def _hardware(var: str, value: str):
  value = value.strip()
  load = hardware.load_profile if os.path.sep in value or value.endswith(".json") else hardware.get_profile
  try:
    return load(value)
  except (TypeError, ValueError) as e:
    raise ValueError(f"{var}={value!r} is not valid: {e}") from None


_READERS: dict[str, tuple[str, Callable[[str, str], object]]] = {
    "MAX_PARALLEL_COMPILE_THREADS": ("max_threads", lambda var, v: _int(var, v, 1, 1024)),
    "DETAILED_LOG": ("detailed_log", lambda var, v: _int(var, v, 0, 2)),
    "MEMORY_USAGE_CORRECTION_RATIO": ("memory_ratio", lambda var, v: _float(var, v, 0, 100)),
    "DEVICE_MEMORY": ("capacity_bytes", _bytes),
    "HARDWARE": ("hardware", _hardware),
    "COMPILE_TIMEOUT": ("compile_timeout_s", lambda var, v: _float(var, v, 0, 1e9)),
    "DUMP_PATH": ("dump_path", lambda var, v: v),
    "MEASURE_TOP_K": ("measure_top_k", lambda var, v: _int(var, v, 0, 1000)),
    "MEASURE_BUDGET": ("measure_budget_s", lambda var, v: _float(var, v, 0, 1e6, with_lo=True)),
}


# Variables read elsewhere (the plan cache); with _READERS, every name ap-xla knows.
OTHER_NAMES = ("CACHE_DIR", "PLAN_CACHE")
_warned: set[str] = set()


def known_names() -> tuple[str, ...]:
  """Every variable name ap-xla reads, without its prefix."""
  return tuple(_READERS) + OTHER_NAMES


def closest_name(name: str, known=None) -> str | None:
  """The known name (without prefix) closest to `name`: most shared words, then most alike."""
  known = known_names() if known is None else known
  words = set(name.split("_"))
  def score(k):
    return len(words & set(k.split("_"))), difflib.SequenceMatcher(None, name, k).ratio()
  best = max(known, key=score)
  shared, alike = score(best)
  return best if shared or alike >= 0.6 else None


def warn_unknown(environ: Mapping[str, str] | None = None) -> list[str]:
  """Warns once per process about each AP_XLA_* / MOREH_ADVANCED_PARALLELIZATION_* variable
  that ap-xla does not read; returns the unknown names found."""
  environ = os.environ if environ is None else environ
  known, unknown = set(known_names()), []
  for var in sorted(environ):
    prefix = next((p for p in PREFIXES if var.startswith(p)), None)
    if prefix is None or var[len(prefix):] in known:
      continue
    unknown.append(var)
    if var in _warned:
      continue
    _warned.add(var)
    near = closest_name(var[len(prefix):])
    hint = f"did you mean {prefix}{near}?" if near else f"known: {', '.join(prefix + k for k in sorted(known))}."
    log.warning("%s is not a variable ap-xla reads, so it has no effect; %s", var, hint)
  return unknown


def check_output_file(what: str, path: str) -> None:
  """Raises ValueError, naming `what`, when `path` cannot become a file: it is a folder, it is
  under a file, or its folder (or the nearest existing one above it) cannot be written."""
  full = os.path.abspath(os.path.expanduser(path))
  if os.path.isdir(full):
    raise ValueError(f"{what} names the folder {full!r}; give a file path, e.g. "
                     f"{os.path.join(full, 'autoconfig_log.dump')!r}.")
  if os.path.lexists(full) and not os.path.isfile(full):
    raise ValueError(f"{what}: {full!r} exists and is not a regular file; give another file path.")
  parent = os.path.dirname(full)
  while not os.path.lexists(parent):
    parent = os.path.dirname(parent)
  if not os.path.isdir(parent):
    raise ValueError(f"{what}: {full!r} is under {parent!r}, which is a file, not a folder; give a path "
                     "in a folder.")
  target = full if os.path.exists(full) else parent
  if not os.access(target, os.W_OK):
    raise ValueError(f"{what}: cannot write {full!r}: {target!r} is not writable by this user; give a "
                     "path in a writable folder.")


def read_settings(environ: Mapping[str, str] | None = None, **overrides) -> SearchSettings:
  """SearchSettings from the environment; keyword overrides win.

  Variables (each also under MOREH_ADVANCED_PARALLELIZATION_): AP_XLA_MAX_PARALLEL_COMPILE_THREADS
  (default 16), AP_XLA_DETAILED_LOG (0, 1 or 2), AP_XLA_MEMORY_USAGE_CORRECTION_RATIO (percent,
  default 80), AP_XLA_DEVICE_MEMORY (e.g. '256MiB'), AP_XLA_HARDWARE (a profile name or a JSON
  path), AP_XLA_COMPILE_TIMEOUT (seconds per candidate), AP_XLA_DUMP_PATH, AP_XLA_MEASURE_TOP_K
  (run the k best-estimated candidates and choose the measured-fastest; default 0),
  AP_XLA_MEASURE_BUDGET (seconds the search may spend timing near ties by itself; default 30,
  0: choose by the estimate alone).

  Unknown variables under either prefix are warned about (once each). With a detailed log of
  2, the dump path is checked now, not after the search.

  Raises:
    ValueError: a variable has a bad value; the message names it and what is allowed.
  """
  environ = os.environ if environ is None else environ
  warn_unknown(environ)
  values, names = {}, {}
  for name, (field, read) in _READERS.items():
    hit = _get(name, environ)
    if hit is not None:
      values[field] = read(*hit)
      names[field] = f"{hit[0]}={hit[1]!r}"
  overrides = {k: v for k, v in overrides.items() if v is not None}
  values.update(overrides)
  names.update({k: f"SearchSettings.{k}={v!r}" for k, v in overrides.items()})
  settings = SearchSettings(**values)
  if settings.detailed_log >= 2:  # the dump is written at the end: a bad path would cost the search
    check_output_file(names.get("dump_path", f"the detailed log's dump path (AP_XLA_DUMP_PATH, default "
                                             f"{settings.dump_path!r})"), settings.dump_path)
  return settings


def measure_top_k(environ: Mapping[str, str] | None = None) -> int:
  """AP_XLA_MEASURE_TOP_K: how many of the best-estimated candidates to run and time (default 0)."""
  environ = os.environ if environ is None else environ
  hit = _get("MEASURE_TOP_K", environ)
  return _int(*hit, 0, 1000) if hit else 0
