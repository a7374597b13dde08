"""Generate the bundled synthetic demo datasets under ``data/demo``.

Two tiny, original datasets are produced from hand-written templates and word lists:

* ``sentiment/{train,validation,test}.jsonl`` - ``{"text": ..., "label": ...}`` lines with
  labels ``positive`` / ``negative`` (balanced per split);
* ``ner/{train,validation,test}.conll`` - ``TOKEN<TAB>TAG`` lines, IOB2 tags over
  PER/ORG/LOC/MISC, one blank line after every sentence.

The generator is deterministic (fixed seed), so re-running it rewrites identical files.
Texts are unique within the whole dataset, hence no duplicates across splits.

Usage::

    python scripts/make_demo_data.py [--out data/demo] [--seed 13]
"""

from __future__ import annotations

import argparse
import json
import random
from collections import Counter
from collections.abc import Callable
from pathlib import Path

SPLITS: dict[str, int] = {"train": 400, "validation": 100, "test": 100}
DEFAULT_SEED = 13

# --------------------------------------------------------------------------------------
# Sentiment
# --------------------------------------------------------------------------------------

# Per domain: subjects, aspects, the verb phrase for "having experienced it" and a noun.
DOMAINS: dict[str, dict[str, list[str]]] = {
    "movie": {
        "subjects": [
            "the movie",
            "this film",
            "the sequel",
            "the documentary",
            "the new thriller",
            "that comedy",
            "the animated feature",
            "Midnight Harbor",
            "the remake",
            "the director's latest film",
            "Paper Lanterns",
            "the science fiction epic",
        ],
        "aspects": [
            "the acting",
            "the soundtrack",
            "the plot",
            "the ending",
            "the dialogue",
            "the pacing",
            "the cinematography",
            "the special effects",
            "the lead actor",
        ],
        "done": ["watched", "saw", "streamed"],
        "nouns": ["movie", "film", "story", "premiere"],
    },
    "restaurant": {
        "subjects": [
            "the restaurant",
            "this bistro",
            "the noodle bar",
            "the new pizzeria",
            "that cafe",
            "the Blue Fig",
            "the steakhouse downtown",
            "the sushi place",
            "the food truck",
            "Casa Verde",
            "the bakery on the corner",
        ],
        "aspects": [
            "the service",
            "the dessert",
            "the soup",
            "the wine list",
            "the staff",
            "the main course",
            "the coffee",
            "the portion size",
            "the atmosphere",
        ],
        "done": ["ate at", "had dinner at", "had lunch at", "tried"],
        "nouns": ["meal", "dinner", "place", "lunch"],
    },
    "product": {
        "subjects": [
            "the blender",
            "this phone",
            "the laptop",
            "these headphones",
            "the vacuum cleaner",
            "the coffee maker",
            "this backpack",
            "the smartwatch",
            "the desk lamp",
            "the Nimbus speaker",
            "this electric kettle",
            "the camera",
        ],
        "aspects": [
            "the battery",
            "the screen",
            "the build quality",
            "the packaging",
            "the manual",
            "the price",
            "the sound",
            "the charger",
            "the design",
        ],
        "done": ["bought", "ordered", "used", "tested"],
        "nouns": ["product", "gadget", "purchase", "device"],
    },
    "book": {
        "subjects": [
            "the novel",
            "this book",
            "the memoir",
            "the cookbook",
            "the short story",
            "the biography",
            "The Salt Road",
            "the fantasy series",
            "this textbook",
            "the poetry collection",
            "the detective novel",
        ],
        "aspects": [
            "the writing",
            "the characters",
            "the first chapter",
            "the ending",
            "the translation",
            "the illustrations",
            "the plot",
            "the narrator",
        ],
        "done": ["read", "finished", "listened to"],
        "nouns": ["book", "read", "novel", "story"],
    },
    "hotel": {
        "subjects": [
            "the hotel",
            "this guesthouse",
            "the resort",
            "the hostel",
            "the inn",
            "the Seaview Lodge",
            "our hotel room",
            "the bed and breakfast",
            "the airport hotel",
            "the mountain cabin",
            "the spa hotel",
        ],
        "aspects": [
            "the breakfast",
            "the front desk",
            "the pool",
            "the view",
            "the room",
            "the bed",
            "the location",
            "the wifi",
            "the cleaning staff",
        ],
        "done": ["stayed at", "booked", "spent a weekend at"],
        "nouns": ["stay", "hotel", "trip", "holiday"],
    },
}

