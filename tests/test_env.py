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


_PROFILE = {"name": "mine", "memory_bytes": 80 * 10**9, "peak_flops": {"f32": 6.7e13, "bf16": 9.9e14},
            "memory_bandwidth": 3.35e12, "link_bandwidth": 4.5e11, "link_latency": 5e-6, "devices_per_node": 8,
            "inter_node_bandwidth": 5e10}


@pytest.mark.parametrize("text, match", [
    (None, "Cannot read hardware profile file .*No such file"),
    ("{not json", "is not valid JSON"),
    (lambda: {k: v for k, v in _PROFILE.items() if k != "peak_flops"}, "missing field 'peak_flops'"),
    (lambda: dict(_PROFILE, devices_per_node=-8), "field 'devices_per_node' must be a positive int, got -8"),
    ("[1, 2, 3]", "must hold a JSON object, got list"),
])
def test_hardware_profile_problems_name_the_variable(text, match, tmp_path):
  import json
  path = tmp_path / "profile.json"
  if text is not None:
    path.write_text(text if isinstance(text, str) else json.dumps(text()))
  for var in ("AP_XLA_HARDWARE", "MOREH_ADVANCED_PARALLELIZATION_HARDWARE"):
    with pytest.raises(ValueError, match=f"^{var}='{path}' is not valid: .*{match}"):
      env.read_settings({var: str(path)})


def test_unknown_variables_are_warned_once_with_the_closest_name(caplog):
  import logging
  environ = {"AP_XLA_MEMORY_RATIO": "50", "MOREH_ADVANCED_PARALLELIZATION_DETAILD_LOG": "1",
             "AP_XLA_ZZZ_QQQ": "1", "AP_XLA_DETAILED_LOG": "1", "OTHER_MEMORY_RATIO": "1"}
  env._warned.difference_update(environ)
  with caplog.at_level(logging.WARNING, logger="ap_xla"):
    for _ in range(3):
      assert env.read_settings(environ).detailed_log == 1
  warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
  assert len(warnings) == 3, warnings  # once each, however often the settings are read
  assert ("AP_XLA_MEMORY_RATIO is not a variable ap-xla reads, so it has no effect; did you mean "
          "AP_XLA_MEMORY_USAGE_CORRECTION_RATIO?") in warnings
  assert any("MOREH_ADVANCED_PARALLELIZATION_DETAILD_LOG" in w and
             "did you mean MOREH_ADVANCED_PARALLELIZATION_DETAILED_LOG?" in w for w in warnings)
  assert any(w.startswith("AP_XLA_ZZZ_QQQ is not") and "known: AP_XLA_CACHE_DIR" in w for w in warnings)


def test_dump_path_is_checked_before_the_search(tmp_path):
  a_file = tmp_path / "file"
  a_file.write_text("x")
  cases = [(str(tmp_path), "names the folder"),
           (str(a_file / "log.dump"), f"is under '{a_file}', which is a file, not a folder")]
  for path, match in cases:
    with pytest.raises(ValueError, match=f"AP_XLA_DUMP_PATH='{path}'.*{match}"):
      env.read_settings({"AP_XLA_DETAILED_LOG": "2", "AP_XLA_DUMP_PATH": path})
    with pytest.raises(ValueError, match=f"SearchSettings.dump_path='{path}'.*{match}"):
      env.read_settings({}, detailed_log=2, dump_path=path)
    assert env.read_settings({"AP_XLA_DUMP_PATH": path}).dump_path == path  # not written below level 2
  ok = env.read_settings({"AP_XLA_DETAILED_LOG": "2", "AP_XLA_DUMP_PATH": str(tmp_path / "new" / "log.dump")})
  assert ok.dump_path.endswith("log.dump")  # a folder that does not exist yet is created when written
