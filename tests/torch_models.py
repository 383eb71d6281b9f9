"""Tiny torch modules shared by the tests."""
import torch


class Pooler(torch.nn.Module):
  """Sums each sequence with `torch.segment_reduce`, an operator the bridge has no JAX lowering for."""

  def forward(self, h):
    lengths = torch.full((h.shape[0],), h.shape[1], dtype=torch.long)
    return torch.segment_reduce(h.flatten(0, 1), "sum", lengths=lengths)