POS_ADJ = [
    "wonderful",
    "excellent",
    "delightful",
    "superb",
    "charming",
    "great",
    "fantastic",
    "impressive",
    "lovely",
    "brilliant",
    "enjoyable",
    "outstanding",
    "memorable",
    "amazing",
    "terrific",
    "pleasant",
    "first-rate",
    "marvelous",
]
NEG_ADJ = [
    "awful",
    "terrible",
    "disappointing",
    "dull",
    "boring",
    "mediocre",
    "poor",
    "dreadful",
    "frustrating",
    "bland",
    "sloppy",
    "forgettable",
    "tedious",
    "clumsy",
    "horrible",
    "underwhelming",
    "miserable",
    "lousy",
]
# Negated phrases whose polarity is the *opposite* of their head word.
POS_NEGATED = [
    "not bad at all",
    "not disappointing in the slightest",
    "never boring",
    "anything but dull",
    "not a letdown",
    "far from mediocre",
    "not terrible at all",
    "by no means forgettable",
]
NEG_NEGATED = [
    "not good",
    "not enjoyable at all",
    "never engaging",
    "far from great",
    "not impressive",
    "anything but pleasant",
    "not worth it",
    "not very nice",
    "by no means excellent",
]
ADVERBS = ["really", "truly", "quite", "very", "absolutely", "pretty", "genuinely", "rather"]
POS_VERBS = ["loved", "enjoyed", "adored", "really liked", "was thrilled with"]
NEG_VERBS = ["hated", "disliked", "regretted", "was annoyed by", "could not stand"]
POS_CLOSING = [
    "we will definitely be back",
    "I would do it again in a heartbeat",
    "it was worth every penny",
    "I am already telling my friends",
    "it made my whole week",
    "I cannot wait to repeat it",
]
NEG_CLOSING = [
    "never again",
    "what a waste of money",
    "I want my money back",
    "I will not make that mistake twice",
    "it ruined my whole week",
    "I left feeling cheated",
]
TIMES = ["last week", "yesterday", "on Saturday", "last month", "over the holidays", "recently"]
RATINGS_POS = ["five stars", "ten out of ten", "a solid nine out of ten", "top marks"]
RATINGS_NEG = ["one star", "two out of ten", "zero stars if I could", "a generous three"]


# Noun phrases above that take a plural verb.
PLURALS = {"these headphones", "the characters", "the illustrations", "the special effects"}


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def _be(noun_phrase: str) -> str:
    return "were" if noun_phrase in PLURALS else "was"


def _sentiment_sentence(rng: random.Random, positive: bool) -> str:
    """Draw one sentence whose overall polarity is ``positive``."""
    dom = DOMAINS[rng.choice(sorted(DOMAINS))]
    subj = rng.choice(dom["subjects"])
    aspect = rng.choice(dom["aspects"])
    noun = rng.choice(dom["nouns"])
    adj = rng.choice(POS_ADJ if positive else NEG_ADJ)
    opp = rng.choice(NEG_ADJ if positive else POS_ADJ)
    negated = rng.choice(POS_NEGATED if positive else NEG_NEGATED)
    adv = rng.choice(ADVERBS)
    verb = rng.choice(POS_VERBS if positive else NEG_VERBS)
    closing = rng.choice(POS_CLOSING if positive else NEG_CLOSING)
    done = rng.choice(dom["done"])
    when = rng.choice(TIMES)
    rating = rng.choice(RATINGS_POS if positive else RATINGS_NEG)
    recommend = "would happily recommend" if positive else "would not recommend"
    article = "an" if adj[0] in "aeiou" else "a"
    sb, ab = _be(subj), _be(aspect)  # "was" / "were"
    it = "them" if subj in PLURALS else "it"
    they = "they" if subj in PLURALS else "it"
    templates: list[Callable[[], str]] = [
        lambda: f"{_cap(subj)} {sb} {adj}.",
        lambda: f"{_cap(subj)} {sb} {adv} {adj}.",
        lambda: f"I thought {subj} {sb} {adj}.",
        lambda: f"Honestly, {subj} {sb} {negated}.",
        lambda: f"{_cap(aspect)} {ab} {negated}.",
        lambda: f"I {verb} {subj}.",
        lambda: f"I {verb} {aspect} of {subj}.",
        lambda: f"What {article} {adj} {noun}!",
        lambda: f"I {recommend} {subj} to anyone.",
        lambda: f"{_cap(aspect)} {ab} {opp}, but overall {subj} {sb} {adj}.",
        lambda: f"Although {aspect} {ab} {opp}, {subj} felt {adj} from start to finish.",
        lambda: f"I expected {subj} to be {opp}, yet {they} turned out {adj}.",
        lambda: f"We {done} {subj} {when} and {aspect} {ab} {adj}; {closing}.",
        lambda: f"{_cap(when)} I {done} {subj}, and {closing}.",
        lambda: f"{_cap(subj)}: {rating}. {_cap(aspect)} {ab} {adv} {adj}.",
        lambda: f"People said {subj} {sb} {opp}, but I found {it} {adj}.",
        lambda: f"My friends {done} {subj} {when}; {aspect} {ab} {negated} and {closing}.",
        lambda: (
            f"After all the hype I finally {done} {subj}, and I have to say "
            f"{aspect} {ab} {adv} {adj}."
        ),
        lambda: f"Not only {ab} {aspect} {adj}, {subj} as a whole {sb} {adj} too.",
    ]
    return rng.choice(templates)()


