"""Split a BEIR folder's judged queries into train and dev qrels (seeded), for training on some queries
of a collection and evaluating on the others:

  python scripts/split_beir_queries.py BEIR_DIR OUT_DIR [--split test] [--dev 0.5] [--seed 0]

OUT_DIR gets links to corpus.jsonl and queries.jsonl and qrels/train.tsv, qrels/dev.tsv.
"""

import argparse
import csv
import random
from collections import defaultdict
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("beir_dir", type=Path)
    p.add_argument("out_dir", type=Path)
    p.add_argument("--split", default="test")
    p.add_argument("--dev", type=float, default=0.5, help="fraction of queries for dev")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    rows = defaultdict(list)
    with (args.beir_dir / "qrels" / f"{args.split}.tsv").open() as fh:
        for row in csv.DictReader(fh, delimiter="\t"):
            rows[row["query-id"]].append(row)
    qids = sorted(rows)
    random.Random(args.seed).shuffle(qids)
    n_dev = round(len(qids) * args.dev)
    parts = {"dev": sorted(qids[:n_dev]), "train": sorted(qids[n_dev:])}
    (args.out_dir / "qrels").mkdir(parents=True, exist_ok=True)
    for name in ("corpus.jsonl", "queries.jsonl"):
        link = args.out_dir / name
        if not link.exists():
            link.symlink_to((args.beir_dir / name).resolve())
    for part, ids in parts.items():
        with (args.out_dir / "qrels" / f"{part}.tsv").open("w", newline="") as fh:
            writer = csv.DictWriter(fh, ["query-id", "corpus-id", "score"], delimiter="\t", lineterminator="\n")
            writer.writeheader()
            for qid in ids:
                writer.writerows(rows[qid])
        print(f"{part}: {len(ids)} queries: {' '.join(ids)}")


if __name__ == "__main__":
    main()
