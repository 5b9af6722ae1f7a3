"""Fixtures of the training tests: the tiny sentiment run's data files (its config: ``helpers.training``)."""

from __future__ import annotations

import pytest

from helpers.data import write_sentiment_data


@pytest.fixture
def data(tmp_path):
    """40 training and 12 test rows of tiny-vocabulary sentiment, as {"train": path, "test": path}."""
    return {
        "train": str(write_sentiment_data(tmp_path / "train.jsonl", 40, seed=1)),
        "test": str(write_sentiment_data(tmp_path / "test.jsonl", 12, seed=2)),
    }
