"""The candidate space: which plans the search compiles, and why others are left out."""
from __future__ import annotations

import dataclasses
import itertools
from typing import Union

from passes.plan import RECOMPUTE_POLICIES, Plan

Auto = str  # the literal 'auto'
AUTO = "auto"

# Micro-batch counts tried when the user leaves `num_micro_batches` to the search; beyond the
# last, the doublings the batch still splits into (`auto_micro_batches`).
AUTO_MICRO_BATCHES = (1, 2, 4, 8, 16)
# Recomputation policies tried when the user leaves activation_recomputation to the search.
# 'selective_layer' is searched only when named: the screen costs it as the mean of 'none' and
# 'full' per block (untraced), and under FSDP its unrecomputed blocks keep their gathered weights
# (XLA:CPU, an 8-layer FSDP-8 Llama: 53.5 MiB of temporaries against 18.7 for 'none').
AUTO_RECOMPUTE = ("none", "selective_op", "full")


def auto_micro_batches(batch_size: int, dp: int) -> list[int]:
  """AUTO_MICRO_BATCHES, then further doublings while each data shard keeps one example per
  micro-batch (32, 64, ... where the batch allows): the screen makes a wide space cheap."""
  mbs = list(AUTO_MICRO_BATCHES)
  mb = mbs[-1] * 2
  while batch_size % (dp * mb) == 0:
    mbs.append(mb)
    mb *= 2
  return mbs


@dataclasses.dataclass(frozen=True)
class SearchOptions:
  """The knobs of the search; a fixed value pins its dimension, 'auto' searches it.

  Attributes mirror MoAI's `enable_advanced_parallelization` arguments, plus
  `tensor_parallel` and `data_parallel` for the JAX-native API.
  """
  pipeline_parallel: bool = True
  num_stages: Union[int, Auto] = AUTO
  num_micro_batches: Union[int, Auto] = AUTO
  activation_recomputation: Union[bool, str] = AUTO
  distribute_parameter: Union[bool, Auto] = AUTO
  mixed_precision: bool = True
  tensor_parallel: Union[int, Auto] = AUTO
  distribute_low_prec_param: Union[bool, Auto] = AUTO

  def __post_init__(self):
    _check_bool("pipeline_parallel", self.pipeline_parallel)
    _check_bool("mixed_precision", self.mixed_precision)
    _check_int_or_auto("num_stages", self.num_stages)
    _check_int_or_auto("num_micro_batches", self.num_micro_batches)
    _check_int_or_auto("tensor_parallel", self.tensor_parallel)
    _check_bool_or_auto("distribute_parameter", self.distribute_parameter)
    _check_bool_or_auto("distribute_low_prec_param", self.distribute_low_prec_param)
    r = self.activation_recomputation
    if isinstance(r, (list, tuple)):  # several policies to search among
      if not r or any(not isinstance(x, str) or x not in RECOMPUTE_POLICIES for x in r) or len(set(r)) < len(r):
        raise ValueError(f"activation_recomputation as a sequence must list distinct policies of "
                         f"{RECOMPUTE_POLICIES}, got {r!r}.")
      object.__setattr__(self, "activation_recomputation", tuple(r))
    elif not (isinstance(r, bool) or r == AUTO or r in RECOMPUTE_POLICIES):
      raise ValueError(f"activation_recomputation must be True, False, 'auto', one of "
                       f"{RECOMPUTE_POLICIES} or a tuple of them, got {r!r}.")
    if not self.pipeline_parallel and self.num_stages not in (AUTO, 1):
      raise ValueError(f"num_stages={self.num_stages} needs pipeline_parallel=True; set "
                       "pipeline_parallel=True or num_stages='auto'.")

  def pinned(self) -> dict:
    """The options the user fixed ({name: value}): what un-pinning could widen."""
    pins = {f: getattr(self, f) for f in ("num_stages", "num_micro_batches", "distribute_parameter",
                                          "tensor_parallel", "activation_recomputation")
            if getattr(self, f) != AUTO}
    if not self.pipeline_parallel:
      pins["pipeline_parallel"] = False
    return pins

  def recompute_choices(self) -> tuple[str, ...]:
    r = self.activation_recomputation
    if r == AUTO:  # what people run: none, torchtitan's two selective policies, full
      return AUTO_RECOMPUTE
    if isinstance(r, bool):
      return ("full",) if r else ("none",)
    return r if isinstance(r, tuple) else (r,)


def _check_bool(name, v):
  if not isinstance(v, bool):
    raise TypeError(f"{name} must be True or False, got {v!r} ({type(v).__name__}).")


def _check_bool_or_auto(name, v):
  if not (isinstance(v, bool) or v == AUTO):
    raise ValueError(f"{name} must be True, False or 'auto', got {v!r}.")


def _check_int_or_auto(name, v):
  if v == AUTO:
    return
  if not isinstance(v, int) or isinstance(v, bool) or v < 1:
    raise ValueError(f"{name} must be a positive int or 'auto', got {v!r}.")


