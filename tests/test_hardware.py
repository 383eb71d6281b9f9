"""Hardware profiles: built-ins, JSON round trip and validation, byte sizes, detection."""
import dataclasses
import json
import logging
import os
import types

import jax
import pytest

from passes import hardware
from passes.hardware import HardwareProfile


def test_builtins_carry_published_figures():
  assert set(hardware.PROFILE_NAMES) == {"h100", "h200", "a100", "cpu"}
  h100, h200, a100 = (hardware.get_profile(n) for n in ("h100", "h200", "a100"))
  assert (h100.peak("bf16"), h100.peak("f32"), h100.memory_bandwidth) == (989.4e12, 67e12, 3.35e12)
  assert (h200.memory_bytes, h200.memory_bandwidth, h200.peak("bf16")) == (141e9, 4.8e12, 989.4e12)
  assert (a100.peak("bf16"), a100.peak("f32"), a100.memory_bytes) == (312e12, 19.5e12, 80e9)
  for p in (h100, h200, a100, hardware.get_profile("cpu")):
    assert {"f32", "bf16"} <= set(p.peak_flops)
    assert p.inter_node_bandwidth < p.link_bandwidth
    r = repr(p)
    assert "\n" not in r and r.startswith(f"HardwareProfile(name={p.name!r}")
  hash(h100)  # usable as a key although peak_flops is a dict
  # GPUs: 8 per node, one NIC per GPU (DGX H100 400 Gb/s, DGX A100 200 Gb/s), published
  # efficiencies below 1, XLA:GPU's overlap and flash attention; the CPU profile has none of them
  assert (h100.devices_per_node, h100.inter_node_bandwidth, a100.inter_node_bandwidth) == (8, 50e9, 25e9)
  for p in (h100, h200, a100):
    assert p.overlaps_collectives and p.flash_attention and p.network_latency > p.link_latency
    assert all(0.5 < getattr(p, f) < 1 for f in ("matmul_efficiency", "link_efficiency",
                                                  "inter_node_efficiency", "attention_efficiency"))
  cpu = hardware.get_profile("cpu")
  assert not cpu.overlaps_collectives and not cpu.flash_attention and cpu.matmul_rate("f32") == cpu.peak("f32")


def test_a_profile_saved_before_the_optional_fields_loads_without_corrections(tmp_path):
  d = dataclasses.asdict(hardware.get_profile("h100"))
  for f in hardware.OPTIONAL_FIELDS:
    d.pop(f)
  p = hardware.load_profile(_write(tmp_path, d))
  assert (p.matmul_efficiency, p.overlaps_collectives, p.flash_attention, p.network_latency) == (
      1.0, False, False, p.link_latency)


def test_get_profile_names_overrides_and_errors():
  assert hardware.get_profile(" H100 ") is hardware.get_profile("h100")
  cpu = hardware.get_profile("cpu", memory_bytes=hardware.parse_bytes("2GiB"))
  assert cpu.memory_bytes == 2**30 * 2 and cpu.name == "cpu"
  assert hardware.get_profile(cpu) is cpu
  with pytest.raises(ValueError, match=r"Unknown hardware profile 'tpu9'; allowed: \['h100', 'h200', 'a100', 'cpu'\]"):
    hardware.get_profile("tpu9")
  with pytest.raises(ValueError, match=r"unknown fields \['memory'\]"):
    hardware.get_profile("cpu", memory=1)
  with pytest.raises(ValueError, match=r"field 'memory_bytes' must be a positive int, got -5"):
    hardware.get_profile("cpu", memory_bytes=-5)
  with pytest.raises(ValueError, match=r"no peak FLOP/s for dtype 'fp8'"):
    hardware.get_profile("a100").peak("fp8")


@pytest.mark.parametrize("text, expected", [
    ("1024", 1024), ("256MiB", 256 * 2**20), ("1.5GB", 1_500_000_000), ("2 gib", 2 * 2**30),
    ("4KB", 4000), ("0.5KiB", 512), ("7B", 7), (12345, 12345), ("80GB", 80 * 10**9),
])
def test_parse_bytes(text, expected):
  assert hardware.parse_bytes(text) == expected


@pytest.mark.parametrize("bad, err, match", [
    ("lots", ValueError, r"Cannot parse the byte size 'lots'"),
    ("256M", ValueError, r"'M' is ambiguous: write 'MiB'"),
    ("", ValueError, r"Cannot parse"),
    ("-3GB", ValueError, r"Cannot parse"),
    (-1, ValueError, r"non-negative, got -1"),
    (1.5, TypeError, r"int or a string"),
    (True, TypeError, r"int or a string"),
])
def test_parse_bytes_errors(bad, err, match):
  with pytest.raises(err, match=match):
    hardware.parse_bytes(bad)


def test_save_load_round_trip_is_atomic(tmp_path, monkeypatch):
  path = tmp_path / "hw.json"
  prof = hardware.get_profile("h100", name="my-h100", link_latency=0.0)
  hardware.save_profile(prof, str(path))
  assert hardware.load_profile(str(path)) == prof
  assert os.listdir(tmp_path) == ["hw.json"]
  # A failed write leaves the old file whole and no temporary file behind.
  def broken_dump(obj, f, **kw):
    f.write('{"name": ')
    raise OSError("disk full")
  monkeypatch.setattr(hardware.json, "dump", broken_dump)
  with pytest.raises(OSError, match="disk full"):
    hardware.save_profile(hardware.get_profile("cpu"), str(path))
  monkeypatch.undo()
  assert hardware.load_profile(str(path)) == prof
  assert os.listdir(tmp_path) == ["hw.json"]
  with pytest.raises(TypeError, match="must be a HardwareProfile"):
    hardware.save_profile({"name": "x"}, str(path))


