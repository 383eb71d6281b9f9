"""Speed of a bridged model: a tiny Llama's full training step on CPU vs torch eager and flax.

The same architecture three ways: HF LlamaForCausalLM in torch eager with torch.optim.AdamW;
the same module and optimizer bridged (`bridge_model`, block form: pre -> scan(block) ->
post; and flat); and a Llama written directly in flax.linen below, loaded with the torch
weights, with `optax.adamw` at the same hyperparameters. A step is the whole training step:
forward, backward and the optimizer update (torch: zero_grad, loss.backward(), step(); JAX:
one jitted function, parameters and optimizer state donated). Before timing, two steps of
each from the same weights are checked to give the same losses (so the three compute the
same thing). Times are medians over round-robin repeats after warm-up.

Prints a readable table, then as the last line one JSON object with the figures, among them
`bridged_over_eager` and `bridged_over_flax` (step-time ratios of the bridged block form).

Run: .venv/bin/python benchmarks/bridge_speed.py [--batch 8 --seq 128 --layers 4 --repeats 20]
"""
from __future__ import annotations

import argparse
import copy
import functools
import json
import os
import statistics
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
import torch  # noqa: E402

from bridge import testing  # noqa: E402
from bridge.program import bridge_model  # noqa: E402


class RMSNorm(nn.Module):
  eps: float

  @nn.compact
  def __call__(self, x):
    w = self.param("weight", nn.initializers.ones, (x.shape[-1],))
    x32 = x.astype(jnp.float32)
    return w * (x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, -1, keepdims=True) + self.eps)).astype(x.dtype)


def _rotate_half(x):
  half = x.shape[-1] // 2
  return jnp.concatenate([-x[..., half:], x[..., :half]], -1)


class Layer(nn.Module):
  """One HF-Llama decoder layer (eager attention semantics: additive finfo.min mask)."""
  heads: int
  kv_heads: int
  ffn: int
  eps: float

  @nn.compact
  def __call__(self, h, bias, cos, sin):
    b, t, d = h.shape
    hd = d // self.heads
    dense = lambda n, name: nn.Dense(n, use_bias=False, name=name)
    x = RMSNorm(self.eps, name="input_layernorm")(h)
    q = dense(self.heads * hd, "q_proj")(x).reshape(b, t, self.heads, hd).transpose(0, 2, 1, 3)
    k = dense(self.kv_heads * hd, "k_proj")(x).reshape(b, t, self.kv_heads, hd).transpose(0, 2, 1, 3)
    v = dense(self.kv_heads * hd, "v_proj")(x).reshape(b, t, self.kv_heads, hd).transpose(0, 2, 1, 3)
    q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
    rep = self.heads // self.kv_heads
    k, v = jnp.repeat(k, rep, axis=1), jnp.repeat(v, rep, axis=1)
    scores = jnp.einsum("bhqd,bhkd->bhqk", q, k) * hd ** -0.5 + bias
    attn = jax.nn.softmax(scores.astype(jnp.float32), -1).astype(q.dtype)
    out = jnp.einsum("bhqk,bhkd->bhqd", attn, v).transpose(0, 2, 1, 3).reshape(b, t, d)
    h = h + dense(d, "o_proj")(out)
    x = RMSNorm(self.eps, name="post_attention_layernorm")(h)
    return h + dense(d, "down_proj")(nn.silu(dense(self.ffn, "gate_proj")(x)) * dense(self.ffn, "up_proj")(x))


class FlaxLlama(nn.Module):
  vocab: int
  dim: int
  layers: int
  heads: int
  kv_heads: int
  ffn: int
  eps: float = 1e-6
  theta: float = 10000.0

  @nn.compact
  def __call__(self, ids, mask, labels):
    b, t = ids.shape
    h = nn.Embed(self.vocab, self.dim, name="embed_tokens")(ids)
    hd = self.dim // self.heads
    inv_freq = 1.0 / self.theta ** (jnp.arange(0, hd, 2, dtype=jnp.float32) / hd)
    freqs = jnp.arange(t, dtype=jnp.float32)[:, None] * inv_freq
    emb = jnp.concatenate([freqs, freqs], -1)
    cos, sin = jnp.cos(emb)[None, None], jnp.sin(emb)[None, None]
    allowed = jnp.tril(jnp.ones((t, t), bool))[None, None] & (mask[:, None, None, :] > 0)
    bias = jnp.where(allowed, 0.0, jnp.finfo(jnp.float32).min)
    for i in range(self.layers):
      h = Layer(self.heads, self.kv_heads, self.ffn, self.eps, name=f"layers_{i}")(h, bias, cos, sin)
    h = RMSNorm(self.eps, name="norm")(h)
    logits = nn.Dense(self.vocab, use_bias=False, name="lm_head")(h).astype(jnp.float32)
    target = jnp.pad(labels, ((0, 0), (0, 1)), constant_values=-100)[:, 1:]
    valid = target != -100
    logp = jax.nn.log_softmax(logits, -1)
    nll = -jnp.take_along_axis(logp, jnp.where(valid, target, 0)[..., None], -1)[..., 0]
    return jnp.sum(jnp.where(valid, nll, 0.0)) / jnp.sum(valid)


