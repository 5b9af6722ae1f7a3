"""Data files for tests: labelled sentiment rows in the tiny vocabulary, and where the real datasets are."""

from __future__ import annotations

import json
import random
from pathlib import Path

from helpers import REPO

SHARED_DATA = REPO.parent / "shared" / "data"
"""The real datasets (SST-2, AG News, TREC, E2E) beside the repository; tests skip when it is absent."""


def write_sentiment_data(path: Path, n: int, seed: int = 0) -> Path:
    """Labelled rows in the tiny vocabulary: 'good'/'great'/'fun' texts are positive, 'bad'/... negative."""
    rng = random.Random(seed)
    pos, neg, filler = (
        ["good", "great", "fun", "love"],
        ["bad", "terrible", "boring", "hate"],
        ["the", "film", "food", "service", "plot", "staff", "very", "really"],
    )
    with open(path, "w") as f:
        for i in range(n):
            label = "positive" if i % 2 == 0 else "negative"
            words = rng.sample(filler, 3) + [rng.choice(pos if label == "positive" else neg)]
            rng.shuffle(words)
            f.write(json.dumps({"text": " ".join(words), "label": label}) + "\n")
    return path
