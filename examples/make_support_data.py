"""Write the support-ticket example data (English and Chinese, seeded, deterministic):

- examples/data/support/tickets.jsonl: {"text", "intent"} for the intent classifier
  (intents billing, delivery, account, refund; refund is the rare class, 10%);
- examples/data/support/domain.jsonl: {"text"} support-desk sentences for the domain stage.

Run from the repository root: python examples/make_support_data.py
"""

import json
import random
from pathlib import Path

OUT = Path(__file__).parent / "data" / "support"

TEMPLATES = {
    "billing": ["I was charged twice for order {n}", "why is my invoice {n} higher than last month",
                "please explain the fee on bill {n}", "订单{n}被重复扣款了", "发票{n}的金额不对"],
    "delivery": ["where is my parcel {n}", "package {n} has not arrived yet", "the courier lost shipment {n}",
                 "快递{n}还没到", "包裹{n}显示已签收但我没收到"],
    "account": ["I cannot log in to account {n}", "reset the password of user {n}", "my account {n} is locked",
                "账号{n}无法登录", "请帮我重置账户{n}的密码"],
    "refund": ["I want my money back for order {n}", "please refund purchase {n}", "退款申请{n}什么时候到账"],
}
SHARES = {"billing": 0.3, "delivery": 0.3, "account": 0.3, "refund": 0.1}
DOMAIN = ["Thank you for contacting support about order {n}.", "Your ticket {n} has been forwarded to our team.",
          "感谢您的耐心，工单{n}已处理。", "We have updated the shipping address of order {n}.",
          "您的账户{n}已经恢复正常。", "A refund for order {n} usually takes five working days."]


def tickets(count: int, rng: random.Random) -> list[dict]:
    intents = rng.choices(list(SHARES), weights=list(SHARES.values()), k=count)
    return [{"text": rng.choice(TEMPLATES[intent]).format(n=rng.randint(1000, 9999)), "intent": intent}
            for intent in intents]


def main() -> None:
    rng = random.Random(0)
    OUT.mkdir(parents=True, exist_ok=True)
    rows = tickets(400, rng)
    domain = [{"text": rng.choice(DOMAIN).format(n=rng.randint(1000, 9999))} for _ in range(300)]
    for name, records in (("tickets.jsonl", rows), ("domain.jsonl", domain)):
        text = "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
        (OUT / name).write_text(text, encoding="utf-8")
    print(f"wrote {len(rows)} tickets and {len(domain)} domain sentences to {OUT}")


if __name__ == "__main__":
    main()
