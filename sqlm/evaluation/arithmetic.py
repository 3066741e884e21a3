"""The arithmetic gold task: multi-digit addition with a worked trace, rewarded by exact correctness.

A verifiable-reasoning task (the setting of GRPO, OREO, DQO): the reward is 1 when the final answer
is exactly right, else 0, read by a checker; no reward model is needed.

**Format** (one character per token, see :func:`char_tokenizer`). The prompt is ``A+B:``. The
completion works the columns from the least significant digit, one fixed-width step ``x+y+c=ss`` per
column (the digits, the incoming carry, and the column sum as two digits: the next carry, then the
answer digit; a column past a shorter operand's end reads ``0``), then the answer after `` = ``::

    prompt      37+85:
    completion   7+5+0=12 3+8+1=12 = 122<eos>

The answer is the last carry (when 1) followed by the steps' units digits read backwards. Steps write
``=`` with no spaces, the answer ``" = "`` with spaces, so a completion cut off after a step never
reads as an answer. Fixed-width steps keep the offsets the model attends over regular, which helps a
tiny model (measured once: greedy accuracy 0.63 against 0.56 with variable-width steps, same budget).

**Base LM** (``pi_ref``): a tiny Qwen2-shaped LM pretrained here on ``prompt + completion`` texts of
problems with operands of 1 to ``max_digits`` digits, ``wrong_share`` of them WRONG (see
:func:`wrong_trace`): half with an error in one column's sum that the rest of the trace carries on
consistently (a wrong trace), half with a right trace and one answer digit changed (a wrong answer).
Sampled at temperature 1 it makes such errors itself, so its accuracy starts well below 1. Pretraining
is deterministic (one thread, deterministic algorithms, seeded data and order): a seed gives the same
weights on every machine of a kind. The model is cached under ``cache_dir/arithmetic`` by a hash of
its settings, as :mod:`sqlm.evaluation.gold` does.

**Splits** by a stable hash of the problem (:func:`split_of`): ``pretrain`` (80%, the only problems in
the pretraining corpus), ``train`` (10%, prompts of the fine-tuning runs and their preference pairs),
``eval`` (10%, held out). The ``long`` evaluation split has operands of ``max_digits + 1`` to
``long_digits`` digits, longer than any seen in pretraining.

**Gold reward**: :func:`answer_reward` (one prompt and completion) and :func:`arith_reward` (TRL's
reward-function signature, ``sqlm.evaluation.arithmetic:arith_reward`` in a recipe).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import SqlmError
from .gold import (
    base_lm,
    completion_text,
    default_cache_dir,
    deterministic_torch,
    fingerprint,
    load_base,
    preference_pairs,
    pretrain_lm,
    save_atomically,
    save_base,
)


CHARS = "0123456789+=: "


# ----------------------------------------------------------------------------- format


def prompt_of(a: int, b: int) -> str:
    return f"{a}+{b}:"


def _columns(a: int, b: int) -> list[tuple[int, int]]:
    xs, ys = str(a)[::-1], str(b)[::-1]
    n = max(len(xs), len(ys))
    return [(int(xs[i]) if i < len(xs) else 0, int(ys[i]) if i < len(ys) else 0) for i in range(n)]


def _render(cols: list[tuple[int, int]], sums: list[int], answer: str) -> str:
    """`` x+y+c=ss ... = answer`` from the columns and the written sums (the carries follow from them)."""
    steps, carry = [], 0
    for (x, y), s in zip(cols, sums):
        steps.append(f" {x}+{y}+{carry}={s:02d}")
        carry = s // 10
    return "".join(steps) + f" = {answer}"


def _trace_sums(cols: list[tuple[int, int]], wrong_at: int | None = None, delta: int = 0) -> list[int]:
    sums, carry = [], 0
    for j, (x, y) in enumerate(cols):
        s = x + y + carry + (delta if j == wrong_at else 0)
        sums.append(s)
        carry = s // 10
    return sums


def _answer_of(sums: list[int]) -> str:
    """The answer a trace's sums spell: the last carry, then the units digits from the top column down."""
    digits = "".join(str(s % 10) for s in reversed(sums))
    text = (str(sums[-1] // 10) if sums[-1] >= 10 else "") + digits
    return text.lstrip("0") or "0"


def trace(a: int, b: int) -> str:
    """The correct worked completion of ``a+b:`` (see the module docstring)."""
    cols = _columns(a, b)
    sums = _trace_sums(cols)
    return _render(cols, sums, _answer_of(sums))


def wrong_trace(a: int, b: int, rng: random.Random) -> str:
    """A well-formed completion of ``a+b:`` whose answer is wrong. With probability 1/2 one column's
    sum is off by 1 or 2 (kept in 0..19) and the later columns and the answer follow from it; else the
    trace is right and one digit of the answer is changed (never to a leading zero)."""
    cols = _columns(a, b)
    if rng.random() < 0.5:
        j = rng.randrange(len(cols))
        s = _trace_sums(cols)[j]
        delta = rng.choice([d for d in (-2, -1, 1, 2) if 0 <= s + d <= 19])
        sums = _trace_sums(cols, wrong_at=j, delta=delta)
        return _render(cols, sums, _answer_of(sums))
    sums = _trace_sums(cols)
    answer = list(_answer_of(sums))
    i = rng.randrange(len(answer))
    choices = [d for d in "0123456789" if d != answer[i] and not (i == 0 and d == "0" and len(answer) > 1)]
    answer[i] = rng.choice(choices)
    return _render(cols, sums, "".join(answer))


# ----------------------------------------------------------------------------- checker

_PROMPT = re.compile(r"\s*(\d+)\+(\d+):\s*", re.ASCII)
_ANSWER = re.compile(r"(?:^|.* )= (0|[1-9]\d*)", re.ASCII | re.DOTALL)
_TAIL = re.compile(r"(?:<eos>|<pad>|\s)+$")


def _text(x) -> str:
    """A string, or the content of the last message of a conversation (TRL's conversational format)."""
    if isinstance(x, str):
        return x
    if isinstance(x, list) and x and isinstance(x[-1], dict):
        return str(x[-1].get("content", ""))
    raise SqlmError(f"expected a string or a list of messages, got {type(x).__name__}")


def parse_prompt(prompt) -> tuple[int, int]:
    """``(a, b)`` of a prompt ``a+b:``."""
    m = _PROMPT.fullmatch(_text(prompt))
    if m is None:
        raise SqlmError(f"not an arithmetic prompt (expected 'A+B:'): {_text(prompt)[:80]!r}")
    return int(m.group(1)), int(m.group(2))


def final_answer(completion) -> int | None:
    """The integer after the completion's final `` = `` (or a leading ``= ``), or None when the
    completion does not end that way: empty, no ``=``, text after the answer, a non-digit or a
    leading zero in the answer (ASCII digits only). Trailing whitespace, EOS and padding tokens are
    ignored."""
    text = _TAIL.sub("", _text(completion))
    m = _ANSWER.fullmatch(text)
    return int(m.group(1)) if m else None


def answer_reward(prompt, completion) -> float:
    """1.0 when ``completion`` ends with the exactly right answer to ``prompt``, else 0.0."""
    a, b = parse_prompt(prompt)
    return 1.0 if final_answer(completion) == a + b else 0.0


def arith_reward(prompts, completions, **kwargs) -> list[float]:
    """:func:`answer_reward` with TRL's reward-function signature (GRPO, RLOO, ``sqlm train``)."""
    if len(prompts) != len(completions):
        raise SqlmError(f"arith_reward got {len(prompts)} prompts but {len(completions)} completions")
    return [answer_reward(p, c) for p, c in zip(prompts, completions)]


# ----------------------------------------------------------------------------- problems


def split_of(a: int, b: int) -> str:
    """``pretrain`` / ``train`` / ``eval`` by a stable hash of the problem (80/10/10)."""
    bucket = int(hashlib.sha256(f"{a}+{b}".encode()).hexdigest()[:8], 16) % 10
    return "pretrain" if bucket < 8 else ("train" if bucket == 8 else "eval")


def _operand(rng: random.Random, digits: int) -> int:
    return rng.randrange(10 ** (digits - 1) if digits > 1 else 0, 10**digits)


def sample_problems(
    n: int, min_digits: int, max_digits: int, seed: int, split: str | None = None, distinct: bool = True
) -> list[tuple[int, int]]:
    """``n`` problems ``(a, b)``, each operand's digit count uniform in ``[min_digits, max_digits]``,
    from ``split`` (None: any), distinct when asked."""
    rng = random.Random(seed)
    out, seen = [], set()
    for _ in range(200 * n + 1000):
        if len(out) == n:
            return out
        p = (_operand(rng, rng.randint(min_digits, max_digits)), _operand(rng, rng.randint(min_digits, max_digits)))
        if (split is not None and split_of(*p) != split) or (distinct and p in seen):
            continue
        seen.add(p)
        out.append(p)
    if len(out) < n:
        raise SqlmError(
            f"only {len(out)} distinct {split or ''} problems with {min_digits}-{max_digits} digit operands, "
            f"{n} asked; raise max_digits or ask for fewer"
        )
    return out


# ----------------------------------------------------------------------------- config


@dataclass
class ArithTaskConfig:
    """Settings of the arithmetic task. The base-LM fields are its cache key (:meth:`base_key`)."""

    seed: int = field(default=0, metadata={"help": "Seed of the corpus, the base LM's weights and data order."})
    max_digits: int = field(default=3, metadata={"help": "Longest operand (digits) in pretraining and training."})
    long_digits: int = field(default=4, metadata={"help": "Longest operand of the 'long' evaluation split."})
    wrong_share: float = field(default=0.5, metadata={"help": "Share of wrong traces/answers in the corpus."})
    corpus_problems: int = field(default=40000, metadata={"help": "Worked problems in the pretraining corpus."})
    hidden_size: int = field(default=64, metadata={"help": "Base LM hidden size."})
    num_hidden_layers: int = field(default=2, metadata={"help": "Base LM layers."})
    num_attention_heads: int = field(default=4, metadata={"help": "Base LM attention heads."})
    lm_steps: int = field(default=1100, metadata={"help": "Optimizer steps of base-LM pretraining."})
    lm_batch_size: int = field(default=48, metadata={"help": "Problems per pretraining batch."})
    lm_learning_rate: float = field(default=3e-3, metadata={"help": "Peak pretraining learning rate."})
    max_new_tokens: int = field(default=64, metadata={"help": "Completion length limit (tokens) when sampling."})

    def base_key(self) -> dict:
        keys = [
            "seed", "max_digits", "wrong_share", "corpus_problems", "hidden_size", "num_hidden_layers",
            "num_attention_heads", "lm_steps", "lm_batch_size", "lm_learning_rate",
        ]  # fmt: skip
        return {"task": "arithmetic", **{k: getattr(self, k) for k in keys}}

    def __post_init__(self):
        if not 0.0 <= self.wrong_share <= 1.0:
            raise SqlmError(f"key 'wrong_share' must be in [0, 1], got {self.wrong_share}")
        if self.max_digits < 1 or self.long_digits < self.max_digits:
            raise SqlmError(
                f"keys 'max_digits' ({self.max_digits}) and 'long_digits' ({self.long_digits}) need "
                "1 <= max_digits <= long_digits"
            )


def corpus(cfg: ArithTaskConfig) -> list[str]:
    """The pretraining texts ``prompt + completion`` (pretrain split only), ``wrong_share`` wrong."""
    problems = sample_problems(cfg.corpus_problems, 1, cfg.max_digits, cfg.seed, split="pretrain", distinct=False)
    rng = random.Random(cfg.seed + 1)
    return [
        prompt_of(a, b) + (wrong_trace(a, b, rng) if rng.random() < cfg.wrong_share else trace(a, b))
        for a, b in problems
    ]


# ----------------------------------------------------------------------------- base model


def char_tokenizer():
    """A character-level tokenizer over ``0-9 + = : space`` with pad/eos/bos/unk (ids 0-3).

    One token per character, so tokenising a prompt and its completion apart or together gives the
    same ids (what TRL's trainers assume). Built in the byte-level form of a Qwen2 tokenizer (the space
    is the vocabulary entry ``Ġ``, a BPE model without merges, byte-level pre-tokenizer and decoder):
    ``AutoTokenizer.from_pretrained`` of a saved Qwen2-shaped base LM rebuilds a ``Qwen2Tokenizer``
    from the vocabulary whatever the saved pipeline says (transformers 5), and only this form survives
    that with the same ids; with a plain ``" "`` entry the reloaded tokenizer dropped every space of
    the worked completions."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from ..tiny import CHAT_TEMPLATE, SPECIAL_TOKENS

    vocab = {t: i for i, t in enumerate([*SPECIAL_TOKENS.values(), *(("Ġ" if c == " " else c) for c in CHARS)])}
    tok = Tokenizer(models.BPE(vocab, [], unk_token=SPECIAL_TOKENS["unk_token"]))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex("."), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **SPECIAL_TOKENS)
    fast.chat_template = CHAT_TEMPLATE
    return fast


_TOKENIZER_PROBE = " 7+5+0=12 3+8+1=12 = 122"


def tokenizer_is_current(folder: str | os.PathLike) -> bool:
    """Whether ``AutoTokenizer.from_pretrained(folder)`` encodes a worked completion as
    :func:`char_tokenizer` does (False for base LMs saved with the space-dropping tokenizer)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    return tok(_TOKENIZER_PROBE)["input_ids"] == char_tokenizer()(_TOKENIZER_PROBE)["input_ids"]


def pretrain_base(cfg: ArithTaskConfig, progress: bool = False):
    """``(model, tokenizer, losses)``: the base LM pretrained on :func:`corpus`, deterministically.

    Causal-LM loss on the completion tokens (the prompt's digits are random, nothing to learn), AdamW,
    linear warm-up then cosine decay to 0.1 of the peak rate, batches drawn by a generator seeded with
    ``cfg.seed``; one thread and deterministic algorithms throughout (:func:`deterministic_torch`)."""
    tokenizer = char_tokenizer()
    texts = corpus(cfg)
    eos = tokenizer.eos_token_id
    rows = [(ids + [eos], t.index(":") + 1) for t, ids in zip(texts, tokenizer(texts)["input_ids"])]
    with deterministic_torch(1):
        model = base_lm(tokenizer, cfg, ffn_factor=2)
        losses = pretrain_lm(model, rows, tokenizer.pad_token_id, cfg, progress=progress)
    return model, tokenizer, losses


def base_model_dir(cfg: ArithTaskConfig, cache_dir: str | os.PathLike | None = None) -> Path:
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return root / "arithmetic" / f"base-{fingerprint(cfg.base_key())}"


def build_base_model(cfg: ArithTaskConfig, cache_dir: str | os.PathLike | None = None, progress: bool = True) -> Path:
    """Pretrain (once) and cache the base LM and its tokenizer; return the folder (loads with
    ``AutoModelForCausalLM.from_pretrained``; ``base_lm.json`` holds the settings, the loss curve and
    the weights' digest)."""
    out = base_model_dir(cfg, cache_dir)
    if (out / "base_lm.json").is_file():
        if not tokenizer_is_current(out):  # saved before the byte-level form: same ids, so same weights
            char_tokenizer().save_pretrained(out)
        return out
    import time

    wall, cpu = time.perf_counter(), time.process_time()
    model, tokenizer, losses = pretrain_base(cfg, progress=progress)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return save_base(out, model, tokenizer, cfg, losses, pretrain_seconds=wall, pretrain_cpu_seconds=cpu)


# ----------------------------------------------------------------------------- prompts, sampling, pairs


def task_prompts(cfg: ArithTaskConfig, n_train: int, n_eval: int, n_long: int) -> dict[str, list[str]]:
    """Prompts of the ``train`` split, the held-out ``eval`` split (operands of 1 to ``max_digits``
    digits) and the ``long`` split (``max_digits + 1`` to ``long_digits`` digits), fixed by the seed."""
    out = {
        "train": sample_problems(n_train, 1, cfg.max_digits, cfg.seed + 101, split="train"),
        "eval": sample_problems(n_eval, 1, cfg.max_digits, cfg.seed + 202, split="eval"),
    }
    if n_long:
        if cfg.long_digits <= cfg.max_digits:
            raise SqlmError("key 'long_digits' must exceed 'max_digits' for a long split")
        out["long"] = sample_problems(n_long, cfg.max_digits + 1, cfg.long_digits, cfg.seed + 303, split="eval")
    return {k: [prompt_of(a, b) for a, b in v] for k, v in out.items()}


@torch.no_grad()
def greedy_completions(
    model, prompt_ids, *, max_new_tokens: int, eos_token_id: int, pad_token_id: int, batch_size: int = 64
) -> list[list[int]]:
    """The argmax completion of each prompt (ends at and includes the first EOS, or is
    ``max_new_tokens`` long); the batching and KV cache of ``sampling.sample_completions``."""
    from ..decoding.engine import cache_of, left_pad, positions

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out: list[list[int]] = []
    for start in range(0, len(prompt_ids), batch_size):
        ids, mask = left_pad(prompt_ids[start : start + batch_size], pad_token_id)
        ids, mask = ids.to(device), mask.to(device)
        pos = positions(mask)
        res = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)
        past, logits, last = cache_of(res), res.logits[:, -1], pos[:, -1]
        done = torch.zeros(ids.shape[0], dtype=torch.bool, device=device)
        steps = []
        for _ in range(max_new_tokens):
            tok = torch.where(done, torch.full_like(done, pad_token_id, dtype=torch.long), logits.argmax(-1))
            steps.append(tok)
            done |= tok == eos_token_id
            if bool(done.all()):
                break
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            last = last + 1
            res = model(
                input_ids=tok[:, None], attention_mask=mask, position_ids=last[:, None], cache=past, use_cache=True
            )
            past, logits = cache_of(res), res.logits[:, -1]
        for row in torch.stack(steps, dim=1).tolist():
            out.append(row[: row.index(eos_token_id) + 1] if eos_token_id in row else row)
    model.train(was_training)
    return out


def _sample(
    model,
    tokenizer,
    prompts: list[str],
    k: int,
    max_new_tokens: int,
    seed: int,
    batch_size: int,
    progress: bool,
    desc: str,
):
    from .sampling import sample_completions

    flat = [p for p in tokenizer(prompts)["input_ids"] for _ in range(k)]
    comps = sample_completions(
        model, flat, max_new_tokens=max_new_tokens, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, seed=seed, batch_size=batch_size, desc=desc, progress=progress,
    )  # fmt: skip
    return flat, comps


def checked_pairs(
    prompts: list[str], samples: list[list[str]], max_pairs_per_prompt: int | None = 1
) -> tuple[list[dict], dict]:
    """Check ``samples[i]`` (completions of ``prompts[i]``) and pair a correct one (chosen) with an
    incorrect one (rejected) of the same prompt: TRL's preference format plus ``chosen_score`` 1.0
    and ``rejected_score`` 0.0. Prompts whose samples are all right or all wrong give no pair, nor do
    empty completions; at most ``max_pairs_per_prompt`` per prompt. Returns ``(rows, stats)``."""
    scores = [arith_reward([p] * len(s), s) for p, s in zip(prompts, samples)]
    rows = preference_pairs(prompts, samples, scores, max_pairs_per_prompt)
    flat = [x for s in scores for x in s]
    stats = {
        "prompts": len(prompts),
        "sample_accuracy": sum(flat) / max(len(flat), 1),
        "all_correct": sum(bool(s) and min(s) == 1.0 for s in scores),
        "all_wrong": sum(bool(s) and max(s) == 0.0 for s in scores),
        "pairs": len(rows),
    }
    return rows, stats


def sample_pairs(
    model,
    tokenizer,
    prompts: list[str],
    k: int,
    max_new_tokens: int,
    seed: int,
    max_pairs_per_prompt: int | None = 1,
    batch_size: int = 64,
    progress: bool = False,
) -> tuple[list[dict], dict]:
    """``k`` temperature-1 samples of the model per prompt, paired by :func:`checked_pairs`."""
    _, comps = _sample(model, tokenizer, prompts, k, max_new_tokens, seed, batch_size, progress, "sampling pairs")
    texts = [completion_text(tokenizer, c) for c in comps]
    rows, stats = checked_pairs(
        prompts, [texts[i * k : (i + 1) * k] for i in range(len(prompts))], max_pairs_per_prompt
    )
    return rows, {**stats, "samples_per_prompt": k}


def _lengths(comps: list[list[int]], eos: int) -> list[int]:
    return [len(c) - (1 if c and c[-1] == eos else 0) for c in comps]


def evaluate_model(
    model,
    tokenizer,
    prompts: dict[str, list[str]],
    *,
    ref_model=None,
    max_new_tokens: int = 64,
    samples_per_prompt: int = 1,
    seed: int = 0,
    batch_size: int = 64,
    progress: bool = False,
    per_sample: bool = False,
) -> dict[str, dict]:
    """Per split of ``prompts`` (e.g. ``eval`` and ``long``): accuracy at temperature 1 (mean and
    standard error over ``samples_per_prompt`` samples per prompt), greedy accuracy, the share of
    sampled completions with a readable answer, mean completion length (tokens, EOS excluded) of the
    samples and of the greedy completions, distinct-1/2 of the sampled completions, and, with
    ``ref_model``, ``KL(pi || pi_ref)`` per sampled completion (exact per-step KL summed along it,
    ``sampling.exact_sequence_kl``). ``per_sample`` adds ``per_sample``: every sample's accuracy and
    KL (prompt-major) and two example completions."""
    from .metrics import distinct_n, mean_se
    from .sampling import exact_sequence_kl

    out: dict[str, dict] = {}
    eos = tokenizer.eos_token_id
    for name, ps in prompts.items():
        flat, comps = _sample(
            model, tokenizer, ps, samples_per_prompt, max_new_tokens, seed, batch_size, progress, f"sampling {name}"
        )
        texts = [completion_text(tokenizer, c) for c in comps]
        flat_prompts = [p for p in ps for _ in range(samples_per_prompt)]
        correct = arith_reward(flat_prompts, texts)
        acc, acc_se = mean_se(correct)
        greedy = greedy_completions(
            model,
            tokenizer(ps)["input_ids"],
            max_new_tokens=max_new_tokens,
            eos_token_id=eos,
            pad_token_id=tokenizer.pad_token_id,
            batch_size=batch_size,
        )
        g_acc, g_se = mean_se(arith_reward(ps, [completion_text(tokenizer, c) for c in greedy]))
        lens = _lengths(comps, eos)
        row = {
            "n": len(texts),
            "accuracy": acc,
            "accuracy_se": acc_se,
            "greedy_accuracy": g_acc,
            "greedy_accuracy_se": g_se,
            "well_formed": sum(final_answer(t) is not None for t in texts) / len(texts),
            "length": sum(lens) / len(lens),
            "greedy_length": sum(_lengths(greedy, eos)) / len(greedy),
            "distinct1": distinct_n(texts, 1),
            "distinct2": distinct_n(texts, 2),
        }
        kl = None
        if ref_model is not None:
            kl, _ = exact_sequence_kl(
                model, ref_model, flat, comps, pad_token_id=tokenizer.pad_token_id, batch_size=batch_size
            )
            row["kl"], row["kl_se"] = mean_se(kl)
        if per_sample:
            row["per_sample"] = {
                "accuracy": correct,
                "kl": kl,
                "examples": [{"prompt": p, "completion": t} for p, t in zip(flat_prompts[:2], texts[:2])],
            }
        out[name] = row
    return out


# ----------------------------------------------------------------------------- task data on disk


def write_jsonl(path: str | os.PathLike, rows: list[dict]) -> Path:
    path = Path(path)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def build_task_data(
    cfg: ArithTaskConfig,
    base: str | os.PathLike,
    *,
    n_train: int = 1000,
    n_eval: int = 300,
    n_long: int = 200,
    samples_per_prompt: int = 4,
    max_pairs_per_prompt: int = 1,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
) -> Path:
    """The fine-tuning data of a base LM, cached by a hash of its settings: ``pairs.jsonl``
    (preference pairs of the ``train`` prompts, for DPO and offline sqlm), ``prompts.jsonl``
    (the ``train`` prompts, prompt-only, for online runs), ``eval_prompts.json`` and
    ``long_prompts.json`` (held out), and ``data.json`` (settings and pair statistics)."""
    settings = {
        "base": Path(base).name, "n_train": n_train, "n_eval": n_eval, "n_long": n_long, "k": samples_per_prompt,
        "max_pairs": max_pairs_per_prompt, "max_new_tokens": cfg.max_new_tokens, "long_digits": cfg.long_digits,
    }  # fmt: skip
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    out = root / "arithmetic" / f"data-{fingerprint(settings)}"
    if (out / "data.json").is_file():
        return out
    model, tokenizer = load_base(base)
    prompts = task_prompts(cfg, n_train, n_eval, n_long)
    with deterministic_torch(1):
        rows, stats = sample_pairs(
            model, tokenizer, prompts["train"], samples_per_prompt, cfg.max_new_tokens, seed=cfg.seed,
            max_pairs_per_prompt=max_pairs_per_prompt, progress=progress,
        )  # fmt: skip

    def write(folder: Path) -> None:
        write_jsonl(folder / "pairs.jsonl", rows)
        write_jsonl(folder / "prompts.jsonl", [{"prompt": p} for p in prompts["train"]])
        (folder / "eval_prompts.json").write_text(json.dumps(prompts["eval"]))
        (folder / "long_prompts.json").write_text(json.dumps(prompts.get("long", [])))
        (folder / "data.json").write_text(json.dumps({"settings": settings, "stats": stats}))

    return save_atomically(out, write)
