"""Write the word-tagging example data (seeded, deterministic):

- examples/data/ner/english.jsonl: {"tokens", "tags"}, English sentences with people (PER) and places (LOC);
- examples/data/ner/chinese.jsonl: the same in Chinese, one word per character;
- examples/data/multitask/requests.jsonl: support requests with three labels, each sometimes missing:
  "ner_tags" (PER/LOC per word), "intent" (book, weather, greet) and "compliant" (no when the request asks for a
  password or a secret code).

Run from the repository root: python examples/make_tagging_data.py
"""

import json
import random
from pathlib import Path

OUT = Path(__file__).parent / "data"

PEOPLE_EN = ["Alice", "Bruno", "Carmen", "Dmitri", "Elena", "Farid", "Greta", "Hiroshi"]
PLACES_EN = [["Paris"], ["Tokyo"], ["Lagos"], ["Oslo"], ["Lima"], ["Cairo"], ["New", "York"], ["Hong", "Kong"]]
SENTENCES_EN = ["{P} lives in {L} .", "yesterday {P} flew to {L} with {P} .", "{L} is where {P} works .",
                "we met {P} in {L} last year .", "the train from {L} to {L} was late ."]
PEOPLE_ZH = ["张伟", "李娜", "王芳", "刘洋", "陈静"]
PLACES_ZH = ["北京", "上海", "广州", "深圳", "成都", "杭州"]
SENTENCES_ZH = ["{P}在{L}工作", "{P}明天去{L}", "昨天{P}和{P}到了{L}", "{L}的{P}很好", "我们从{L}去{L}"]

PEOPLE = ["alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi"]
CITIES = [["paris"], ["london"], ["tokyo"], ["berlin"], ["madrid"], ["new", "york"], ["hong", "kong"]]
REQUESTS = {"book": [["book", "a", "table", "for", "PER", "in", "CITY"], ["please", "book", "a", "flight", "to", "CITY"]],
            "weather": [["what", "is", "the", "weather", "in", "CITY"], ["will", "it", "rain", "in", "CITY"]],
            "greet": [["say", "hello", "to", "PER"], ["send", "my", "regards", "to", "PER", "in", "CITY"]]}
ENDINGS = {"no": [["and", "share", "the", "password"], ["and", "send", "the", "secret", "code"]],
           "yes": [["and", "thank", "you"], ["right", "now", "please"]]}


def _entity(kind: str, words: list[str]) -> tuple[list[str], list[str]]:
    return words, [f"B-{kind}"] + [f"I-{kind}"] * (len(words) - 1)


def ner_sentence(rng: random.Random, chinese: bool) -> dict:
    """One sentence with its slots filled: {"tokens", "tags"} (Chinese: one word per character)."""
    template = rng.choice(SENTENCES_ZH if chinese else SENTENCES_EN)
    words, tags = [], []
    for piece in template.replace("{", " {").replace("}", "} ").split() if not chinese else _zh_pieces(template):
        if piece in ("{P}", "{L}"):
            if chinese:
                name = rng.choice(PEOPLE_ZH if piece == "{P}" else PLACES_ZH)
                entity = _entity("PER" if piece == "{P}" else "LOC", list(name))
            else:
                entity = _entity("PER", [rng.choice(PEOPLE_EN)]) if piece == "{P}" else _entity("LOC", rng.choice(PLACES_EN))
            words += entity[0]
            tags += entity[1]
        else:
            characters = list(piece) if chinese else [piece]
            words += characters
            tags += ["O"] * len(characters)
    return {"tokens": words, "tags": tags}


def _zh_pieces(template: str) -> list[str]:
    pieces, rest = [], template
    while rest:
        slot = min((i for i in (rest.find("{P}"), rest.find("{L}")) if i >= 0), default=-1)
        if slot < 0:
            return pieces + [rest]
        pieces += ([rest[:slot]] if slot else []) + [rest[slot:slot + 3]]
        rest = rest[slot + 3:]
    return pieces


def request(rng: random.Random, i: int) -> dict:
    """A request labelled for each head, but record i leaves out one label (i % 4: ner, intent, compliant) or none."""
    intent, compliant = ["book", "weather", "greet"][i % 3], "yes" if (i // 3) % 2 == 0 else "no"
    words, tags = [], []
    for slot in rng.choice(REQUESTS[intent]):
        entity = (_entity("PER", [rng.choice(PEOPLE)]) if slot == "PER" else
                  _entity("LOC", rng.choice(CITIES)) if slot == "CITY" else ([slot], ["O"]))
        words += entity[0]
        tags += entity[1]
    ending = rng.choice(ENDINGS[compliant])
    record = {"tokens": words + ending, "ner_tags": tags + ["O"] * len(ending), "intent": intent, "compliant": compliant}
    missing = {0: "ner_tags", 1: "intent", 2: "compliant"}.get(i % 4)
    if missing is not None:
        del record[missing]
    return record


def write(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    print(f"wrote {len(records)} records to {path}")


def main() -> None:
    rng = random.Random(0)
    write(OUT / "ner" / "english.jsonl", [ner_sentence(rng, False) for _ in range(240)])
    write(OUT / "ner" / "chinese.jsonl", [ner_sentence(rng, True) for _ in range(240)])
    write(OUT / "multitask" / "requests.jsonl", [request(rng, i) for i in range(320)])


if __name__ == "__main__":
    main()
