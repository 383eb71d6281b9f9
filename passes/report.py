"""What the search found: every candidate with its memory, cost and verdict, and the choice."""
from __future__ import annotations

import dataclasses
from typing import Any

from passes.cost_model import rank_key
from passes.plan import Plan

# Verdicts, best first: the order the report lists them in.
CHOSEN, FEASIBLE, OVER_BUDGET, PRUNED, COMPILE_ERROR, TIMEOUT, SKIPPED = (
    "chosen", "feasible", "over_budget", "pruned", "compile_error", "timeout", "skipped")
VERDICTS = (CHOSEN, FEASIBLE, OVER_BUDGET, PRUNED, COMPILE_ERROR, TIMEOUT, SKIPPED)
_ORDER = {v: i for i, v in enumerate(VERDICTS)}

# Where a candidate's figures come from.
COMPILED, PREDICTED = "compiled", "predicted"

GiB = 1024 ** 3


def fmt_bytes(n: int | None) -> str:
  if n is None:
    return "-"
  for unit, size in (("GiB", GiB), ("MiB", 1024 ** 2), ("KiB", 1024)):
    if n >= size:
      return f"{n / size:.2f} {unit}"
  return f"{n} B"


def fmt_time(s: float | None) -> str:
  if s is None:
    return "-"
  return f"{s * 1e3:.3f} ms" if s < 1 else f"{s:.3f} s"


@dataclasses.dataclass(frozen=True)
class CandidateResult:
  """One candidate's outcome.

  Attributes:
    plan: the candidate.
    verdict: one of chosen, feasible, over_budget, pruned, compile_error, timeout, skipped.
    memory_bytes: predicted per-device peak (argument + output - alias + temp), if compiled.
    est_time_s: estimated step time from the cost model, if compiled.
    reason: why it was rejected (or what made it win).
    compile_s: seconds spent lowering and compiling it.
    details: memory and cost breakdowns for the detailed log.
    figures: where memory_bytes and est_time_s come from: 'compiled' (XLA's analysis of the
      compiled candidate) or 'predicted' (the analytic screen, calibrated; not compiled).
    route: for a compiled candidate, which compiler gave its figures ('xla:gpu (deviceless)',
      'xla:cpu', ...: `passes.gpu_target`); '' when not recorded.
  """
  plan: Plan
  verdict: str
  memory_bytes: int | None = None
  est_time_s: float | None = None
  reason: str = ""
  compile_s: float = 0.0
  details: dict = dataclasses.field(default_factory=dict, compare=False)
  figures: str = COMPILED
  route: str = ""

  def __post_init__(self):
    if self.figures not in (COMPILED, PREDICTED):
      raise ValueError(f"CandidateResult.figures must be {COMPILED!r} or {PREDICTED!r}, got {self.figures!r}.")

  def __repr__(self):
    return (f"CandidateResult({self.plan}, {self.verdict}, mem={fmt_bytes(self.memory_bytes)}, "
            f"time={fmt_time(self.est_time_s)}, {self.figures})")

  @property
  def source(self) -> str:
    """Where its figures come from, as the report's table says it: 'predicted' (the screen), or
    the compiler that gave them ('xla:gpu (deviceless)', 'xla:cpu'; 'compiled' if not recorded)."""
    return self.route if self.figures == COMPILED and self.route else self.figures

  @property
  def compiled(self) -> bool:
    """Whether XLA compiled it (its figures are XLA's, not the screen's)."""
    return self.figures == COMPILED and self.verdict not in (PRUNED, SKIPPED)

  def to_json(self) -> dict:
    return {"plan": self.plan.to_dict(), "verdict": self.verdict, "memory_bytes": self.memory_bytes,
            "est_time_s": self.est_time_s, "reason": self.reason, "compile_s": self.compile_s,
            "details": self.details, "figures": self.figures, "route": self.route}

  @classmethod
  def from_json(cls, d: dict) -> "CandidateResult":
    return cls(plan=Plan.from_dict(d["plan"]), verdict=d["verdict"], memory_bytes=d["memory_bytes"],
               est_time_s=d["est_time_s"], reason=d["reason"], compile_s=d["compile_s"],
               details=d.get("details", {}), figures=d.get("figures", COMPILED), route=d.get("route", ""))


