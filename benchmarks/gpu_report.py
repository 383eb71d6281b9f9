"""The GPU check's figures and its readable summary (pure Python: no jax, no torch).

Used by benchmarks/gpu_check.py on the step results: which plans to run, the plan-quality
figures (Spearman, regret, memory error, MFU, out-of-memory), the one-liner's ratio, the
summary text and the one-line headline.
"""
from __future__ import annotations

import statistics

RUNNABLE = ("chosen", "feasible")
TARGETS = {"spearman": 0.7, "regret": 1.10, "memory_err": 0.05}  # as benchmarks/plan_quality.py


def plan_repr(d: dict) -> str:
  s = f"Plan(mb={d['mb']}, recompute={d['recompute']!r}"
  if d.get("dp", 1) * d.get("tp", 1) * d.get("pp", 1) > 1:
    s += f", dp={d['dp']}, tp={d['tp']}, pp={d['pp']}, fsdp={d['fsdp']}"
  return s + (", bf16" if d.get("bf16") else "") + ")"


def _entry(c: dict, source: str) -> dict:
  return {"plan": c["plan"], "source": source, "verdict": c["verdict"], "est_s": c.get("est_time_s"),
          "predicted_bytes": c.get("memory_bytes"), "hlo_flops": (c.get("details") or {}).get("flops")}


def plans_to_run(found: dict) -> list[dict]:
  """The plans to run, in order: the chosen one, the other feasible ones by estimate, then the
  pruned ones that fit when searched alone, by estimate."""
  cands = found["result"]["candidates"]
  chosen = [_entry(c, "search") for c in cands if c["verdict"] == "chosen"]
  feasible = [_entry(c, "search") for c in cands if c["verdict"] == "feasible"]
  alone = [_entry(c, "pruned, searched alone") for c in found.get("extra", []) if c.get("verdict") in RUNNABLE]
  for e in alone:
    e["verdict"] = "feasible"
  by_est = lambda e: e["est_s"] if e["est_s"] is not None else float("inf")
  return chosen + sorted(feasible, key=by_est) + sorted(alone, key=by_est)


def spearman(x, y) -> float | None:
  """Spearman's rank correlation (average ranks for ties); None under 3 points or no spread."""
  if len(x) < 3:
    return None

  def ranks(v):
    order = sorted(range(len(v)), key=lambda i: v[i])
    r = [0.0] * len(v)
    i = 0
    while i < len(order):
      j = i
      while j + 1 < len(order) and v[order[j + 1]] == v[order[i]]:
        j += 1
      for k in range(i, j + 1):
        r[order[k]] = (i + j) / 2
      i = j + 1
    return r

  rx, ry = ranks(x), ranks(y)
  mx, my = statistics.fmean(rx), statistics.fmean(ry)
  sxy = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
  sx = sum((a - mx) ** 2 for a in rx) ** 0.5
  sy = sum((b - my) ** 2 for b in ry) ** 0.5
  return None if sx == 0 or sy == 0 else sxy / (sx * sy)


