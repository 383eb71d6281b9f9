"""`ap-xla plan`: its table, its JSON, its errors; the `run` dispatch; the model configs it reads."""
import json
import os
import signal
import subprocess
import sys
import types

import jax
import pytest

from ap_xla import presets
from ap_xla.cli import main

# Start the backend with conftest's 8 devices, so that main() finds it started and leaves the
# environment alone (as a process importing jax before `ap-xla plan` would).
assert jax.device_count() == 8

# Pinned so that only the two dp=8 plans (replicated or FSDP parameters) are compiled.
FAST = ["--no-pipeline-parallel", "--tensor-parallel", "1", "--num-micro-batches", "1",
        "--activation-recomputation", "false", "--no-mixed-precision"]
TINY = ["plan", "--model", "llama-tiny", "--hardware", "h100", "--devices", "8", "--batch", "16", "--seq", "32"]


def _plan(capsys, tmp_path, *extra):
  code = main(TINY + FAST + ["--cache-dir", str(tmp_path / "cache"), *extra])
  out, err = capsys.readouterr()
  return code, out, err


def test_table_then_json_from_the_cache(capsys, tmp_path):
  """The screened search over tp 1, 2, 4 and 8: the chosen plan compiled, the rest compiled or
  predicted, each saying which; the second run is read from the plan cache."""
  from passes.plan import Plan
  argv = TINY + FAST + ["--cache-dir", str(tmp_path / "cache"), "--distribute-parameter", "false"]
  argv[argv.index("--tensor-parallel") + 1] = "auto"
  assert main(argv) == 0
  out, err = capsys.readouterr()
  header = next(l for l in out.splitlines() if l.startswith("#"))
  for column in ("plan", "memory/device", "est. step", "figures", "verdict"):
    assert column in header
  rows = [l for l in out.splitlines() if l[:1].isdigit()]
  # compiled by XLA:GPU for the H100 without a device (jax's CUDA plugin is in the dev setup)
  assert len(rows) == 4 and "chosen" in rows[0] and " xla:gpu (deviceless) " in rows[0]
  assert all(" xla:gpu (deviceless) " in r or " predicted " in r for r in rows[1:])
  assert "Compiled: xla:gpu (deviceless): h100_sxm.txtpb, topology 1x1x8" in out
  assert "Target:   8 x h100 (74.51 GiB each; budget 59.60 GiB)" in out
  assert "candidates: predicted" in out and ", compiled " in out
  assert "Chosen plan: Plan(dp=" in out and "num_stages : 1" in out
  assert "Generated 4 parallelization candidates" in err  # the search's log goes to stderr
  assert "Screened 4 candidates" in err and "(predicted " in err

  assert main(argv + ["--json"]) == 0
  out, err = capsys.readouterr()
  doc = json.loads(out)  # one JSON document and nothing else on stdout
  assert doc["from_cache"] and "Reusing the cached plan" in err
  assert repr(Plan.from_dict(doc["plan"])) in rows[0]
  assert (doc["devices"], doc["batch"], doc["seq"], doc["hardware"]["name"]) == (8, 16, 32, "h100")
  cands = doc["result"]["candidates"]
  assert sorted(c["plan"]["tp"] for c in cands) == [1, 2, 4, 8]
  assert cands[0]["verdict"] == "chosen" and cands[0]["figures"] == "compiled"
  assert cands[0]["route"] == "xla:gpu (deviceless)" and doc["route"].startswith("xla:gpu (deviceless): ")
  assert {c["figures"] for c in cands} <= {"compiled", "predicted"}
  fastest = min(c["est_time_s"] for c in cands if c["figures"] == "compiled")
  assert float(f"{cands[0]['est_time_s']:.3g}") == float(f"{fastest:.3g}")  # ties to 3 digits: less memory
  assert doc["memory_bytes"] == cands[0]["memory_bytes"] < doc["result"]["budget_bytes"]
  assert doc["model"]["num_params"] == presets.get_preset("llama-tiny").config.num_params
  assert doc["screen"]["compiled"] + doc["screen"]["predicted"] == 4


