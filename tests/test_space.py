"""The candidate space: enumeration, pins and option validation."""
import dataclasses
import pytest

from passes.plan import Plan
from passes.space import SearchOptions, check_pinned_tp, enumerate_plans, no_candidate_message


def test_defaults_enumerate_every_factorization():
  plans, skipped = enumerate_plans(8, 16, 4, SearchOptions(mixed_precision=False))
  meshes = {(p.pp, p.dp, p.tp) for p in plans}
  assert meshes == {(1, 8, 1), (1, 4, 2), (1, 2, 4), (1, 1, 8), (2, 4, 1), (2, 2, 2), (2, 1, 4),
                    (4, 2, 1), (4, 1, 2)}  # pp=8 exceeds 4 blocks
  assert all(p.num_devices == 8 for p in plans)
  assert {p.recompute for p in plans} == {"none", "selective_op", "full"}
  assert not any(p.fsdp and p.dp == 1 for p in plans)
  assert not any(p.bf16 or p.low_prec for p in plans)
  assert len(set(plans)) == len(plans)


def test_mixed_precision_adds_low_precision_gather_only_with_fsdp():
  plans, _ = enumerate_plans(4, 8, 2, SearchOptions(pipeline_parallel=False))
  assert all(p.bf16 for p in plans)
  assert any(p.low_prec for p in plans)
  assert all(p.fsdp for p in plans if p.low_prec)


def test_pins_fix_their_dimension():
  o = SearchOptions(num_stages=2, num_micro_batches=4, activation_recomputation=True,
                    distribute_parameter=True, mixed_precision=False)
  plans, _ = enumerate_plans(8, 16, 4, o)
  assert plans and all(p.pp == 2 and p.mb == 4 and p.recompute == "full" for p in plans)
  assert all(p.fsdp for p in plans if p.dp > 1)


def test_no_pipeline_without_blocks_or_when_disabled():
  plans, _ = enumerate_plans(8, 16, 0, SearchOptions())
  assert all(p.pp == 1 and p.recompute == "none" for p in plans)
  plans, _ = enumerate_plans(8, 16, 4, SearchOptions(pipeline_parallel=False))
  assert all(p.pp == 1 for p in plans)


def test_batch_divisibility_is_a_recorded_reason():
  plans, skipped = enumerate_plans(8, 4, 0, SearchOptions(mixed_precision=False))
  assert all(p.dp <= 4 for p in plans)
  assert any("does not divide by data parallel 8" in s.reason for s in skipped)


def test_tp_and_pipeline_checks_are_consulted():
  plans, skipped = enumerate_plans(8, 16, 4, SearchOptions(), tp_ok=lambda tp: "no TP here",
                                   pipeline_ok=lambda pp, mb, dp: "odd" if mb == 8 else None)
  assert all(p.tp == 1 for p in plans)
  assert all(p.mb != 8 for p in plans if p.pp > 1)
  assert any(s.reason == "no TP here" for s in skipped) and any(s.reason == "odd" for s in skipped)


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_stages=3), "num_stages=3 does not divide the device count 8"),
    (dict(num_stages=8), "exceeds the number of blocks 4"),
    (dict(num_micro_batches=3), "num_micro_batches=3 does not divide the global batch 16"),
    (dict(tensor_parallel=3), "tensor_parallel=3 does not divide"),
    (dict(num_stages=4), r"num_stages=4 does not divide the 6 blocks .*allowed: \[1, 2\]"),
])
def test_unsatisfiable_pins_are_errors(kwargs, match):
  blocks = 6 if kwargs.get("num_stages") == 4 else 4
  with pytest.raises(ValueError, match=match):
    enumerate_plans(8, 16, blocks, SearchOptions(**kwargs))


def test_pinned_tensor_parallel_the_program_cannot_use_is_an_error():
  tp_ok = lambda tp: None if tp <= 2 else f"no tensor-parallel group of the program divides by tp={tp}"
  with pytest.raises(ValueError, match=r"tensor_parallel=4 cannot be used by this program: no tensor-"
                                       r"parallel group .* tp=4; allowed: \[1, 2\] or 'auto'"):
    check_pinned_tp(8, SearchOptions(tensor_parallel=4), tp_ok)
  check_pinned_tp(8, SearchOptions(tensor_parallel=2), tp_ok)
  check_pinned_tp(8, SearchOptions(), tp_ok)
  # enumerate_plans itself leaves such a slice empty with the reason (the CLI slices by tp)
  plans, skipped = enumerate_plans(8, 16, 4, SearchOptions(tensor_parallel=4), tp_ok=tp_ok)
  assert not plans and skipped and all("tp=4" in s.reason for s in skipped)


def test_auto_micro_batch_counts_the_batch_cannot_split_into_are_recorded():
  plans, skipped = enumerate_plans(8, 16, 0, SearchOptions(mixed_precision=False, tensor_parallel=1))
  assert {p.mb for p in plans} == {1, 2}  # dp=8: 16 examples split into at most 2 micro-batches
  (why,) = [s for s in skipped if s.plan.dp == 8]
  assert why.plan.mb == 4 and why.reason == ("batch 16 does not divide by dp*mb for dp=8 and auto "
                                             "micro-batch counts [4, 8, 16]")


