"""Write the quickstart dataset: unit conversions in English and Chinese with checkable answers.

Each record is alpaca-style: an instruction such as "Convert 37 km to m." or "把 37 千克换算成克。"
and the exact numeric answer. Held-out prompts use numbers that never appear in training for
that conversion, so exact match on them measures what the model learned, not what it memorised.

Run: python examples/make_quickstart_data.py  (deterministic: same files every time)
"""

from __future__ import annotations

import json
import random
from pathlib import Path

# (English unit, English target, Chinese unit, Chinese target, factor): multiply by factor,
# or divide when the conversion goes the other way.
CONVERSIONS = [
    ("km", "m", "千米", "米", 1000),
    ("kg", "g", "千克", "克", 1000),
    ("m", "cm", "米", "厘米", 100),
    ("yuan", "jiao", "元", "角", 10),
]
TRAIN_RECORDS = 3000
TEST_RECORDS = 100
SEED = 20261123


def _question(rng: random.Random, value: int, conversion: tuple, reverse: bool) -> tuple[str, str]:
    en_from, en_to, zh_from, zh_to, factor = conversion
    if reverse:
        en_from, en_to, zh_from, zh_to = en_to, en_from, zh_to, zh_from
        shown, answer = value * factor, value
    else:
        shown, answer = value, value * factor
    if rng.random() < 0.5:
        return f"Convert {shown} {en_from} to {en_to}.", str(answer)
    return f"把 {shown} {zh_from}换算成{zh_to}。", str(answer)


def _records(rng: random.Random, count: int, values: list[int]) -> list[dict]:
    out = []
    for _ in range(count):
        conversion = rng.choice(CONVERSIONS)
        instruction, answer = _question(rng, rng.choice(values), conversion, rng.random() < 0.5)
        out.append({"instruction": instruction, "output": answer})
    return out


def main(out_dir: Path = Path(__file__).parent / "data" / "quickstart") -> None:
    rng = random.Random(SEED)
    values = list(range(1, 1000))
    rng.shuffle(values)
    held_out, seen = values[:100], values[100:]
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, records in (
        ("train.jsonl", _records(rng, TRAIN_RECORDS, seen)),
        ("test.jsonl", _records(rng, TEST_RECORDS, held_out)),
    ):
        with open(out_dir / name, "w", encoding="utf-8") as f:
            for record in records:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
        print(f"wrote {len(records)} records to {out_dir / name}")


if __name__ == "__main__":
    main()
