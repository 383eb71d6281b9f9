"""The README's JAX-native example runs as written (in a temporary folder, with a private plan cache)."""
import pathlib
import re

import jax
import numpy as np

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def python_blocks(text: str) -> list[str]:
  return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_the_jax_api_example_runs(tmp_path, monkeypatch):
  blocks = [b for b in python_blocks(README.read_text()) if "ap_xla.search(" in b]
  assert len(blocks) == 1, "the README has one JAX-native example"
  monkeypatch.chdir(tmp_path)
  monkeypatch.setenv("AP_XLA_CACHE_DIR", str(tmp_path / "plan_cache"))
  scope: dict = {}
  exec(compile(blocks[0], "README.md", "exec"), scope)
  result, trainer, loss = scope["result"], scope["trainer"], scope["loss"]
  assert result.plan == trainer.plan and result.candidates[0].verdict == "chosen"
  assert np.isfinite(float(loss)) and trainer.plan.num_devices <= jax.device_count()
  assert (tmp_path / "ckpt").is_dir()  # the checkpoint the example saves
