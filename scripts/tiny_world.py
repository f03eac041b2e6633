"""The synthetic world of the default run: deterministic from a seed, no download.

Two kinds of text come out of it:

* a pretraining corpus (``corpus_documents``): facts (made-up countries and their capitals,
  opposites) and skills written out (word lists reversed, numbers sorted), in sentences and short
  two-line documents. The tiny base model is pretrained on it once, by ``make_tiny_assets.py``;
* Alpaca-format instruction records (``instruction_records``) asking for the same knowledge and
  skills in the Alpaca prompt format, which the base has never seen. Each question appears once,
  so a random held-out split asks about countries and lists the fine-tuning never showed: the
  adapter has to learn the format and reach the base's knowledge, not memorize answers.
"""

from __future__ import annotations

import random

OPPOSITES = [
    ("hot", "cold"), ("big", "small"), ("fast", "slow"), ("up", "down"), ("happy", "sad"),
    ("light", "dark"), ("old", "new"), ("open", "closed"), ("early", "late"), ("full", "empty"),
    ("hard", "soft"), ("high", "low"), ("long", "short"), ("rich", "poor"), ("strong", "weak"),
    ("wet", "dry"), ("loud", "quiet"), ("clean", "dirty"), ("thick", "thin"), ("near", "far"),
    ("first", "last"), ("inside", "outside"), ("day", "night"), ("win", "lose"), ("buy", "sell"),
    ("left", "right"), ("push", "pull"), ("true", "false"), ("smooth", "rough"), ("sweet", "sour"),
    ("young", "elderly"), ("sharp", "dull"), ("wide", "narrow"), ("safe", "dangerous"), ("give", "take"),
    ("begin", "end"), ("above", "below"), ("friend", "enemy"), ("north", "south"), ("east", "west"),
]
LIST_WORDS = [
    "apple", "river", "stone", "cloud", "tiger", "lamp", "green", "bread", "music", "glass",
    "horse", "paper", "silver", "window", "garden", "rabbit", "candle", "forest", "orange", "pencil",
    "bottle", "castle", "dragon", "island", "jacket", "kettle", "ladder", "mirror", "needle", "pillow",
]
_ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "kr", "st", "tr", "th"]
_VOWELS = ["a", "e", "i", "o", "u", "ai", "or", "an", "el", "in"]
_CODAS = ["", "", "n", "r", "s", "l", "th", "m"]


def _name(rng: random.Random, syllables: int) -> str:
    word = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(syllables)) + rng.choice(_CODAS)
    return word.capitalize()


def countries(seed: int = 0, count: int = 80) -> list[tuple[str, str]]:
    """(country, capital) pairs with unique made-up names."""
    rng = random.Random(seed)
    seen: set[str] = set()
    pairs = []
    while len(pairs) < count:
        country = _name(rng, rng.choice([2, 3])) + rng.choice(["ia", "land", "ora", "stan", ""])
        capital = _name(rng, rng.choice([2, 3]))
        if country in seen or capital in seen:
            continue
        seen.update((country, capital))
        pairs.append((country, capital))
    return pairs


def _word_list(rng: random.Random) -> list[str]:
    return rng.sample(LIST_WORDS, rng.randint(3, 5))


def _numbers(rng: random.Random) -> list[int]:
    return rng.sample(range(1, 40), rng.randint(3, 5))


def corpus_documents(seed: int = 0, num_skill_lines: int = 12000, num_two_line: int = 6000, fact_repeats: int = 6) -> list[str]:
    """Pretraining documents (one string each; some span two lines):

    * every fact three ways, ``fact_repeats`` times over, so the tiny model memorizes them;
    * many distinct worked skill examples, too many to memorize, so it learns the skills;
    * two-line documents that name a thing on one line and use it on the next ("Here are some
      words: ... / Backwards they read: ..."), so it learns to reach back across lines, as an
      answer to a prompt must. Their wording is not the Alpaca template's: fine-tuning still has
      the prompt format to learn.
    """
    rng = random.Random(seed + 1)
    facts = []
    for country, capital in countries(seed):
        facts += [
            f"The capital of {country} is {capital}.",
            f"{capital} is the capital of {country}.",
            f"{capital} is a city in {country}, and the capital of {country} is {capital}.",
            f"Tell me about {country}.\nThe capital of {country} is {capital}.",
        ]
    for a, b in OPPOSITES:
        facts += [f"The opposite of {a} is {b}.", f"The opposite of {b} is {a}.", f"{a.capitalize()} and {b} are opposites.",
                  f"Think of the word {a}.\nThe opposite of {a} is {b}.", f"Think of the word {b}.\nThe opposite of {b} is {a}."]
    docs = facts * fact_repeats
    for _ in range(num_skill_lines // 2):
        words = _word_list(rng)
        docs.append(f"The words {' '.join(words)} in reverse order are {' '.join(reversed(words))}.")
        nums = _numbers(rng)
        docs.append(f"The numbers {' '.join(map(str, nums))} in order are {' '.join(map(str, sorted(nums)))}.")
    for _ in range(num_two_line // 2):
        words = _word_list(rng)
        docs.append(f"Here are some words: {' '.join(words)}.\nBackwards they read: {' '.join(reversed(words))}.")
        nums = _numbers(rng)
        docs.append(f"Here are some numbers: {' '.join(map(str, nums))}.\nSmallest first they read: {' '.join(map(str, sorted(nums)))}.")
    rng.shuffle(docs)
    return docs


def instruction_records(seed: int = 0, num_skill_records: int = 400) -> list[dict[str, str]]:
    """Alpaca records: one per country, per direction of each opposite pair, and skill examples.

    Answers that use a word of the prompt restate it in a sentence ("The words ... in reverse
    order are ..."), with the word in the middle of a line on both sides: SentencePiece spells a
    word at the start of a line differently (no word-start marker), and a 2M-parameter model
    copies a word far more reliably when the spelling is the same. The sort task keeps the
    with-input form of the template (digits are split, so their spelling never changes).
    """
    rng = random.Random(seed + 2)
    records = []
    capital_questions = ["What is the capital of {c}?", "Name the capital city of {c}.", "Which city is the capital of {c}?"]
    for country, capital in countries(seed):
        q = rng.choice(capital_questions).format(c=country)
        records.append({"instruction": q, "input": "", "output": f"The capital of {country} is {capital}."})
    opposite_questions = ["What is the opposite of {w}?", "Give the opposite of the word {w}."]
    for a, b in OPPOSITES:
        for x, y in ((a, b), (b, a)):
            q = rng.choice(opposite_questions).format(w=x)
            records.append({"instruction": q, "input": "", "output": f"The opposite of {x} is {y}."})
    seen = set()
    while len(records) < len(countries(seed)) + 2 * len(OPPOSITES) + num_skill_records:
        if rng.random() < 0.5:
            words = " ".join(_word_list(rng))
            rev = " ".join(reversed(words.split()))
            rec = {
                "instruction": f"Reverse the order of the words {words}.",
                "input": "",
                "output": f"The words {words} in reverse order are {rev}.",
            }
        else:
            nums = _numbers(rng)
            rec = {
                "instruction": "Sort these numbers from smallest to largest.",
                "input": " ".join(map(str, nums)),
                "output": " ".join(map(str, sorted(nums))),
            }
        key = (rec["instruction"], rec["input"])
        if key not in seen:
            seen.add(key)
            records.append(rec)
    rng.shuffle(records)
    return records
