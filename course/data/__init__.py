"""The course's text corpus: short, simple stories, generated from code.

``corpus.txt`` in this folder is shipped with the package; it is the output of
:func:`make_corpus` and can be regenerated offline, byte for byte, with::

    python -m course.data            # rewrites course/data/corpus.txt
    python -m course.data --check    # exits 1 if the shipped file is stale

The stories are original text produced by a small grammar (characters, places,
objects, a handful of plot shapes) from a seeded random generator, so the
corpus is free of any licence and small enough for a language model with a few
hundred thousand parameters to learn in a minute on a CPU. One story per
paragraph; paragraphs are separated by one blank line.
"""

from __future__ import annotations

import random
from pathlib import Path

CORPUS_PATH = Path(__file__).resolve().parent / "corpus.txt"
CORPUS_SEED = 1234
N_STORIES = 800

NAMES = ["Mia", "Tom", "Lily", "Ben", "Sam", "Anna", "Max", "Zoe", "Leo", "Ella",
         "Nina", "Omar", "Ruby", "Finn", "Ivy", "Jack", "Lena", "Noah", "Rosa", "Tim"]
ANIMALS = ["cat", "dog", "fox", "owl", "rabbit", "duck", "bear", "frog", "mouse", "goat",
           "bird", "pig", "horse", "turtle", "squirrel", "lamb"]
ANIMAL_ADJS = ["little", "small", "big", "brave", "shy", "kind", "clever", "sleepy",
               "happy", "curious", "gentle", "funny", "quiet", "busy"]
PLACES = ["the park", "the forest", "the river", "the garden", "the beach", "the hill",
          "the farm", "the town", "the lake", "the meadow", "the market", "the old bridge"]
OBJECTS = ["a red ball", "a blue kite", "a small boat", "a big box", "a shiny key",
           "a yellow hat", "an old map", "a green apple", "a wooden spoon", "a silver bell",
           "a paper star", "a warm scarf", "a little drum", "a round stone", "a soft pillow"]
HIDING = ["under a bush", "behind a tree", "in the tall grass", "next to a rock",
          "under a bench", "inside a hollow log", "on top of a wall", "near the water",
          "in a basket", "under a pile of leaves"]
FEELINGS = ["happy", "sad", "scared", "tired", "proud", "surprised", "excited", "worried", "calm"]
WEATHER = ["sunny", "rainy", "windy", "cold", "warm", "cloudy", "snowy", "bright"]
FOODS = ["bread", "soup", "cake", "pie", "cookies", "rice", "pancakes", "apples", "berries", "milk"]
COLOURS = ["red", "blue", "green", "yellow", "orange", "purple", "white", "black", "pink", "brown"]
NUMBERS = ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]


def _a(word: str) -> str:
    """'a' or 'an' before a word."""
    return ("an " if word[0] in "aeiou" else "a ") + word


def _bare(obj: str) -> str:
    """'a red ball' -> 'red ball'."""
    return obj.split(" ", 1)[1]


def _lost_object(r: random.Random) -> list[str]:
    name, friend = r.sample(NAMES, 2)
    animal, animal2 = r.sample(ANIMALS, 2)
    obj, place, hiding = r.choice(OBJECTS), r.choice(PLACES), r.choice(HIDING)
    s = [r.choice([f"Once upon a time, there was {_a(r.choice(ANIMAL_ADJS))} {animal} named {name}.",
                   f"There was once {_a(r.choice(ANIMAL_ADJS))} {animal} called {name}.",
                   f"{name} was {_a(r.choice(ANIMAL_ADJS))} {animal} who lived near {place}."])]
    s.append(f"{name} had {obj}, and {name} loved it very much.")
    s.append(f"One {r.choice(WEATHER)} day, the {_bare(obj)} was gone.")
    s.append(f"{name} felt {r.choice(['sad', 'worried', 'scared'])} and looked everywhere.")
    s.append(f"Then {name} met {friend}, {_a(r.choice(ANIMAL_ADJS))} {animal2}.")
    s.append(f"\"Can you help me find my {_bare(obj)}?\" asked {name}.")
    s.append(r.choice([f"\"Yes, I will help you,\" said {friend}.",
                       f"\"Of course,\" said {friend}. \"Let us look together.\""]))
    s.append(f"They looked {r.choice(HIDING)} and {r.choice(HIDING)}.")
    s.append(f"At last, they found the {_bare(obj)} {hiding}.")
    s.append(f"{name} was very {r.choice(['happy', 'glad', 'proud'])} and said thank you to {friend}.")
    s.append(r.choice(["From that day on, they were best friends.",
                       "They played together until the sun went down.",
                       f"After that, {name} always kept the {_bare(obj)} in a safe place."]))
    return s


def _new_friend(r: random.Random) -> list[str]:
    name, friend = r.sample(NAMES, 2)
    animal, animal2 = r.sample(ANIMALS, 2)
    place = r.choice(PLACES)
    s = [f"{name} the {animal} went to {place} on {_a(r.choice(WEATHER))} morning."]
    s.append(f"At {place}, {name} saw {_a(r.choice(ANIMAL_ADJS))} {animal2} sitting alone.")
    s.append(f"The {animal2} looked {r.choice(['sad', 'shy', 'lonely', 'tired'])}.")
    s.append(f"\"Hello, my name is {name}. What is your name?\" asked {name}.")
    s.append(f"\"My name is {friend},\" said the {animal2}.")
    s.append(f"\"Do you want to play with me?\" asked {name}.")
    s.append(f"{friend} smiled and said, \"Yes, I would like that.\"")
    game = r.choice(["hide and seek", "tag", "catch", "a game with a ball", "a jumping game"])
    s.append(f"They played {game} all afternoon.")
    s.append(f"When it was time to go home, {friend} was {r.choice(['happy', 'not lonely any more', 'smiling'])}.")
    s.append(r.choice(["The next day, they met again.",
                       f"{name} learned that it is good to be kind.",
                       "It was the best day of the week."]))
    return s