def test_out_of_memory_exits_1_with_the_message(capsys, tmp_path):
  code, out, err = _plan(capsys, tmp_path, "--device-memory", "64KiB", "--distribute-parameter", "true",
                         "--json")
  assert code == 1
  assert "OUT_OF_MEMORY" in err and "smallest candidate" in err
  doc = json.loads(out)
  assert doc["error"] == "out_of_memory" and "OUT_OF_MEMORY" in doc["message"] and not doc["from_cache"]
  assert {c["verdict"] for c in doc["candidates"]} == {"over_budget"}
  # the text report shows the candidates the message refers to; the outcome was cached
  code, out, err = _plan(capsys, tmp_path, "--device-memory", "64KiB", "--distribute-parameter", "true")
  assert code == 1 and "OUT_OF_MEMORY" in err and "no candidate fits (search skipped)" in err
  assert "Start compilation" not in err
  rows = [l for l in out.splitlines() if l[:1].isdigit()]
  assert len(rows) == len(doc["candidates"]) and all("over_budget" in r for r in rows)


def _write(tmp_path, name, text):
  path = tmp_path / name
  path.write_text(text)
  return str(path)


@pytest.mark.parametrize("args, message", [
    (["--model", "llama9-1t"], "Unknown model preset 'llama9-1t'; allowed: ['llama-tiny', 'llama2-7b'"),
    (["--hardware", "tpu9000"], "--hardware: Unknown hardware profile 'tpu9000'"),
    (["--hardware", "/nonexistent/profile.json"], "Cannot read hardware profile file"),
    (["--model", "/nonexistent/config.json"], "'/nonexistent/config.json' does not exist"),
    (["--num-stages", "3"], "num_stages=3 does not divide the device count 8"),
    (["--memory-ratio", "150"], "--memory-ratio must be a percentage in (0, 100], got 150"),
    (["--device-memory", "lots"], "--device-memory: Cannot parse the byte size 'lots'"),
])
def test_bad_arguments_exit_2(args, message, capsys, tmp_path):
  argv = TINY + ["--cache-dir", str(tmp_path)]
  flag, value = args
  if flag in argv:
    argv[argv.index(flag) + 1] = value
  else:
    argv += args
  assert main(argv) == 2
  err = capsys.readouterr().err.strip().splitlines()[-1]
  assert err.startswith("ap-xla plan: error:") and message in err


@pytest.mark.parametrize("text, message", [
    ("{not json", "is not valid JSON"),
    ("[1, 2]", "must hold a JSON object, got list"),
    ('{"model_type": "bert", "hidden_size": 64}', "has model_type 'bert'; supported: ['llama', 'mistral'"),
    ('{"model_type": "llama", "vocab_size": 64, "num_attention_heads": 4}', "missing field 'hidden_size'"),
    ('{"model_type": "gpt2", "vocab_size": 64, "n_embd": "64", "n_layer": 2, "n_head": 4}',
     "field 'n_embd' must be a positive integer, got '64'"),
])
def test_malformed_config_files_exit_2(text, message, capsys, tmp_path):
  path = _write(tmp_path, "config.json", text)
  argv = TINY + ["--cache-dir", str(tmp_path)]
  argv[argv.index("llama-tiny")] = path
  assert main(argv) == 2
  err = capsys.readouterr().err
  assert path in err and message in err


def test_usage_errors_from_argparse(capsys):
  assert main(["plan", "--model", "llama-tiny", "--hardware", "h100", "--devices", "0", "--batch", "8"]) == 2
  assert "--devices must be a positive int, got '0'" in capsys.readouterr().err
  assert main(["plan", "--model", "llama-tiny"]) == 2
  assert "required" in capsys.readouterr().err
  assert main(["plan", "--help"]) == 0 and "--num-micro-batches" in capsys.readouterr().out
  assert main([]) == 2


def test_more_devices_than_the_started_backend_is_a_clear_error(capsys, tmp_path):
  argv = TINY + FAST + ["--cache-dir", str(tmp_path)]
  argv[argv.index("--devices") + 1] = "16"
  assert main(argv) == 1
  assert "jax was already started with 8" in capsys.readouterr().err


def test_hf_configs_are_planned(capsys, tmp_path):
  llama = _write(tmp_path, "mistral.json", json.dumps({
      "model_type": "mistral", "vocab_size": 96, "hidden_size": 32, "num_hidden_layers": 2,
      "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 64,
      "max_position_embeddings": 128, "rope_theta": 1e6}))
  spec = presets.from_hf_config(llama)
  assert (spec.family, spec.config.kv_heads, spec.config.rope_theta, spec.default_seq) == ("llama", 2, 1e6, 128)
  argv = TINY + FAST + ["--cache-dir", str(tmp_path), "--distribute-parameter", "false", "--json"]
  argv[argv.index("llama-tiny")] = llama
  assert main(argv) == 0
  doc = json.loads(capsys.readouterr().out)
  assert doc["model"]["config"]["kv_heads"] == 2 and doc["plan"]["dp"] == 8


