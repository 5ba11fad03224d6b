"""Write preference pairs for the quickstart task: the same unit-conversion prompts, chosen = the correct answer,
rejected = a wrong one, for examples/dpo_after_quickstart.yaml and examples/reward_model.yaml.

Built from examples/data/quickstart/{train,test}.jsonl (python examples/make_quickstart_data.py writes them), so
the DPO example's prompts are the very prompts its starting SFT model learned. Each wrong answer is a mistake a
model of the task makes (the quickstart model's own mistakes are of these kinds): a zero too many or too few, or
the number copied unconverted. Held-out pairs (test) use the held-out quickstart prompts.

Run: python examples/make_preference_data.py  (deterministic: same files every time)
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

HERE = Path(__file__).parent
SEED = 20261124


def wrong_answer(instruction: str, answer: int, rng: random.Random) -> int:
    """A wrong answer to a quickstart prompt, never equal to the correct one."""
    shown = int(re.search(r"\d+", instruction).group())
    candidates = {
        "zero_too_many": answer * 10,
        "zero_too_few": answer // 10 if answer % 10 == 0 and answer >= 10 else None,
        "unconverted": shown,
    }
    options = [value for value in candidates.values() if value is not None and value != answer]
    return rng.choice(options)


def pairs(records: list[dict], rng: random.Random) -> list[dict]:
    out = []
    for record in records:
        answer = int(record["output"])
        out.append({"instruction": record["instruction"], "chosen": str(answer),
                    "rejected": str(wrong_answer(record["instruction"], answer, rng))})
    return out


def main(source: Path = HERE / "data" / "quickstart", out_dir: Path = HERE / "data" / "preferences",
         train_pairs: int = 1000) -> None:
    rng = random.Random(SEED)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, count in (("train", train_pairs), ("test", None)):
        lines = (source / f"{name}.jsonl").read_text(encoding="utf-8").splitlines()
        records = [json.loads(line) for line in lines[:count]]
        path = out_dir / f"units_{name}.jsonl"
        with open(path, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(pair, ensure_ascii=False) + "\n" for pair in pairs(records, rng))
        print(f"wrote {len(records)} pairs to {path}")


if __name__ == "__main__":
    main()
