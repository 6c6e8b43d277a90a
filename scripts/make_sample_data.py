#!/usr/bin/env python3
"""Write the project's small sample reranking data set (stdlib only, deterministic).

Every passage is generated here from the hand-written fact tables below, which the
project's authors wrote for this purpose; no external data set text is copied.

    python scripts/make_sample_data.py             # writes data/sample/
    python scripts/make_sample_data.py --out DIR   # writes somewhere else

Outputs:
  train.jsonl           FlagEmbedding records {"query", "pos": [...], "neg": [...]}
  val_candidates.jsonl  {"qid", "query", "candidates": [{"docid", "text", "label"}]}
  README.md             what the files are and how many records they hold

Each query asks one fact (relation) about one entity. Its positive states that fact.
Its hard negatives are: the same entity with a different fact, the same relation for a
different entity, and sentences that mention the entity and the relation's key words
without giving the answer. Validation queries ask about held-out entities only (marked
VAL below), with the same relations and templates, so a model must generalise.
"""

from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path

SEED = 20240611
REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "data" / "sample"
VAL = True  # marks an entity held out for validation

# ---------------------------------------------------------------------------
# Fact tables (hand-written; every row is meant to be true; None = relation not used)
# ---------------------------------------------------------------------------

# name, capital, continent, currency, most widely spoken language
COUNTRIES = [
    ("Peru", "Lima", "South America", "the Peruvian sol", "Spanish"),
    ("Chile", "Santiago", "South America", "the Chilean peso", "Spanish"),
    ("Brazil", "Brasília", "South America", "the Brazilian real", "Portuguese"),
    ("Mexico", "Mexico City", "North America", "the Mexican peso", "Spanish"),
    ("Japan", "Tokyo", "Asia", "the yen", "Japanese"),
    ("China", "Beijing", "Asia", "the renminbi", "Mandarin Chinese"),
    ("South Korea", "Seoul", "Asia", "the won", "Korean"),
    ("Egypt", "Cairo", None, "the Egyptian pound", "Arabic"),
    ("Kenya", "Nairobi", "Africa", "the Kenyan shilling", None),
    ("France", "Paris", "Europe", "the euro", "French"),
    ("Germany", "Berlin", "Europe", "the euro", "German"),
    ("Poland", "Warsaw", "Europe", "the zloty", "Polish"),
    ("Australia", "Canberra", None, "the Australian dollar", "English"),
    ("the United Kingdom", "London", "Europe", "the pound sterling", "English"),
    ("Ecuador", "Quito", "South America", "the United States dollar", "Spanish", VAL),
    ("Hungary", "Budapest", "Europe", "the forint", "Hungarian", VAL),
]

# name, chemical symbol, atomic number
ELEMENTS = [
    ("hydrogen", "H", "1"), ("helium", "He", "2"), ("carbon", "C", "6"),
    ("nitrogen", "N", "7"), ("oxygen", "O", "8"), ("sodium", "Na", "11"),
    ("calcium", "Ca", "20"), ("iron", "Fe", "26"), ("copper", "Cu", "29"),
    ("gold", "Au", "79"), ("lead", "Pb", "82"), ("uranium", "U", "92"),
    ("neon", "Ne", "10", VAL), ("zinc", "Zn", "30", VAL), ("silver", "Ag", "47", VAL),
]

# title, author, year first published
BOOKS = [
    ("Pride and Prejudice", "Jane Austen", "1813"),
    ("Moby-Dick", "Herman Melville", "1851"),
    ("Nineteen Eighty-Four", "George Orwell", "1949"),
    ("Animal Farm", "George Orwell", "1945"),
    ("Frankenstein", "Mary Shelley", "1818"),
    ("Jane Eyre", "Charlotte Brontë", "1847"),
    ("Wuthering Heights", "Emily Brontë", "1847"),
    ("The Great Gatsby", "F. Scott Fitzgerald", "1925"),
    ("To Kill a Mockingbird", "Harper Lee", "1960"),
    ("Of Mice and Men", "John Steinbeck", "1937"),
    ("War and Peace", "Leo Tolstoy", None),
    ("The Little Prince", "Antoine de Saint-Exupéry", "1943"),
    ("Dracula", "Bram Stoker", "1897", VAL),
    ("The Hobbit", "J. R. R. Tolkien", "1937", VAL),
    ("Brave New World", "Aldous Huxley", "1932", VAL),
]

