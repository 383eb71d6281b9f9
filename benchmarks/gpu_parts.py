"""The GPU check's measuring steps, one per process (run by benchmarks/gpu_check.py).

Each step is `python benchmarks/gpu_parts.py STEP --work DIR [...]`, a fresh process with its
own time limit, so a crash, a hang or an out-of-memory in one step is recorded and the others
still run. Each prints its log and, as its last line, one JSON object with its figures.

  env         versions, the devices jax sees and their memory limit, torchax loading, nvidia-smi
  calibrate   `passes.calibrate.run_calibration` on the devices against the built-in profile
              (`passes.hardware.detect_profile`); saves the calibrated profile to DIR/profile.json
  pq-search   `ap_xla.search` of the plan-quality Llama with that profile, bf16 mixed precision;
              meanwhile every plan of its space searched alone (pinned options), so the plans
              its branch-and-bound prunes have a prediction too; writes DIR/search.json
  pq-run      one plan of it run for real in this fresh process (`plan_quality.Candidate`):
              step times and the device's peak memory (`peak_bytes_in_use`: the counter cannot
              be reset, hence one process per plan)
"""
from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import json
import logging
import os
import re
import subprocess
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

# The plan-quality model: ~1B parameters (TinyLlama's width, 20 blocks) with 2048-token
# sequences, so that one GPU cannot hold the replicated step's activations (the search must
# recompute or micro-batch); the dry run's is a toy of the same shape.
# name: (vocab, dim, layers, heads, kv_heads, ffn, seq)
PQ_MODELS = {
    "llama-1b": (32000, 2048, 20, 16, 4, 5632, 2048),
    "tiny": (128, 32, 2, 4, 4, 64, 32),
}
# The GPU check searches two recomputation policies, not the auto space's four: every plan of its
# space is compiled (and maybe run) within the lent device's few minutes.
PQ_RECOMPUTE = ("none", "full")
OOM_PATTERN = re.compile(r"RESOURCE_EXHAUSTED|out of memory|OutOfMemory|Out of memory|failed to allocate",
                         re.IGNORECASE)


def pq_config(name: str):
  from ap_xla.models.llama import LlamaConfig
  vocab, dim, layers, heads, kv, ffn, seq = PQ_MODELS[name]
  return LlamaConfig(vocab=vocab, dim=dim, layers=layers, heads=heads, kv_heads=kv, ffn=ffn, seq=seq)


def pq_batch(name: str, capacity_bytes: int) -> int:
  """The global batch: 4 on the dry run's toy; 16 sequences on a GPU under 100 GiB, else 32.

  Sized so that the step without recomputation or micro-batches needs more than the 80% budget
  (mixed precision: ~16 B of parameter, gradient and AdamW state per parameter, ~17 GB, plus the
  activations) while the memory-saving plans fit.
  """
  if name == "tiny":
    return 4
  return 16 if capacity_bytes < 100 * 2**30 else 32


def model_flops(cfg, batch: int) -> float:
  """FLOPs of one training step of the model as written, without recomputation.

  6 x (block and LM-head weights) per token for the matmuls, forward and backward, plus
  12 x layers x dim x seq per token for attention's two matmuls over the full (unmasked)
  score matrix, as the model computes it. The embedding lookup is not a matmul.
  """
  kv = (cfg.kv_heads or cfg.heads) * cfg.head_dim
  block = cfg.dim * (2 * cfg.dim + 2 * kv) + 3 * cfg.dim * cfg.ffn_dim
  tokens = batch * cfg.seq
  return 6.0 * (cfg.layers * block + cfg.vocab * cfg.dim) * tokens + 12.0 * cfg.layers * cfg.dim * cfg.seq * tokens


def _emit(doc: dict) -> None:
  print(json.dumps(doc), flush=True)


def _error(e: BaseException) -> dict:
  text = " ".join(f"{type(e).__name__}: {e}".split())
  return {"error": text[:1500], "oom": bool(OOM_PATTERN.search(text))}


