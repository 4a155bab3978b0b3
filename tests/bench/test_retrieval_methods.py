"""The benchmark's ranked methods: each part of the model alone, and the untrained recipe."""
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

from retrieval_quality import METHODS, method_descriptors  # noqa: E402


def test_parts_split_the_prototype_and_the_untrained_recipe_weighs_like_the_model():
    prototypes = np.array([[3.0, 4.0, 1.0, 0.0, 0.0]])  # learned part (2), colour part (3)
    means = {"lab": np.array([[0.0, 2.0, 0.0]]), "block3": np.ones((1, 4)), "blocks345": np.ones((1, 6)),
             "hypercolumn": np.array([[0.0, 5.0]])}
    colour = np.full((1, 512), 1 / 512)
    described = method_descriptors(means, prototypes, colour, embedding_dim=2, colour_weight=0.36)
    assert set(described) | {"model", "chance"} == set(METHODS)
    assert described["model_learned"].tolist() == [[3.0, 4.0]]
    assert described["model_colour"].tolist() == [[0.0, 2.0, 0.0]]
    # each part unit-normalised, then weighted sqrt(1 - w) and sqrt(w), as the model's pixels are
    assert described["hypercolumn_colour"][0] == pytest.approx([0.0, 0.8, 0.0, 0.6, 0.0])
    assert described["backbone"] is means["block3"] and described["colour_histogram"] is colour


def test_a_model_without_colour_code_is_compared_at_half_weight():
    means = {"lab": np.array([[1.0, 0.0]]), "block3": np.ones((1, 1)), "blocks345": np.ones((1, 1)),
             "hypercolumn": np.array([[1.0]])}
    described = method_descriptors(means, np.ones((1, 3)), np.ones((1, 8)), embedding_dim=3, colour_weight=0.0)
    assert described["hypercolumn_colour"][0] == pytest.approx([np.sqrt(0.5), np.sqrt(0.5), 0.0])
    assert described["model_learned"].shape == (1, 3)