def flax_params_from_torch(model) -> dict:
  """HF Llama weights in FlaxLlama's layout (Dense kernels are the transposed torch weights)."""
  sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
  kernel = lambda name: {"kernel": jnp.asarray(sd[name].T)}
  params = {"embed_tokens": {"embedding": jnp.asarray(sd["model.embed_tokens.weight"])},
            "norm": {"weight": jnp.asarray(sd["model.norm.weight"])}, "lm_head": kernel("lm_head.weight")}
  for i in range(model.config.num_hidden_layers):
    p = f"model.layers.{i}."
    layer = {n: kernel(p + f"self_attn.{n}.weight") for n in ("q_proj", "k_proj", "v_proj", "o_proj")}
    layer |= {n: kernel(p + f"mlp.{n}.weight") for n in ("gate_proj", "up_proj", "down_proj")}
    layer |= {n: {"weight": jnp.asarray(sd[p + f"{n}.weight"])} for n in ("input_layernorm", "post_attention_layernorm")}
    params[f"layers_{i}"] = layer
  return {"params": params}


def _median_times(fns: dict, repeats: int) -> dict:
  """Median seconds per call of each function, timed round-robin so that load from other
  processes on the machine hits every implementation alike."""
  for fn in fns.values():  # warm-up (and compile)
    fn()
    fn()
  times = {name: [] for name in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      t0 = time.perf_counter()
      fn()
      times[name].append(time.perf_counter() - t0)
  return {name: statistics.median(t) for name, t in times.items()}


def _jax_trainer(loss_fn, tx, params, batch):
  """`step()` running one donated, jitted training step of `loss_fn` with `tx`; returns the loss."""
  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def train_step(params, opt_state, batch):
    loss, grads = jax.value_and_grad(loss_fn)(params, batch)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  params = jax.tree.map(jnp.array, params)  # own copies: they are donated
  state = {"params": params, "opt": tx.init(params)}

  def step():
    state["params"], state["opt"], loss = train_step(state["params"], state["opt"], batch)
    return jax.block_until_ready(loss)
  return step


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--seq", type=int, default=128)
  ap.add_argument("--layers", type=int, default=4)
  ap.add_argument("--hidden", type=int, default=64)
  ap.add_argument("--vocab", type=int, default=256)
  ap.add_argument("--repeats", type=int, default=20)
  args = ap.parse_args()
  jax.config.update("jax_default_matmul_precision", "highest")  # fp32 like torch on CPU
  hyper = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)

  model = testing.tiny_causal_lm("llama", layers=args.layers, hidden=args.hidden, vocab=args.vocab)
  batch = testing.lm_batch(args.batch, args.seq, args.vocab)
  tensors = {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}
  check_model = copy.deepcopy(model)  # the same weights, for the equivalence check
  fparams = flax_params_from_torch(model)

  t0 = time.perf_counter()
  bridged = bridge_model(model, batch, torch.optim.AdamW(model.parameters(), **hyper))
  bridge_s = time.perf_counter() - t0
  flat = bridge_model(model, batch, torch.optim.AdamW(model.parameters(), **hyper), find_stack=False)
  prog, fprog = bridged.program, flat.program

  cfg = model.config
  flax_model = FlaxLlama(args.vocab, args.hidden, args.layers, cfg.num_attention_heads,
                         cfg.num_key_value_heads, cfg.intermediate_size, cfg.rms_norm_eps, cfg.rope_parameters["rope_theta"]
                         if getattr(cfg, "rope_parameters", None) else 10000.0)
  ids, mask, labels = (jnp.asarray(tensors[k].numpy()) for k in ("input_ids", "attention_mask", "labels"))
  fbatch = {"ids": ids, "mask": mask, "labels": labels}
  flax_tx = optax.adamw(hyper["lr"], b1=hyper["betas"][0], b2=hyper["betas"][1], eps=hyper["eps"],
                        weight_decay=hyper["weight_decay"])

  def flax_loss(p, b):
    return flax_model.apply(p, b["ids"], b["mask"], b["labels"])

  def make_steps():
    return {"bridged (scan blocks)": _jax_trainer(prog.loss, prog.optimizer, prog.params, prog.batch),
            "bridged (flat)": _jax_trainer(fprog.loss, fprog.optimizer, fprog.params, fprog.batch),
            "native flax": _jax_trainer(flax_loss, flax_tx, fparams, fbatch)}

  def torch_trainer(m):
    opt = torch.optim.AdamW(m.parameters(), **hyper)

    def step():
      opt.zero_grad(set_to_none=True)
      loss = m(**batch).loss
      loss.backward()
      opt.step()
      return loss.detach()
    return step

  # Equivalence: two training steps of each from the same weights give the same losses.
  t0 = time.perf_counter()
  checks = {"torch": torch_trainer(check_model), **make_steps()}
  losses = {name: [float(step()) for _ in range(2)] for name, step in checks.items()}
  compile_s = time.perf_counter() - t0
  ref = losses["torch"]
  worst = max(abs(a - b) for v in losses.values() for a, b in zip(v, ref))
  if worst > 1e-4:
    raise SystemExit(f"the implementations disagree on the losses of two training steps: {losses}")

  # torch's OpenMP threads stall badly when the cores are shared with other work, so it is
  # timed with its default thread count and with one thread; the faster is the baseline.
  threads = torch.get_num_threads()
  torch_step = torch_trainer(model)

  def torch_one_thread():
    torch.set_num_threads(1)
    torch_step()
    torch.set_num_threads(threads)

  measured = _median_times({
      f"torch eager ({threads} threads)": torch_step,
      "torch eager (1 thread)": torch_one_thread,
      **make_steps(),
  }, args.repeats)
  torch_name = min((k for k in measured if k.startswith("torch")), key=measured.get)
  times = {"torch eager": measured[torch_name], **{k: v for k, v in measured.items() if not k.startswith("torch")}}
  base_t, base_f = times["torch eager"], times["native flax"]
  print(f"tiny Llama: batch {args.batch}, seq {args.seq}, {args.layers} layers, hidden {args.hidden}, "
        f"vocab {args.vocab}, {prog.num_params:,} params; {os.cpu_count()} CPUs; full training step "
        "(forward, backward, AdamW update)")
  print(f"bridge_model {bridge_s:.1f} s; first two steps of all (with compiles) {compile_s:.1f} s; "
        f"losses of 2 steps agree to {worst:.1e}")
  print(f"torch eager: {', '.join(f'{k[12:]} {1e3 * t:.1f} ms' for k, t in measured.items() if k.startswith('torch'))}"
        f" (baseline: the faster); load average {os.getloadavg()[0]:.1f}")
  print(f"{'implementation':24} {'ms/step':>9} {'/ torch':>8} {'/ flax':>8}")
  for name, t in times.items():
    print(f"{name:24} {1e3 * t:>9.2f} {t / base_t:>8.2f} {t / base_f:>8.2f}")
  print(json.dumps({
      "step": "forward+backward+AdamW update", "batch": args.batch, "seq": args.seq,
      "layers": args.layers, "params": prog.num_params,
      "ms": {k: round(1e3 * v, 3) for k, v in times.items()},
      "bridged_over_eager": round(times["bridged (scan blocks)"] / base_t, 3),
      "bridged_over_flax": round(times["bridged (scan blocks)"] / base_f, 3),
      "bridged_flat_over_eager": round(times["bridged (flat)"] / base_t, 3),
      "bridged_flat_over_flax": round(times["bridged (flat)"] / base_f, 3),
      "torch_baseline": torch_name, "load_average": round(os.getloadavg()[0], 2),
      "bridge_s": round(bridge_s, 2), "loss_max_diff": worst}))


if __name__ == "__main__":
  main()