# title, painter, where it is displayed
PAINTINGS = [
    ("the Mona Lisa", "Leonardo da Vinci", "the Louvre in Paris"),
    ("The Starry Night", "Vincent van Gogh", "the Museum of Modern Art in New York"),
    ("The Night Watch", "Rembrandt", "the Rijksmuseum in Amsterdam"),
    ("Girl with a Pearl Earring", "Johannes Vermeer", "the Mauritshuis in The Hague"),
    ("Guernica", "Pablo Picasso", "the Museo Reina Sofía in Madrid"),
    ("The Persistence of Memory", "Salvador Dalí", "the Museum of Modern Art in New York"),
    ("Las Meninas", "Diego Velázquez", "the Prado Museum in Madrid"),
    ("American Gothic", "Grant Wood", "the Art Institute of Chicago"),
    ("the Arnolfini Portrait", "Jan van Eyck", "the National Gallery in London"),
    ("Liberty Leading the People", "Eugène Delacroix", "the Louvre in Paris"),
    ("Nighthawks", "Edward Hopper", "the Art Institute of Chicago", VAL),
    ("The Birth of Venus", "Sandro Botticelli", "the Uffizi Gallery in Florence", VAL),
    ("The Hay Wain", "John Constable", "the National Gallery in London", VAL),
]

# name, order from the Sun, kind of planet
PLANETS = [
    ("Mercury", "first", "a rocky planet"), ("Earth", "third", "a rocky planet"),
    ("Mars", "fourth", "a rocky planet"), ("Jupiter", "fifth", "a gas giant"),
    ("Uranus", "seventh", "an ice giant"), ("Neptune", "eighth", "an ice giant"),
    ("Venus", "second", "a rocky planet", VAL), ("Saturn", "sixth", "a gas giant", VAL),
]

# name, animal class, where it is native
ANIMALS = [
    ("the koala", "a mammal", "Australia"),
    ("the kangaroo", "a mammal", "Australia"),
    ("the giraffe", "a mammal", "Africa"),
    ("the giant panda", "a mammal", "China"),
    ("the polar bear", "a mammal", "the Arctic"),
    ("the emu", "a bird", "Australia"),
    ("the bald eagle", "a bird", "North America"),
    ("the Komodo dragon", "a reptile", "Indonesia"),
    ("the axolotl", "an amphibian", "Mexico"),
    ("the great white shark", "a fish", None),
    ("the platypus", "a mammal", "Australia", VAL),
    ("the ostrich", "a bird", "Africa", VAL),
    ("the American alligator", "a reptile", "the southeastern United States", VAL),
]

# thing, was/were, verb, who, year
DISCOVERIES = [
    ("penicillin", "was", "discovered", "Alexander Fleming", "1928"),
    ("X-rays", "were", "discovered", "Wilhelm Röntgen", "1895"),
    ("the electron", "was", "discovered", "J. J. Thomson", "1897"),
    ("radium", "was", "discovered", "Marie and Pierre Curie", "1898"),
    ("the World Wide Web", "was", "invented", "Tim Berners-Lee", "1989"),
    ("dynamite", "was", "invented", "Alfred Nobel", None),
    ("the phonograph", "was", "invented", "Thomas Edison", "1877"),
    ("the smallpox vaccine", "was", "developed", "Edward Jenner", "1796"),
    ("the atomic nucleus", "was", "discovered", "Ernest Rutherford", "1911"),
    ("Jupiter's four largest moons", "were", "discovered", "Galileo Galilei", "1610"),
    ("the neutron", "was", "discovered", "James Chadwick", "1932", VAL),
    ("the stethoscope", "was", "invented", "René Laennec", "1816", VAL),
    ("the dwarf planet Pluto", "was", "discovered", "Clyde Tombaugh", "1930", VAL),
]
VERB_FORMS = {  # past participle -> (gerund, noun)
    "discovered": ("discovering", "discovery"),
    "invented": ("inventing", "invention"),
    "developed": ("developing", "development"),
}

