"""The plan cache: a search result stored as JSON under a fingerprint of what decides it.

The key covers the program (the jaxpr of its loss traced on abstract inputs, the shapes and
dtypes of parameters, batch and optimizer state), the devices (platform, kind, count), the
hardware profile (every field), the memory capacity and the options and settings that change
the result. The entry also records a version (this format's, a hash of the search pass's
source, jax/jaxlib's): a changed pass or a new XLA decides differently, so its entries are
stale. Entries are read with `json` only (nothing is unpickled or evaluated) and never from
anything but a regular file; a stale, corrupt or foreign entry, or one whose content does not
fit the search it is read for (`plan_cache_check`: device count, batch, budget, options,
well-formed candidates), is ignored with a warning and replaced by the next search's result.

An entry holds either the search's result or its out-of-memory outcome (no candidate fits:
deterministic for the same key, and as costly to find again). Not stored: an outcome with a
timed-out candidate (a busy machine may compile it next time), a search run with an injected
`compile_fn` (tests' fault injection), and a search whose caller cancelled it meanwhile.

Environment: AP_XLA_CACHE_DIR (or MOREH_ADVANCED_PARALLELIZATION_CACHE_DIR; default
~/.cache/ap_xla) and AP_XLA_PLAN_CACHE=0 to turn the cache off.

With the plan cache on, XLA's persistent compilation cache is kept beside it (`<cache>/xla`,
`compilation_cache`) unless the process already set one: a search run again after a change
of its inputs (another batch, another ratio) and the training step of a chosen plan reuse the
executables compiled before.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
import re
import stat
import time
from typing import Any, Callable, Mapping

import jax
import jaxlib
import numpy as np

from ap_xla import env, plan_cache_check
from passes import gpu_target
from passes import search as search_pass
from passes.devices import check_devices
from passes.evaluate import compile_plan
from passes.program import Program
from passes.report import (TIMEOUT, CandidateResult, NothingCompiledError, OutOfMemoryError, SearchResult,
                           nothing_compiled)
from passes.space import SearchOptions

log = logging.getLogger("ap_xla")

FORMAT = "ap_xla.plan_cache"
FORMAT_VERSION = 2  # 2: entries may hold an out-of-memory outcome
# Settings that change which plan wins; threads, logging and progress bars do not.
_RESULT_SETTINGS = ("memory_ratio", "compile_timeout_s", "measure_top_k", "measure_budget_s", "exhaustive")
_ENTRY_MODE = 0o644  # readable like any cache file (mkstemp creates 0600)
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")
_MAX_ENTRY_BYTES = 256 * 2**20  # far above any search's report; guards against reading a huge file


@functools.cache
def _passes_digest() -> str:
  """A hash of the search pass's source: a changed cost model or memory rule makes entries stale."""
  import passes
  folder, digest = os.path.dirname(passes.__file__), hashlib.sha256()
  for name in sorted(os.listdir(folder)):
    if name.endswith(".py"):
      with open(os.path.join(folder, name), "rb") as f:
        digest.update(name.encode() + b"\0" + f.read())
  return digest.hexdigest()[:16]


def version() -> str:
  """What an entry must have been written by to be reused: this format, the pass's code, jax."""
  return (f"{FORMAT}/{FORMAT_VERSION} passes/{_passes_digest()} jax/{jax.__version__} "
          f"jaxlib/{jaxlib.__version__}")


def _shapes(tree) -> dict:
  leaves = jax.tree_util.tree_leaves_with_path(tree)
  return {"tree": str(jax.tree.structure(tree)),
          "leaves": [[jax.tree_util.keystr(p), list(x.shape), str(x.dtype)] for p, x in leaves]}


def program_key(program: Program) -> dict:
  """What of a program decides its plan: its loss's jaxpr and its shapes (not its values)."""
  abstract = program.abstract()
  closed = jax.make_jaxpr(abstract.loss)(abstract.params, abstract.batch)
  digest = hashlib.sha256(_ADDRESS.sub("", str(closed.jaxpr)).encode())
  for c in closed.consts:  # constants the loss closes over are part of what it computes
    digest.update(np.asarray(c).tobytes())
  opt_state = jax.eval_shape(abstract.init_optimizer, abstract.params)
  frozen = {} if program.trainable is None else {"trainable": [bool(t) for t in jax.tree.leaves(program.trainable)]}
  return {**frozen, "loss_jaxpr_sha256": digest.hexdigest(), "params": _shapes(abstract.params),
          "batch": _shapes(abstract.batch), "opt_state": _shapes(opt_state),
          "layered": program.layers is not None, "num_blocks": program.num_blocks}


def key_document(program: Program, devices, options: SearchOptions,
                 settings: search_pass.SearchSettings) -> dict:
  """Everything the cache key is a hash of, as JSON-ready data."""
  devices = tuple(devices)
  hw, capacity = search_pass.resolve_hardware(settings, devices)
  return {
      "program": program_key(program),
      "devices": {"platform": devices[0].platform, "device_kind": devices[0].device_kind,
                  "count": len(devices)},
      "hardware": dataclasses.asdict(hw),
      "capacity_bytes": capacity,
      # XLA:GPU without a device or XLA:CPU: the figures differ (passes/gpu_target.py).
      "compile_route": gpu_target.compile_route(hw, devices).describe(),
      "options": dataclasses.asdict(options),
      "settings": {k: getattr(settings, k) for k in _RESULT_SETTINGS},
  }


