"""Prompt datasets (load, filter, tokenise, length-sample, collate) and the offline review tokenizer."""

from rlhf_cli.data.imdb_local import load_imdb_reviews, load_review_texts
from rlhf_cli.data.prompts import PromptData, build_prompt_data, collate_queries
from rlhf_cli.data.sources import load_text_dataset
from rlhf_cli.data.text import clean_html
from rlhf_cli.data.tokenizer import review_tokenizer

__all__ = [
    "PromptData",
    "build_prompt_data",
    "clean_html",
    "collate_queries",
    "load_imdb_reviews",
    "load_review_texts",
    "load_text_dataset",
    "review_tokenizer",
]