def test_gpt2_config_builds_the_transformers_model(tmp_path):
  """Our GPT-2 from a transformers config.json, with its weights, gives transformers' loss."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  import jax.numpy as jnp
  import numpy as np
  from ap_xla.models.gpt2 import params_from_hf
  hf_cfg = transformers.GPT2Config(vocab_size=97, n_embd=32, n_layer=2, n_head=4, n_positions=24,
                                   resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
  hf_cfg.save_pretrained(tmp_path)
  torch.manual_seed(0)
  model = transformers.GPT2LMHeadModel(hf_cfg).eval()
  spec = presets.from_hf_config(str(tmp_path))
  prog = presets.build_program(spec, batch=2, seq=16, abstract=False)
  params = params_from_hf({k: v.detach().numpy() for k, v in model.state_dict().items()}, spec.config)
  tokens = np.random.RandomState(0).randint(0, 97, (2, 16))
  ref = model(torch.tensor(tokens), labels=torch.tensor(tokens)).loss.item()
  ours = float(prog.loss(params, {"tokens": jnp.asarray(tokens)}))
  assert abs(ours - ref) <= 1e-6 * abs(ref), (ours, ref)  # float32 rounding: ~1e-7
  with pytest.raises(ValueError, match="seq=25 exceeds .* 24 learned positions"):
    presets.build_program(spec, batch=2, seq=25)


def test_llama_style_config_builds_the_transformers_model(tmp_path):
  """A transformers-5 Mistral config.json (GQA, rope_parameters) maps onto our Llama-style model."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  import jax.numpy as jnp
  import numpy as np
  hf_cfg = transformers.MistralConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, rope_theta=1e6,
                                      rms_norm_eps=1e-6)
  hf_cfg.save_pretrained(tmp_path)
  torch.manual_seed(0)
  model = transformers.MistralForCausalLM(hf_cfg).eval()
  spec = presets.from_hf_config(str(tmp_path / "config.json"))
  assert (spec.config.kv_heads, spec.config.rope_theta) == (2, 1e6)
  prog = presets.build_program(spec, batch=2, seq=16, abstract=False)
  sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
  layer = lambda name: jnp.stack([sd[f"model.layers.{i}.{name}"] for i in range(2)])
  linear = lambda name: {"kernel": jnp.swapaxes(layer(name + ".weight"), 1, 2)}  # torch [out, in]
  params = {"pre": {"tok": {"embedding": jnp.asarray(sd["model.embed_tokens.weight"])}},
            "blocks": {"attn_norm": {"scale": layer("input_layernorm.weight")},
                       "mlp_norm": {"scale": layer("post_attention_layernorm.weight")},
                       **{n: linear(f"self_attn.{n}_proj") for n in "qkvo"},
                       **{n: linear(f"mlp.{n}_proj") for n in ("gate", "up", "down")}},
            "post": {"norm": {"scale": jnp.asarray(sd["model.norm.weight"])},
                     "lm_head": {"kernel": jnp.asarray(sd["lm_head.weight"].T)}}}
  tokens = np.random.RandomState(0).randint(0, 97, (2, 16))
  ref = model(torch.tensor(tokens), labels=torch.tensor(tokens)).loss.item()
  ours = float(prog.loss(params, {"tokens": jnp.asarray(tokens)}))
  assert abs(ours - ref) <= 1e-6 * abs(ref), (ours, ref)  # float32 rounding: ~1e-7


def test_run_dispatches_to_the_launcher(monkeypatch):
  seen = []
  monkeypatch.setitem(sys.modules, "ap_xla.launcher", types.SimpleNamespace(main=lambda a: seen.append(a) or 3))
  assert main(["run", "train.py", "--lr", "1"]) == 3 and seen == [["train.py", "--lr", "1"]]


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cli(tmp_path, *args, cache=None):
  """`python -m ap_xla plan ...` in a process of its own (it sets its own device count)."""
  env = dict(os.environ, AP_XLA_CACHE_DIR=str(cache or tmp_path))
  env.pop("XLA_FLAGS", None)
  return subprocess.run([sys.executable, "-m", "ap_xla", "plan", *args], capture_output=True, text=True,
                        env=env, timeout=300, cwd=ROOT)