def make_sentiment(rng: random.Random) -> dict[str, list[dict[str, str]]]:
    """Return balanced, duplicate-free splits of sentiment examples."""
    total = sum(SPLITS.values())
    seen: set[str] = set()
    pools: dict[bool, list[str]] = {True: [], False: []}
    for positive in (True, False):
        while len(pools[positive]) < total // 2:
            text = _sentiment_sentence(rng, positive)
            if text.lower() not in seen:
                seen.add(text.lower())
                pools[positive].append(text)
    out: dict[str, list[dict[str, str]]] = {}
    start = 0
    for split, n in SPLITS.items():
        half = n // 2
        rows = [{"text": t, "label": "positive"} for t in pools[True][start : start + half]]
        rows += [{"text": t, "label": "negative"} for t in pools[False][start : start + half]]
        rng.shuffle(rows)
        out[split] = rows
        start += half
    return out


# --------------------------------------------------------------------------------------
# NER
# --------------------------------------------------------------------------------------

FIRST = [
    "Maria",
    "John",
    "Aiko",
    "Oluwaseun",
    "Lena",
    "Rahul",
    "Sofia",
    "Tomas",
    "Grace",
    "Mateo",
    "Ingrid",
    "Kwame",
    "Yusuf",
    "Chloe",
    "Dmitri",
    "Ana",
    "Hiroshi",
    "Priya",
    "Elias",
    "Fatima",
    "Noah",
    "Zofia",
    "Liam",
    "Amara",
]
LAST = [
    "Lopez",
    "Smith",
    "Tanaka",
    "Adeyemi",
    "Fischer",
    "Mehta",
    "Rossi",
    "Novak",
    "O'Neill",
    "Herrera",
    "Lindqvist",
    "Mensah",
    "Demir",
    "Dubois",
    "Volkov",
    "Silva",
    "Nakamura",
    "Iyer",
    "Brandt",
    "Haddad",
    "Carter",
    "Kowalska",
    "Byrne",
    "Okafor",
]
ORGS = [
    "Orion Motors",
    "Kestrel Labs",
    "Greenway Foods",
    "Riverside University",
    "Bluefield Bank",
    "Northwind Analytics",
    "the Harbor Trust",
    "Silverline Airways",
    "Meridian Health",
    "Copperleaf Books",
    "United Nations",
    "Red Cross",
    "Atlas Energy Group",
    "Pinecrest Capital",
    "Lumen Studios",
    "Vantage Telecom",
    "City Council",
    "Eastbrook Hospital",
    "Falcon Robotics",
    "Tidewater Shipping Company",
]
LOCS = [
    "Paris",
    "New York",
    "Nairobi",
    "Buenos Aires",
    "Lake Geneva",
    "Osaka",
    "Berlin",
    "São Paulo",
    "Cape Town",
    "Vancouver",
    "the Rocky Mountains",
    "Lisbon",
    "Mumbai",
    "Reykjavik",
    "Rio de Janeiro",
    "Kraków",
    "Dublin",
    "Seoul",
    "Marrakesh",
    "the Mekong Delta",
    "Hamburg",
    "Austin",
    "Melbourne",
    "Lagos",
]
NATIONALITIES = [
    "French",
    "Brazilian",
    "Japanese",
    "Kenyan",
    "German",
    "Canadian",
    "Indian",
    "Portuguese",
    "Irish",
    "Korean",
    "Nigerian",
    "Polish",
    "Moroccan",
    "Australian",
]
EVENTS = [
    "World Cup",
    "Olympic Games",
    "Winter Lights Festival",
    "Harvest Fair",
    "Global Climate Summit",
    "Tour de France",
    "Open Source Week",
    "Paralympic Games",
    "Spring Marathon",
    "International Jazz Festival",
]
PRODUCTS = [
    "Zephyr X2",
    "Aurora Pro",
    "Nimbus 7",
    "Falcon One",
    "PixelPad Mini",
    "Helix Z",
    "Quasar Watch",
    "Echo Drift",
    "Terra Bike 3",
]

