"""One training record per (query, positive), for data with many positives per query:

  python scripts/split_positives.py IN.jsonl OUT.jsonl

Each record of IN with k positives becomes k records, each with one of them and all the query's
negatives; `pos_scores`/`pos_grades`/`pos_ids` follow their positive, `neg_*` fields are repeated. A
record keeps its single positive per step either way (SPEC 2 samples one), so this changes how often a
query comes round per epoch, not what a step sees: an epoch visits every positive once instead of one
random positive per query. Run it after `rerank-lightning score-teacher`, which then scores each
passage once.
"""

import argparse
import json

PER_POSITIVE = ("pos", "pos_scores", "pos_grades", "pos_ids")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("src", help="FlagEmbedding training JSONL")
    p.add_argument("dst", help="where to write the split records")
    args = p.parse_args()
    written = read = 0
    with open(args.src, encoding="utf-8") as fh, open(args.dst, "w", encoding="utf-8") as out:
        for line in fh:
            if not line.strip():
                continue
            record = json.loads(line)
            read += 1
            for i in range(len(record["pos"])):
                one = dict(record)
                one.update({key: [record[key][i]] for key in PER_POSITIVE if key in record})
                out.write(json.dumps(one, ensure_ascii=False) + "\n")
                written += 1
    print(f"{read} records -> {written} records, one positive each: {args.dst}")


if __name__ == "__main__":
    main()
