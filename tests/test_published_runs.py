"""benchmarks/published_runs.py on one published row (the full table runs in scripts/bench.sh)."""
import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import published_runs as pr  # noqa: E402


def test_the_table_has_the_issue_s_breadth():
  rows = pr.load_rows()
  assert len(rows) >= 15 and len({r["source"]["independent_group"] for r in rows}) >= 3
  assert {r["hardware"]["num_gpus"] for r in rows} >= {8, 128}
  for r in rows:  # every eligible row pins to a plan of its own device count and a preset of its shapes
    preset, plan, batch, seq, _ = pr.pin(r)
    assert plan.num_devices == r["hardware"]["num_gpus"] and batch % plan.dp == 0 and r["source"]["quote"]


def test_hsdp_and_selective_recomputation_are_pinned_with_a_note():
  row = next(r for r in pr.load_rows() if r["id"] == "maxtext-h100x16-llama2-7b-fsdp8-dp2")
  preset, plan, batch, seq, notes = pr.pin(row)
  assert (preset, batch, seq) == ("llama2-7b", 64, 4096)
  assert (plan.dp, plan.tp, plan.fsdp, plan.recompute, plan.low_prec) == (16, 1, True, "dots", False)
  assert (plan.hsdp, plan.fsdp_group, plan.replicas) == (True, 8, 2)  # pinned as HSDP 8x2
  assert any("HSDP" in n for n in notes) and any("minimal_flash" in n for n in notes)


def test_selective_rows_are_planned_with_the_policy_they_state():
  want = {"tt-a100x64-llama2-13b-sac-op": "selective_op", "tt-a100x64-llama2-13b-sac-layer": "selective_layer",
          "tt-h100x64-llama3-8b-fsdp8-tp8-compile": "selective_op",
          "fms-a100x128-llama-13b-fsdp-selectiveac-eager": "selective_layer",
          "jaxtoolbox-h100x8-llama2-7b-fsdp8": "dots", "tt-a100x64-llama2-13b-noac": "none"}
  rows = {r["id"]: r for r in pr.load_rows()}
  assert {i: pr.pin(rows[i])[1].recompute for i in want} == want
  odd = dict(rows["tt-a100x64-llama2-13b-sac-op"], id="x")
  odd["layout"] = dict(odd["layout"], recompute_detail="something else")
  with pytest.raises(ValueError, match="SELECTIVE"):
    pr.pin(odd)


def test_one_row_end_to_end(capsys):
  pr.main(["--rows", "jaxtoolbox-h100x8-llama2-7b-fsdp8"])  # --rows: no free search
  out = capsys.readouterr().out.strip().splitlines()
  summary = json.loads(out[-1])
  assert summary["rows"] == 1 and summary["route"].startswith("analytic screen")
  # 7B, FSDP over 8 H100, 2 x 4096 tokens per GPU, measured 0.721 s: within 2x, and it fits
  assert summary["worst_abs_log2"] < 1.0 and summary["feasible"] == 1
  assert "jaxtoolbox-h100x8-llama2-7b-fsdp8" in out[2]


def test_ordering_counts_violations_ties_and_skips_close_pairs():
  r = lambda i, m, p, g="g": {"id": i, "group": g, "measured_s": m, "predicted_s": p}
  pairs = pr.ordering([r("a", 1.0, 2.0), r("b", 1.2, 1.5), r("c", 1.02, 1.0), r("d", 2.0, 2.0, "h"),
                       r("e", 3.0, 2.0, "h")])
  got = {(p["faster"], p["slower"]): p["verdict"] for p in pairs}
  assert got == {("a", "b"): "violation", ("c", "b"): "ok", ("d", "e"): "tie"}
  assert pr.ordering([r("x", 1.0, 2.0), r("y", 2.0, 1.0)])[0]["verdict"] == "violation"
  with pytest.raises(SystemExit, match="unknown or ineligible"):
    pr.run(["no-such-row"])


