"""benchmarks/per_example_mia.py: the pure statistics of the U-LiRA benchmark, on synthetic Gaussians."""
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import per_example_mia as pem


def test_logit_confidence_is_exact_and_finite():
    """phi = log(p_y / (1 - p_y)) from logits, also where softmax rounds p_y to 1."""
    z = torch.tensor([[1.0, 2.0, 0.5], [0.0, 0.0, 0.0], [200.0, -50.0, 0.0]])
    y = torch.tensor([1, 2, 0])
    p = torch.softmax(z.double(), 1)[torch.arange(3), y]
    phi = pem.logit_confidence(z, y)
    assert np.allclose(phi[:2], torch.log(p / (1 - p))[:2].numpy())
    assert phi[1] == pytest.approx(math.log(0.5))  # 1/3 vs 2/3
    assert phi[2] == pytest.approx(200.0, abs=1e-6)  # 200 - logsumexp(-50, 0)


def _gaussians(targets, per_side, shift, seed=0):
    rng = np.random.default_rng(seed)
    centre = rng.normal(0, 3, (targets, 1))  # each target its own scale, as instances differ
    return centre + shift + rng.normal(0, 1, (targets, per_side)), centre + rng.normal(0, 1, (targets, per_side))


def test_identical_distributions_give_chance_auc_and_small_epsilon():
    phi_in, phi_out = _gaussians(200, 16, 0.0)
    s_in, s_out = pem.ulira_scores(phi_in, phi_out)
    assert abs(pem.auc(s_in, s_out) - 0.5) < 0.05
    g_in, g_out = pem.ulira_scores(phi_in, phi_out, "global")
    assert abs(pem.auc(g_in, g_out) - 0.5) < 0.05
    lo, hi = pem.bootstrap_auc(s_in, s_out, n_boot=200)
    assert lo < 0.5 < hi
    assert pem.tpr_at_fpr(s_in, s_out, 0.01) < 0.05
    # epsilon needs many models per target to approach 0 (with few, chance gaps read as leakage)
    rng = np.random.default_rng(1)
    assert pem.epsilon(rng.normal(0, 1, 4000), rng.normal(0, 1, 4000)) < 0.2


def test_few_models_per_side_are_not_biased():
    """4 vs 4 models per target: the leave-one-out fits on both sides have the same size, so
    identical distributions read AUC 0.5 (fitting the other side on all 4 read 0.44)."""
    phi_in, phi_out = _gaussians(1000, 4, 0.0, seed=3)
    for variance in ("target", "global"):
        assert abs(pem.auc(*pem.ulira_scores(phi_in, phi_out, variance)) - 0.5) < 0.02
    shifted = pem.ulira_scores(*_gaussians(1000, 4, 1.0, seed=3))
    assert pem.auc(*shifted) > 0.6


def test_separated_distributions_give_auc_one_and_large_epsilon():
    phi_in, phi_out = _gaussians(50, 16, 12.0)
    s_in, s_out = pem.ulira_scores(phi_in, phi_out)
    assert pem.auc(s_in, s_out) > 0.99
    assert pem.tpr_at_fpr(s_in, s_out, 0.001) > 0.9
    summary = pem.attack_summary(phi_in, phi_out, n_boot=50)
    assert summary["auc_ci95"][0] > 0.98 and summary["separated"] == 1.0
    assert summary["epsilon_mean"] == pytest.approx(math.log(16))  # inf capped at log(models per side)
    assert summary["forgetting_quality"] < 0.01
    # the direction does not matter: an attack may also threshold from below
    assert math.isinf(pem.epsilon(phi_out[0], phi_in[0]))
    # overlapping: finite, between the two
    rng = np.random.default_rng(2)
    eps = pem.epsilon(rng.normal(1.5, 1, 4000), rng.normal(0, 1, 4000))
    assert 0.5 < eps < 5


def test_epsilon_matches_the_formula_on_a_hand_example():
    """pos (1, 2, 3, 4) vs neg (0, 1.5, 2.5, 5): the best attack is 'phi > 1.5' (FPR 2/4, FNR 1/4),
    epsilon log((1 - delta - 1/2) / (1/4)) = log 2; the same as a brute force over every threshold
    and both directions, skipping ratios with a zero or negative side."""
    pos, neg, delta = np.array([1.0, 2.0, 3.0, 4.0]), np.array([0.0, 1.5, 2.5, 5.0]), 1e-5
    best = 0.0
    for thr in [-np.inf, 0.0, 1.0, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0]:
        for above in (True, False):
            fpr = np.mean(neg > thr if above else neg <= thr)
            fnr = 1 - np.mean(pos > thr if above else pos <= thr)
            if fpr > 0 and fnr > 0:
                best = max([best] + [math.log(n / d) for n, d in ((1 - delta - fpr, fnr), (1 - delta - fnr, fpr)) if n > 0])
    assert pem.epsilon(pos, neg, delta) == pytest.approx(best)
    assert best == pytest.approx(math.log((0.5 - delta) / 0.25))


def test_forgetting_quality_bins():
    assert pem.forgetting_quality(np.zeros(5)) == 1.0  # first bin: 2 / 2^1
    assert pem.forgetting_quality(np.array([0.6])) == 0.5  # second bin
    assert pem.forgetting_quality(np.array([math.inf])) == pytest.approx(2 / 2**13)


def test_balanced_membership_and_sides():
    member = pem.balanced_membership(targets=10, shadows_per_side=4, seed=0)
    assert member.shape == (8, 10) and (member.sum(0) == 4).all()
    assert not (member == pem.balanced_membership(10, 4, seed=1)).all()
    phi = np.arange(80, dtype=float).reshape(8, 10)
    phi_in, phi_out = pem.split_sides(phi, member, positive=-phi)
    assert phi_in.shape == phi_out.shape == (10, 4)
    assert (phi_in <= 0).all() and (phi_out >= 0).all()
    assert sorted(-phi_in[3]) == sorted(phi[member[:, 3], 3])


def test_epsilon_null_is_the_small_sample_floor():
    """Between identical distributions, few models per side still read as some epsilon; more read less."""
    few, f_few = pem.epsilon_null(4, 4, draws=200)
    many, f_many = pem.epsilon_null(200, 200, draws=50)
    assert 0.3 < few <= math.log(4) and many < few and f_many > f_few
