"""The scoring rule of a reward model, under the name ``rlhf reward``'s code and its users import.

The rule itself is in :mod:`rlhf_cli.models.reward_scoring`, below both the trainer here and the
``learned`` reward source (``rlhf_cli.rewards.learned``), so neither package imports the other's.
"""

from rlhf_cli.models.reward_scoring import (  # noqa: F401 (re-exported)
    HEAD_RULES,
    RULE_FILE,
    RULE_FORMAT,
    SEQUENCE_CLASSIFICATION,
    VALUE_HEAD,
    HeadRule,
    ScoringRule,
    encode_texts,
    left_padded,
    pad_id_of,
    padded_batch,
    right_padded,
    score_ids,
    score_texts,
    sequence_scores,
)