# ---------------------------------------------------------------------------
# Templates. {e} = entity, {v} = the relation's value; "q" asks, "a" answers,
# "near" mentions the entity and the relation's key words without answering.
# ---------------------------------------------------------------------------

TYPES = {
    "country": {
        "table": COUNTRIES,
        "relations": ["capital", "continent", "currency", "language"],
        "generic": ["{e} is a member of the United Nations.", "Many tourists visit {e} every year.",
                    "The flag of {e} flies outside its embassies abroad.", "{e} has a long and varied history."],
        "capital": {
            "q": ["What is the capital of {e}?", "Which city is the capital of {e}?"],
            "a": ["{v} is the capital of {e}.", "The capital city of {e} is {v}."],
            "near": ["Students are often asked to name the capital of {e} in geography lessons.",
                     "The capital of {e} is home to many of the country's government offices.",
                     "Maps of {e} usually mark the capital city with a star."]},
        "continent": {
            "q": ["Which continent is {e} in?", "On which continent is {e} located?"],
            "a": ["{e} is a country in {v}.", "{e} is located in {v}."],
            "near": ["Geography lessons about {e} often start by finding its continent on a world map.",
                     "{e} shares its continent with several other countries.",
                     "Travel writers often compare {e} with its neighbours on the same continent."]},
        "currency": {
            "q": ["What is the currency of {e}?", "Which currency is used in {e}?"],
            "a": ["{e} uses {v} as its currency.", "The currency of {e} is {v}."],
            "near": ["Travellers to {e} often exchange money for the local currency at the airport.",
                     "Prices in shops across {e} are shown in the national currency.",
                     "Visitors should check the exchange rate before buying the currency of {e}."]},
        "language": {
            "q": ["What language is most widely spoken in {e}?", "Which language do most people in {e} speak?"],
            "a": ["{v} is the most widely spoken language in {e}.", "Most people in {e} speak {v}."],
            "near": ["Visitors to {e} often learn a few words of the local language.",
                     "Language schools in {e} offer courses for foreign students.",
                     "Many books have been translated into the main language spoken in {e}."]},
    },
    "element": {
        "table": ELEMENTS,
        "relations": ["symbol", "number"],
        "generic": ["{e} is one of the chemical elements.", "Chemists have studied the properties of {e} for a long time.",
                    "{e} has many uses in industry and science."],
        "symbol": {
            "q": ["What is the chemical symbol for {e}?", "Which symbol represents {e} on the periodic table?"],
            "a": ["The chemical symbol for {e} is {v}.", "{e} is represented by the symbol {v}."],
            "near": ["The chemical symbol for {e} appears in every copy of the periodic table.",
                     "Chemistry students memorise the chemical symbol for {e} early on.",
                     "Every box of the periodic table shows a symbol, including the one for {e}."]},
        "number": {
            "q": ["What is the atomic number of {e}?", "Which atomic number does {e} have?"],
            "a": ["The atomic number of {e} is {v}.", "{e} has the atomic number {v}."],
            "near": ["The atomic number of {e} tells you how many protons each of its atoms has.",
                     "Students are often asked to look up the atomic number of {e}.",
                     "{e} takes its place on the periodic table according to its atomic number."]},
    },
    "book": {
        "table": BOOKS,
        "relations": ["author", "year"],
        "generic": ["{e} has been translated into many languages.", "{e} is often included on school reading lists.",
                    "{e} is considered a classic of literature."],
        "author": {
            "q": ["Who wrote {e}?", "Who is the author of {e}?"],
            "a": ["{e} was written by {v}.", "{v} is the author of {e}."],
            "near": ["Literature students often write essays about the author of {e}.",
                     "Many readers know the story of {e} without knowing who wrote it.",
                     "Biographies describe the life of the author of {e}."]},
        "year": {
            "q": ["When was {e} first published?", "In which year was {e} first published?"],
            "a": ["{e} was first published in {v}.", "The first edition of {e} appeared in {v}."],
            "near": ["{e} has been reprinted many times since it was first published.",
                     "Collectors pay high prices for first editions of {e}.",
                     "Scholars study the time and place in which {e} was written."]},
    },
    "painting": {
        "table": PAINTINGS,
        "relations": ["painter", "place"],
        "generic": ["Reproductions of {e} appear on posters and postcards.", "Art students often study {e}.",
                    "{e} is a famous painting."],
        "painter": {
            "q": ["Who painted {e}?", "Which artist painted {e}?"],
            "a": ["{e} was painted by {v}.", "{v} painted {e}."],
            "near": ["Art historians have written many books about the painter of {e}.",
                     "Visitors standing in front of {e} often wonder who painted it.",
                     "The artist who painted {e} is remembered as an important painter."]},
        "place": {
            "q": ["Where is {e} displayed?", "In which museum can you see {e}?"],
            "a": ["{e} is displayed at {v}.", "Visitors can see {e} at {v}."],
            "near": ["Crowds of visitors come to see {e} every year.",
                     "Guidebooks tell visitors which museum displays {e}.",
                     "Travellers plan whole trips around a visit to see {e}."]},
    },
    "planet": {
        "table": PLANETS,
        "relations": ["order", "kind"],
        "generic": ["{e} is one of the eight planets of the Solar System.", "Many books have been written about {e}.",
                    "Scientists have studied {e} for centuries."],
        "order": {
            "q": ["Which planet from the Sun is {e}?", "Where does {e} come in order of distance from the Sun?"],
            "a": ["{e} is the {v} planet from the Sun.", "Counting outward from the Sun, {e} is the {v} planet."],
            "near": ["{e} orbits the Sun, as every planet in the Solar System does.",
                     "{e} travels around the Sun on an elliptical orbit.",
                     "Astronomers can calculate the distance between {e} and the Sun very precisely."]},
        "kind": {
            "q": ["What type of planet is {e}?", "How do astronomers classify the planet {e}?"],
            "a": ["{e} is {v}.", "Astronomers classify {e} as {v}."],
            "near": ["Scientists study what {e} is made of to understand how the planet formed.",
                     "Astronomers group the planets by size and composition, and {e} is no exception.",
                     "Astronomers worked out what type of planet {e} is from careful observations."]},
    },
    "animal": {
        "table": ANIMALS,
        "relations": ["class", "native"],
        "generic": ["Wildlife documentaries often feature {e}.", "Children enjoy learning about {e}.",
                    "Scientists study the behaviour of {e}."],
        "class": {
            "q": ["What kind of animal is {e}?", "Which animal class does {e} belong to?"],
            "a": ["{e} is {v}.", "Biologists classify {e} as {v}."],
            "near": ["Biologists classify {e} by features such as its skeleton and how it breathes.",
                     "Field guides describe {e} together with related animals.",
                     "Students often ask what kind of animal {e} really is."]},
        "native": {
            "q": ["Where is {e} found in the wild?", "Which part of the world is {e} native to?"],
            "a": ["{e} is native to {v}.", "In the wild, {e} is found in {v}."],
            "near": ["Wildlife photographers travel long distances to see {e} in the wild.",
                     "Conservation groups study where {e} lives in the wild.",
                     "Nature guides help visitors spot {e} in its natural habitat."]},
    },
    "discovery": {
        "table": DISCOVERIES,
        "relations": ["who", "when"],
        "generic": ["Many history books mention {e}.", "Students learn about {e} at school.",
                    "Science museums often have exhibits about {e}."],
        "who": {
            "q": ["Who {verb} {e}?", "Who is credited with {gerund} {e}?"],
            "a": ["{e} {be} {verb} by {v}.", "{v} {verb} {e}."],
            "near": ["Historians of science have written about the {noun} of {e}.",
                     "The {noun} of {e} is a famous moment in history.",
                     "Textbooks tell the story of the {noun} of {e}."]},
        "when": {
            "q": ["When {be} {e} {verb}?", "In which year {be} {e} {verb}?"],
            "a": ["{e} {be} {verb} in {v}.", "The {noun} of {e} took place in {v}."],
            "near": ["Many people do not know exactly when {e} {be} {verb}.",
                     "The {noun} of {e} was an important turning point.",
                     "The story of how {e} {be} {verb} is often retold."]},
    },
}

