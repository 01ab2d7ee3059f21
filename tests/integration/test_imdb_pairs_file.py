"""The IMDb pairs written to a file score the same texts as `rlhf reward data=imdb_pairs`."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from rlhf_cli.tools.imdb_pairs_file import main


@pytest.mark.slow  # reads the IMDb reviews (tens of seconds on a busy 2-core machine)
def test_written_pairs_are_the_imdb_pairs_in_the_explicit_format(tmp_path: Path) -> None:
    from rlhf_cli.config.compose import compose_train_config
    from rlhf_cli.data.imdb_pairs import imdb_pair_rows
    from rlhf_cli.data.preferences import parse_rows, read_preference_table
    from rlhf_cli.models.builder import load_tokenizer

    out = tmp_path / "imdb.jsonl"
    assert main([str(out), "--pairs", "6", "--seed", "3"]) == 0
    cfg = compose_train_config([], config_name="reward")
    tokenizer = load_tokenizer(cfg.model)
    expected = imdb_pair_rows(cfg.data, "train", 6, tokenizer, 3)
    files = OmegaConf.merge(cfg.data, {"source": "files", "data_files": [str(out)]})
    read = parse_rows(read_preference_table(files, "train"), files, tokenizer, where=str(out))
    assert read.chosen_texts == expected.chosen_texts and read.rejected_texts == expected.rejected_texts
    with pytest.raises(SystemExit):  # never overwrites
        main([str(out), "--pairs", "2"])