def rank(results) -> list[CandidateResult]:
  """Feasible candidates cheapest first, then the rejected ones, by verdict.

  Estimates equal to 3 significant digits are a tie and go to less memory
  (`cost_model.rank_key`): the cost model is not finer than that. Exact ties left keep the
  input order (the sort is stable).
  """
  def key(r: CandidateResult):
    return (_ORDER[r.verdict],) + rank_key(r.est_time_s, r.memory_bytes)
  return sorted(results, key=key)


@dataclasses.dataclass(frozen=True)
class SearchResult:
  """The ranked report and the chosen plan.

  Attributes:
    plan: the chosen plan.
    candidates: every candidate, ranked (the chosen one first).
    budget_bytes: per-device memory budget (capacity x ratio / 100).
    capacity_bytes: per-device memory capacity used.
    hardware: the hardware profile's name.
    num_devices: devices searched over.
    timings: seconds for 'screen', 'compile', 'select' and 'total'.
    from_cache: True when the result was read from the plan cache.
    screen: what the analytic screen did: candidates 'predicted' and 'compiled', and its
      stated 'memory_error' and 'time_error' after 'samples' compiled candidates (empty for
      an exhaustive search).
    route: where the candidates were compiled (`gpu_target.CompileRoute.describe()`: e.g.
      'xla:gpu (deviceless): h100_sxm.txtpb, topology 1x8x8'); '' when not recorded.
  """
  plan: Plan
  candidates: tuple[CandidateResult, ...]
  budget_bytes: int
  capacity_bytes: int
  hardware: str
  num_devices: int
  global_batch: int
  timings: dict
  from_cache: bool = False
  screen: dict = dataclasses.field(default_factory=dict)
  route: str = ""

  @property
  def chosen(self) -> CandidateResult:
    return self.candidates[0]

  @property
  def feasible(self) -> list[CandidateResult]:
    return [c for c in self.candidates if c.verdict in (CHOSEN, FEASIBLE)]

  def __repr__(self):
    return (f"SearchResult({self.plan}, feasible={len(self.feasible)}/{len(self.candidates)}, "
            f"budget={fmt_bytes(self.budget_bytes)})")

  def table(self, limit: int | None = None) -> str:
    """A readable table of the candidates."""
    rows = [("#", "plan", "memory/device", "est. step", "figures", "verdict", "reason")]
    for i, c in enumerate(self.candidates[:limit] if limit else self.candidates):
      figures = "-" if c.memory_bytes is None and c.est_time_s is None else c.source
      rows.append((str(i), repr(c.plan), fmt_bytes(c.memory_bytes), fmt_time(c.est_time_s), figures, c.verdict,
                   c.reason[:80]))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)

  def to_json(self) -> dict[str, Any]:
    return {"plan": self.plan.to_dict(), "candidates": [c.to_json() for c in self.candidates],
            "budget_bytes": self.budget_bytes, "capacity_bytes": self.capacity_bytes,
            "hardware": self.hardware, "num_devices": self.num_devices, "global_batch": self.global_batch,
            "timings": self.timings, "screen": self.screen, "route": self.route}

  @classmethod
  def from_json(cls, d: dict, from_cache: bool = False) -> "SearchResult":
    return cls(plan=Plan.from_dict(d["plan"]),
               candidates=tuple(CandidateResult.from_json(c) for c in d["candidates"]),
               budget_bytes=d["budget_bytes"], capacity_bytes=d["capacity_bytes"], hardware=d["hardware"],
               num_devices=d["num_devices"], global_batch=d["global_batch"], timings=d["timings"],
               from_cache=from_cache, screen=d.get("screen", {}), route=d.get("route", ""))


class OutOfMemoryError(RuntimeError):
  """No candidate fits in device memory (MoAI's OUT_OF_MEMORY)."""

  def __init__(self, message: str, results=()):
    super().__init__(message)
    self.results = tuple(results)


class NothingCompiledError(OutOfMemoryError):
  """No candidate compiled (each timed out or failed to compile): their memory is unknown.

  A subclass of OutOfMemoryError only so that code handling "no plan" (an exit status, the
  plan cache, a fallback) handles it too; its message says what happened and what to do.
  """


