"""The built-in presets plan the published models: parameter counts from their model cards."""
import pytest

from ap_xla import presets


# Hugging Face's counts (sum of the checkpoint's tensors; GPT-2's tied lm_head counted once).
@pytest.mark.parametrize("name, published", [
    ("llama2-7b", 6_738_415_616),
    ("llama2-13b", 13_015_864_320),
    ("gpt2-xl", 1_557_611_200),
])
def test_preset_parameter_counts(name, published):
  spec = presets.get_preset(name)
  program = presets.build_program(spec, batch=1, seq=128)  # shapes only
  assert program.num_params == spec.config.num_params
  tied = spec.config.vocab * spec.config.dim if spec.family == presets.GPT2 else 0
  # GPT-2 ties lm_head to wte; the plan holds it as its own matrix, and the note says so
  assert program.num_params - tied == published
  if tied:
    assert program.num_params == 1_638_022_400
    assert spec.note.startswith("the tied lm_head is planned as its own matrix: +80.4M parameters (5% ")
  else:
    assert spec.note == ""
