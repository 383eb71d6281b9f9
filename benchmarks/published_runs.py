"""ap-xla's plans held against published, measured training runs (issue 19).

Reads `benchmarks/data/published_runs.json` (each row cited with a verbatim quote of its
source; provenance and caveats in `benchmarks/data/published_runs.md`), pins each
`benchmark_eligible` configuration's layout as an ap-xla Plan, and predicts its per-device
memory and step time with the analytic screen (`passes.screen`, the search's first stage:
nothing is compiled, so 8B-70B on 8-128 GPUs plan in seconds on a 2-core machine), for the
row's GPU profile and the GPU compiler's collectives (reduce-scatter for FSDP gradients).

Prints per row the pinned plan, predicted vs measured step time, |log2(pred/measured)|, the
predicted memory against the 80% budget; then the pairwise ordering check within each
`group` (same model, GPU and count: the faster one must be predicted faster unless the two
are within 5%); last line one JSON object with the figures.

Pinning. The published layouts map onto ap-xla's Plan as follows, and each row prints what
it lost: FSDP over all ranks -> Plan(dp=N, fsdp=True), except where no weight dimension
divides by N (96 ranks: PyTorch FSDP flattens and pads, ap-xla shards whole dimensions): then
the largest group that divides them all (`passes.shardings.largest_shard_group`, 32 of 96)
as HSDP, Plan(dp=N, fsdp=True, fsdp_group=32), which the row's notes say; HSDP (shard in a
node, replicate across nodes) -> Plan(dp=N, fsdp=True, fsdp_group=<shard degree>);
activation recomputation none/full -> 'none'/'full', 'selective' by its stated kind
(`SELECTIVE`): torchtitan per-op -> 'selective_op', torchtitan per-layer -> 'selective_layer'
(every 2nd block), fms-fsdp @4ffb9bd every k-th block (k not stated) -> 'selective_layer',
fms-fsdp @ed74fd5 a fraction p of the blocks (p not stated) -> p = 1/2 where that fits, else
the least p that fits (`resolve_fraction`), MaxText minimal_flash -> 'dots' (which does not
save the attention output minimal_flash keeps); parameters gathered in bf16 -> low_prec.

Costing a row as it ran: PyTorch without torch.compile runs each elementwise op and reduction
as its own kernel (the screen's fusion='eager'); torch.compile (Inductor) and the JAX runs fuse
(fusion='xla'), `row_fusion`. On an H100 a run whose attention was PyTorch SDPA's flash backend
(FlashAttention-2) gets that kernel's efficiency (`FA2_HOPPER_EFFICIENCY`), the cuDNN runs the
profile's.

Then, unless --no-free-choice (or --rows), `benchmarks/published_choice.py`: the free search's
choice per published workload, judged against the published runs in its space (issue 19:
never more than 10% slower than one of them); its counts are the JSON's "free_choice".

Run: .venv/bin/python benchmarks/published_runs.py [--rows ID ...] [--no-free-choice]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

DATA = os.path.join(ROOT, "benchmarks", "data", "published_runs.json")
MEMORY_RATIO = 0.8  # ap-xla's default MEMORY_USAGE_CORRECTION_RATIO
NEAR = 0.10         # "feasible or misses by less than 10%"
SAME = 0.05         # two measured step times within 5% need no order

PRESETS = {"Llama-2-7B": "llama2-7b", "Llama-2-13B": "llama2-13b", "Llama-2-70B": "llama2-70b",
           "Llama-3-8B": "llama3-8b", "Llama-3.1-8B": "llama3.1-8b", "Llama-3-70B": "llama3-70b",
           "Llama-34B (Llama-2 architecture, fms '34b')": "llama2-34b-arch"}
RECOMPUTE = {"none": "none", "full": "full"}
# A row's "selective" recomputation, by what its `recompute_detail` says it is -> the ap-xla
# policy (`passes.recompute`) and the note the row prints. First match wins.
SELECTIVE = (
    ("per-op sac", "selective_op", None),          # torchtitan selective_ac_option='op'
    ("per op sac", "selective_op", None),
    ("per-layer sac", "selective_layer", None),    # torchtitan selective_ac_option='2'
    ("every k-th", "selective_layer", "every k-th block (k not stated) as every 2nd"),  # fms-fsdp @4ffb9bd
    ("fraction p", "selective_layer", None),       # fms-fsdp @ed74fd5: p not stated, `resolve_fraction`
    ("minimal_flash", "dots", "minimal_flash as 'dots' (attention output not saved)"),  # MaxText
)


def unstated_fraction(row: dict) -> bool:
  """Whether the row checkpoints a fraction of its blocks that its source does not state
  (fms-fsdp @ed74fd5: `apply_selective_ac(model, p)`, any p in [0, 1])."""
  return "fraction p" in (row["layout"].get("recompute_detail") or "").lower()


def resolve_fraction(sel: dict, full: dict, budget: float) -> tuple[float, dict]:
  """(p, figures) of a row whose fraction p of recomputed blocks is not stated: p = 1/2 (ap-xla's
  'selective_layer') where that fits the budget, else the least p in [1/2, 1] that fits ('full'
  where none does: the row is then called infeasible). The screen costs per-layer recomputation
  as the stack's mix of 'none' and 'full' blocks (`passes.screen_profile._layer_mix`: linear in
  the fraction), so a fraction p's memory and times are the line through p=1/2 and p=1."""
  if sel["memory_bytes"] <= budget:
    return 0.5, sel
  span = sel["memory_bytes"] - full["memory_bytes"]
  p = 1.0 if span <= 0 else min(1.0, max(0.5, 1 - (budget - full["memory_bytes"]) / (2 * span)))
  t = 2 * (1 - p)  # weight of p=1/2's figures
  return p, {k: t * sel[k] + (1 - t) * full[k] for k in sel}


