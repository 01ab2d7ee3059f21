"""Write ``rlhf reward``'s offline IMDb pairs to a preference file, to train on them together with
pairs of your own (``rlhf reward data=files data.data_files=[mine.jsonl,imdb_pairs.jsonl]``).

    python -m rlhf_cli.tools.imdb_pairs_file OUT.jsonl [--pairs 2000] [--split train] [--seed 0]

The pairs are exactly those of ``data=imdb_pairs`` (same snippets, lengths and review tokenizer for
the same seed). The two snippets of a pair have different openings, so each row has an empty
``prompt`` and the whole snippet as ``chosen`` / ``rejected``: the scored texts (prompt + response)
are the same as under ``data=imdb_pairs``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Sequence


def write_imdb_pairs(out: Path, *, pairs: int, split: str, seed: int) -> int:
    """Write ``pairs`` IMDb pairs of ``split`` to ``out`` (explicit format); returns the rows written."""
    from rlhf_cli.config.compose import compose_train_config
    from rlhf_cli.data.imdb_pairs import imdb_pair_rows
    from rlhf_cli.models.builder import load_tokenizer

    cfg = compose_train_config([], config_name="reward")
    rows = imdb_pair_rows(cfg.data, split, pairs, load_tokenizer(cfg.model), seed)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "x", encoding="utf-8") as handle:  # never overwrite a file
        for chosen, rejected in zip(rows.chosen_texts, rows.rejected_texts):
            handle.write(json.dumps({"prompt": "", "chosen": chosen, "rejected": rejected, "source": f"imdb_pairs/{split}"},
                                    ensure_ascii=False) + "\n")
    return len(rows)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rlhf_cli.tools.imdb_pairs_file", description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="the .jsonl file to write (must not exist)")
    parser.add_argument("--pairs", type=int, default=2000, help="pairs to write (default: 2000, as data=imdb_pairs)")
    parser.add_argument("--split", choices=("train", "test"), default="train", help="IMDb split (default: train)")
    parser.add_argument("--seed", type=int, default=0, help="the seed rlhf reward would use (default: 0)")
    args = parser.parse_args(argv)
    if args.out.exists():
        parser.error(f"{args.out} exists; give a new file.")
    written = write_imdb_pairs(args.out, pairs=args.pairs, split=args.split, seed=args.seed)
    print(f"wrote {written} IMDb pairs ({args.split} split, seed {args.seed}) to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
