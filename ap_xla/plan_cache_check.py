"""Checks a plan cache entry's stored outcome against the search it is read for, before it is used.

An entry whose key matches the request can still hold content no search of that request
produced: edited by hand, written by a bug, or damaged so that it still parses as JSON
(`"memory_bytes": "lots"`, no candidates, a plan for 64 devices in a 1-device search). Each
check returns the first problem found, in words, or None; the cache then warns and searches
again, as for a garbled entry.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

from passes.plan import Plan
from passes.report import CHOSEN, FEASIBLE, VERDICTS
from passes.space import AUTO, SearchOptions


@dataclasses.dataclass(frozen=True)
class Request:
  """What a stored outcome must agree with: the search it is read for."""
  num_devices: int
  global_batch: int
  capacity_bytes: int
  budget_bytes: int
  hardware: str
  options: SearchOptions
  num_blocks: int


def _is_int(v) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _plan(d: Any, where: str, req: Request) -> tuple[Plan | None, str | None]:
  if not isinstance(d, dict):
    return None, f"{where} is not an object"
  try:
    plan = Plan.from_dict(d)
  except (TypeError, ValueError) as e:
    return None, f"{where} is not a valid plan ({e})"
  if plan.num_devices != req.num_devices:
    return None, f"{where} {plan} uses {plan.num_devices} devices; this search is for {req.num_devices}"
  return plan, None


def honours(plan: Plan, options: SearchOptions, num_blocks: int) -> str | None:
  """Why `plan` is not one the `options` allow (None: it is)."""
  o = options
  pins = [("pipeline_parallel", not o.pipeline_parallel and plan.pp != 1),
          ("num_stages", o.num_stages != AUTO and plan.pp != o.num_stages),
          ("num_micro_batches", o.num_micro_batches != AUTO and plan.mb != o.num_micro_batches),
          ("tensor_parallel", o.tensor_parallel != AUTO and plan.tp != o.tensor_parallel),
          ("distribute_parameter", o.distribute_parameter != AUTO and plan.fsdp != o.distribute_parameter),
          ("mixed_precision", plan.bf16 != o.mixed_precision),
          ("distribute_low_prec_param", plan.low_prec and not (plan.bf16 and plan.fsdp) or (
              o.distribute_low_prec_param != AUTO and plan.bf16 and plan.fsdp
              and plan.low_prec != o.distribute_low_prec_param)),
          ("activation_recomputation", plan.recompute not in (o.recompute_choices() if num_blocks else ("none",)))]
  broken = [name for name, bad in pins if bad]
  if broken:
    return f"{plan} does not honour the option {broken[0]}={getattr(o, broken[0])!r}"
  return None


def _candidate(d: Any, i: int, req: Request) -> str | None:
  where = f"candidate {i}"
  if not isinstance(d, dict):
    return f"{where} is not an object"
  _, problem = _plan(d.get("plan"), f"{where}'s plan", req)
  if problem:
    return problem
  verdict = d.get("verdict")
  if verdict not in VERDICTS:
    return f"{where}'s verdict {verdict!r} is not one of {list(VERDICTS)}"
  mem, est = d.get("memory_bytes"), d.get("est_time_s")
  if mem is not None and (not _is_int(mem) or mem < 0):
    return f"{where}'s memory_bytes {mem!r} is not a byte count"
  if est is not None and (not _is_number(est) or est < 0):
    return f"{where}'s est_time_s {est!r} is not a number of seconds"
  if verdict in (CHOSEN, FEASIBLE) and (mem is None or est is None):
    return f"{where} is {verdict} without a memory figure and a time estimate"
  if verdict in (CHOSEN, FEASIBLE) and mem > req.budget_bytes:
    return f"{where} is {verdict} with {mem} bytes, over the budget of {req.budget_bytes}"
  if not isinstance(d.get("reason"), str):
    return f"{where}'s reason is not a string"
  if not _is_number(d.get("compile_s")) or d["compile_s"] < 0:
    return f"{where}'s compile_s {d.get('compile_s')!r} is not a number of seconds"
  if not isinstance(d.get("details", {}), dict):
    return f"{where}'s details is not an object"
  return None


def _candidates(cands: Any, req: Request) -> str | None:
  if not isinstance(cands, list) or not cands:
    return "it holds no candidates"
  for i, c in enumerate(cands):
    problem = _candidate(c, i, req)
    if problem:
      return problem
  return None


def check_result(d: Mapping, req: Request) -> str | None:
  """The first problem of a stored SearchResult (`SearchResult.to_json()`) for `req`, or None."""
  for name, want in (("num_devices", req.num_devices), ("global_batch", req.global_batch),
                     ("capacity_bytes", req.capacity_bytes), ("budget_bytes", req.budget_bytes),
                     ("hardware", req.hardware)):
    if d.get(name) != want:
      return f"its {name} is {d.get(name)!r}, this search's is {want!r}"
  if not isinstance(d.get("timings"), dict) or not all(_is_number(v) for v in d["timings"].values()):
    return "its timings are not numbers"
  plan, problem = _plan(d.get("plan"), "the chosen plan", req)
  if problem:
    return problem
  if req.global_batch % (plan.dp * plan.mb):
    return f"the chosen plan {plan} does not divide the global batch {req.global_batch}"
  problem = honours(plan, req.options, req.num_blocks) or _candidates(d.get("candidates"), req)
  if problem:
    return problem
  first = d["candidates"][0]
  if first["verdict"] != CHOSEN or first["plan"] != d["plan"]:
    return "its first candidate is not the chosen plan"
  return None


def check_out_of_memory(d: Mapping, req: Request) -> str | None:
  """The first problem of a stored out-of-memory outcome for `req`, or None."""
  if not isinstance(d.get("message"), str) or not d["message"]:
    return "its message is not a string"
  problem = _candidates(d.get("candidates"), req)
  if problem:
    return problem
  fits = [i for i, c in enumerate(d["candidates"]) if c["verdict"] in (CHOSEN, FEASIBLE)]
  if fits:
    return f"it says nothing fits, but candidate {fits[0]} is {d['candidates'][fits[0]]['verdict']}"
  return None