# Determiners that stay outside an entity span ("the" in "the Rocky Mountains").
_OUTSIDE_PREFIX = {"the"}

NER_TEMPLATES = [
    "{PER} joined {ORG} in {LOC} last year .",
    "{ORG} opened a new office in {LOC} on Monday .",
    "The {NAT} delegation arrived in {LOC} for the {EVENT} .",
    "{PER} , a spokesperson for {ORG} , declined to comment .",
    "According to {PER} , {ORG} will launch the {PROD} next spring .",
    "{ORG} {PROD} sales doubled after the {EVENT} .",
    "In {LOC} {PER} opened a small bakery .",
    "The keynote at the {EVENT} was given by {PER} .",
    "Tickets for the {EVENT} in {LOC} sold out within hours .",
    "{PER} and {PER} met at {ORG} headquarters in {LOC} .",
    "The {NAT} team beat the {NAT} team in the final of the {EVENT} .",
    "{ORG} announced a partnership with {ORG} .",
    "Flights from {LOC} to {LOC} were cancelled because of the storm .",
    "Shares of {ORG} rose after {PER} praised the {PROD} .",
    "{PER} moved from {LOC} to {LOC} to work for {ORG} .",
    "A {NAT} startup called {ORG} is hiring engineers in {LOC} .",
    "Reviewers compared the {PROD} with the {PROD} .",
    "The mayor of {LOC} thanked {ORG} for its support .",
    "{PER} won gold at the {EVENT} .",
    "Yesterday the {NAT} minister visited {ORG} .",
    "She bought a new {PROD} at a market in {LOC} .",
    "{PER} told reporters that the {EVENT} would return to {LOC} .",
    "Researchers at {ORG} published a study with colleagues from {ORG} .",
    "The report was written by {PER} , {PER} and {PER} .",
    "{LOC} will host the {EVENT} for the first time .",
    "Most visitors to the festival came from {LOC} , {LOC} or {LOC} .",
    "After the merger , {PER} became chief executive of {ORG} .",
    "The new bridge connects {LOC} with {LOC}",
    "Sales of the {PROD} were strongest among {NAT} customers .",
    "Congratulations to {PER}",
    "{NAT} fans celebrated in the streets of {LOC} .",
    "The weather was mild and the streets were quiet .",
    "Our guide , {PER} , grew up near {LOC} .",
    "{ORG} recalled thousands of {PROD} units on Friday .",
    "The prize was shared by {PER} of {ORG} and {PER} of {ORG} .",
    "Everyone agreed the meeting had gone well .",
    "Critics say {ORG} has ignored residents of {LOC} for years .",
    "The {NAT} author {PER} will read from her new novel in {LOC} .",
]


def _tagged(text: str, label: str) -> list[tuple[str, str]]:
    """Split an entity surface string into tokens tagged with IOB2 ``label``."""
    tokens = text.split()
    out: list[tuple[str, str]] = []
    if tokens[0] in _OUTSIDE_PREFIX:
        out.append((tokens[0], "O"))
        tokens = tokens[1:]
    out += [(tok, ("B-" if i == 0 else "I-") + label) for i, tok in enumerate(tokens)]
    return out