def test_no_candidate_message_lists_each_reason_once_with_a_hint():
  plans, skipped = enumerate_plans(4, 3, 0, SearchOptions(mixed_precision=False, tensor_parallel=1,
                                                          num_micro_batches=1))
  assert plans == [] and len(skipped) == 1
  msg = no_candidate_message(4, 3, skipped + skipped, {"tensor_parallel": 1})
  assert msg.startswith("no parallelization candidate is left to compile for 4 devices and a global batch of 3")
  assert msg.count("batch 3 does not divide by data parallel 4") == 1 and "and 1 more)" in msg
  assert msg.endswith("Use a global batch that a data-parallel size in [4] divides (with the micro-batches), "
                      "or another device count; or un-pin tensor_parallel=1 (set to 'auto').")


def test_stages_without_blocks_is_an_error():
  with pytest.raises(ValueError, match="needs a model with a block stack"):
    enumerate_plans(8, 16, 0, SearchOptions(num_stages=2))
  with pytest.raises(ValueError, match="recomputes per block"):
    enumerate_plans(8, 16, 0, SearchOptions(activation_recomputation=True))


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(pipeline_parallel="yes"), TypeError, "pipeline_parallel must be True or False"),
    (dict(mixed_precision=1), TypeError, "mixed_precision must be True or False"),
    (dict(num_stages=0), ValueError, "num_stages must be a positive int or 'auto', got 0"),
    (dict(num_stages=2.0), ValueError, "num_stages must be a positive int"),
    (dict(num_micro_batches="many"), ValueError, "num_micro_batches must be"),
    (dict(activation_recomputation="sometimes"), ValueError, "activation_recomputation must be"),
    (dict(distribute_parameter=None), ValueError, "distribute_parameter must be True, False or 'auto'"),
    (dict(pipeline_parallel=False, num_stages=2), ValueError, "needs pipeline_parallel=True"),
])
def test_option_validation(kwargs, exc, match):
  with pytest.raises(exc, match=match):
    SearchOptions(**kwargs)


def test_plan_repr_reads_like_the_log():
  assert repr(Plan(dp=2, tp=2, pp=2, mb=4, fsdp=True)) == (
      "Plan(dp=2, tp=2, pp=2, mb=4, recompute='none', fsdp=True, schedule='gpipe')")
  assert Plan.from_dict(Plan(dp=4, bf16=True).to_dict()) == Plan(dp=4, bf16=True)
  with pytest.raises(ValueError, match="Plan.mb must be a positive int"):
    Plan(mb=0)
  with pytest.raises(ValueError, match=r"Plan.schedule must be one of \('gpipe', '1f1b'\), got 'zb'"):
    Plan(pp=2, schedule="zb")
  assert repr(Plan(dp=2, pp=4, mb=8, schedule="1f1b")).endswith("schedule='1f1b')")
  with pytest.raises(TypeError, match="Plan.fsdp must be True or False, got 1"):
    Plan(fsdp=1)


def test_fewer_micro_batches_than_stages_is_left_out_unless_pinned():
  plans, skipped = enumerate_plans(8, 32, 8, SearchOptions(mixed_precision=False))
  assert all(p.mb >= p.pp for p in plans if p.pp > 1)
  assert any("micro-batches < 4 stages" in s.reason for s in skipped)
  plans, _ = enumerate_plans(8, 32, 8, SearchOptions(num_micro_batches=2, mixed_precision=False))
  assert any(p.pp == 4 and p.mb == 2 for p in plans)


def test_auto_micro_batches_go_beyond_16_where_the_batch_allows():
  plans, _ = enumerate_plans(8, 256, 0, SearchOptions(mixed_precision=False, tensor_parallel=1))
  assert {p.mb for p in plans if p.dp == 8} == {1, 2, 4, 8, 16, 32}  # 256 / 8 = 32 examples per shard
  assert all(256 % (p.dp * p.mb) == 0 for p in plans)
  plans, _ = enumerate_plans(2, 256, 0, SearchOptions(mixed_precision=False, tensor_parallel=1))
  assert {p.mb for p in plans} == {1, 2, 4, 8, 16, 32, 64, 128}


def test_1f1b_is_offered_where_it_keeps_fewer_micro_batches_than_gpipe():
  plans, _ = enumerate_plans(8, 64, 8, SearchOptions(mixed_precision=False, tensor_parallel=1))
  one = [p for p in plans if p.schedule == "1f1b"]
  assert one and all(p.pp > 1 and p.mb > p.pp + 1 for p in one)
  assert {p.mb for p in one if p.pp == 2} == {4, 8, 16}  # dp=4: 16 examples per data shard
  assert all(dataclasses.replace(p, schedule="gpipe") in plans for p in one)  # beside GPipe, not instead


def test_recomputation_as_a_set_of_policies():
  """A tuple of policies is searched among (what the exhaustive tests use to stay small)."""
  o = SearchOptions(activation_recomputation=["none", "selective_op"])
  assert o.activation_recomputation == ("none", "selective_op") and o.recompute_choices() == ("none", "selective_op")
  assert {p.recompute for p in enumerate_plans(8, 16, 4, o)[0]} == {"none", "selective_op"}
  for bad in ((), ("none", "none"), ("none", "sometimes"), ("none", True)):
    with pytest.raises(ValueError, match="distinct policies"):
      SearchOptions(activation_recomputation=bad)
