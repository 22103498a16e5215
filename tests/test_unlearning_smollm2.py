"""The unlearning run against the independent PyTorch reference loop on the real SmolLM2-135M (the tiny model's
cases and the comparison itself: test_unlearning.py)."""
import pytest
from test_unlearning import MODES, _compare

pytestmark = pytest.mark.reference


@pytest.mark.parametrize("method,adaptive_coeff", MODES[1:])
def test_smollm2_matches_reference_at_reference_settings(tmp_path, smollm2_dir, method, adaptive_coeff):
    """lr 5e-5, alpha 1200: the forget loss and the coefficient agree to TIGHT (6 steps: each topic's
    first batch and two updates after it). Both Adaptive RMU modes here; RMU on SmolLM2 is the
    chaotic test below, and every mode at c 6.5 is the tiny-model test above."""
    _compare(tmp_path, smollm2_dir, method, adaptive_coeff, layer_id=3, lr=5e-5, alpha=1200.0, steering=6.5,
             max_len=[64, 48], steps=6)


def test_smollm2_matches_reference_on_a_chaotic_trajectory(tmp_path, smollm2_dir):
    """lr 1e-3, alpha 100: the retain loss jumps 4 -> 159; tolerance from the measured last-bit drift."""
    _compare(tmp_path, smollm2_dir, "rmu", "first_batch", layer_id=3, lr=1e-3, alpha=100.0, steering=60.0,
             max_len=[64, 48])
