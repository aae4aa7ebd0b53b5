"""Regenerate forge's bundled demo data and tokenizer (committed; run only to change them).

    python -m forge.demo._make_assets

The data are templated question/answer chats about arithmetic, capitals, opposites and
plurals: regular enough that a 1M-parameter model learns them in a minute, varied enough
that the loss curve means something. Everything is seeded, so the files are reproducible.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).parent

CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid",
    "Portugal": "Lisbon", "Japan": "Tokyo", "China": "Beijing", "India": "New Delhi",
    "Canada": "Ottawa", "Brazil": "Brasilia", "Egypt": "Cairo", "Kenya": "Nairobi",
    "Peru": "Lima", "Chile": "Santiago", "Norway": "Oslo", "Sweden": "Stockholm",
    "Finland": "Helsinki", "Poland": "Warsaw", "Greece": "Athens", "Ireland": "Dublin",
    "Austria": "Vienna", "Hungary": "Budapest", "Turkey": "Ankara", "Australia": "Canberra",
}
OPPOSITES = {
    "hot": "cold", "big": "small", "fast": "slow", "up": "down", "light": "dark",
    "open": "closed", "early": "late", "happy": "sad", "full": "empty", "old": "new",
    "hard": "soft", "high": "low", "wet": "dry", "strong": "weak", "rich": "poor",
}
PLURALS = {
    "mouse": "mice", "child": "children", "foot": "feet", "tooth": "teeth", "man": "men",
    "woman": "women", "goose": "geese", "person": "people", "cactus": "cacti",
    "leaf": "leaves", "knife": "knives", "box": "boxes", "city": "cities", "fish": "fish",
}
SYSTEM = "You are a concise assistant."


def _qa(rng: random.Random) -> tuple[str, str, str]:
    """One (question, right answer, wrong answer)."""
    kind = rng.choice(["add", "sub", "capital", "opposite", "plural"])
    if kind == "add":
        a, b = rng.randint(0, 20), rng.randint(0, 20)
        wrong = a + b + rng.choice([-2, -1, 1, 2])
        return f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}.", f"{a} plus {b} is {wrong}."
    if kind == "sub":
        a = rng.randint(5, 30)
        b = rng.randint(0, a)
        wrong = a - b + rng.choice([-1, 1, 3])
        return f"What is {a} minus {b}?", f"{a} minus {b} is {a - b}.", f"{a} minus {b} is {wrong}."
    if kind == "capital":
        country = rng.choice(sorted(CAPITALS))
        other = rng.choice([c for c in sorted(CAPITALS.values()) if c != CAPITALS[country]])
        return (f"What is the capital of {country}?",
                f"The capital of {country} is {CAPITALS[country]}.",
                f"The capital of {country} is {other}.")
    if kind == "opposite":
        word = rng.choice(sorted(OPPOSITES))
        return (f"What is the opposite of {word}?", f"The opposite of {word} is {OPPOSITES[word]}.",
                f"The opposite of {word} is {word}.")
    word = rng.choice(sorted(PLURALS))
    return (f"What is the plural of {word}?", f"The plural of {word} is {PLURALS[word]}.",
            f"The plural of {word} is {word}s.")


def make_sft(n: int = 400, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        question, answer, _ = _qa(rng)
        messages = [{"role": "user", "content": question},
                    {"role": "assistant", "content": answer}]
        if i % 4 == 0:  # some rows carry a system prompt, as real chat data does
            messages.insert(0, {"role": "system", "content": SYSTEM})
        rows.append({"messages": messages})
    return rows


def make_dpo(n: int = 200, seed: int = 1) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        question, answer, wrong = _qa(rng)
        rows.append({"prompt": question, "chosen": answer, "rejected": wrong})
    return rows


def make_text(n: int = 120, seed: int = 2) -> list[dict]:
    """Raw documents for continued pre-training: a few facts in a row, of varying length."""
    rng = random.Random(seed)
    return [{"text": " ".join(_qa(rng)[1] for _ in range(rng.randint(2, 12)))} for _ in range(n)]


def make_tokenizer(texts: list[str], vocab_size: int = 1024):
    """A byte-level BPE (any text encodes) with ChatML special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def main() -> None:
    sft, dpo = make_sft(), make_dpo()
    for name, rows in (("demo_sft.jsonl", sft), ("demo_dpo.jsonl", dpo), ("demo_text.jsonl", make_text())):
        with open(HERE / name, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
    texts = [m["content"] for r in sft for m in r["messages"]]
    texts += [r[k] for r in dpo for k in ("prompt", "chosen", "rejected")]
    make_tokenizer(texts).save(str(HERE / "tokenizer.json"))
    # The tokenizer learns from the chats alone (the text rows repeat their sentences).
    print(f"wrote {len(sft)} sft rows, {len(dpo)} dpo rows, text rows and tokenizer.json to {HERE}")


if __name__ == "__main__":
    main()
