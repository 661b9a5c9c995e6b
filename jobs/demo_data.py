"""Generated data for the demo tasks: rows with the columns the demo tasks declare, deterministic per seed.

Each generator makes a task a tiny random-initialised model can learn in seconds, so fine-tuning
visibly lifts its score over the base model's.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from core.errors import NotFound

Row = dict[str, object]

POSITIVE = ["great", "wonderful", "lovely", "fun", "superb", "charming", "brilliant", "delightful"]
NEGATIVE = ["awful", "boring", "dull", "terrible", "bad", "tedious", "horrible", "clumsy"]
NEUTRAL = ["the", "movie", "plot", "film", "acting", "story", "was", "and", "very", "quite", "really", "ending"]
COLORS = ["red", "blue", "green", "yellow", "black", "white", "orange", "purple"]
OBJECTS = ["car", "house", "bird", "hat", "door", "ball", "cup", "kite", "boat", "lamp"]
WORDS = ["cat", "dog", "tree", "sun", "rain", "road", "book", "fish", "milk", "star", "wind", "rock", "leaf", "ship"]
SPLIT_SIZES = {"train": 2000, "test": 200, "validation": 200}


def _sentiment(rng: random.Random) -> Row:
    label = rng.choice(["positive", "negative"])
    cue = rng.choice(POSITIVE if label == "positive" else NEGATIVE)
    words = rng.sample(NEUTRAL, 4)
    words.insert(rng.randrange(len(words) + 1), cue)
    return {"review": " ".join(words), "label": label}


def _colors(rng: random.Random) -> Row:
    colors = rng.sample(COLORS, rng.randint(1, 3))
    parts = [f"a {color} {rng.choice(OBJECTS)}" for color in colors]
    return {"text": "I saw " + " and ".join(parts), "colors": colors}


def _similarity(rng: random.Random) -> Row:
    first = rng.sample(WORDS, 5)
    shared = rng.randint(0, 5)
    others = [w for w in WORDS if w not in first]
    second = rng.sample(first, shared) + rng.sample(others, 5 - shared)
    rng.shuffle(second)
    return {"sentence1": " ".join(first), "sentence2": " ".join(second), "label": float(shared)}


def _arithmetic(rng: random.Random) -> Row:
    a, b = rng.randint(0, 9), rng.randint(0, 9)
    return {"question": f"What is {a} plus {b}?", "answer": f"{a} plus {b} is {a + b}. #### {a + b}"}


GENERATORS: dict[str, Callable[[random.Random], Row]] = {
    "sentiment": _sentiment,
    "colors": _colors,
    "similarity": _similarity,
    "arithmetic": _arithmetic,
}


def demo_rows(generator: str, split: str, seed: int = 0) -> list[Row]:
    """The rows of one split of a demo task; train and test come from different seeds."""
    if generator not in GENERATORS:
        raise NotFound(f"unknown demo generator {generator!r}; known: {', '.join(GENERATORS)}")
    rng = random.Random(f"{generator}/{split}/{seed}")
    return [GENERATORS[generator](rng) for _ in range(SPLIT_SIZES.get(split, 200))]