def test_free_choice_is_judged_against_the_published_runs_in_its_space(monkeypatch):
  import published_choice as pc
  rows = [r for r in pr.load_rows() if r["group"].startswith("Llama-3.1-8B") and r["hardware"]["num_gpus"] == 8]
  (res,), summary = pc.run(rows)
  # torchtitan's two 8-GPU rows (eager, compiled) pin one plan of the space: judged only if chosen
  pinned = pr.pin(rows[0])[1]
  assert res["candidates"] > 100 and res["choice"] is not None and res["published_in_space"]
  assert res["verdict"] == ("ok" if res["choice"] == repr(pinned) else "not covered")
  assert summary["workloads"] == 1 and summary["judged"] + summary["not_covered"] == 1
  # a choice that a published run shows > 10% slower than the best published plan in the space
  rows = [r for r in pr.load_rows() if r["id"].startswith("tt-a100x64-llama2-13b-")]
  plans = {r["id"]: pr.pin(r)[1] for r in rows}
  planner = pr.Planner()
  for chosen, verdict in (("tt-a100x64-llama2-13b-sac-op", "slower"), ("tt-a100x64-llama2-13b-noac", "ok")):
    monkeypatch.setattr(pc, "free_choice", lambda planner, row: (plans[chosen], None, list(plans.values())))
    got = pc.judge(planner, rows)
    assert (got["verdict"], got["best_published"]) == (verdict, "tt-a100x64-llama2-13b-noac"), got


def test_an_unstated_fraction_of_recomputed_blocks_is_the_least_that_fits():
  """fms-fsdp's compile table checkpoints a fraction p of the blocks, p not stated: p = 1/2 where
  that fits, else the least p in [1/2, 1] that fits, the figures on the line through p=1/2 and 1."""
  sel = {"memory_bytes": 100.0, "total_s": 1.0}
  full = {"memory_bytes": 40.0, "total_s": 1.4}
  assert pr.resolve_fraction(sel, full, 120.0) == (0.5, sel)
  p, fig = pr.resolve_fraction(sel, full, 70.0)  # 40 + 2 (1 - p) 60 = 70
  assert p == pytest.approx(0.75) and fig["memory_bytes"] == pytest.approx(70.0)
  assert fig["total_s"] == pytest.approx(1.2)
  p, fig = pr.resolve_fraction(sel, full, 30.0)  # not even 'full' fits: p = 1, over the budget
  assert p == 1.0 and fig["memory_bytes"] == pytest.approx(40.0)
  rows = {r["id"]: r for r in pr.load_rows()}
  assert pr.unstated_fraction(rows["fms-a100x128-llama-70b-fsdp-selectiveac-compile"])
  assert not pr.unstated_fraction(rows["fms-a100x128-llama-13b-fsdp-selectiveac-eager"])  # every x-th block


def test_pytorch_flash_attention_on_hopper_is_flashattention_2():
  rows = {r["id"]: r for r in pr.load_rows()}
  fms, maxtext = rows["fms-h100x96-llama-7b-hsdp-noac-eager"], rows["maxtext-h100x8-llama2-7b-fsdp8-dp1"]
  assert (pr.attention_kernel(fms), pr.attention_kernel(maxtext)) == ("fa2", "cudnn")
  assert pr.hardware_for(fms).attention_efficiency == pr.FA2_HOPPER_EFFICIENCY
  assert pr.hardware_for(maxtext).attention_efficiency > pr.FA2_HOPPER_EFFICIENCY
  a100 = rows["fms-a100x128-llama-7b-hsdp-noac-eager"]  # A100's profile is FlashAttention-2's already
  from passes.hardware import get_profile
  assert pr.hardware_for(a100).attention_efficiency == get_profile("a100").attention_efficiency


def test_pytorch_eager_rows_are_costed_with_eager_kernels():
  """A PyTorch run without torch.compile runs each elementwise op as its own kernel; torch.compile
  and the JAX runs fuse (costed as XLA fuses). Same layout, eager predicted slower."""
  rows = {r["id"]: r for r in pr.load_rows()}
  eager, compiled = rows["fms-h100x96-llama-7b-hsdp-noac-eager"], rows["fms-h100x96-llama-7b-hsdp-noac-compile"]
  assert [pr.row_fusion(r) for r in (eager, compiled, rows["maxtext-h100x8-llama2-7b-fsdp8-dp1"])] == [
      "eager", "xla", "xla"]
  planner = pr.Planner()
  e, c = planner.predict(eager), planner.predict(compiled)
  assert e["predicted_s"] > 1.1 * c["predicted_s"] and e["memory_bound_s"] > 2 * c["memory_bound_s"], (e, c)