def plan_quality_figures(found: dict, runs: list[dict], calibration: dict | None) -> dict:
  """Predicted against measured, per plan and overall (see the module doc of gpu_check)."""
  result = found["result"]
  budget, capacity = result["budget_bytes"], result["capacity_bytes"]
  rows = []
  for r in runs:
    row = {k: r.get(k) for k in ("plan", "source", "verdict", "est_s", "predicted_bytes", "hlo_flops", "status")}
    times = r.get("times") or []
    if times and not r.get("error"):
      row["measured_s"] = statistics.median(times)
      row["iqr"] = _iqr(times) / row["measured_s"]
      row["measured_bytes"] = r.get("measured_bytes")
      row["child_predicted_bytes"] = r.get("predicted_bytes")
      row["compile_s"] = r.get("compile_s")
      row["cache"] = f"{r.get('cache_hits', '?')}/{r.get('cache_requests', '?')}"
      row["loss"] = r.get("loss")
      if row["measured_bytes"] and row["predicted_bytes"]:
        row["memory_err"] = (row["predicted_bytes"] - row["measured_bytes"]) / row["measured_bytes"]
    else:
      row["error"] = r.get("error") or "no step times"
      row["oom"] = bool(r.get("oom"))
    rows.append(row)
  ok = [r for r in rows if "measured_s" in r and r["est_s"] is not None]
  chosen = next((r for r in ok if r["verdict"] == "chosen"), None)
  best = min(ok, key=lambda r: r["measured_s"]) if ok else None
  searched = [r for r in ok if r["source"] == "search"]
  errs = [abs(r["memory_err"]) for r in rows if r.get("memory_err") is not None]
  out = {"model": found["model"], "params": found["params"], "batch": found["batch"],
         "seq": found["config"]["seq"], "budget_bytes": budget, "capacity_bytes": capacity,
         "profile": found.get("profile_source"), "search_s": result["timings"].get("total"),
         "chosen": plan_repr(result["plan"]), "measured": len(ok), "planned": len(runs),
         "spearman": spearman([r["est_s"] for r in ok], [r["measured_s"] for r in ok]),
         "spearman_search_feasible": spearman([r["est_s"] for r in searched], [r["measured_s"] for r in searched]),
         "regret": chosen["measured_s"] / best["measured_s"] if chosen and best else None,
         "best_measured": plan_repr(best["plan"]) if best else None,
         "memory_err_max": max(errs) if errs else None, "memory_err_median": statistics.median(errs) if errs else None,
         "targets": TARGETS}
  out["verdicts"] = {}
  for c in result["candidates"]:
    out["verdicts"][c["verdict"]] = out["verdicts"].get(c["verdict"], 0) + 1
  replicated = next((c for c in result["candidates"] if c["plan"]["mb"] == 1 and c["plan"]["recompute"] == "none"
                     and c["plan"].get("dp", 1) * c["plan"].get("tp", 1) * c["plan"].get("pp", 1) == 1), None)
  if replicated:
    out["replicated"] = {"verdict": replicated["verdict"], "predicted_bytes": replicated.get("memory_bytes"),
                         "fits": replicated["verdict"] in RUNNABLE}
  # 3. out of memory: a plan the search (or the search alone) called feasible that did not run.
  out["feasible_oom"] = [plan_repr(r["plan"]) for r in rows if r.get("oom")]
  out["measured_over_budget"] = [plan_repr(r["plan"]) for r in rows if (r.get("measured_bytes") or 0) > budget]
  if chosen:
    flops = found["model_flops"]
    cal = calibration or {}
    datasheet = (cal.get("builtin") or {}).get("peak_flops", {}).get("bf16")
    if datasheet is None and found.get("profile_source") != "calibrated":  # the search used the built-in one
      datasheet = found["profile"]["peak_flops"]["bf16"]
    peaks = {"datasheet": datasheet, "calibrated matmul": (cal.get("calibrated") or {}).get("peak_flops", {}).get("bf16")}
    out["step_s_chosen"] = chosen["measured_s"]
    out["tokens_per_s"] = found["batch"] * found["config"]["seq"] / chosen["measured_s"]
    out["model_flops"] = flops
    out["mfu"] = {k: flops / chosen["measured_s"] / v for k, v in peaks.items() if v}
    if chosen.get("hlo_flops"):
      out["hfu"] = {k: chosen["hlo_flops"] / chosen["measured_s"] / v for k, v in peaks.items() if v}
  out["rows"] = rows
  return out


def _iqr(xs) -> float:
  if len(xs) < 2:
    return 0.0
  q = statistics.quantiles(xs, n=4)
  return q[2] - q[0]


def oneliner_figures(ap: dict, torch_run: dict) -> dict:
  out = {}
  for name, r in (("ap", ap), ("torch", torch_run)):
    if r.get("status") == "ok":
      out[name] = {k: r.get(k) for k in ("tokens_per_s", "steps_per_s", "first_step_s", "build_s", "params",
                                         "batch", "seq", "plan", "search_s", "candidates", "feasible")}
  if "ap" in out and "torch" in out:
    out["tokens_per_s_ratio"] = out["ap"]["tokens_per_s"] / out["torch"]["tokens_per_s"]
    la, lt = ap["losses"][0], torch_run["losses"][0]
    out["first_loss"] = {"ap": la, "torch": lt, "rel_diff": abs(la - lt) / abs(lt) if lt else None}
  return out


def all_ok(doc: dict) -> bool:
  """Every step ran and finished (a plan left out for time is not a failure of the check)."""
  return bool(doc["steps"]) and all(s["status"] == "ok" for s in doc["steps"])


# -- the summary -------------------------------------------------------------------------

def _g(x, fmt="{:.3g}", none="-"):
  return none if x is None else fmt.format(x)


