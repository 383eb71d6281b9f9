"""Environment variables and the one-liner's options reject bad values clearly."""
import pytest

import ap_xla
from ap_xla import env
from passes.hardware import get_profile
from passes.search import SearchSettings


def test_defaults_and_both_prefixes():
  s = env.read_settings({})
  assert (s.max_threads, s.detailed_log, s.memory_ratio) == (16, 0, 80.0)
  s = env.read_settings({"MOREH_ADVANCED_PARALLELIZATION_MAX_PARALLEL_COMPILE_THREADS": "4",
                         "AP_XLA_DETAILED_LOG": "2", "AP_XLA_MEMORY_USAGE_CORRECTION_RATIO": "65.5",
                         "AP_XLA_DEVICE_MEMORY": "256MiB", "MOREH_ADVANCED_PARALLELIZATION_HARDWARE": "h100"})
  assert (s.max_threads, s.detailed_log, s.memory_ratio, s.capacity_bytes) == (4, 2, 65.5, 256 * 2**20)
  assert s.hardware.name.lower().startswith("h100")
  assert env.measure_top_k({"MOREH_ADVANCED_PARALLELIZATION_MEASURE_TOP_K": "3"}) == 3


@pytest.mark.parametrize("var, value, match", [
    ("AP_XLA_MAX_PARALLEL_COMPILE_THREADS", "0", "expected an integer 1..1024"),
    ("AP_XLA_MAX_PARALLEL_COMPILE_THREADS", "four", "expected an integer"),
    ("AP_XLA_DETAILED_LOG", "3", "AP_XLA_DETAILED_LOG='3' is not valid: expected an integer 0..2"),
    ("MOREH_ADVANCED_PARALLELIZATION_DETAILED_LOG", "-1", "MOREH_ADVANCED_PARALLELIZATION_DETAILED_LOG"),
    ("AP_XLA_MEMORY_USAGE_CORRECTION_RATIO", "120", r"expected a number in \(0, 100\]"),
    ("AP_XLA_MEMORY_USAGE_CORRECTION_RATIO", "0", r"expected a number in \(0, 100\]"),
    ("AP_XLA_DEVICE_MEMORY", "lots", "AP_XLA_DEVICE_MEMORY='lots' is not valid"),
    ("AP_XLA_HARDWARE", "tpu9000", "AP_XLA_HARDWARE='tpu9000' is not valid"),
    ("AP_XLA_COMPILE_TIMEOUT", "-5", "AP_XLA_COMPILE_TIMEOUT"),
    ("AP_XLA_MEASURE_TOP_K", "-1", "AP_XLA_MEASURE_TOP_K"),
])
def test_bad_values_name_the_variable(var, value, match):
  with pytest.raises(ValueError, match=match):
    env.read_settings({var: value})
  if var.endswith("MEASURE_TOP_K"):  # also readable on its own
    with pytest.raises(ValueError, match=match):
      env.measure_top_k({var: value})


def test_disagreeing_prefixes_are_an_error():
  with pytest.raises(ValueError, match="disagree; set only one"):
    env.read_settings({"AP_XLA_DETAILED_LOG": "1", "MOREH_ADVANCED_PARALLELIZATION_DETAILED_LOG": "2"})


def test_enable_advanced_parallelization_signature_and_validation():
  import inspect
  sig = inspect.signature(ap_xla.enable_advanced_parallelization)
  assert [(p.name, p.default) for p in sig.parameters.values()] == [
      ("pipeline_parallel", True), ("num_stages", "auto"), ("num_micro_batches", "auto"),
      ("activation_recomputation", "auto"), ("distribute_parameter", "auto"), ("mixed_precision", True)]
  try:
    opts = ap_xla.enable_advanced_parallelization(num_stages=2, mixed_precision=False)
    assert opts.num_stages == 2 and not opts.mixed_precision
    with pytest.raises(ValueError, match="num_micro_batches must be a positive int or 'auto', got -2"):
      ap_xla.enable_advanced_parallelization(num_micro_batches=-2)
    with pytest.raises(TypeError, match="pipeline_parallel must be True or False, got 'no'"):
      ap_xla.enable_advanced_parallelization(pipeline_parallel="no")
  finally:
    ap_xla.disable_advanced_parallelization()


BAD_SETTINGS = [
    (dict(memory_ratio=0), ValueError, r"SearchSettings.memory_ratio=0 is not valid: expected a number in \(0, 100\]"),
    (dict(memory_ratio=150.0), ValueError, r"memory_ratio=150.0 .* \(0, 100\]"),
    (dict(memory_ratio=True), ValueError, "memory_ratio=True"),
    (dict(max_threads=0), ValueError, "max_threads=0 is not valid: expected an integer >= 1"),
    (dict(max_threads=2.5), ValueError, "max_threads=2.5"),
    (dict(detailed_log=3), ValueError, r"detailed_log=3 is not valid: expected 0 \(summary\)"),
    (dict(capacity_bytes=-1), ValueError, "capacity_bytes=-1 is not valid: expected a positive int"),
    (dict(capacity_bytes="256MiB"), ValueError, "capacity_bytes='256MiB' .*parse_bytes"),
    (dict(compile_timeout_s=0), ValueError, "compile_timeout_s=0 is not valid: expected a positive number"),
    (dict(measure_top_k=-1), ValueError, "measure_top_k=-1 is not valid: expected an integer >= 0"),
    (dict(progress="yes"), ValueError, "progress='yes'"),
    (dict(dump_path=""), ValueError, "dump_path=''"),
    (dict(hardware="tpu9000"), ValueError, r"hardware='tpu9000' is not valid: .*'h100'"),
    (dict(hardware=42), TypeError, "hardware must be None .* got 42"),
]


@pytest.mark.parametrize("kwargs, exc, match", BAD_SETTINGS, ids=[next(iter(k)) + str(i) for i, (k, _, _)
                                                                  in enumerate(BAD_SETTINGS)])
def test_search_settings_reject_bad_values(kwargs, exc, match):
  with pytest.raises(exc, match=match):
    SearchSettings(**kwargs)


def test_search_settings_accept_the_documented_ranges():
  s = SearchSettings(memory_ratio=100, max_threads=1, detailed_log=2, capacity_bytes=1, hardware="H100",
                     compile_timeout_s=0.5, progress=False, measure_top_k=0)
  assert s.memory_ratio == 100 and s.hardware == "H100"
  assert SearchSettings(hardware=get_profile("cpu")).hardware.name == "cpu"


@pytest.mark.parametrize("kwargs, match", [(dict(memory_ratio=0), "memory_ratio=0"),
                                           (dict(max_threads=0), "max_threads=0"),
                                           (dict(detailed_log=5), "detailed_log=5"),
                                           (dict(capacity_bytes=0), "capacity_bytes=0")])
def test_search_keyword_settings_are_validated_before_searching(kwargs, match):
  import jax
  import optax
  from passes.program import Program
  program = Program(params={"w": jax.ShapeDtypeStruct((4, 4), "float32")}, optimizer=optax.sgd(0.1),
                    batch={"x": jax.ShapeDtypeStruct((8, 4), "float32")},
                    loss_fn=lambda p, b: (b["x"] @ p["w"]).mean())
  with pytest.raises(ValueError, match=match):
    ap_xla.search(program, **kwargs)