def fingerprint(doc: Mapping) -> str:
  """The sha256 of a key document in canonical JSON."""
  return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()


def cache_dir(environ: Mapping[str, str] | None = None) -> str:
  """AP_XLA_CACHE_DIR (or MOREH_ADVANCED_PARALLELIZATION_CACHE_DIR), default ~/.cache/ap_xla."""
  environ = os.environ if environ is None else environ
  hit = env._get("CACHE_DIR", environ)
  return os.path.expanduser(hit[1] if hit else os.path.join("~", ".cache", "ap_xla"))


def cache_enabled(environ: Mapping[str, str] | None = None) -> bool:
  """False when AP_XLA_PLAN_CACHE is 0/false/off/no; any other value or none leaves it on."""
  environ = os.environ if environ is None else environ
  hit = env._get("PLAN_CACHE", environ)
  if hit is None:
    return True
  value = hit[1].strip().lower()
  if value in ("0", "false", "off", "no"):
    return False
  if value in ("1", "true", "on", "yes"):
    return True
  raise ValueError(f"{hit[0]}={hit[1]!r} is not valid: expected 0 or 1 (also true/false, on/off).")


def compilation_cache(directory: str) -> str:
  """Points XLA's persistent compilation cache at `<directory>/xla` unless one is set already
  (by the user, JAX_COMPILATION_CACHE_DIR or a test run); returns the folder in use."""
  current = jax.config.jax_compilation_cache_dir
  if current:
    return current
  path = os.path.join(directory, "xla")
  jax.config.update("jax_compilation_cache_dir", path)
  log.debug("XLA's persistent compilation cache: %s", path)
  return path


def entry_path(directory: str, key: str) -> str:
  return os.path.join(directory, f"plan-{key[:32]}.json")


def request(program: Program, doc: Mapping, settings: search_pass.SearchSettings,
            options: SearchOptions) -> plan_cache_check.Request:
  """What an entry read for this search must agree with (see `plan_cache_check`)."""
  capacity = doc["capacity_bytes"]
  return plan_cache_check.Request(
      num_devices=doc["devices"]["count"], global_batch=program.batch_size, capacity_bytes=capacity,
      budget_bytes=int(capacity * settings.memory_ratio / 100), hardware=doc["hardware"]["name"],
      options=options, num_blocks=program.num_blocks)


def _read_json(path: str) -> tuple[Any, str | None]:
  """(document, None) or (None, problem). Never blocks: a FIFO or device at `path` is a problem."""
  try:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
  except OSError as e:
    return None, f"unreadable: {e.strerror}"
  with os.fdopen(fd, "rb") as f:
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
      return None, "not a regular file (a folder, FIFO or device is at its path)"
    if st.st_size > _MAX_ENTRY_BYTES:
      return None, f"corrupt: {st.st_size} bytes, more than any entry ({_MAX_ENTRY_BYTES})"
    try:
      return json.loads(f.read().decode("utf-8")), None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      return None, f"corrupt: not valid JSON ({e})"
    except OSError as e:
      return None, f"unreadable: {e.strerror}"


def read_entry(path: str, key: str, expect: plan_cache_check.Request | None = None
               ) -> SearchResult | OutOfMemoryError | None:
  """The cached outcome at `path` for `key`; None (with a warning) if absent or unusable.

  Args:
    path, key: the entry and the key it must hold.
    expect: the search it is read for; its stored outcome must agree with it (device count,
      batch, budget, options, well-formed candidates), else it is unusable.

  Returns:
    A SearchResult (`from_cache=True`), or the OutOfMemoryError the search raised (its
    `from_cache` attribute True; the caller raises it), or None.
  """
  if not os.path.lexists(path):
    return None
  doc, problem = _read_json(path)
  if problem is None:
    problem = _check_entry(doc, key)
  if problem is None and expect is not None:
    kind = "result" if "result" in doc else "out_of_memory"
    check = plan_cache_check.check_result if kind == "result" else plan_cache_check.check_out_of_memory
    why = check(doc[kind], expect)
    problem = f"corrupt: it does not fit this search: {why}" if why else None
  if problem is None:
    try:
      if "result" in doc:
        outcome = SearchResult.from_json(doc["result"], from_cache=True)
      else:
        oom = doc["out_of_memory"]
        if not isinstance(oom["message"], str):
          raise TypeError("the message is not a string")
        cands = [CandidateResult.from_json(c) for c in oom["candidates"]]
        outcome = (NothingCompiledError if nothing_compiled(cands) else OutOfMemoryError)(oom["message"], cands)
        outcome.from_cache = True
    except (KeyError, TypeError, ValueError, AttributeError) as e:
      problem = f"corrupt: the stored result is malformed ({type(e).__name__}: {e})"
  if problem is not None:
    log.warning("Ignoring the plan cache entry %s: %s. It will be replaced.", path, problem)
    return None
  return outcome