def recompute_policy(row: dict) -> tuple[str, str | None]:
  """(ap-xla policy, note or None) of a row's published activation recomputation."""
  lay = row["layout"]
  rec = lay["activation_recompute"]
  if rec in RECOMPUTE:
    return RECOMPUTE[rec], None
  detail = (lay.get("recompute_detail") or "").lower()
  for key, policy, note in SELECTIVE:
    if key in detail:
      return policy, note
  raise ValueError(f"row {row['id']!r}: recomputation {rec!r} ({lay.get('recompute_detail')!r}) has no "
                   "ap-xla policy in SELECTIVE; add its mapping there.")


def load_rows(path: str = DATA, eligible_only: bool = True) -> list[dict]:
  """The table's rows (only the benchmark-eligible ones by default)."""
  with open(path) as f:
    rows = json.load(f)["rows"]
  return [r for r in rows if r["benchmark_eligible"] or not eligible_only]


# H100 NVL dense bf16 peak (NVIDIA H100 datasheet: 1,671 TFLOPS with sparsity, halved).
H100_NVL_BF16 = 835.5e12


# FlashAttention-2 on Hopper: "FlashAttention-2 achieving only 35% utilization on the H100 GPU"
# (FlashAttention-3, arXiv:2407.08608, abstract). The h100 profile's attention efficiency is
# that of the cuDNN kernel ap-xla runs (FlashAttention-3's class); a row whose PyTorch run used
# SDPA's flash backend (FlashAttention-2) ran this one. On A100 the profile's figure is
# FlashAttention-2's already.
FA2_HOPPER_EFFICIENCY = 0.35


def attention_kernel(row: dict) -> str:
  """'cudnn' or 'fa2': the fused attention kernel the row's run used, from its layout."""
  text = row["layout"]["attention"].lower()
  if "cudnn" in text:
    return "cudnn"
  if "sdpa" in text or "scaled_dot_product_attention" in text or "flash attention v2" in text:
    return "fa2"
  raise ValueError(f"row {row['id']!r}: attention {row['layout']['attention']!r} names no kernel "
                   "attention_kernel knows (cuDNN or PyTorch SDPA's flash backend); add it there.")


def hardware_for(row: dict):
  """The row's GPU profile: the built-in one of its class; torchtitan's H100s (96 GB HBM2e at
  2.4 TB/s, stated in the source) are the h100 profile with that memory and bandwidth, and a
  peak in the middle of the range the source states ('between SXM and NVL' at 500 W). On an
  H100, a run with PyTorch SDPA's flash attention gets FlashAttention-2's efficiency there."""
  from passes.hardware import get_profile
  gpu = row["hardware"]["gpu_class"]
  if gpu == "A100-80GB":
    return get_profile("a100")
  fa2 = {"attention_efficiency": FA2_HOPPER_EFFICIENCY} if attention_kernel(row) == "fa2" else {}
  if gpu == "H100-80GB":
    return get_profile("h100", **fa2)
  if gpu == "H100-96GB-HBM2e-500W":
    sxm = get_profile("h100")
    mid = (sxm.peak("bf16") + H100_NVL_BF16) / 2
    return get_profile("h100", name="h100-96gb-hbm2e", memory_bytes=96 * 10**9, memory_bandwidth=2.4e12,
                       peak_flops=dict(sxm.peak_flops, bf16=mid, f16=mid), **fa2)
  raise ValueError(f"row {row['id']!r}: no profile for GPU class {gpu!r}")


