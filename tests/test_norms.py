"""--mode=norms: every layer's activation norm, equal at layer l to what the unlearning step logs."""
import json

import numpy as np
import pytest
from helpers import read_metrics

from armu_jax.config import config_with
from armu_jax.norms import norms_cli, plot_norms
from armu_jax.train import run


@pytest.mark.slow
def test_norm_profile_at_layer_l_is_the_steps_frozen_norm(tmp_path, tiny_llama):
    model = tiny_llama
    settings = dict(model=str(model), layer_id=2, forget_max_len=[48], retain_max_len=48, pad_multiple=32,
                    beta=3.0)
    # The step's first batch: topic 0's first 4 texts, norms over real tokens (loss_mask=tokens); the
    # second step's, topic 1, without each text's first token.
    for loss_mask, skip, topic in (("tokens", False, 0), ("tokens_after_first", True, 1)):
        out = tmp_path / f"run-{loss_mask}"
        run(config_with(**settings, loss_mask=loss_mask, norm_skip_first=skip, max_num_batches=2,
                        checkpoint_every=0, output_dir=str(out), export=False))
        logged = read_metrics(out)[topic]
        profile_dir = tmp_path / f"norms-{loss_mask}"
        norms_cli(config_with(**settings, mode="norms", norms_texts=4, norm_skip_first=skip,
                              output_dir=str(profile_dir)))
        report = json.loads((profile_dir / "norms.json").read_text())
        corpus = report["corpora"][["demo:bio", "demo:cyber"][topic]]
        norm = corpus["mean_skip_first"][2] if skip else corpus["mean"][2]
        assert norm == pytest.approx(logged["forget_norm_frozen"], rel=1e-5)
        assert corpus["coeff"][2] == pytest.approx(3.0 * logged["forget_norm_frozen"], rel=1e-5)
        assert len(corpus["mean"]) == 4 and corpus["texts"] == 4
        assert set(report["corpora"]) == {"demo:bio", "demo:cyber", "demo:retain"}
        assert np.all(np.array(corpus["std"]) > 0)
        for layer, (low, high) in enumerate(corpus["mean_ci"]):  # the interval over texts holds the mean
            assert low <= corpus["mean"][layer] <= high and high > low
        assert np.all(np.array(corpus["text_spread"]) > 0)
        (panel,) = plot_norms(tmp_path / "again.png", report)  # the figure: each corpus's profile by layer
        assert panel["lines"][f"{['demo:bio', 'demo:cyber'][topic]}: all tokens"] == (
            [0.0, 1.0, 2.0, 3.0], corpus["mean"])
        name = f"{['demo:bio', 'demo:cyber'][topic]}: all tokens"
        assert np.allclose(panel["errorbars"][name], corpus["mean_ci"])
        assert set(panel["lines"]) == {f"{c}: {w}" for c in report["corpora"] for w in ("all tokens", "without the first")}
        assert "| 2 |" in (profile_dir / "norms.md").read_text()