def _size(b) -> str:
  if b is None:
    return "-"
  return f"{b / 2**30:.2f} GiB" if b >= 2**30 else f"{b / 2**20:.2f} MiB"


def _count(n) -> str:
  return f"{n / 1e9:.3g}B" if n >= 1e9 else f"{n / 1e6:.3g}M"


def summary(doc: dict) -> tuple[str, dict]:
  """The readable summary and the headline figures (one JSON object)."""
  env = doc.get("env") or {}
  v = env.get("versions", {})
  device = env.get("device_kind", "?")
  lines = ["", "=" * 100,
           f"GPU check{' (DRY RUN: toy sizes on CPU, figures mean nothing)' if doc['dry_run'] else ''}: "
           f"{env.get('device_count', '?')} x {device} ({env.get('platform', '?')}), jax {v.get('jax', '?')}, "
           f"torch {v.get('torch', '?')}, torchax {v.get('torchax', '?')}, transformers {v.get('transformers', '?')}; "
           f"{doc['date']}; {doc.get('seconds', 0):.0f} s of {doc['budget_s']:.0f}",
           "steps: " + ", ".join(f"{s['step']} {s['status']} ({s['seconds']:.0f} s)" for s in doc["steps"])]
  head = {"benchmark": "gpu_check", "dry_run": doc["dry_run"], "device": device, "jax": v.get("jax"),
          "torch": v.get("torch"), "seconds": doc.get("seconds"), "all_ok": all_ok(doc)}

  cal = doc.get("calibration") or {}
  lines.append("\n1. calibration (passes/calibrate.py) against the built-in profile "
               f"'{(cal.get('builtin') or {}).get('name', '?')}':")
  if cal.get("status") == "ok":
    units = {"bf16_flops": (1e12, "TFLOP/s"), "f32_flops": (1e12, "TFLOP/s"), "memory_bandwidth": (1e9, "GB/s"),
             "memory_bytes": (2**30, "GiB"), "link_bandwidth": (1e9, "GB/s"), "link_latency": (1e-6, "us")}
    lines.append(f"   {'figure':18} {'built-in':>12} {'measured':>12} {'ratio':>7}")
    for k, c in cal["compare"].items():
      scale, unit = units[k]
      lines.append(f"   {k:18} {c['builtin'] / scale:12.4g} {c['measured'] / scale:12.4g} {c['ratio']:7.3f}  {unit}")
    lines.append("   (measured memory_bytes is the allocator's limit: jax takes 75% of a GPU's memory unless "
                 "XLA_PYTHON_CLIENT_MEM_FRACTION says otherwise; f32 matmuls run at jax's default precision)")
    head["calibration"] = {k: round(c["ratio"], 4) for k, c in cal["compare"].items()}
  else:
    lines.append(f"   {cal.get('status', 'not run')}: {cal.get('error', '')[:300]}")

  pq = doc.get("plan_quality") or {}
  f = pq.get("figures")
  lines.append("\n2. plan quality on the device:")
  if f:
    lines.append(f"   {f['model']}: {_count(f['params'])} parameters, batch {f['batch']} x {f['seq']} tokens, bf16 "
                 f"mixed precision; budget {_size(f['budget_bytes'])} of {_size(f['capacity_bytes'])}; "
                 f"{f['profile']} profile")
    rep = f.get("replicated") or {}
    lines.append(f"   search: {f['verdicts']} in {_g(f['search_s'], '{:.1f}')} s; chose {f['chosen']}; replicated "
                 f"step (mb=1, no recomputation): {rep.get('verdict', '?')}, {_size(rep.get('predicted_bytes'))}")
    unit, scale = ("GiB", 2**30) if f["capacity_bytes"] >= 2**30 else ("MiB", 2**20)
    mem = lambda b: "-" if b is None else f"{b / scale:.2f}"
    lines.append(f"   {'plan':40} {'source':22} {'est ms':>9} {'meas ms':>9} {'IQR':>5} {'pred ' + unit:>8} "
                 f"{'meas ' + unit:>8} {'mem err':>7} {'compile':>8}")
    for r in sorted(f["rows"], key=lambda r: r.get("measured_s", float("inf"))):
      label = plan_repr(r["plan"]) + (" *" if r["verdict"] == "chosen" else "")
      if "measured_s" not in r:
        lines.append(f"   {label:40} {r['source']:22} {_g(r['est_s'] and r['est_s'] * 1e3, '{:9.2f}'):>9} "
                     f"{'oom' if r.get('oom') else r.get('status', 'failed')}: {r.get('error', '')[:80]}")
        continue
      err = _g(r.get("memory_err"), "{:+.1%}")
      lines.append(f"   {label:40} {r['source']:22} {r['est_s'] * 1e3:9.2f} {r['measured_s'] * 1e3:9.2f} "
                   f"{r['iqr']:5.2f} {mem(r['predicted_bytes']):>8} {mem(r.get('measured_bytes')):>8} {err:>7} "
                   f"{_g(r.get('compile_s'), '{:.1f}'):>6} s  cache {r['cache']}")
    lines.append("   (* the search's choice; est: the cost model; meas: median step; mem err: (predicted - measured) "
                 "/ measured peak (a GPU's peak_bytes_in_use); compile: the run's compiles, cache: hits/requests "
                 "of the persistent compilation cache)")
    lines.append(f"   Spearman(est, measured) {_g(f['spearman'])} over {f['measured']} plans (target >= 0.7; over "
                 f"the search's feasible ones alone: {_g(f['spearman_search_feasible'])}); regret {_g(f['regret'], '{:.3f}')} "
                 f"(best measured: {f['best_measured']}; target <= 1.10)")
    lines.append(f"   memory error: max {_g(f['memory_err_max'], '{:.1%}')}, median {_g(f['memory_err_median'], '{:.1%}')} "
                 "(target 5%)")
    if "mfu" in f:
      lines.append(f"   chosen plan: {f['step_s_chosen'] * 1e3:.1f} ms/step, {f['tokens_per_s']:.4g} tokens/s; MFU "
                   + ", ".join(f"{v:.1%} of the {k} peak" for k, v in f["mfu"].items())
                   + ("; with recomputation (HLO FLOPs): " + ", ".join(f"{v:.1%}" for v in f["hfu"].values())
                      if f.get("hfu") else ""))
    head["plan_quality"] = {k: f.get(k) for k in ("model", "params", "batch", "seq", "chosen", "best_measured",
                                                  "measured", "planned", "spearman", "regret", "memory_err_max",
                                                  "memory_err_median", "mfu", "step_s_chosen", "search_s")}
    head["plan_quality"]["replicated_fits"] = rep.get("fits")
  else:
    s = pq.get("search") or {}
    lines.append(f"   {s.get('status', 'not run')}: {s.get('error', '')[:300]}")

  lines.append("\n3. out of memory:")
  if f:
    lines.append(f"   plans called feasible that ran out of memory: {', '.join(f['feasible_oom']) or 'none'}; "
                 f"measured above the budget: {', '.join(f['measured_over_budget']) or 'none'}; "
                 f"not run (time): {sum(r.get('status') == 'not run' for r in f['rows'])}")
    head["oom"] = {"feasible_oom": f["feasible_oom"], "measured_over_budget": f["measured_over_budget"]}
  else:
    lines.append("   not measured (plan quality did not run)")

  one = doc.get("oneliner") or {}
  o = one.get("figures") or {}
  lines.append("\n4. the torch one-liner (`ap-xla run`) against plain torch on the same device:")
  for name, label in (("ap", "ap-xla run"), ("torch", "plain torch, bf16 autocast")):
    r = o.get(name)
    if r:
      extra = (f"; search {_g(r['search_s'], '{:.1f}')} s, plan {r['plan']}" if name == "ap" else "")
      lines.append(f"   {label:28} {r['tokens_per_s']:10.4g} tokens/s, {r['steps_per_s']:7.3g} steps/s, first step "
                   f"{r['first_step_s']:.1f} s{extra}")
    else:
      run = one.get(name) or {}
      lines.append(f"   {label:28} {run.get('status', 'not run')}: {run.get('error', '')[:300]}")
  if "tokens_per_s_ratio" in o:
    lines.append(f"   ap-xla / torch tokens/s: {o['tokens_per_s_ratio']:.3f}; first-step loss {o['first_loss']['ap']:.4f} "
                 f"vs {o['first_loss']['torch']:.4f}")
    head["oneliner"] = {"ratio": o["tokens_per_s_ratio"], "ap_tokens_per_s": o["ap"]["tokens_per_s"],
                        "torch_tokens_per_s": o["torch"]["tokens_per_s"], "search_s": o["ap"]["search_s"],
                        "first_step_s": o["ap"]["first_step_s"]}
  lines.append("=" * 100)
  return "\n".join(lines), head
