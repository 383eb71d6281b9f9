"""Calibration: a quick run on the simulated devices gives a valid profile that is saved and reused."""
import dataclasses
import json
import logging

import jax
import numpy as np
import pytest

from passes import calibrate as cal_lib
from passes import hardware
from passes.calibrate import LinkFit, Sample, fit_link


@pytest.fixture(scope="module")
def quick():
  return cal_lib.run_calibration(jax.devices(), quick=True)


def test_quick_calibration_gives_a_valid_profile(quick, tmp_path):
  p = quick.profile
  assert p.name == "calibrated-cpu-cpu-8" and p.devices_per_node == 8
  for f in ("memory_bytes", "memory_bandwidth", "link_bandwidth", "inter_node_bandwidth"):
    assert getattr(p, f) > 0, f
  assert p.link_latency >= 0 and p.peak("f32") > 0 and p.peak("bf16") > 0
  kinds = {(s.kind, s.group) for s in quick.samples}
  assert {("matmul-f32", 1), ("matmul-bf16", 1), ("memory", 1)} <= kinds
  assert {("all-reduce", g) for g in (2, 4, 8)} <= kinds  # every group size present is measured
  assert all(s.seconds > 0 for s in quick.samples)
  assert [f.group for f in quick.links] == [2, 4, 8, 0]
  # the profile's peak is the best measured matmul rate
  f32 = [s for s in quick.samples if s.kind == "matmul-f32"]
  assert p.peak("f32") == pytest.approx(max(2 * s.size ** 3 / s.seconds for s in f32))
  path = tmp_path / "cpu.json"
  hardware.save_profile(p, str(path))
  assert hardware.load_profile(str(path)) == p


def test_calibrate_saves_and_load_or_calibrate_reuses(quick, tmp_path, monkeypatch, caplog):
  calls = []

  def fake_run(devices=None, quick=False):  # counts calibrations; the measuring is tested above
    calls.append(quick)
    return quick_cal

  quick_cal = quick
  monkeypatch.setattr(cal_lib, "run_calibration", fake_run)
  path = tmp_path / "profiles" / "mine.json"
  p1 = cal_lib.load_or_calibrate(jax.devices(), path=str(path), quick=True)
  assert calls == [True] and path.exists() and p1 == quick.profile
  with caplog.at_level(logging.INFO, logger="ap_xla"):
    p2 = cal_lib.load_or_calibrate(jax.devices(), path=str(path))
  assert calls == [True], "a saved profile must be reused, not re-measured"
  assert p2 == p1 and "Using the calibrated hardware profile" in caplog.text
  # the default path lives under the cache folder, named by platform, kind and count
  default = cal_lib.default_profile_path(jax.devices(), cache_dir=str(tmp_path / "cache"))
  # versioned: a profile measured the way an older calibration did is not read back
  assert default == str(tmp_path / "cache" / "profiles" / f"cpu-cpu-8.v{cal_lib.CALIBRATION_VERSION}.json")
  cal_lib.load_or_calibrate(jax.devices(), cache_dir=str(tmp_path / "cache"))
  assert calls == [True, False] and hardware.load_profile(default) == quick.profile


def _write(path, doc):
  path.write_text(doc if isinstance(doc, str) else json.dumps(doc))
  return str(path)


@pytest.mark.parametrize("mutate, match", [
    (lambda d: d.pop("link_bandwidth"), r"missing field 'link_bandwidth'"),
    (lambda d: d.update(memory_bandwidth=-1.0), r"field 'memory_bandwidth' must be a positive number, got -1.0"),
    (lambda d: d["peak_flops"].pop("bf16"), r"field 'peak_flops' needs entries \['bf16'\]"),
    (lambda d: d.update(link_latency="fast"), r"field 'link_latency' must be a non-negative number, got 'fast'"),
])
def test_bad_profile_file_names_the_field_and_the_file(tmp_path, mutate, match):
  d = dataclasses.asdict(hardware.get_profile("cpu"))
  mutate(d)
  path = _write(tmp_path / "bad.json", d)
  with pytest.raises(ValueError, match=match) as e:
    cal_lib.load_or_calibrate(jax.devices(), path=path)
  assert path in str(e.value)


def test_unreadable_profile_file_is_a_clear_error(tmp_path):
  path = _write(tmp_path / "broken.json", '{"name": "x", ')
  with pytest.raises(ValueError, match=r"is not valid JSON") as e:
    cal_lib.load_or_calibrate(jax.devices(), path=path)
  assert path in str(e.value)


def test_bad_cached_profile_is_replaced_with_a_warning(tmp_path, monkeypatch, caplog):
  cache = tmp_path / "cache"
  default = cal_lib.default_profile_path(jax.devices(), cache_dir=str(cache))
  (cache / "profiles").mkdir(parents=True)
  _write(cache / "profiles" / f"cpu-cpu-8.v{cal_lib.CALIBRATION_VERSION}.json", {"name": "half"})
  good = hardware.get_profile("cpu")
  monkeypatch.setattr(cal_lib, "run_calibration",
                      lambda devices=None, quick=False: cal_lib.Calibration(good, (), (), 0.0))
  with caplog.at_level(logging.WARNING, logger="ap_xla"):
    p = cal_lib.load_or_calibrate(jax.devices(), cache_dir=str(cache))
  assert p == good and hardware.load_profile(default) == good
  assert "Ignoring the cached hardware profile" in caplog.text and "missing field" in caplog.text


def test_fit_link_recovers_the_ring_model():
  bw, lat = 2e9, 30e-6
  samples = []
  for kind in ("all-reduce", "all-gather"):
    for n in (2, 4, 8):
      for size in (4096, 1 << 22):
        a, b = cal_lib._ring_coeffs(kind, n, size)
        samples.append(Sample(kind, size, n, a / bw + b * lat))
  fit = fit_link(samples)
  assert fit.bandwidth == pytest.approx(bw, rel=1e-6) and fit.latency == pytest.approx(lat, rel=1e-6)
  assert fit_link([s for s in samples if s.group == 4], 4).group == 4
  # noise that makes the latency negative is clamped, not returned
  noisy = [dataclasses.replace(s, seconds=s.seconds * (0.5 if s.size == 4096 else 1.0)) for s in samples]
  assert fit_link(noisy).latency >= 0
  with pytest.raises(ValueError, match="at least two sizes"):
    fit_link([s for s in samples if s.size == 4096 and s.kind == "all-reduce" and s.group == 2])
  assert "GB/s" in repr(LinkFit(0, 1e9, 1e-6))


def test_memory_sample_streams_into_a_reused_buffer(monkeypatch):
  # the step's buffers are reused (donated state, heap temporaries): a fresh 16 MiB output per
  # run would be timed with its page faults (1.7 vs 5.0 GB/s per device on 8 CPU devices)
  donated = []
  real_jit = jax.jit

  def spy(fn, *a, **kw):
    donated.append(kw.get("donate_argnums"))
    return real_jit(fn, *a, **kw)
  monkeypatch.setattr(cal_lib.jax, "jit", spy)
  mesh = cal_lib.auto_mesh(np.array(jax.devices(), dtype=object), ("d",))
  s = cal_lib._memory_sample(mesh, 1 << 16, 2)
  assert donated == [0] and s.kind == "memory" and s.seconds > 0


def test_profile_key_is_a_safe_file_name():
  class Dev:
    platform, device_kind = "gpu", "NVIDIA H100 80GB HBM3"
  assert cal_lib.profile_key([Dev()] * 8) == "gpu-nvidia_h100_80gb_hbm3-8"
  with pytest.raises(ValueError, match="at least one device"):
    cal_lib.profile_key([])