def pin(row: dict):
  """(preset name, Plan, global batch, seq, notes) of a row's published layout (module doc)."""
  from passes.plan import Plan
  lay, w, hw = row["layout"], row["workload"], row["hardware"]
  n, tp = hw["num_gpus"], lay["tensor_parallel"] or 1
  notes = []
  group = 0
  if lay.get("hsdp"):
    group = lay["fsdp_degree"]
    notes.append(f"HSDP {lay['fsdp_degree']}x{lay['data_parallel']}")
  policy, note = recompute_policy(row)
  if note:
    notes.append(note)
  if lay.get("torch_compile"):
    notes.append("torch.compile costed as XLA fuses")
  if (lay.get("pipeline_parallel") or 1) != 1 or (lay.get("context_parallel") or 1) != 1:
    raise ValueError(f"row {row['id']!r}: pipeline or context parallelism is not pinned by this benchmark")
  fsdp = (lay["fsdp_degree"] or 1) > 1
  plan = Plan(dp=n // tp, tp=tp, mb=w["grad_accum"] or 1, recompute=policy, fsdp=fsdp, bf16=True,
              low_prec=fsdp and lay.get("param_gather_dtype") == "bf16", fsdp_group=group)
  return PRESETS[row["model"]["name"]], plan, w["global_batch_seqs"], w["seq_len"], notes


def _shardable(plan, program, notes):
  """The plan ap-xla actually runs for a pinned FSDP layout: where no weight dimension divides
  by the shard degree, HSDP over the largest group that divides them all (module doc)."""
  from passes.shardings import largest_shard_group
  if not plan.fsdp or plan.shard_degree == 1:
    return plan, notes
  g = largest_shard_group(program, plan.shard_degree)
  if g == plan.shard_degree:
    return plan, notes
  new = dataclasses.replace(plan, fsdp_group=g)
  return new, notes + [f"FSDP {plan.shard_degree} planned as HSDP {g}x{plan.dp // g} "
                       f"(no weight dim divides by {plan.shard_degree})"]


def _check_preset(spec, row):
  """The preset has the row's published shapes (a wrong mapping would plan another model)."""
  m, c = row["model"], spec.config
  want = (m["hidden"], m["n_layers"], m["n_heads"], m["n_kv_heads"], m["ffn"], m["vocab"])
  have = (c.dim, c.layers, c.heads, c.kv_heads or c.heads, c.ffn_dim, c.vocab)
  if want != have:
    raise ValueError(f"row {row['id']!r}: preset {spec.name!r} has (dim, layers, heads, kv, ffn, vocab) "
                     f"{have}, the published model {want}")


def _figures(screened) -> dict:
  """A screened plan's figures the table reports: its step-time terms and its memory."""
  c = screened.cost
  return {"total_s": c.total_s, "compute_s": c.compute_s, "comm_s": c.comm_s, "hidden_s": c.hidden_s,
          "flops_s": c.flops_s, "memory_bound_s": c.memory_bound_s, "memory_bytes": screened.memory_bytes}


def row_fusion(row: dict) -> str:
  """How the row's run formed its kernels (`passes.jaxpr_liveness.FUSIONS`): 'eager' for PyTorch
  without torch.compile (each elementwise op and reduction its own kernel), else 'xla' (XLA's
  fusion for the JAX runs; torch.compile's Inductor fuses elementwise chains alike)."""
  return "eager" if row["layout"].get("torch_compile") is False else "xla"


