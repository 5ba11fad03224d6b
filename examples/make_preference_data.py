"""Write preference pairs for the quickstart task: the same unit-conversion prompts, chosen = the correct answer,
rejected = a wrong one, for examples/dpo_after_quickstart.yaml and examples/reward_model.yaml; and the same answers
unpaired for examples/kto_after_quickstart.yaml: each a conversation labelled true (the correct answer) or false
(the wrong one), shuffled so that neighbouring records (KTO's mismatched pairs for its KL term) answer different
prompts.

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


def labelled(pair_records: list[dict], rng: random.Random) -> list[dict]:
    """Each pair's answers as two KTO records (messages and a boolean label), shuffled."""
    out = []
    for pair in pair_records:
        for key, label in (("chosen", True), ("rejected", False)):
            out.append({"messages": [{"role": "user", "content": pair["instruction"]},
                                     {"role": "assistant", "content": pair[key]}], "label": label})
    rng.shuffle(out)
    return out


def main(source: Path = HERE / "data" / "quickstart", out_dir: Path = HERE / "data" / "preferences",
         train_pairs: int = 1000) -> None:
    rng, shuffle_rng = random.Random(SEED), random.Random(SEED + 1)  # the pairs' stream stays as it was
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, count in (("train", train_pairs), ("test", None)):
        lines = (source / f"{name}.jsonl").read_text(encoding="utf-8").splitlines()
        records = [json.loads(line) for line in lines[:count]]
        path = out_dir / f"units_{name}.jsonl"
        written = pairs(records, rng)
        with open(path, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(pair, ensure_ascii=False) + "\n" for pair in written)
        print(f"wrote {len(records)} pairs to {path}")
        unpaired = labelled(written, shuffle_rng)
        kto_path = out_dir / f"units_kto_{name}.jsonl"
        with open(kto_path, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(record, ensure_ascii=False) + "\n" for record in unpaired)
        print(f"wrote {len(unpaired)} labelled answers to {kto_path}")


if __name__ == "__main__":
    main()
