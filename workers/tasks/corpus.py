"""The built-in character corpus: English-like text from a small seeded grammar (no download).

It has structure at several scales (spelling, agreement, arithmetic facts, nested clauses), so a
small model's loss falls steadily over thousands of steps and optimizers can be told apart.
"""

import random

_SUBJECTS = ["the optimizer", "a worker", "the scheduler", "every gradient", "the model", "our cluster",
             "the researcher", "a small network", "the parameter server", "each layer", "the learning rate",
             "the loss", "a straggler", "the aggregator", "this experiment"]
_VERBS = ["updates", "measures", "averages", "projects", "ignores", "reports", "compresses", "follows",
          "rejects", "tracks", "merges", "shrinks", "balances", "restores", "schedules"]
_OBJECTS = ["the weights", "a noisy estimate", "the low-rank subspace", "its momentum", "the checkpoint",
            "every metric", "the validation set", "a sharp minimum", "the coded gradient", "the batch",
            "the singular vectors", "a flat region", "the outliers", "the final accuracy", "the queue"]
_ADVERBS = ["quickly", "carefully", "again", "slowly", "twice", "in parallel", "without delay", "at night"]
_CONNECT = ["because", "while", "although", "so that", "after", "before", "unless"]
_NUMBERS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
            "eleven", "twelve"]


def _clause(rng: random.Random) -> str:
    words = [rng.choice(_SUBJECTS), rng.choice(_VERBS), rng.choice(_OBJECTS)]
    if rng.random() < 0.4:
        words.append(rng.choice(_ADVERBS))
    return " ".join(words)


def _sentence(rng: random.Random) -> str:
    r = rng.random()
    if r < 0.15:
        a, b = rng.randrange(13), rng.randrange(13)
        if a + b < 13:
            return f"{_NUMBERS[a]} plus {_NUMBERS[b]} is {_NUMBERS[a + b]}."
        return f"{a} plus {b} is {a + b}."
    if r < 0.25:
        n = rng.randrange(2, 9)
        return "count: " + ", ".join(_NUMBERS[i] for i in range(n)) + "."
    text = _clause(rng)
    if rng.random() < 0.5:
        text += f" {rng.choice(_CONNECT)} {_clause(rng)}"
    return text[0].upper() + text[1:] + "."


def generate_corpus(n_chars: int = 1_000_000, seed: int = 0) -> str:
    rng = random.Random(seed)
    parts: list[str] = []
    size = 0
    while size < n_chars:
        paragraph = " ".join(_sentence(rng) for _ in range(rng.randrange(3, 8))) + "\n"
        parts.append(paragraph)
        size += len(paragraph)
    return "".join(parts)[:n_chars]