# -- env ---------------------------------------------------------------------------------

def step_env(args) -> dict:
  import importlib.metadata as md
  import platform
  out = {"python": platform.python_version(), "versions": {}}
  for dist in ("jax", "jaxlib", "jax-cuda13-plugin", "jax-cuda12-plugin", "torch", "torchax", "transformers",
               "flax", "optax", "orbax-checkpoint", "numpy", "scipy"):
    try:
      out["versions"][dist] = md.version(dist)
    except md.PackageNotFoundError:
      pass
  import jax
  from passes import compat, hardware
  devices = jax.devices()
  d = devices[0]
  out.update(platform=d.platform, device_kind=d.device_kind, device_count=len(devices),
             memory_limit_bytes=hardware.device_memory_bytes(d), jax_support_note=compat.support_note(),
             builtin_profile=hardware.detect_profile(devices).name)
  import torch
  out["torch_cuda"] = torch.cuda.is_available()
  if out["torch_cuda"]:
    out["torch_device"] = torch.cuda.get_device_name()
  try:
    from bridge import torchax_compat
    torchax_compat.torchax_module()
    out["torchax"] = {"loaded": True, "shim_used": torchax_compat.named_overloads_removed(),
                      "placeholders": len(torchax_compat.placeholders_used())}
  except Exception as e:  # the one-liner part will fail the same way: say so early
    out["torchax"] = {"loaded": False, **_error(e)}
  try:
    q = "name,memory.total,driver_version,clocks.sm,clocks.max.sm,temperature.gpu,power.draw"
    r = subprocess.run(["nvidia-smi", f"--query-gpu={q}", "--format=csv,noheader"], capture_output=True,
                       text=True, timeout=20)
    out["nvidia_smi"] = r.stdout.strip() or r.stderr.strip()
  except (OSError, subprocess.TimeoutExpired) as e:
    out["nvidia_smi"] = f"not available: {e}"
  return out


# -- calibrate ---------------------------------------------------------------------------

def step_calibrate(args) -> dict:
  import jax
  from passes import calibrate, hardware
  devices = jax.devices()
  cal = calibrate.run_calibration(devices, quick=args.dry_run)
  builtin = hardware.detect_profile(devices)
  hardware.save_profile(cal.profile, os.path.join(args.work, "profile.json"))
  p, b = cal.profile, builtin
  figures = {"bf16_flops": (b.peak("bf16"), p.peak("bf16")), "f32_flops": (b.peak("f32"), p.peak("f32")),
             "memory_bandwidth": (b.memory_bandwidth, p.memory_bandwidth),
             "memory_bytes": (b.memory_bytes, p.memory_bytes)}
  if len(devices) > 1:
    figures["link_bandwidth"] = (b.link_bandwidth, p.link_bandwidth)
    figures["link_latency"] = (b.link_latency, p.link_latency)
  return {"builtin": dataclasses.asdict(b), "calibrated": dataclasses.asdict(p), "seconds": cal.seconds,
          "compare": {k: {"builtin": v[0], "measured": v[1], "ratio": v[1] / v[0]} for k, v in figures.items()},
          "samples": [dataclasses.asdict(s) for s in cal.samples]}


# -- plan quality: search ----------------------------------------------------------------

def _profile(work: str):
  import jax
  from passes import hardware
  path = os.path.join(work, "profile.json")
  if os.path.exists(path):
    return hardware.load_profile(path), "calibrated"
  return hardware.detect_profile(jax.devices()), "built-in (calibration did not run)"


def _pinned(program, devices, plan, kwargs):
  """One plan searched alone: the search's own verdict, memory and estimate for it."""
  import ap_xla
  from passes.report import OutOfMemoryError
  try:
    res = ap_xla.search(program, devices, num_micro_batches=plan.mb, activation_recomputation=plan.recompute,
                        pipeline_parallel=False, tensor_parallel=plan.tp, **kwargs)
    cands = res.candidates
  except OutOfMemoryError as e:  # alone and over budget: still a prediction
    cands = e.results
  return next(c for c in cands if c.plan == plan)