STOPWORDS = frozenset(
    "a an the of in on at to for by with from and or is are was were be been its it what which who "
    "whom where when how does do did as that this these those most many much s can you".split())


# ---------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------

def tokens(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


def content_words(text: str) -> set[str]:
    return {t for t in tokens(text) if t not in STOPWORDS}


def mentions(text: str, phrase: str) -> bool:
    """True when the phrase (minus a leading article) occurs as whole words in text."""
    words = tokens(re.sub(r"^(the|a|an) ", "", phrase))
    toks = tokens(text)
    return any(toks[i:i + len(words)] == words for i in range(len(toks) - len(words) + 1))


def load_entities() -> list[dict]:
    """One dict per table row: type, name, held_out, and a value (or None) per relation."""
    entities = []
    for kind, spec in TYPES.items():
        for row in spec["table"]:
            held_out = row[-1] is VAL
            values = list(row[:-1] if held_out else row)
            ent = {"type": kind, "name": values.pop(0), "held_out": held_out, "extra": {}}
            if kind == "discovery":
                be, verb = values.pop(0), values.pop(0)
                gerund, noun = VERB_FORMS[verb]
                ent["extra"] = {"be": be, "verb": verb, "gerund": gerund, "noun": noun}
            ent.update(zip(spec["relations"], values, strict=True))
            entities.append(ent)
    return entities


def render(template: str, ent: dict, value: str | None = None) -> str:
    text = template.format(e=ent["name"], v=value, **ent["extra"])
    return text[0].upper() + text[1:]


def dedupe(items: list[str]) -> list[str]:
    return list(dict.fromkeys(items))


def build_query(rng: random.Random, ent: dict, rel: str, pool: list[dict], n_pos: int, n_neg: int):
    """(query, positives, hard negatives) for one entity/relation."""
    spec = TYPES[ent["type"]]
    rspec = spec[rel]
    query = render(rng.choice(rspec["q"]), ent)
    pos = [render(t, ent, ent[rel]) for t in rng.sample(rspec["a"], n_pos)]
    # negatives that mention the entity: its other facts, near misses, generic sentences
    about_entity = [render(rng.choice(spec[r]["a"]), ent, ent[r])
                    for r in spec["relations"] if r != rel and ent[r] is not None]
    about_entity += [render(t, ent) for t in rng.sample(rspec["near"], 2)]
    n_generic = max(2, 5 - len(about_entity))  # at least five negatives mention the entity
    about_entity += [render(t, ent) for t in rng.sample(spec["generic"], n_generic)]
    rng.shuffle(about_entity)
    # negatives that state the same relation for other entities
    others = [o for o in pool if o["type"] == ent["type"] and o is not ent and o[rel] is not None]
    same_relation = [render(rng.choice(rspec["a"]), o, o[rel]) for o in rng.sample(others, len(others))]
    n_other = max(2, n_neg - len(about_entity))
    neg = dedupe(about_entity[:n_neg - n_other] + same_relation[:n_other])
    check(query, ent, rel, pos, neg)
    return query, pos, neg


def check(query: str, ent: dict, rel: str, pos: list[str], neg: list[str]) -> None:
    """Every positive states the asked fact; no negative states it about the asked entity."""
    name, value = ent["name"], ent[rel]
    for p in pos:
        assert mentions(p, name) and mentions(p, value), (query, p)
    for n in neg:
        assert not (mentions(n, name) and mentions(n, value)), (query, n)
        assert n not in pos, (query, n)


def make_records(entities: list[dict], rng: random.Random):
    train_ents = [e for e in entities if not e["held_out"]]
    pairs = lambda ents: [(e, r) for e in ents for r in TYPES[e["type"]]["relations"] if e[r] is not None]
    train = []
    for ent, rel in pairs(train_ents):
        n_pos = 2 if rng.random() < 0.25 else 1
        query, pos, neg = build_query(rng, ent, rel, train_ents, n_pos, rng.randint(7, 12))
        overlap = sum(bool(content_words(query) & content_words(n)) for n in neg)
        assert len(neg) >= 7 and overlap >= 5, (query, neg)
        rng.shuffle(neg)
        train.append({"query": query, "pos": pos, "neg": neg})
    val = []
    for ent, rel in pairs([e for e in entities if e["held_out"]]):
        n_pos = 2 if rng.random() < 0.2 else 1
        n_cand = rng.randint(8, 10)
        query, pos, neg = build_query(rng, ent, rel, entities, n_pos, n_cand - n_pos)
        cands = [(t, 1) for t in pos] + [(t, 0) for t in neg]
        rng.shuffle(cands)
        val.append({"query": query, "candidates": cands})
    rng.shuffle(train)
    rng.shuffle(val)
    queries = [r["query"] for r in train + val]
    assert len(set(queries)) == len(queries), "duplicate query"
    for i, rec in enumerate(val):
        rec["qid"] = f"v{i}"
        rec["candidates"] = [{"docid": f"v{i}-{j}", "text": t, "label": lab}
                             for j, (t, lab) in enumerate(rec["candidates"])]
    return train, [{"qid": r["qid"], "query": r["query"], "candidates": r["candidates"]} for r in val]


README = """\
# Sample reranking data

A small reranking data set for trying the project out (the default `python train.py`
run trains on `train.jsonl` and validates on `val_candidates.jsonl`).

- `train.jsonl`: {n_train} training queries in FlagEmbedding format, one JSON object per
  line: `{{"query": str, "pos": [str, ...], "neg": [str, ...]}}` ({n_train_pos} positive and
  {n_train_neg} hard negative passages in all).
- `val_candidates.jsonl`: {n_val} validation queries, each
  `{{"qid": str, "query": str, "candidates": [{{"docid": str, "text": str, "label": int}}, ...]}}`
  ({n_val_cand} candidates in all, {n_val_pos} with label 1). Validation queries ask about
  entities that no training query asks about, with the same relation types.

The project's authors wrote these files with `scripts/make_sample_data.py` from hand-written
fact tables (countries, chemical elements, books, paintings, planets, animals, discoveries).
No external data set text is copied: this is the project's own data, under the same licence
as the project. Hard negatives state a different fact about the same entity, the same fact
about a different entity, or mention the query's key words without answering it.

Regenerate (the output is byte-identical on every run):

    python scripts/make_sample_data.py            # or --out DIR to write elsewhere
"""


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with path.open("w", encoding="utf-8", newline="\n") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory (default: data/sample)")
    args = parser.parse_args(argv)
    train, val = make_records(load_entities(), random.Random(SEED))
    args.out.mkdir(parents=True, exist_ok=True)
    write_jsonl(args.out / "train.jsonl", train)
    write_jsonl(args.out / "val_candidates.jsonl", val)
    counts = {
        "n_train": len(train), "n_train_pos": sum(len(r["pos"]) for r in train),
        "n_train_neg": sum(len(r["neg"]) for r in train), "n_val": len(val),
        "n_val_cand": sum(len(r["candidates"]) for r in val),
        "n_val_pos": sum(c["label"] for r in val for c in r["candidates"]),
    }
    (args.out / "README.md").write_text(README.format(**counts), encoding="utf-8", newline="\n")
    print(f"wrote {len(train)} training and {len(val)} validation queries to {args.out}")


if __name__ == "__main__":
    main()
