"""The Hugging Face Trainer under `ap-xla run`, against the same script in plain torch.

tests/torch_scripts/hf_trainer.py is moreh-dev/quickstart's train_llm.py, small (MoAI's AP
line after `import moreh`). Run by `ap_xla.launcher.main` in this process, as `ap-xla run`:

  * with default `TrainingArguments` (fused AdamW, linear schedule, max_grad_norm 1.0: every
    step clips), 5 steps;
  * with the recipe's options (adamw_torch, cosine with warm-up, max_grad_norm=1, evaluation
    each epoch) plus gradient accumulation (the Trainer's `num_items_in_batch` loss scaling)
    and a checkpoint every 3 of 6 steps; then again from the step-3 checkpoint
    (`resume_from_checkpoint`);
  * with default `TrainingArguments` and peft LoRA adapters on q_proj, v_proj (`--lora`): the
    Trainer builds its optimizer on the adapters, the base weights are frozen; the saved
    adapter is compared.

Tolerances (fp32): the logged loss, grad_norm and eval_loss 1e-4 relative (measured ~1e-6);
the learning rate exactly; saved weights 5e-5 absolute and optimizer moments 1e-5 absolute
(see test_torch_scripts.py).
"""
import os

import pytest
import torch

from tests import script_runs as sr
from tests.test_torch_scripts import REL, assert_optimizer_state, assert_rel, assert_same_weights

TRAINER = sr.script("hf_trainer.py")
DEFAULT = ["--default", "--rows", "44", "--num-epochs", "1"]  # 40 train rows: 5 steps of 8
RECIPE = ["--rows", "52", "--num-epochs", "2", "--grad-accum", "2", "--save-steps", "3"]  # 6 steps of 2 x 8


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  out = tmp_path_factory.mktemp("trainer")
  cache = tmp_path_factory.mktemp("plan_cache")
  saved = os.environ.get("AP_XLA_CACHE_DIR")
  os.environ["AP_XLA_CACHE_DIR"] = str(cache)
  try:
    r = {}
    for name, args in (("default", DEFAULT), ("recipe", RECIPE)):
      r[f"ref_{name}"] = sr.last_json(sr.reference(TRAINER, [*args, "--output-dir", str(out / f"ref_{name}")]))
      r[name] = sr.last_json(sr.ap_run(TRAINER, [*args, "--output-dir", str(out / name)]))
    lora = [*DEFAULT, "--lora"]
    r["ref_lora"] = sr.last_json(sr.reference(TRAINER, [*lora, "--output-dir", str(out / "ref_lora")]))
    r["lora"] = sr.last_json(sr.ap_run(TRAINER, [*lora, "--output-dir", str(out / "lora")]))
    r["resume"] = sr.last_json(sr.ap_run(TRAINER, [*RECIPE, "--output-dir", str(out / "resume"),
                                                   "--resume", str(out / "recipe" / "checkpoint-3")]))
  finally:
    if saved is None:
      os.environ.pop("AP_XLA_CACHE_DIR")
    else:
      os.environ["AP_XLA_CACHE_DIR"] = saved
  r["out"] = out
  return r


def _logged(history, key):
  return [(h["step"], h[key]) for h in history if key in h]


def assert_same_logs(got: list, want: list, steps: int):
  for key in ("loss", "grad_norm", "eval_loss"):
    g, w = _logged(got, key), _logged(want, key)
    assert [s for s, _ in g] == [s for s, _ in w], key
    if w:
      assert_rel([v for _, v in g], [v for _, v in w], REL, f"logged {key}")
  assert _logged(got, "learning_rate") == _logged(want, "learning_rate")
  assert len(_logged(got, "loss")) >= min(steps, 5)


def test_default_training_arguments(runs):
  got, want = runs["default"], runs["ref_default"]
  assert_same_logs(got["log_history"], want["log_history"], 5)
  assert [s for s, _ in _logged(got["log_history"], "grad_norm")] == [1, 2, 3, 4, 5]
  assert_same_weights(got["final"], want["final"])
  assert (got["device"], got["n_gpu"]) == ("cuda:0", 1)  # one presented accelerator: no DataParallel


def test_recipe_with_accumulation_and_evaluation(runs):
  got, want = runs["recipe"], runs["ref_recipe"]
  assert_same_logs(got["log_history"], want["log_history"], 6)
  assert [s for s, _ in _logged(got["log_history"], "eval_loss")] == [3, 6]  # each epoch
  assert max(h["step"] for h in got["log_history"]) == 6
  assert_same_weights(got["final"], want["final"])


def test_checkpoints_hold_the_trained_state(runs):
  out = runs["out"]
  for step in (3, 6):
    got, want = out / "recipe" / f"checkpoint-{step}", out / "ref_recipe" / f"checkpoint-{step}"
    assert_same_weights(got, want)
    assert_optimizer_state(torch.load(got / "optimizer.pt", weights_only=False),
                           torch.load(want / "optimizer.pt", weights_only=False))
    assert (torch.load(got / "scheduler.pt", weights_only=False)
            == torch.load(want / "scheduler.pt", weights_only=False))


def test_resume_from_checkpoint(runs):
  got, want = runs["resume"], runs["ref_recipe"]
  resumed = [h for h in got["log_history"] if h["step"] > 3]
  assert_same_logs(resumed, [h for h in want["log_history"] if h["step"] > 3], 3)
  assert_same_weights(got["final"], want["final"])


def test_lora_adapters_with_the_trainer(runs):
  """Only the adapters train; `save_model` writes the adapter, which matches torch's."""
  from safetensors.torch import load_file
  got, want = runs["lora"], runs["ref_lora"]
  assert_same_logs(got["log_history"], want["log_history"], 5)
  a, b = (load_file(os.path.join(d, "adapter_model.safetensors")) for d in (got["final"], want["final"]))
  assert a.keys() == b.keys() and a and all("lora_" in k for k in a)
  for k in a:
    assert float((a[k] - b[k]).abs().max()) <= 5e-5, k
  assert not os.path.exists(os.path.join(got["final"], "model.safetensors"))  # the adapter alone
  assert any(float(v.abs().max()) > 0 for k, v in a.items() if "lora_B" in k)  # trained (B starts at 0)