def _check_entry(doc: Any, key: str) -> str | None:
  if not isinstance(doc, dict) or doc.get("format") != FORMAT:
    return "foreign: not an ap_xla plan cache entry"
  missing = [f for f in ("version", "key") if f not in doc]
  kinds = [f for f in ("result", "out_of_memory") if f in doc]
  if not kinds:
    missing.append("result")
  if missing:
    return f"corrupt: missing fields {missing}"
  if len(kinds) > 1:
    return "corrupt: it holds both a result and an out-of-memory outcome"
  if doc["version"] != version():
    return f"stale: written by {doc['version']!r}, this is {version()!r}"
  if doc["key"] != key:
    return f"foreign: it holds the plan for key {str(doc['key'])[:16]}..., not {key[:16]}..."
  if not isinstance(doc[kinds[0]], dict):
    return f"corrupt: {kinds[0]!r} is not an object"
  return None


def write_entry(path: str, key: str, doc: Mapping, result: SearchResult | OutOfMemoryError,
                program: Program) -> None:
  """Stores a search's result or out-of-memory outcome atomically (a temporary file renamed over)."""
  entry = {"format": FORMAT, "version": version(), "key": key, "created": time.time(),
           "describes": {"program": repr(program), "devices": doc["devices"],
                         "hardware": doc["hardware"]["name"], "options": doc["options"]}}
  if isinstance(result, OutOfMemoryError):
    entry["out_of_memory"] = {"message": str(result), "candidates": [c.to_json() for c in result.results]}
  else:
    entry["result"] = result.to_json()
  search_pass.write_json_atomic(path, entry)
  try:  # after the rename: a 0600 file for a moment is harmless, a half-written one is not
    os.chmod(path, _ENTRY_MODE)
  except OSError as e:
    log.debug("Could not chmod %s: %s", path, e)


def _why_not_stored(outcome, compile_fn: Callable, cancel) -> str | None:
  """Why an outcome must not be cached (None: store it)."""
  if cancel is not None and cancel.is_set():
    return "the search was cancelled"
  if compile_fn is not compile_plan:
    return "it came from an injected compile_fn"
  cands = outcome.results if isinstance(outcome, OutOfMemoryError) else outcome.candidates
  timeouts = sum(c.verdict == TIMEOUT for c in cands)
  if timeouts:
    return f"{timeouts} candidates timed out (the next search may compile them in time)"
  return None


def cached_search(program: Program, devices=None, options: SearchOptions | None = None,
                  settings: search_pass.SearchSettings | None = None, *,
                  compile_fn: Callable = compile_plan, directory: str | None = None,
                  enabled: bool | None = None, search_fn: Callable = search_pass.search,
                  cancel=None) -> SearchResult:
  """`passes.search.search`, served from the plan cache when the same search ran before.

  Args:
    program, devices, options, settings, compile_fn: as for `passes.search.search`.
    directory: the cache folder (default: `cache_dir()` from the environment).
    enabled: use the cache (default: `cache_enabled()` from AP_XLA_PLAN_CACHE).
    search_fn: the search to run on a miss.
    cancel: a `threading.Event`; once set, the outcome of the search under way is not stored
      (the caller was interrupted and will not use it).

  Returns:
    The SearchResult; `from_cache=True` when it was read from the cache.

  Raises:
    OutOfMemoryError: as `search` does; read from the cache too (then its `from_cache` is True).

  Example:
    >>> result = cached_search(program, options=SearchOptions(mixed_precision=False))
    >>> result.from_cache  # True on the second call
  """
  options = options or SearchOptions()
  settings = settings or search_pass.SearchSettings()
  devices = check_devices(devices)
  if not (cache_enabled() if enabled is None else enabled):
    return search_fn(program, devices, options, settings, compile_fn=compile_fn)
  doc = key_document(program, devices, options, settings)
  key = fingerprint(doc)
  directory = directory or cache_dir()
  path = entry_path(directory, key)
  compilation_cache(directory)
  hit = read_entry(path, key, request(program, doc, settings, options))
  if isinstance(hit, OutOfMemoryError):
    log.info("Reusing the cached outcome from %s: no candidate fits (search skipped).", path)
    raise hit
  if hit is not None:
    log.info("Reusing the cached plan %s from %s (search skipped).", hit.plan, path)
    log.info("The final configuration is: %s", search_pass.config_line(hit.plan, hit.global_batch))
    return hit
  try:
    outcome = result = search_fn(program, devices, options, settings, compile_fn=compile_fn)
  except OutOfMemoryError as e:
    outcome, result = e, None
  why_not = _why_not_stored(outcome, compile_fn, cancel)
  if why_not:
    log.info("Not storing this search in the plan cache: %s.", why_not)
  else:
    try:
      write_entry(path, key, doc, outcome, program)
      log.info("Stored the %s in the cache: %s", "plan" if result is not None else "out-of-memory outcome", path)
    except Exception as e:  # a cache that cannot be written must not fail a finished search
      log.warning("Could not write the plan cache entry %s: %s: %s", path, type(e).__name__, e)
  if result is None:
    raise outcome
  return result
