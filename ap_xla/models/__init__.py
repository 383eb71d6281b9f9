"""Flax models with a block stack, exposed as `Program`s (the JAX API's examples, `ap-xla plan` presets).

  llama  a Llama-style decoder (`llama_program`)
  gpt2   a GPT-2 style decoder (`gpt2_program`)
"""
