"""The notebooks run top to bottom on 8 simulated CPU devices and show what they promise.

Each notebook is executed in a fresh kernel of this interpreter (a kernelspec written for the
test, so the venv's ipykernel runs it whatever other kernels are installed), with a fresh plan
cache; a cell that raises fails the test with its traceback. The outputs are then checked for
the text each notebook is about, so a notebook that silently does nothing fails too.
"""
import json
import pathlib
import re
import sys
import time

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
CELL_TIMEOUT_S = 300


@pytest.fixture
def kernel_env(tmp_path, monkeypatch):
  """A 'python3' kernelspec running this interpreter, found first; a private plan cache."""
  spec = tmp_path / "jupyter" / "kernels" / "python3"
  spec.mkdir(parents=True)
  (spec / "kernel.json").write_text(json.dumps({
      "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
      "display_name": "ap-xla test kernel", "language": "python"}))
  monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
  monkeypatch.setenv("AP_XLA_CACHE_DIR", str(tmp_path / "plan_cache"))
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  monkeypatch.setenv("PYTHONPATH", str(ROOT))
  return tmp_path


def run(name: str) -> tuple[str, list, float]:
  """Executes a notebook; returns its text output, its display outputs and the seconds it took."""
  book = nbformat.read(NOTEBOOKS / name, as_version=4)
  client = NotebookClient(book, kernel_name="python3", timeout=CELL_TIMEOUT_S, startup_timeout=120,
                          resources={"metadata": {"path": str(NOTEBOOKS)}})
  t0 = time.perf_counter()
  client.execute()
  seconds = time.perf_counter() - t0
  print(f"{name}: executed in {seconds:.1f} s")
  texts, displays = [], []
  for cell in book.cells:
    for out in cell.get("outputs", []):
      if out.output_type == "stream":
        texts.append(out.text)
      elif out.output_type in ("execute_result", "display_data"):
        texts.append(out.data.get("text/plain", ""))
        displays.append(out.data)
  return "\n".join(texts), displays, seconds


def losses(text: str) -> list[float]:
  return [float(x) for x in re.findall(r"step +\d+: loss ([0-9.]+)", text)]


def test_notebooks_are_committed_without_outputs():
  names = sorted(p.name for p in NOTEBOOKS.glob("*.ipynb"))
  assert names == ["01_torch_quickstart.ipynb", "02_jax_search_api.ipynb", "03_candidate_space.ipynb"]
  for name in names:
    book = nbformat.read(NOTEBOOKS / name, as_version=4)
    nbformat.validate(book)
    code = [c for c in book.cells if c.cell_type == "code"]
    assert all(c.outputs == [] and c.execution_count is None for c in code), f"{name} has outputs"
    # the device count is fixed in the first code cell, before anything imports jax
    assert "--xla_force_host_platform_device_count=8" in code[0].source
    assert code[0].source.index("XLA_FLAGS") < code[0].source.index("import ap_xla")


def test_torch_quickstart(kernel_env):
  text, _, _ = run("01_torch_quickstart.ipynb")
  assert "ap-xla plan for LlamaForCausalLM with batch 8: Plan(" in text
  assert "ap-xla took over LlamaForCausalLM" in text
  assert "Generated 4 parallelization candidates" in text  # only the data x tensor split is searched
  found = losses(text)
  assert len(found) == 12 and found[-1] < 0.8 * found[0], found
  acc = re.search(r"next-token accuracy (\d+)%", text)
  assert acc and int(acc.group(1)) >= 50, text[-500:]


@pytest.mark.slow  # the default run executes the torch quickstart; `-m slow` the other two
def test_jax_search_api(kernel_env):
  text, _, _ = run("02_jax_search_api.ipynb")
  # the linen MLP's search table, with the chosen plan first
  assert re.search(r"0 +Plan\(dp=\d, tp=\d, pp=1, mb=1, .*chosen", text)
  # the nnx model trained with its plan
  nnx_losses = losses(text)[:5]
  assert nnx_losses[-1] < nnx_losses[0], nnx_losses
  # the Llama budget rejected plain data parallelism and the trainer reused the cached plan
  assert re.search(r"Plan\(dp=8, tp=1, pp=1, mb=1, recompute='none', fsdp=False\) +[0-9.]+ \w+ +[0-9.]+ ms +"
                   r"(compiled|predicted) +over_budget", text)
  chosen = re.search(r"plan: (Plan\(.*\)) \| from cache: True", text)
  assert chosen and chosen.group(1) != "Plan(dp=8, tp=1, pp=1, mb=1, recompute='none', fsdp=False)", text
  llama_losses = losses(text)[5:]
  assert len(llama_losses) == 6 and llama_losses[-1] < llama_losses[0], llama_losses
  # an impossible pin and an impossible budget
  assert "{'num_stages': 3} -> ValueError: num_stages=3 does not divide the device count 8" in text
  assert "{'num_micro_batches': 5} -> ValueError: num_micro_batches=5 does not divide the global batch 16" in text
  assert "OUT_OF_MEMORY: no parallelization candidate fits" in text and "smallest candidate" in text
  assert "un-pin tensor_parallel=1" in text


@pytest.mark.slow  # the default run executes the torch quickstart; `-m slow` the other two
def test_candidate_space(kernel_env):
  text, displays, _ = run("03_candidate_space.ipynb")
  assert sum("image/png" in d for d in displays) == 2  # the scatter plot and the schedule
  plotted = re.search(r"\| (\d+) compiled and (\d+) predicted candidates plotted", text)
  assert plotted and int(plotted.group(1)) >= 1 and int(plotted.group(2)) >= 1
  verdicts = re.search(r"verdicts: (\{.*\})", text).group(1)
  assert "'chosen': 1" in verdicts and "over_budget" in verdicts
  # the forced pipeline and its GPipe grid: 2 stages x 4 micro-batches, 2 * (4 + 2 - 1) ticks
  assert "Plan(dp=4, tp=1, pp=2, mb=4, recompute='none', fsdp=False, schedule='gpipe')" in text
  assert "2 stages x 10 ticks, 16 busy cells, 4 idle: bubble 20.0% (formula (S-1)/(M+S-1) = 20.0%)" in text
  assert "stage 0 | F0 F1 F2 F3 .. .. B3 B2 B1 B0" in text
  assert "stage 1 | .. F0 F1 F2 F3 B3 B2 B1 B0 .." in text