@dataclasses.dataclass(frozen=True)
class Skipped:
  """A point of the space that was not compiled, with the reason."""
  plan: Plan
  reason: str


def divisors(n: int) -> list[int]:
  return [d for d in range(1, n + 1) if n % d == 0]


def enumerate_plans(num_devices: int, batch_size: int, num_blocks: int, options: SearchOptions,
                    tp_ok=lambda tp: None, pipeline_ok=lambda pp, mb, dp: None,
                    fsdp_groups=lambda dp, tp: ()):
  """Lists the plans to compile and the ones left out with their reasons.

  Args:
    num_devices: devices in the mesh.
    batch_size: global batch.
    num_blocks: depth of the block stack (0: no layer structure, no pipelining).
    options: the search knobs.
    tp_ok: `tp -> reason or None`; says whether tensor parallelism of that degree applies.
    pipeline_ok: `(pp, mb, dp) -> reason or None` for pipelined combinations.
    fsdp_groups: `(dp, tp) -> FSDP group sizes` to try as HSDP beside FSDP over all of dp
      (pp == 1; `hsdp_groups`); none by default.

  Returns:
    (plans, skipped): plans to compile, in a deterministic order; skipped plans with reasons.

  Raises:
    ValueError: a pinned value can never be satisfied (names the option and the rule). A pinned
      tensor_parallel that `tp_ok` refuses is only left out here (see `check_pinned_tp`).
  """
  o = options
  _check_pins(num_devices, batch_size, num_blocks, o)
  plans, skipped = [], []
  pps = [o.num_stages] if o.num_stages != AUTO else (
      [d for d in divisors(num_devices) if d <= max(num_blocks, 1)] if o.pipeline_parallel and num_blocks else [1])
  for pp in pps:
    rest = num_devices // pp
    tps = [o.tensor_parallel] if o.tensor_parallel != AUTO else divisors(rest)
    for tp in tps:
      if rest % tp:
        continue
      dp = rest // tp
      base = Plan(dp=dp, tp=tp, pp=pp)
      if batch_size % dp:
        skipped.append(Skipped(base, f"batch {batch_size} does not divide by data parallel {dp}"))
        continue
      if tp > 1 and (why := tp_ok(tp)):
        skipped.append(Skipped(base, why))
        continue
      mbs = [o.num_micro_batches] if o.num_micro_batches != AUTO else auto_micro_batches(batch_size, dp)
      if o.num_micro_batches == AUTO:
        # One record per mesh for the auto counts the batch cannot split into (not one per count).
        if bad := [mb for mb in mbs if batch_size % (dp * mb)]:
          skipped.append(Skipped(dataclasses.replace(base, mb=bad[0]), f"batch {batch_size} does not "
                                 f"divide by dp*mb for dp={dp} and auto micro-batch counts {bad}"))
          mbs = [mb for mb in mbs if mb not in bad]
      for mb in mbs:
        plan0 = dataclasses.replace(base, mb=mb)
        if batch_size % (dp * mb):
          skipped.append(Skipped(plan0, f"batch {batch_size} does not divide by dp*mb = {dp}*{mb}"))
          continue
        if pp > 1 and mb < pp and o.num_micro_batches == AUTO:
          skipped.append(Skipped(plan0, f"{mb} micro-batches < {pp} stages: a larger bubble than "
                                        f"mb={pp} with no memory saved"))
          continue
        if pp > 1 and (why := pipeline_ok(pp, mb, dp)):
          skipped.append(Skipped(plan0, why))
          continue
        for plan in _variants(plan0, num_blocks, o):
          plans.append(plan)
          if plan.fsdp and pp == 1:
            plans += [dataclasses.replace(plan, fsdp_group=g) for g in fsdp_groups(dp, tp) if 1 < g < dp]
          # 1F1B keeps 2S micro-batches' residuals where GPipe keeps M + S - 1: an
          # alternative when that is fewer (at the cost of S more ticks and post per tick).
          if pp > 1 and mb > pp + 1:
            plans.append(dataclasses.replace(plan, schedule="1f1b"))
  return plans, skipped


def _variants(plan: Plan, num_blocks: int, o: SearchOptions):
  recomputes = o.recompute_choices() if num_blocks else ("none",)
  fsdps = [o.distribute_parameter] if o.distribute_parameter != AUTO else [False, True]
  if plan.dp == 1:
    fsdps = [False] if o.distribute_parameter is not True else [True]
  for recompute, fsdp in itertools.product(recomputes, fsdps):
    lows = [False]
    if o.mixed_precision and fsdp:
      lows = [o.distribute_low_prec_param] if o.distribute_low_prec_param != AUTO else [False, True]
    for low in lows:
      yield dataclasses.replace(plan, recompute=recompute, fsdp=fsdp, low_prec=low, bf16=o.mixed_precision)