def test_sixty_four_devices_in_a_process_of_its_own(tmp_path):
  r = _cli(tmp_path, "--model", "gpt2-tiny", "--hardware", "a100", "--devices", "64", "--batch", "64", "--seq",
           "32", "--json", "-q", *FAST, "--distribute-parameter", "false")
  assert r.returncode == 0, r.stderr[-2000:]
  doc = json.loads(r.stdout)
  assert doc["devices"] == doc["result"]["num_devices"] == 64 and doc["plan"]["dp"] == 64
  assert doc["model"]["family"] == "gpt2" and "Generated" not in r.stderr  # -q: no log
  # a batch no data-parallel size of 64 devices divides: a usage error, nothing compiled
  r = _cli(tmp_path, "--model", "llama-tiny", "--hardware", "h100", "--devices", "64", "--batch", "3", "--seq", "32",
           *FAST)
  assert r.returncode == 2, r.stderr[-2000:]
  assert "can use 64 devices with a global batch of 3" in r.stderr
  assert "batch 3 does not divide by data parallel 64" in r.stderr and "Start compilation" not in r.stderr


def test_a_second_run_is_read_from_the_cache(tmp_path):
  """Only two micro-batches fit: the first run searches, the second compiles nothing and says so."""
  args = ["--model", "llama-tiny", "--hardware", "h100", "--devices", "8", "--batch", "16", "--seq", "64",
          "--device-memory", "8MiB", "--no-pipeline-parallel", "--tensor-parallel", "1",
          "--activation-recomputation", "false", "--no-mixed-precision", "--distribute-parameter", "false"]
  first, second = (_cli(tmp_path, *args) for _ in range(2))
  assert first.returncode == second.returncode == 0, (first.stderr[-2000:], second.stderr[-2000:])
  assert "Start compilation" in first.stderr and "Stored the plan" in first.stderr
  assert "Start compilation" not in second.stderr  # nothing compiled the second time
  assert second.stderr.count("Reusing the cached") == 1
  assert "read from the plan cache (search skipped)" in second.stdout
  chosen = lambda out: out[out.index("Chosen plan:"):]
  assert "mb=2" in chosen(first.stdout) and chosen(first.stdout) == chosen(second.stdout)


def test_unusable_device_count_or_batch_is_a_usage_error(capsys, tmp_path):
  argv = TINY + FAST + ["--cache-dir", str(tmp_path)]
  argv[argv.index("--devices") + 1] = "6"  # dp=6 is the only plan the pins allow; 16 % 6 != 0
  assert main(argv) == 2
  out, err = capsys.readouterr()
  assert err.startswith("ap-xla plan: error: no parallel plan of these options can use 6 devices with a "
                        "global batch of 16")
  assert "batch 16 does not divide by data parallel 6" in err and "[6] divides" in err
  assert "OUT_OF_MEMORY" not in err and "Start compilation" not in err and out == ""
  argv[argv.index("--devices") + 1] = "8"
  argv[argv.index("--batch") + 1] = "3"
  assert main(argv + ["--exhaustive", "--json"]) == 2
  out, err = capsys.readouterr()
  doc = json.loads(out)
  assert doc["error"] == "bad_arguments" and "batch 3 does not divide by data parallel 8" in doc["message"]
  assert [c["verdict"] for c in doc["candidates"]] == ["skipped"] and os.listdir(tmp_path) == []


def test_an_error_inside_the_search_is_not_a_usage_error(monkeypatch, tmp_path):
  from ap_xla import plan_cache

  def broken(*args, **kwargs):
    raise ValueError("a bug inside the search")
  monkeypatch.setattr(plan_cache, "cached_search", broken)
  with pytest.raises(ValueError, match="a bug inside the search"):  # a traceback, not "bad arguments"
    main(TINY + FAST + ["--cache-dir", str(tmp_path)])


def test_ctrl_c_stores_nothing(monkeypatch, capsys, tmp_path):
  """An interrupt during the search exits 130 at once; the search under way stores nothing."""
  import functools
  import threading
  import time
  from ap_xla import plan_cache
  started, pressed = threading.Event(), []

  def slow_search(program, devices, options, *args, **kwargs):
    started.set()
    for _ in range(600):  # a search polls its compile workers; the interrupt lands between polls
      time.sleep(0.1)
    raise AssertionError("not interrupted")
  monkeypatch.setattr(plan_cache, "cached_search", functools.partial(plan_cache.cached_search,
                                                                     search_fn=slow_search))

  def interrupt():
    started.wait(60)
    pressed.append(time.perf_counter())
    os.kill(os.getpid(), signal.SIGINT)
  threading.Thread(target=interrupt, daemon=True).start()
  argv = TINY + FAST + ["--cache-dir", str(tmp_path)]
  assert main(argv) == 130
  assert time.perf_counter() - pressed[0] < 5
  assert "interrupted; nothing was stored" in capsys.readouterr().err
  assert os.listdir(tmp_path) == []