class Planner:
  """Screens pinned plans, sharing a program's screen between rows of the same shapes."""

  def __init__(self):
    self._screens: dict = {}

  def screen(self, preset: str, batch: int, seq: int, plan, fusion: str = "xla"):
    from ap_xla import presets
    from passes.build import derive_program_tp
    from passes.screen import build_screen
    key = (preset, batch, seq, plan.num_devices, fusion)
    if key not in self._screens:
      spec = presets.resolve_model(preset)
      program = presets.build_program(spec, batch, seq)
      rules = derive_program_tp(program.abstract())

      class _Gpu:  # the devices planned for: a GPU's, so the screen emits its collectives
        platform = "gpu"
      base = build_screen(program, [_Gpu()] * plan.num_devices, rules, [plan], fusion)
      self._screens[key] = (spec, base)
    spec, s = self._screens[key]
    s.profile.set_sizes({batch // (plan.dp * plan.mb)})
    return spec, s

  def predict(self, row: dict) -> dict:
    """One row's prediction against its measurement."""
    t0 = time.perf_counter()
    preset, plan, batch, seq, notes = pin(row)
    hw = hardware_for(row)
    spec, screen = self.screen(preset, batch, seq, plan, row_fusion(row))
    _check_preset(spec, row)
    plan, notes = _shardable(plan, screen.program, notes)
    s = screen(plan, hw)
    budget = MEMORY_RATIO * hw.memory_bytes
    fig = _figures(s)
    fraction = None
    if unstated_fraction(row):
      full = _figures(screen(dataclasses.replace(plan, recompute="full"), hw))
      fraction, fig = resolve_fraction(fig, full, budget)
      notes = notes + [f"p not stated: p={fraction:.2f}" + (
          "" if fraction == 0.5 else f", the least that fits (p=1/2: {s.memory_bytes / 2**30:.1f} GiB)")]
    measured = row["derived"]["step_time_s"]
    pred = fig["total_s"]
    peak = row.get("published_peak_memory_gib")
    if peak is not None and peak * 2**30 > budget:
      notes = notes + [f"published peak {peak} GiB > {MEMORY_RATIO:.0%} of {hw.memory_bytes / 1e9:.0f} GB "
                       f"({budget / 2**30:.1f} GiB): over the budget even if predicted exactly"]
    return {"id": row["id"], "group": row["group"], "source": row["source"]["independent_group"],
            "model": row["model"]["name"], "gpus": row["hardware"]["num_gpus"], "hardware": hw.name,
            "plan": repr(plan), "notes": notes, "measured_s": measured, "predicted_s": pred,
            "log2": math.log2(pred / measured), "compute_s": fig["compute_s"], "comm_s": fig["comm_s"],
            "hidden_s": fig["hidden_s"], "flops_s": fig["flops_s"], "memory_bound_s": fig["memory_bound_s"],
            "memory_bytes": fig["memory_bytes"], "budget_bytes": budget,
            "feasible": fig["memory_bytes"] <= budget * (1 + 1e-9),
            "near_feasible": fig["memory_bytes"] <= (1 + NEAR) * budget, "recompute_fraction": fraction,
            "memory_terms": {k: round(v / 2**30, 2) for k, v in s.memory.items()},
            "published_peak_gib": peak,
            "published_over_budget": peak is not None and peak * 2**30 > budget,
            "wall_s": time.perf_counter() - t0}


def ordering(results: list[dict]) -> list[dict]:
  """Pairs within a group whose measured step times differ by more than SAME, with whether the
  faster one is predicted faster ('ok'), slower ('violation') or the same ('tie')."""
  out = []
  by_group: dict = {}
  for r in results:
    by_group.setdefault(r["group"], []).append(r)
  for group, rs in sorted(by_group.items()):
    for i in range(len(rs)):
      for j in range(i + 1, len(rs)):
        a, b = sorted((rs[i], rs[j]), key=lambda r: r["measured_s"])
        if b["measured_s"] <= (1 + SAME) * a["measured_s"]:
          continue
        verdict = ("ok" if a["predicted_s"] < b["predicted_s"] else
                   "tie" if math.isclose(a["predicted_s"], b["predicted_s"], rel_tol=1e-9) else "violation")
        out.append({"group": group, "faster": a["id"], "slower": b["id"], "verdict": verdict,
                    "measured_ratio": b["measured_s"] / a["measured_s"],
                    "predicted_ratio": b["predicted_s"] / a["predicted_s"]})
  return out


def summary(results: list[dict], pairs: list[dict], wall_s: float) -> dict:
  errs = [abs(r["log2"]) for r in results]
  return {"rows": len(results), "sources": len({r["source"] for r in results}),
          "median_abs_log2": round(statistics.median(errs), 3) if errs else None,
          "worst_abs_log2": round(max(errs), 3) if errs else None,
          "median_ratio": round(statistics.median(r["predicted_s"] / r["measured_s"] for r in results), 3)
          if results else None,
          "median_ratio_by_source": {src: round(statistics.median(r["predicted_s"] / r["measured_s"] for r in results
                                                                   if r["source"] == src), 3)
                                     for src in sorted({r["source"] for r in results})},
          "median_abs_log2_eager_only": round(statistics.median(
              abs(r["log2"]) for r in results if not any("torch.compile" in n for n in r["notes"])), 3)
          if any(not any("torch.compile" in n for n in r["notes"]) for r in results) else None,
          "feasible": sum(r["feasible"] for r in results),
          "fraction_resolved": sum(r["recompute_fraction"] not in (None, 0.5) for r in results),
          "feasible_or_within_10pct": sum(r["near_feasible"] for r in results),
          "pairs": len(pairs), "ordering_violations": sum(p["verdict"] == "violation" for p in pairs),
          "ordering_ties": sum(p["verdict"] == "tie" for p in pairs),
          "targets": {"median_abs_log2": 0.4, "worst_abs_log2": 1.0}, "wall_s": round(wall_s, 1),
          "route": "analytic screen (passes.screen), GPU collectives, nothing compiled"}


def table(results: list[dict]) -> str:
  gib = lambda b: f"{b / 2**30:.1f}"
  head = (f"{'row':<48} {'gpus':>4} {'plan':<82} {'meas s':>7} {'pred s':>7} {'|log2|':>6} "
          f"{'comp s':>7} {'comm s':>7} {'hid s':>6} {'GiB':>6} {'budget':>6} feasible  notes")
  lines = [head, "-" * len(head)]
  for r in results:
    plan = r["plan"].replace("Plan(", "").replace(")", "").replace(", pp=1", "").replace(", bf16=True", "")
    lines.append(f"{r['id']:<48} {r['gpus']:>4} {plan:<82} {r['measured_s']:>7.3f} {r['predicted_s']:>7.3f} "
                 f"{abs(r['log2']):>6.2f} {r['compute_s']:>7.3f} {r['comm_s']:>7.3f} {r['hidden_s']:>6.2f} "
                 f"{gib(r['memory_bytes']):>6} {gib(r['budget_bytes']):>6} "
                 f"{'yes' if r['feasible'] else 'near' if r['near_feasible'] else 'NO':<9} {'; '.join(r['notes'])}")
  return "\n".join(lines)


def run(ids=None, path: str = DATA) -> tuple[list[dict], list[dict], dict]:
  """(per-row results, ordering pairs, summary) over the eligible rows (or those named)."""
  t0 = time.perf_counter()
  rows = load_rows(path)
  if ids:
    known = {r["id"] for r in rows}
    bad = [i for i in ids if i not in known]
    if bad:
      raise SystemExit(f"--rows: unknown or ineligible row ids {bad}; eligible: {sorted(known)}")
    rows = [r for r in rows if r["id"] in ids]
  planner = Planner()
  results = [planner.predict(r) for r in rows]
  pairs = ordering(results)
  return results, pairs, summary(results, pairs, time.perf_counter() - t0)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--rows", nargs="*", help="row ids (default: every benchmark-eligible row)")
  ap.add_argument("--json-rows", action="store_true", help="print each row's full figures as JSON too")
  ap.add_argument("--no-free-choice", dest="free_choice", action="store_false",
                  help="skip the free search per workload (benchmarks/published_choice.py, ~1-2 min)")
  args = ap.parse_args(argv)
  results, pairs, summ = run(args.rows)
  choices = None
  if args.free_choice and not args.rows:
    import published_choice
    choices, summ["free_choice"] = published_choice.run()
  print(table(results))
  if pairs:
    print("\nordering within each group (pairs more than 5% apart):")
    for p in pairs:
      print(f"  {p['verdict']:<9} {p['faster']} faster than {p['slower']}: measured x{p['measured_ratio']:.3f}, "
            f"predicted x{p['predicted_ratio']:.3f}  [{p['group']}]")
  if choices is not None:
    print("\nap-xla plan's free choice per workload (the screened search, nothing compiled) against the "
          "published runs in its space:")
    print(published_choice.table(choices))
  if args.json_rows:
    for r in results:
      print(json.dumps(r))
  print(json.dumps(summ))


if __name__ == "__main__":
  main()