def _person(rng: random.Random) -> str:
    shape = rng.random()
    if shape < 0.15:
        return rng.choice(LAST)
    if shape < 0.25:
        return f"{rng.choice(FIRST)} {rng.choice(FIRST)} {rng.choice(LAST)}"
    return f"{rng.choice(FIRST)} {rng.choice(LAST)}"


def _ner_sentence(rng: random.Random) -> list[tuple[str, str]]:
    """Fill one template; returns ``(token, tag)`` pairs."""
    fillers: dict[str, Callable[[], list[tuple[str, str]]]] = {
        "{PER}": lambda: _tagged(_person(rng), "PER"),
        "{ORG}": lambda: _tagged(rng.choice(ORGS), "ORG"),
        "{LOC}": lambda: _tagged(rng.choice(LOCS), "LOC"),
        "{NAT}": lambda: _tagged(rng.choice(NATIONALITIES), "MISC"),
        "{EVENT}": lambda: _tagged(rng.choice(EVENTS), "MISC"),
        "{PROD}": lambda: _tagged(rng.choice(PRODUCTS), "MISC"),
    }
    out: list[tuple[str, str]] = []
    for i, tok in enumerate(rng.choice(NER_TEMPLATES).split()):
        if tok in fillers:
            span = fillers[tok]()
            if i == 0 and span[0][1] == "O":  # sentence-initial "the" -> "The"
                span[0] = (_cap(span[0][0]), "O")
            out += span
        else:
            out.append((tok, "O"))
    return out


def make_ner(rng: random.Random) -> dict[str, list[list[tuple[str, str]]]]:
    """Return duplicate-free splits of tagged sentences."""
    total = sum(SPLITS.values())
    seen: set[tuple[str, ...]] = set()
    pool: list[list[tuple[str, str]]] = []
    attempts = 0
    while len(pool) < total:
        attempts += 1
        if attempts > 100 * total:
            raise RuntimeError("could not draw enough unique NER sentences")
        sent = _ner_sentence(rng)
        key = tuple(tok for tok, _ in sent)
        if key not in seen:
            seen.add(key)
            pool.append(sent)
    out: dict[str, list[list[tuple[str, str]]]] = {}
    start = 0
    for split, n in SPLITS.items():
        out[split] = pool[start : start + n]
        start += n
    return out


# --------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------


def write_sentiment(out: Path, splits: dict[str, list[dict[str, str]]]) -> None:
    """Write JSON Lines files, one per split."""
    out.mkdir(parents=True, exist_ok=True)
    for split, rows in splits.items():
        with (out / f"{split}.jsonl").open("w", encoding="utf-8", newline="\n") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")


def write_ner(out: Path, splits: dict[str, list[list[tuple[str, str]]]]) -> None:
    """Write CoNLL files (``TOKEN<TAB>TAG``, blank line after each sentence)."""
    out.mkdir(parents=True, exist_ok=True)
    for split, sents in splits.items():
        with (out / f"{split}.conll").open("w", encoding="utf-8", newline="\n") as f:
            for sent in sents:
                for tok, tag in sent:
                    f.write(f"{tok}\t{tag}\n")
                f.write("\n")


def _summary(
    sent: dict[str, list[dict[str, str]]], ner: dict[str, list[list[tuple[str, str]]]]
) -> str:
    lines = []
    for split, rows in sent.items():
        counts = Counter(r["label"] for r in rows)
        lines.append(f"sentiment/{split}: {len(rows)} ({dict(sorted(counts.items()))})")
    for split, sents in ner.items():
        ents = Counter(tag[2:] for s in sents for _, tag in s if tag.startswith("B-"))
        toks = sum(len(s) for s in sents)
        lines.append(
            f"ner/{split}: {len(sents)} sentences, {toks} tokens, "
            f"entities {dict(sorted(ents.items()))}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Generate both datasets and print a summary."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("data/demo"))
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    args = parser.parse_args(argv)
    sentiment = make_sentiment(random.Random(args.seed))
    ner = make_ner(random.Random(args.seed + 1))
    write_sentiment(args.out / "sentiment", sentiment)
    write_ner(args.out / "ner", ner)
    print(_summary(sentiment, ner))


if __name__ == "__main__":
    main()