def step_pq_search(args) -> dict:
  import jax
  import ap_xla
  from ap_xla.models.llama import llama_program
  from passes import hardware
  from passes.report import PRUNED
  from passes.recompute import recomputed_fraction
  from passes.space import SearchOptions, enumerate_plans
  devices = jax.devices()
  profile, source = _profile(args.work)
  device_capacity = hardware.device_memory_bytes(devices[0]) or profile.memory_bytes
  capacity = hardware.parse_bytes(args.capacity) if args.capacity not in (None, "auto") else device_capacity
  cfg, batch = pq_config(args.model), pq_batch(args.model, capacity)
  program = llama_program(cfg, batch, abstract=True, name=f"llama ({args.model})")
  # measure_budget_s=0: the check judges the estimate's choice (every plan is run below anyway),
  # and timing near ties would spend the device time the check is budgeted.
  kwargs = dict(hardware=profile, capacity_bytes=capacity, mixed_precision=True, progress=False,
                compile_timeout_s=args.compile_timeout, measure_budget_s=0)
  # Every plan of the space is also searched alone on worker threads, started before the real
  # search: the plans its branch-and-bound prunes get a prediction too (and can be run), and
  # those it does compile find them in the persistent compilation cache. The likely-pruned
  # variants (most recomputation and micro-batches) go first.
  space, _ = enumerate_plans(len(devices), batch, cfg.layers,
                             SearchOptions(mixed_precision=True, activation_recomputation=PQ_RECOMPUTE))
  space.sort(key=lambda p: (-recomputed_fraction(p.recompute), -p.mb))
  if args.capacity == "auto":  # the dry run: a budget halfway between the replicated and the smallest plan
    from ap_xla import env
    alone = dict(kwargs, capacity_bytes=2**40)
    replicated = next(p for p in space if p.mb == 1 and p.recompute == "none")
    sizes = [_pinned(program, devices, p, alone).memory_bytes for p in (replicated, space[0])]
    capacity = int(sum(sizes) / 2 * 100 / env.read_settings().memory_ratio)
    kwargs["capacity_bytes"] = capacity
    print(f"dry run: replicated plan {sizes[0]} B, smallest {sizes[1]} B: capacity {capacity} B", flush=True)
  print(f"searching {program!r} on {len(devices)} {devices[0].device_kind} with the {source} profile; "
        f"plans searched alone: {f'all, {args.extra_threads} at once' if args.extra_threads else 'the pruned ones, after it'}",
        flush=True)
  doc = {"model": args.model, "config": dataclasses.asdict(cfg), "batch": batch, "params": program.num_params,
         "model_flops": model_flops(cfg, batch), "profile": dataclasses.asdict(profile), "profile_source": source,
         "extra": []}
  path = os.path.join(args.work, "search.json")
  pool = concurrent.futures.ThreadPoolExecutor(max(args.extra_threads, 1))
  futures = {p: pool.submit(_pinned, program, devices, p, kwargs) for p in space} if args.extra_threads else {}
  t0 = time.perf_counter()
  res = ap_xla.search(program, devices, activation_recomputation=PQ_RECOMPUTE, **kwargs)
  doc.update(result=res.to_json(), search_s=time.perf_counter() - t0)
  print(res.table(), flush=True)
  _write(path, doc)  # the runs can start from this even if the plans alone run out of time
  pruned = {c.plan for c in res.candidates if c.verdict == PRUNED}
  if not args.extra_threads:  # --extra-threads 0: only the pruned plans, one at a time, after the search
    futures = {p: pool.submit(_pinned, program, devices, p, kwargs) for p in space if p in pruned}
  for p, f in futures.items():
    if p not in pruned:
      f.cancel()  # compiled by the search already (if not started yet)
  for p in [p for p in space if p in pruned]:
    try:
      c = futures[p].result()
      doc["extra"].append(c.to_json())
      print(f"  alone: {c!r}", flush=True)
    except Exception as e:
      doc["extra"].append({"plan": p.to_dict(), "verdict": "error", **_error(e)})
    _write(path, doc)
  pool.shutdown(wait=False, cancel_futures=True)  # main() exits without waiting for stragglers
  doc["total_s"] = time.perf_counter() - t0
  _write(path, doc)
  return {k: v for k, v in doc.items() if k != "result"} | {"plan": res.plan.to_dict(), "timings": res.timings,
                                                           "budget_bytes": res.budget_bytes,
                                                           "capacity_bytes": res.capacity_bytes}