def _weather(r: random.Random) -> list[str]:
    name = r.choice(NAMES)
    animal = r.choice(ANIMALS)
    place = r.choice(PLACES)
    w1, w2 = r.sample(WEATHER, 2)
    obj = r.choice(OBJECTS)
    s = [f"It was {_a(w1)} day, and {name} the {animal} wanted to go to {place}."]
    s.append(f"{name} took {obj} and went outside.")
    s.append(f"But soon the day became {w2}.")
    if w2 in ("rainy", "snowy", "cold", "windy", "cloudy"):
        s.append(f"{name} felt {r.choice(['cold', 'wet', 'tired', 'worried'])} and walked back home.")
        s.append(f"At home, {name} had some warm {r.choice(['soup', 'milk', 'tea'])} and sat by the fire.")
        s.append(f"\"I will go to {place} tomorrow,\" said {name}.")
    else:
        s.append(f"{name} was {r.choice(['happy', 'glad', 'excited'])} and ran all the way to {place}.")
        s.append(f"There, {name} played with the {_bare(obj)} until the evening.")
        s.append(f"\"What a good day,\" said {name}.")
    s.append(r.choice(["Then it was time to sleep.", "The end.", "And that was a good day."]))
    return s


def _cooking(r: random.Random) -> list[str]:
    name, friend = r.sample(NAMES, 2)
    food = r.choice(["bread", "soup", "cake", "pie", "cookies", "pancakes"])
    plural = food.endswith("s")
    n = r.randrange(2, 9)
    extra = r.sample(["flour", "milk", "sugar", "eggs", "butter", "apples", "berries", "carrots", "salt"], 3)
    s = [f"{name} wanted to make {food} for {friend}."]
    s.append(f"First, {name} put {extra[0]}, {extra[1]} and {extra[2]} in a big bowl.")
    s.append(f"Then {name} mixed everything with {r.choice(['a wooden spoon', 'a big spoon', 'a fork'])}.")
    where = "on the stove" if food == "soup" else "in the oven"
    s.append(f"The {food} needed {NUMBERS[n - 1]} minutes {where}.")
    s.append(f"{name} counted: {', '.join(NUMBERS[:n])}.")
    s.append(f"The {food} {'were' if plural else 'was'} ready, and {'they' if plural else 'it'} smelled very good.")
    s.append(f"{friend} came to visit and said, \"I love {food}!\"")
    s.append(f"They ate the {food} together and were {r.choice(['happy', 'full', 'glad'])}.")
    return s


def _counting(r: random.Random) -> list[str]:
    name = r.choice(NAMES)
    things = r.choice(["apples", "birds", "stars", "ducks", "flowers", "stones", "boats", "shells"])
    place = r.choice(PLACES)
    n = r.randrange(3, 11)
    colour = r.choice(COLOURS)
    s = [f"{name} went to {place} and saw some {colour} {things}."]
    s.append(f"\"Let me count them,\" said {name}.")
    s.append(f"{', '.join(NUMBERS[:n]).capitalize()}.")
    s.append(f"There were {NUMBERS[n - 1]} {colour} {things}.")
    k = r.randrange(1, n)
    s.append(f"Then {NUMBERS[k - 1]} of them {r.choice(['went away', 'were gone', 'fell in the water'])}.")
    s.append(f"Now there were {NUMBERS[n - k - 1]} {things} left.")
    s.append(f"{name} was {r.choice(['happy', 'proud', 'surprised'])} to count so well.")
    return s


PLOTS = [_lost_object, _new_friend, _weather, _cooking, _counting]


def make_corpus(n_stories: int = N_STORIES, seed: int = CORPUS_SEED) -> str:
    """Return the corpus text: `n_stories` stories, one per paragraph, ending with a newline."""
    r = random.Random(seed)
    stories = []
    for _ in range(n_stories):
        plot = r.choice(PLOTS)
        stories.append(" ".join(plot(r)))
    return "\n\n".join(stories) + "\n"


def read_stories(path: str | Path = CORPUS_PATH) -> list[str]:
    """The stories of a corpus file, in order (paragraphs separated by blank lines)."""
    text = Path(path).read_text(encoding="utf-8")
    return [p.strip() for p in text.split("\n\n") if p.strip()]


def write_corpus(path: str | Path = CORPUS_PATH) -> Path:
    path = Path(path)
    path.write_text(make_corpus(), encoding="utf-8", newline="\n")
    return path


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m course.data", description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only compare the shipped corpus with a fresh one")
    parser.add_argument("--out", type=Path, default=CORPUS_PATH, help="where to write (default: the shipped file)")
    args = parser.parse_args(argv)
    if args.check:
        ok = args.out.exists() and args.out.read_text(encoding="utf-8") == make_corpus()
        print(f"{args.out}: {'up to date' if ok else 'STALE: run python -m course.data'}")
        return 0 if ok else 1
    path = write_corpus(args.out)
    print(f"wrote {path} ({path.stat().st_size} bytes)")
    return 0