def hsdp_groups(devices_per_node: int, largest_group=lambda dp: None):
  """`(dp, tp) -> FSDP group sizes` for `enumerate_plans`: where the data-parallel ranks span
  nodes, a group of one node's ranks (sharded over NVLink, replicated across nodes); and where
  FSDP over all of dp would leave weights replicated (no dimension divides by dp),
  `largest_group(dp)`, the largest group that shards them all (`shardings.largest_shard_group`)."""
  def groups(dp: int, tp: int) -> tuple[int, ...]:
    out = set()
    node = devices_per_node // tp if devices_per_node % tp == 0 else 0
    if dp * tp > devices_per_node and node > 1 and dp % node == 0:
      out.add(node)
    g = largest_group(dp)
    if g and g < dp:
      out.add(g)
    return tuple(sorted(out))
  return groups


def check_pinned_tp(num_devices: int, options: SearchOptions, tp_ok) -> None:
  """Raises ValueError when the user pinned a tensor_parallel degree the program cannot use.

  Not part of `enumerate_plans`: callers that pin tp themselves to slice the space (the
  CLI's quick search) expect such a slice to come back empty, with its reason, not to fail.
  """
  tp = options.tensor_parallel
  if tp != AUTO and tp > 1 and not num_devices % tp and (why := tp_ok(tp)):
    usable = [t for t in divisors(num_devices) if t == 1 or not tp_ok(t)]
    raise ValueError(f"tensor_parallel={tp} cannot be used by this program: {why}; allowed: {usable} "
                     "or 'auto'.")


def _check_pins(num_devices, batch_size, num_blocks, o: SearchOptions):
  if o.num_stages != AUTO and o.num_stages > 1:
    if not num_blocks:
      raise ValueError(f"num_stages={o.num_stages} needs a model with a block stack (Layers), but this "
                       "program has none; use num_stages='auto' or 1, or give the program Layers.")
    if num_devices % o.num_stages:
      raise ValueError(f"num_stages={o.num_stages} does not divide the device count {num_devices}; "
                       f"allowed: {divisors(num_devices)}.")
    if o.num_stages > num_blocks:
      raise ValueError(f"num_stages={o.num_stages} exceeds the number of blocks {num_blocks}; "
                       f"use at most {num_blocks} stages.")
    if num_blocks % o.num_stages:
      ok = [d for d in divisors(num_devices) if num_blocks % d == 0]
      raise ValueError(f"num_stages={o.num_stages} does not divide the {num_blocks} blocks (stages hold "
                       f"equal chunks of blocks); allowed: {ok} (dividing both {num_blocks} blocks and "
                       f"{num_devices} devices) or 'auto'.")
  if o.tensor_parallel != AUTO and num_devices % o.tensor_parallel:
    raise ValueError(f"tensor_parallel={o.tensor_parallel} does not divide the device count "
                     f"{num_devices}; allowed: {divisors(num_devices)}.")
  if o.num_micro_batches != AUTO and batch_size % o.num_micro_batches:
    raise ValueError(f"num_micro_batches={o.num_micro_batches} does not divide the global batch "
                     f"{batch_size}; allowed: {divisors(batch_size)}.")
  if set(o.recompute_choices()) != {"none"} and o.activation_recomputation != AUTO and not num_blocks:
    raise ValueError(f"activation_recomputation={o.activation_recomputation!r} recomputes per block, "
                     "but this program has no block stack (Layers); use 'auto' or False.")


def no_candidate_message(num_devices: int, batch_size: int, skipped, pinned: dict | None = None,
                         header: str | None = None) -> str:
  """Why no plan is left to compile: the distinct skip reasons, each with an example plan, and a hint.

  Args:
    num_devices, batch_size: what the plans were enumerated for.
    skipped: the `Skipped` records (or CandidateResults) of every left-out plan.
    pinned: the options the user fixed ({name: value}); the hint offers to un-pin them.
    header: the opening sentence (default: no candidate is left to compile for these devices
      and this batch).
  """
  by_reason: dict[str, list] = {}
  for sk in skipped:
    by_reason.setdefault(sk.reason, []).append(sk.plan)
  header = header or (f"no parallelization candidate is left to compile for {num_devices} devices and a "
                      f"global batch of {batch_size}")
  lines = [f"{header}: all {len(skipped)} candidates were left out:"]
  for i, (reason, plans) in enumerate(by_reason.items()):
    if i == 12:
      lines.append(f"  ... and {len(by_reason) - i} more reasons")
      break
    more = f" and {len(plans) - 1} more" if len(plans) > 1 else ""
    lines.append(f"  - {reason} ({plans[0]}{more})")
  dps = sorted({sk.plan.dp for sk in skipped if sk.reason.startswith("batch ")})
  hint = f"a global batch that a data-parallel size in {dps} divides (with the micro-batches), or " if dps else ""
  unpin = ""
  if pinned:
    unpin = "; or un-pin " + ", ".join(f"{k}={v!r}" for k, v in pinned.items()) + " (set to 'auto')"
  lines.append(f"  Use {hint}another device count{unpin}.")
  return "\n".join(lines)