def _write(path: str, doc: dict) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(doc, f)
  os.replace(tmp, path)


# -- plan quality: one run ---------------------------------------------------------------

def step_pq_run(args) -> dict:
  import jax
  from ap_xla.models.llama import llama_program
  from passes.plan import Plan
  from plan_quality import Candidate  # benchmarks/plan_quality.py
  plan = Plan.from_dict(json.loads(args.plan))
  devices = jax.devices()
  program = llama_program(pq_config(args.model), args.batch, abstract=True, name=f"llama ({args.model})")
  out = {"plan": plan.to_dict()}
  events = {"requests": 0, "hits": 0}

  def count(event, **_):  # the step should come from the persistent cache the search filled
    if event == "/jax/compilation_cache/compile_requests_use_cache":
      events["requests"] += 1
    elif event == "/jax/compilation_cache/cache_hits":
      events["hits"] += 1

  jax.monitoring.register_event_listener(count)
  try:
    t0 = time.perf_counter()
    cand = Candidate(program, plan, devices)
    out.update(compile_s=time.perf_counter() - t0, predicted_bytes=cand.memory.total,
               cache_requests=events["requests"], cache_hits=events["hits"])
    if devices[0].platform == "cpu":
      cand.run(0, 1, True)  # as plan_quality's child: the runtime's threads start on first use
    out.update(cand.run(args.warmup, args.steps, True))
  except Exception as e:  # out of memory at run time is a result
    out.update(_error(e))
  return out


STEPS = {"env": step_env, "calibrate": step_calibrate, "pq-search": step_pq_search, "pq-run": step_pq_run}


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("step", choices=sorted(STEPS))
  ap.add_argument("--work", required=True, help="the check's working folder")
  ap.add_argument("--dry-run", action="store_true")
  ap.add_argument("--model", choices=sorted(PQ_MODELS), default="llama-1b")
  ap.add_argument("--capacity", default=None,
                  help="per-device memory for the search (default: the device's; 'auto': the dry run's, halfway "
                       "between the replicated and the smallest plan)")
  ap.add_argument("--compile-timeout", type=float, default=None)
  ap.add_argument("--extra-threads", type=int, default=4,
                  help="pq-search: plans searched alone at once, beside the search (0: only the pruned ones, after it)")
  ap.add_argument("--plan", help="pq-run: the plan as JSON")
  ap.add_argument("--batch", type=int, help="pq-run: the global batch pq-search chose")
  ap.add_argument("--steps", type=int, default=5)
  ap.add_argument("--warmup", type=int, default=2)
  args = ap.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="[%(asctime)s %(threadName)s] %(message)s", datefmt="%H:%M:%S")
  logging.getLogger("jax").setLevel(logging.WARNING)
  try:
    doc = STEPS[args.step](args)
  except Exception as e:
    traceback.print_exc()
    _emit({"step": args.step, "status": "failed", **_error(e)})
    return 1
  _emit({"step": args.step, "status": "ok", **doc})
  return 0


if __name__ == "__main__":
  code = main()
  sys.stdout.flush()
  sys.stderr.flush()
  # Without waiting for worker threads still compiling plans nobody needs any more (pq-search).
  os._exit(code)
