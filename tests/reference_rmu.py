"""An independent PyTorch version of the reference RMU / Adaptive RMU loop (the test oracle).

Written from the reference's description, not from armu_jax: two HF models (frozen and
updated), a forward hook on layer l (each model cut after layer l and run without its head: the reference
runs the rest and drops it, and nothing past layer l reaches the loss; on SmolLM2 at l = 3 that is 4 of
30 layers and no 49152-word head, about 6x less work), torch's mse_loss over the padded batch, the
transformers.AdamW (2024) arithmetic, step idx -> topic idx % n, batch idx // n.
"""
from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
import transformers


def forward_with_cache(model, inputs, module, no_grad):
    cache = []

    def hook(_module, _inputs, output):
        cache.append(output[0] if isinstance(output, tuple) else output)

    handle = module.register_forward_hook(hook)
    with torch.set_grad_enabled(not no_grad):
        model(**inputs)
    handle.remove()
    return cache[0]


def after_first_weight(inputs):
    """[B, T]: 1 on real tokens except each row's first (left padding: the first 1 of the mask)."""
    mask = inputs["attention_mask"].float()
    w = mask.clone()
    w[torch.arange(mask.shape[0]), mask.argmax(dim=1)] = 0.0
    return w


def mean_norm(h, inputs, after_first):
    if not after_first:
        return torch.mean(h.norm(dim=-1).mean(dim=1), dim=0).item()
    w = after_first_weight(inputs)
    return torch.mean((h.norm(dim=-1) * w).sum(1) / w.sum(1)).item()


def masked_mse(a, b, inputs):
    w = after_first_weight(inputs)
    return (((a - b) ** 2).sum(-1) * w).sum() / (w.sum() * a.shape[-1])


class HFAdamW:
    """transformers.AdamW (correct_bias=True) as of 2024."""

    def __init__(self, params, lr, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0):
        self.params, self.lr, self.betas, self.eps, self.wd = list(params), lr, betas, eps, weight_decay
        self.state = [{"step": 0, "exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}
                      for p in self.params]

    @torch.no_grad()
    def step(self):
        b1, b2 = self.betas
        for p, st in zip(self.params, self.state):
            st["step"] += 1
            st["exp_avg"].mul_(b1).add_(p.grad, alpha=1.0 - b1)
            st["exp_avg_sq"].mul_(b2).addcmul_(p.grad, p.grad, value=1.0 - b2)
            denom = st["exp_avg_sq"].sqrt().add_(self.eps)
            step_size = self.lr * math.sqrt(1.0 - b2 ** st["step"]) / (1.0 - b1 ** st["step"])
            p.addcdiv_(st["exp_avg"], denom, value=-step_size)
            if self.wd > 0.0:
                p.add_(p, alpha=-self.lr * self.wd)


def run_reference(model_dir, forget_texts, retain_texts, control_vectors, *, method, layer_id, steps, lr,
                  alphas, steering_coeffs=None, beta=5.0, adaptive_coeff="first_batch", batch_size=4,
                  forget_max_len=(512, 768), retain_max_len=512, after_first=False, perturb=False):
    """perturb: start the updated model's trained weights one float32 ulp away from the frozen ones
    (toward +inf), the smallest change of an input, to measure how much the trajectory amplifies
    last-bit differences. after_first: our variant --loss_mask=tokens_after_first --norm_skip_first (means over real
    tokens except each row's first, in the losses and the adaptive norm). Returns (per-step dicts of loss/forget_loss/retain_loss/coeff, {layer: final down_proj weight})."""
    torch.manual_seed(0)
    frozen = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    updated = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    tokenizer.pad_token, tokenizer.padding_side = tokenizer.eos_token, "left"
    for model in (frozen, updated):
        model.model.layers = model.model.layers[:layer_id + 1]
    layers = [layer_id - 2, layer_id - 1, layer_id]
    for p in updated.parameters():
        p.requires_grad_(False)
    trained = [updated.model.layers[i].mlp.down_proj.weight for i in layers]
    with torch.no_grad():
        for p in trained:
            if perturb:
                p.copy_(torch.nextafter(p, torch.full_like(p, float("inf"))))
            p.requires_grad_(True)
    optimizer = HFAdamW(trained, lr=lr)
    frozen_module, updated_module = frozen.model.layers[layer_id], updated.model.layers[layer_id]
    forget = [[t[i:i + batch_size] for i in range(0, len(t), batch_size)] for t in forget_texts]
    retain = [[t[i:i + batch_size] for i in range(0, len(t), batch_size)] for t in retain_texts]
    n = len(forget)
    coeffs = {}
    history = []
    for idx in range(steps):
        topic, b = idx % n, idx // n
        u = torch.tensor(control_vectors[topic]).view(1, 1, -1)
        forget_inputs = tokenizer(forget[topic][b], return_tensors="pt", padding=True, truncation=True,
                                  max_length=forget_max_len[topic])
        h_forget = forward_with_cache(updated.model, forget_inputs, updated_module, no_grad=False)
        if method == "rmu":
            coeff = steering_coeffs[topic]
        elif adaptive_coeff == "per_batch":
            frozen_forget = forward_with_cache(frozen.model, forget_inputs, frozen_module, no_grad=True)
            coeff = beta * mean_norm(frozen_forget, forget_inputs, after_first)
        else:
            if topic not in coeffs:
                coeffs[topic] = beta * mean_norm(h_forget.detach(), forget_inputs, after_first)
            coeff = coeffs[topic]
        if after_first:
            forget_loss = masked_mse(h_forget, u * coeff, forget_inputs)
        else:
            with warnings.catch_warnings():  # the reference broadcasts the [1, 1, D] target on purpose
                warnings.simplefilter("ignore", UserWarning)
                forget_loss = F.mse_loss(h_forget, u * coeff)
        retain_inputs = tokenizer(retain[topic][b], return_tensors="pt", padding=True, truncation=True,
                                  max_length=retain_max_len)
        h_retain = forward_with_cache(updated.model, retain_inputs, updated_module, no_grad=False)
        h_retain_frozen = forward_with_cache(frozen.model, retain_inputs, frozen_module, no_grad=True)
        retain_loss = (masked_mse(h_retain, h_retain_frozen, retain_inputs) if after_first
                       else F.mse_loss(h_retain, h_retain_frozen)) * alphas[topic]
        loss = forget_loss + retain_loss
        for p in trained:
            p.grad = None
        loss.backward()
        optimizer.step()
        history.append({"loss": loss.item(), "forget_loss": forget_loss.item(),
                        "retain_loss": retain_loss.item(), "coeff": float(coeff)})
    return history, {i: p.detach().numpy().copy() for i, p in zip(layers, trained)}
