"""Split the 1,000 Yelp sentences into 300 for training and 700 for evaluation (stratified,
seeded), for the domain-adaptation run in docs/trainer.md and examples/yelp-adapt.yaml.

    python -m scripts.split_yelp [--out out/yelp] [--train 300] [--seed 7]
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
YELP = ROOT.parent / "shared" / "data" / "restaurant_reviews" / "yelp.jsonl"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "out" / "yelp")
    parser.add_argument("--train", type=int, default=300)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    rows = [json.loads(line) for line in YELP.read_text().splitlines() if line.strip()]
    by_label: dict[str, list[dict[str, str]]] = {}
    for row in rows:
        by_label.setdefault(row["label"], []).append(row)
    rng = random.Random(args.seed)
    train: list[dict[str, str]] = []
    for items in by_label.values():
        rng.shuffle(items)
        train += items[: round(args.train * len(items) / len(rows))]
    chosen = {id(row) for row in train}
    held_out = [row for row in rows if id(row) not in chosen]
    args.out.mkdir(parents=True, exist_ok=True)
    for name, part in (("train", train), ("eval", held_out)):
        lines = "".join(json.dumps(row) + "\n" for row in part)
        (args.out / f"{name}.jsonl").write_text(lines)
    print(f"{len(train)} training and {len(held_out)} evaluation sentences in {args.out}")


if __name__ == "__main__":
    main()