def no_plan_error(results, budget: int, capacity: int, ratio: float, num_devices: int, batch: int,
                  pinned: dict, suffix: str = "") -> OutOfMemoryError:
  """The error of a search without a feasible candidate: NothingCompiledError when none compiled."""
  message = out_of_memory_message(results, budget, capacity, ratio, num_devices, batch, pinned) + suffix
  cls = NothingCompiledError if nothing_compiled(results) else OutOfMemoryError
  return cls(message, results)


def nothing_compiled(results) -> bool:
  """Whether every candidate that was tried failed to compile or timed out: none has a figure
  from XLA (the screen's predictions of the others do not count)."""
  return (not any(r.memory_bytes is not None and r.figures == COMPILED for r in results)
          and any(r.verdict in (COMPILE_ERROR, TIMEOUT) for r in results))


class NoCandidateError(ValueError):
  """The options leave nothing to compile for this program, device count and batch.

  A ValueError (bad input, not a memory shortage); `results` holds the skipped candidates
  with their reasons.
  """

  def __init__(self, message: str, results=()):
    super().__init__(message)
    self.results = tuple(results)


def out_of_memory_message(results, budget: int, capacity: int, ratio: float, num_devices: int,
                          batch: int, pinned: dict) -> str:
  """What a search without a feasible candidate found, and what to do (MoAI's OUT_OF_MEMORY).

  When no candidate compiled at all, memory is not what failed: the message says that instead.
  """
  if nothing_compiled(results):
    return _nothing_compiled_message(results)
  sized = [r for r in results if r.memory_bytes is not None]
  compiled = [r for r in sized if r.figures == COMPILED] or sized
  lines = ["OUT_OF_MEMORY: no parallelization candidate fits in device memory."]
  if compiled:
    best = min(compiled, key=lambda r: r.memory_bytes)
    how = "" if best.figures == COMPILED else " (predicted by the screen, not compiled)"
    lines.append(f"  smallest candidate: {best.plan} needs {fmt_bytes(best.memory_bytes)} per device{how}; "
                 f"available: {fmt_bytes(budget)} ({ratio:g}% of {fmt_bytes(capacity)}) on each of "
                 f"{num_devices} devices (over by {fmt_bytes(best.memory_bytes - budget)}).")
  else:
    lines.append("  no candidate compiled; see the reasons in the report.")
  lines.append("  what would make it fit:")
  lines.append(f"  - more devices (now {num_devices}) or devices with more memory;")
  lines.append(f"  - a smaller global batch (now {batch});")
  for name, value in pinned.items():
    lines.append(f"  - un-pin {name}={value!r} (set it to 'auto') so the search can use it;")
  lines.append("  - raise the memory usage correction ratio (AP_XLA_MEMORY_USAGE_CORRECTION_RATIO, now "
               f"{ratio:g}) only if you accept less headroom.")
  errors = [r for r in results if r.verdict in (COMPILE_ERROR, TIMEOUT)]
  if errors:
    lines.append(f"  ({len(errors)} candidates failed to compile; first: {errors[0].reason[:200]})")
  return "\n".join(lines)


def _nothing_compiled_message(results) -> str:
  timeouts = [r for r in results if r.verdict == TIMEOUT]
  errors = [r for r in results if r.verdict == COMPILE_ERROR]
  tried = len(timeouts) + len(errors)
  lines = [f"NO_CANDIDATE_COMPILED: none of the {tried} candidates tried compiled ({len(timeouts)} timed out, "
           f"{len(errors)} failed to compile), so nothing is known about their memory or speed."]
  if timeouts:
    lines.append(f"  first timeout: {timeouts[0].plan}: {timeouts[0].reason[:200]}")
  if errors:
    lines.append(f"  first compile error: {errors[0].plan}: {errors[0].reason[:300]}")
  lines.append("  what to do:")
  if timeouts:
    lines.append("  - raise the per-candidate compile time limit (AP_XLA_COMPILE_TIMEOUT, in seconds) or unset "
                 "it (no limit); a busy machine compiles more slowly;")
  if errors:
    lines.append("  - read the compile errors (AP_XLA_DETAILED_LOG=1 lists every candidate with its reason); "
                 "an error in every plan is usually in the program itself.")
  return "\n".join(lines)