def _write(tmp_path, d, text=None):
  path = tmp_path / "p.json"
  path.write_text(text if text is not None else json.dumps(d))
  return str(path)


@pytest.mark.parametrize("change, match", [
    (lambda d: d.pop("link_bandwidth"), r"missing field 'link_bandwidth'"),
    (lambda d: d.update(color="red"), r"unknown field 'color' \(value 'red'\)"),
    (lambda d: d.update(memory_bandwidth=-1.0), r"field 'memory_bandwidth' must be a positive number, got -1.0"),
    (lambda d: d.update(devices_per_node="8"), r"field 'devices_per_node' must be a positive int, got '8'"),
    (lambda d: d.update(link_latency=[1]), r"field 'link_latency' must be a non-negative number, got \[1\]"),
    (lambda d: d["peak_flops"].pop("bf16"), r"field 'peak_flops' needs entries \['bf16'\]"),
    (lambda d: d["peak_flops"].update(f32=0), r"field 'peak_flops'\['f32'\] must be a positive number, got 0"),
    (lambda d: d.update(memory_bytes="many"), r"field 'memory_bytes': Cannot parse the byte size 'many'"),
    (lambda d: d.update(matmul_efficiency=0), r"field 'matmul_efficiency' must be a number in \(0, 1.5\]"),
    (lambda d: d.update(attention_efficiency=2.0), r"field 'attention_efficiency' must be a number in"),
    (lambda d: d.update(inter_node_latency=-1), r"field 'inter_node_latency' must be a non-negative number or null"),
    (lambda d: d.update(overlaps_collectives="yes"), r"field 'overlaps_collectives' must be true or false"),
])
def test_load_profile_names_the_bad_field_value_and_file(tmp_path, change, match):
  d = dataclasses.asdict(hardware.get_profile("a100"))
  change(d)
  path = _write(tmp_path, d)
  with pytest.raises(ValueError, match=match) as e:
    hardware.load_profile(path)
  assert path in str(e.value)


def test_load_profile_accepts_size_strings_and_rejects_bad_json(tmp_path):
  d = dataclasses.asdict(hardware.get_profile("a100"))
  d["memory_bytes"] = "40GB"
  assert hardware.load_profile(_write(tmp_path, d)).memory_bytes == 40 * 10**9
  with pytest.raises(ValueError, match=r"is not valid JSON"):
    hardware.load_profile(_write(tmp_path, None, text="{nope"))
  with pytest.raises(ValueError, match=r"must hold a JSON object, got list"):
    hardware.load_profile(_write(tmp_path, [1, 2]))
  with pytest.raises(ValueError, match=r"Cannot read hardware profile file"):
    hardware.load_profile(str(tmp_path / "absent.json"))


def _dev(kind, platform="gpu", stats=None):
  def memory_stats():
    if isinstance(stats, Exception):
      raise stats
    return stats
  return types.SimpleNamespace(device_kind=kind, platform=platform, memory_stats=memory_stats)


@pytest.mark.parametrize("kind, name", [
    ("NVIDIA H100 80GB HBM3", "h100"), ("NVIDIA H200", "h200"), ("NVIDIA GH200 480GB", "h200"),
    ("NVIDIA A100-SXM4-80GB", "a100"), ("NVIDIA H100 PCIe", "h100"),
])
def test_detect_profile_from_device_kind(kind, name):
  assert hardware.detect_profile([_dev(kind)]).name == name


def test_detect_profile_cpu_unknown_and_empty(caplog):
  assert hardware.detect_profile(jax.devices()).name == "cpu"
  with caplog.at_level(logging.WARNING, logger="ap_xla"):
    assert hardware.detect_profile([_dev("Tesla V100-SXM2-16GB")]).name == "a100"
  assert "No hardware profile for device kind 'Tesla V100-SXM2-16GB'" in caplog.text
  with pytest.raises(ValueError, match="at least one device"):
    hardware.detect_profile([])


def test_device_memory_bytes():
  assert hardware.device_memory_bytes(jax.devices()[0]) is None  # CPU has no allocator stats
  assert hardware.device_memory_bytes(_dev("x", stats={"bytes_limit": 79 * 2**30, "peak_bytes_in_use": 1})) == 79 * 2**30
  assert hardware.device_memory_bytes(_dev("x", stats={})) is None
  assert hardware.device_memory_bytes(_dev("x", stats=RuntimeError("unsupported"))) is None


def test_profile_is_frozen_and_copies_its_flops():
  flops = {"f32": 1e12, "bf16": 2e12}
  p = HardwareProfile("t", 1, flops, 1.0, 1.0, 0.0, 1, 1.0)
  flops["f32"] = 5.0
  assert p.peak("f32") == 1e12
  with pytest.raises(dataclasses.FrozenInstanceError):
    p.name = "u"
