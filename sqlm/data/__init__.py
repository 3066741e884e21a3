"""Datasets in TRL's formats -> token trajectories for the soft-Q losses.

Formats (TRL's names; each standard (text) or conversational (lists of messages)):

* **preference**: ``prompt``, ``chosen``, ``rejected`` (explicit prompt), or ``chosen`` / ``rejected``
  holding whole conversations (implicit prompt, extracted with ``trl.data_utils.extract_prompt``).
  Offline, each row gives TWO trajectories: the chosen and the rejected completion.
* **prompt-completion**: ``prompt``, ``completion``, with an optional scalar ``reward`` (float) or
  ``label`` (bool, KTO style: true -> +1, false -> -1) that lands on the completion's last token.
* **prompt-only**: ``prompt`` (online rollouts).

Precomputed dense rewards (e.g. from a reward cache) ride along as columns of floats aligned with the
completion tokens: ``chosen_token_rewards`` / ``rejected_token_rewards`` (preference) and
``token_rewards`` (prompt-completion). Their length must equal the number of completion tokens that
:func:`tokenize_preference` / :func:`tokenize_prompt_completion` produce (before truncation).

Precomputed reference values (``precompute_ref_log_probs``, :mod:`sqlm.reference`) ride along the
same way, one float per completion token: ``chosen_ref_log_probs`` / ``chosen_ref_logsumexp`` (and
``rejected_...``), or ``ref_log_probs`` / ``ref_logsumexp`` (prompt-completion) hold
``log pi_ref(a_t|s_t)`` and ``logsumexp z_ref(s_t)`` of each completion token.

Tokenisation is pure and deterministic and, with ``max_prompt_length=None`` and
``max_completion_length=None``, gives exactly the ids of TRL's ``DPOTrainer`` (same EOS handling,
same chat-template calls, same common-prefix split, same ``keep_start`` truncation at ``max_length``).

The modules, in the order data flows through them: :mod:`.sources` (loading a split, the train and
eval sets), :mod:`.holdout` (rows held out as the eval set), :mod:`.formats` (TRL's formats),
:mod:`.tokenization` (one row -> ids, pure), :mod:`.prepare` (a whole dataset checked, tokenised and
its untrainable rows dropped), :mod:`.trajectories` (rows -> paths -> padded model inputs). The column
names they share live in the leaf module :mod:`sqlm.columns`.
"""

from ..columns import ALL_REF_COLUMNS, REF_COLUMNS, TEXT_COLUMNS, TOKEN_COLUMNS, TOKEN_REWARD_COLUMNS
from .formats import FORMAT_HELP, PREFERENCE, PROMPT_COMPLETION, PROMPT_ONLY, detect_format
from .holdout import HOLD_OUT_SEED, check_hold_out, hold_out, hold_out_indices
from .prepare import SKIP_IDENTICAL, SKIP_LONG_PROMPT, SKIP_TRUNCATED, prepare_dataset
from .sources import check_utf8, decode_message_columns, load_split, load_train_eval, one_line, take_first
from .tokenization import template_ends_turns, tokenize_preference, tokenize_prompt, tokenize_prompt_completion
from .trajectories import (
    DataCollatorForSoftQ,
    Trajectory,
    offline_trajectories,
    pack_trajectories,
    passthrough_columns,
)


__all__ = [
    "ALL_REF_COLUMNS",
    "FORMAT_HELP",
    "HOLD_OUT_SEED",
    "PREFERENCE",
    "PROMPT_COMPLETION",
    "PROMPT_ONLY",
    "REF_COLUMNS",
    "SKIP_IDENTICAL",
    "SKIP_LONG_PROMPT",
    "SKIP_TRUNCATED",
    "TEXT_COLUMNS",
    "TOKEN_COLUMNS",
    "TOKEN_REWARD_COLUMNS",
    "DataCollatorForSoftQ",
    "Trajectory",
    "check_hold_out",
    "check_utf8",
    "decode_message_columns",
    "detect_format",
    "hold_out",
    "hold_out_indices",
    "load_split",
    "load_train_eval",
    "offline_trajectories",
    "one_line",
    "pack_trajectories",
    "passthrough_columns",
    "prepare_dataset",
    "take_first",
    "template_ends_turns",
    "tokenize_preference",
    "tokenize_prompt",
    "tokenize_prompt_completion",
]
