"""The column names of sqlm's datasets: the schema that data loading, reward caching, precomputed
reference values and the trainer's guards share.

A leaf module (it imports nothing from sqlm), so that any of them can read the schema without
importing the others (:mod:`sqlm.data` tokenises, :mod:`sqlm.rewards.cache` writes dense rewards
with :mod:`sqlm.data`'s tokenisers: the columns cannot live in either without a cycle).
"""

from __future__ import annotations


# columns added by tokenisation; everything else is passed to reward functions
TOKEN_COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids", "completion_ids", "row_index")
# the text columns of TRL's dataset formats (preference, prompt-completion, prompt-only)
TEXT_COLUMNS = ("prompt", "chosen", "rejected", "completion")
# the dense-reward column of each side of a row (one float per completion token): the reward cache
# writes them, the trainer reads them
TOKEN_REWARD_COLUMNS = {
    "chosen": "chosen_token_rewards",
    "rejected": "rejected_token_rewards",
    "completion": "token_rewards",
}
# precomputed log pi_ref(a_t|s_t) and logsumexp z_ref(s_t) of each side's completion tokens
REF_COLUMNS = {
    "chosen": ("chosen_ref_log_probs", "chosen_ref_logsumexp"),
    "rejected": ("rejected_ref_log_probs", "rejected_ref_logsumexp"),
    "completion": ("ref_log_probs", "ref_logsumexp"),
}
ALL_REF_COLUMNS = tuple(c for cols in REF_COLUMNS.values() for c in cols)
