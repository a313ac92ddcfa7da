"""Inception Score over consecutive splits of 5000 samples, as ADM's evaluator (synthetic logits: the packaged
Inception has no classifier)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import StubInception

from maetok.eval.fid import extract_features
from maetok.eval.generation import generation_metrics, reference_from_images
from maetok.eval.metrics import inception_score, inception_score_split_note, inception_score_split_sizes

NUM_CLASSES = 32


def confident_spread(num: int, classes: int) -> torch.Tensor:
    """``(num, NUM_CLASSES)`` logits: one-hot predictions spread evenly over ``classes`` classes, so IS = classes."""
    assert num % classes == 0
    labels = torch.arange(classes).repeat(num // classes)
    return torch.nn.functional.one_hot(labels, NUM_CLASSES).double() * 1000.0  # exp(-1000) == 0 in float64


def test_split_sizes_follow_adm():
    assert inception_score_split_sizes(50000) == [5000] * 10
    assert inception_score_split_sizes(10000) == [5000, 5000]
    assert inception_score_split_sizes(12000) == [5000, 5000, 2000]
    assert inception_score_split_sizes(3000) == [3000]
    assert inception_score_split_note(50000) is None
    assert "5000/5000/2000" in inception_score_split_note(12000)


def test_12000_samples_give_three_consecutive_splits():
    # split i (5000, 5000, 2000 samples) spreads confident predictions over C_i classes: IS_i = C_i exactly
    classes = (4, 10, 25)
    logits = torch.cat([confident_spread(5000, 4), confident_spread(5000, 10), confident_spread(2000, 25)])
    mean, std = inception_score(logits)
    assert mean == pytest.approx(np.mean(classes), rel=1e-12)  # 13: the mean over the three splits
    assert std == pytest.approx(np.std(classes), rel=1e-12)


def test_fewer_than_5000_samples_is_one_split():
    logits = confident_spread(3000, 6)
    mean, std = inception_score(logits)
    assert mean == pytest.approx(6.0, rel=1e-12) and std == 0.0
    # one split over all samples: a different split size changes the score here
    assert inception_score(torch.cat([confident_spread(1500, 3), confident_spread(1500, 5)]))[0] != pytest.approx(4.0)


def test_identical_predictions_give_one():
    logits = torch.randn(1, NUM_CLASSES, dtype=torch.float64).repeat(12000, 1)
    mean, std = inception_score(logits)
    assert mean == pytest.approx(1.0, abs=1e-12) and std == pytest.approx(0.0, abs=1e-12)


def test_generation_metrics_report_split_size_and_count():
    stub = StubInception()
    rng = np.random.default_rng(0)
    reference = reference_from_images(rng.integers(0, 256, (20, 8, 8, 3), dtype=np.uint8), stub, progress=False)
    samples = rng.integers(0, 256, (23, 8, 8, 3), dtype=np.uint8)
    result = generation_metrics(samples, reference, stub, inception_score_split_size=10, progress=False)
    assert result["inception_score_split_size"] == 10 and result["inception_score_splits"] == 3
    logits = extract_features(samples, stub, progress=False)["logits"]
    assert result["inception_score"] == pytest.approx(inception_score(logits, 10)[0], rel=1e-6)
    assert any("10/10/3" in note for note in result["notes"])

