"""bench/fusion_profile.py reads XLA's compiled HLO: each dot's FLOPs (2 x output x contraction), its
shapes and whether the autodiff transpose (the backward) made it, from a program compiled here."""
import sys

import jax
import jax.numpy as jnp
from helpers import ROOT

sys.path.insert(0, str(ROOT / "bench"))
import fusion_profile  # noqa: E402


def test_dot_flops_and_labels_from_compiled_hlo():
    x, w = jnp.ones((8, 16)), jnp.ones((16, 24))
    hlo = jax.jit(lambda x, w: x @ w).lower(x, w).compile().as_text()
    flops, label = fusion_profile.dot_flops(hlo)
    assert flops == 2 * 8 * 16 * 24
    assert label.startswith("forward") and "[8, 16]x[16, 24]->[8, 24]" in label

    q, k = jnp.ones((2, 3, 5, 4)), jnp.ones((2, 3, 7, 4))  # a batched dot: the batch dims count once
    hlo = jax.jit(lambda q, k: jnp.einsum("bhqd,bhkd->bhqk", q, k)).lower(q, k).compile().as_text()
    assert fusion_profile.dot_flops(hlo)[0] == 2 * (2 * 3 * 5 * 7) * 4

    hlo = jax.jit(jax.grad(lambda w, x: jnp.sum(jnp.tanh(x @ w)))).lower(w, x).compile().as_text()
    dots = sorted(fusion_profile.dot_flops(body) for body in hlo.split("\n\n") if " dot(" in body)
    # the forward x @ w (tanh' needs it) and dL/dw = x^T g, [16, 24] over 8 rows: the same FLOPs
    assert [flops for flops, _ in dots] == [2 * 8 * 16 * 24] * 2
    assert sorted(label.split()[0] for _, label in dots) == ["backward", "forward"]

    assert fusion_profile.dot_flops("%p = f32[4]{0} parameter(0)\nROOT %n = f32[4]{0} negate(%p)") == (0.0, "")
    assert fusion_profile.kind_of("ynn_fusion.3", "ROOT %d = f32[2,2]{1,0} dot(%a, %b)") == "dot"
    assert fusion_profile.kind_of("transpose_copy_fusion.1", "") == "copy/transpose"
    assert fusion_profile.kind_of("add_divide_fusion.2", "") == "elementwise/reduce"
