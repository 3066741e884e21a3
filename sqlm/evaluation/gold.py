"""The embedded gold-reward task: an offline analogue of the DPO paper's controlled-sentiment
generation (Rafailov et al. 2023, section 6.1: GPT-2 on IMDb, a sentiment classifier as the
ground-truth reward).

* **Text:** English sentences from the Wikipedia-trained trigram Markov generator shipped with the
  ``essential-generators`` package (real text statistics, not written by this project), split by
  seed into a training corpus and held-out text.
* **Base model** (``pi_ref``): a tiny Qwen2-shaped LM with a byte-level BPE tokenizer, both trained
  here on the training corpus, once, and cached under ``cache_dir`` keyed by the settings.
* **Prompts:** the first few words of held-out sentences.
* **Gold reward:** VADER's compound sentiment score of the completion, in [-1, 1]. It only labels
  preference pairs and scores evaluations; no learner ever trains on it directly.
* **Preferences:** ``k`` samples per prompt from the base model; every pair of samples whose gold
  scores differ gives (chosen, rejected), as the paper built its pairs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import math
import os
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import SqlmError
from ..paths import cache_dir as default_cache_dir  # $SQLM_CACHE or ~/.cache/sqlm


def fingerprint(obj) -> str:
    """A short stable hash of a JSON-able object (settings that define a cached artefact)."""
    blob = json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


# ----------------------------------------------------------------------------- gold reward

_ANALYZER = None


def gold_reward(texts: list[str]) -> list[float]:
    """VADER compound sentiment of each text (positive sentiment is reward), in [-1, 1]."""
    global _ANALYZER
    if _ANALYZER is None:
        try:
            from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
        except ImportError:
            raise SqlmError("the gold-reward task needs vaderSentiment: pip install 'sqlm[eval]'") from None
        _ANALYZER = SentimentIntensityAnalyzer()
    return [float(_ANALYZER.polarity_scores(t)["compound"]) for t in texts]


def gold_reward_func(prompts, completions, **kwargs) -> list[float]:
    """The gold reward with TRL's reward-function signature (for evaluation hooks only)."""
    return gold_reward([c if isinstance(c, str) else c[-1]["content"] for c in completions])


# ----------------------------------------------------------------------------- text


@functools.lru_cache(maxsize=1)
def _markov_generator():
    """essential-generators' trigram generator (loading its model takes seconds: once per process)."""
    try:
        from essential_generators import MarkovTextGenerator
    except ImportError:
        raise SqlmError("the gold-reward task needs essential-generators: pip install 'sqlm[eval]'") from None
    return MarkovTextGenerator()


def english_sentences(n: int, seed: int, min_words: int = 3, max_words: int = 15) -> list[str]:
    """``n`` sentences from essential-generators' Wikipedia-trained trigram generator, seeded."""
    gen = _markov_generator()
    state = random.getstate()
    random.seed(seed)
    try:
        out = []
        for _ in range(n):
            text = gen.gen_text(random.randint(min_words, max_words)).replace("\n", " ").strip()
            text = text[0].upper() + text[1:] if text else text
            text = text.rstrip(" ,;:-") + "."
            out.append(" ".join(text.split()))
    finally:
        random.setstate(state)
    return out


# ----------------------------------------------------------------------------- config


@dataclass
class GoldTaskConfig:
    """Settings of the gold-reward task. Every field is part of the cache key of what it defines."""

    seed: int = field(default=0, metadata={"help": "Seed of the corpus, the base model and the samples."})
    corpus_sentences: int = field(default=40000, metadata={"help": "Training sentences for the base LM."})
    heldout_sentences: int = field(default=4000, metadata={"help": "Held-out sentences (prompt source)."})
    vocab_size: int = field(default=2048, metadata={"help": "BPE vocabulary size of the base tokenizer."})
    hidden_size: int = field(default=128, metadata={"help": "Base LM hidden size."})
    num_hidden_layers: int = field(default=3, metadata={"help": "Base LM layers."})
    num_attention_heads: int = field(default=4, metadata={"help": "Base LM attention heads."})
    lm_steps: int = field(default=800, metadata={"help": "Optimizer steps of base-LM pretraining."})
    lm_batch_size: int = field(default=48, metadata={"help": "Sentences per pretraining batch."})
    lm_learning_rate: float = field(default=3e-3, metadata={"help": "Peak pretraining learning rate."})
    prompt_words: int = field(default=3, metadata={"help": "Words of held-out text used as a prompt."})
    max_new_tokens: int = field(default=24, metadata={"help": "Completion length limit (tokens)."})

    def base_key(self) -> dict:
        keys = [
            "seed", "corpus_sentences", "heldout_sentences", "vocab_size", "hidden_size",
            "num_hidden_layers", "num_attention_heads", "lm_steps", "lm_batch_size", "lm_learning_rate",
        ]  # fmt: skip
        # "pretraining": base LMs trained before pretraining was deterministic are not reused
        return {**{k: getattr(self, k) for k in keys}, "pretraining": "deterministic"}


# ----------------------------------------------------------------------------- base model


@contextlib.contextmanager
def deterministic_torch(threads: int = 1):
    """One intra-op thread and deterministic algorithms inside the block; the old settings after. A
    base LM pretrained inside it from a seed has the same weights on every machine of a kind."""
    old_threads, old_det = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(old_det)
        torch.set_num_threads(old_threads)


def weights_digest(model) -> str:
    """sha256 of the state dict's raw bytes, in key order (equal digests = bit-identical weights)."""
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def lm_batch(rows: list[tuple[list[int], int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ids, attention mask and labels of ``(ids, n_prompt)`` rows (labels -100 on the
    first ``n_prompt`` tokens and on the padding)."""
    width = max(len(r) for r, _ in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    attn = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (r, n_prompt) in enumerate(rows):
        ids[i, : len(r)] = torch.as_tensor(r)
        labels[i, n_prompt : len(r)] = torch.as_tensor(r[n_prompt:])
        attn[i, : len(r)] = 1
    return ids, attn, labels


def pretrain_lm(model, rows: list[tuple[list[int], int]], pad_id: int, cfg, progress: bool = True) -> list[float]:
    """Causal-LM pretraining of a base LM on ``(ids, n_prompt)`` rows (:func:`lm_batch`): AdamW, linear
    warm-up, cosine decay to 0.1 of the peak rate, ``cfg.lm_steps`` batches of ``cfg.lm_batch_size``
    rows drawn by a generator seeded with ``cfg.seed``. Returns the loss of every step."""
    from tqdm.auto import tqdm

    gen = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lm_learning_rate, weight_decay=0.01, betas=(0.9, 0.98))
    warm = max(1, cfg.lm_steps // 20)

    def lr_at(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, cfg.lm_steps - warm)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    model.train()
    losses = []
    bar = tqdm(range(cfg.lm_steps), desc="pretraining base LM", disable=not progress, leave=False)
    for _ in bar:
        idx = torch.randint(len(rows), (cfg.lm_batch_size,), generator=gen).tolist()
        ids, attn, labels = lm_batch([rows[i] for i in idx], pad_id)
        loss = model(input_ids=ids, attention_mask=attn, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if len(losses) % 50 == 0:
            bar.set_postfix(loss=f"{sum(losses[-50:]) / 50:.3f}")
    model.eval()
    return losses


def _pretrain(model, tokenizer, texts: list[str], cfg: GoldTaskConfig, progress: bool = True) -> list[float]:
    """The base LM on English: each sentence is ``text <eos>`` (at most 64 tokens), loss on every token."""
    rows = [ids + [tokenizer.eos_token_id] for ids in tokenizer(texts)["input_ids"]]
    rows = [(r[:64], 0) for r in rows if len(r) > 1]
    return pretrain_lm(model, rows, tokenizer.pad_token_id, cfg, progress=progress)


def pretrain_base(cfg: GoldTaskConfig, progress: bool = False):
    """``(model, tokenizer, heldout sentences, losses)``: the base LM and its BPE tokenizer trained on
    the seeded corpus, deterministically (one thread, deterministic algorithms): a seed gives the same
    weights on every machine of a kind, and so the same preference pairs and reward model."""
    from ..tiny import train_tokenizer

    texts = english_sentences(cfg.corpus_sentences, seed=cfg.seed)
    train_set = set(texts)
    heldout = [s for s in english_sentences(cfg.heldout_sentences, seed=cfg.seed + 10_000) if s not in train_set]
    with deterministic_torch(1):
        torch.manual_seed(cfg.seed)
        tokenizer = train_tokenizer(texts, vocab_size=cfg.vocab_size)
        model = base_lm(tokenizer, cfg, ffn_factor=3)
        losses = _pretrain(model, tokenizer, texts, cfg, progress=progress)
    return model, tokenizer, heldout, losses


def base_lm(tokenizer, cfg, ffn_factor: int):
    """A freshly initialised Qwen2-shaped base LM for ``tokenizer`` with ``cfg``'s seed, width, depth and
    heads (half as many key-value heads), an MLP ``ffn_factor`` times as wide, 128 positions."""
    from ..tiny import tiny_model_for_tokenizer

    return tiny_model_for_tokenizer(
        tokenizer,
        seed=cfg.seed,
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=max(1, cfg.num_attention_heads // 2),
        intermediate_size=ffn_factor * cfg.hidden_size,
        max_position_embeddings=128,
    )


def save_atomically(out: Path, write) -> Path:
    """``write(folder)`` into a temporary sibling of ``out``, then rename it to ``out`` (a process that
    finished first wins; the other's copy is dropped): a cached folder is never half-written."""
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    write(tmp)
    if out.exists():
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    else:
        tmp.rename(out)
    return out


def save_base(out: Path, model, tokenizer, cfg, losses: list[float], files: dict | None = None, **meta) -> Path:
    """Save a pretrained base LM, its tokenizer, ``files`` (name -> JSON data) and ``base_lm.json``
    (settings, loss curve, weights digest, ``meta``) to ``out``, atomically (:func:`save_atomically`)."""
    tail = losses[-100:]
    info = {"settings": cfg.base_key(), "final_loss": sum(tail) / len(tail), "losses": losses[::10],
            "weights_sha256": weights_digest(model), "torch": torch.__version__, **meta}  # fmt: skip

    def write(folder: Path) -> None:
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        for name, data in (files or {}).items():
            (folder / name).write_text(json.dumps(data))
        (folder / "base_lm.json").write_text(json.dumps(info))

    return save_atomically(out, write)


def base_model_dir(cfg: GoldTaskConfig, cache_dir: str | os.PathLike | None = None) -> Path:
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return root / "gold" / f"base-{fingerprint(cfg.base_key())}"


def build_base_model(cfg: GoldTaskConfig, cache_dir: str | os.PathLike | None = None, progress: bool = True) -> Path:
    """Train (once) and cache the base LM, its tokenizer and the held-out text; return the folder.

    The folder holds a model that loads with ``AutoModelForCausalLM.from_pretrained``, its tokenizer,
    ``heldout.json`` (held-out sentences) and ``base_lm.json`` (settings and the loss curve). A second
    call with the same settings returns the cached folder at once.
    """
    out = base_model_dir(cfg, cache_dir)
    if (out / "base_lm.json").is_file():
        return out
    model, tokenizer, heldout, losses = pretrain_base(cfg, progress=progress)
    return save_base(out, model, tokenizer, cfg, losses, {"heldout.json": heldout})


def load_base(path: str | os.PathLike):
    """(model, tokenizer) of a cached base LM folder, in eval mode (:func:`sqlm.loading.load_policy`)."""
    from ..loading import load_policy

    return load_policy(path)


# ----------------------------------------------------------------------------- prompts and pairs


def prompts_from_heldout(heldout: list[str], words: int) -> list[str]:
    """The first ``words`` words of each held-out sentence that has at least ``words + 3`` words,
    de-duplicated in order."""
    seen, out = set(), []
    for s in heldout:
        w = s.split()
        if len(w) < words + 3:
            continue
        p = " ".join(w[:words])
        if p not in seen:
            seen.add(p)
            out.append(p)
    return out


def split_prompts(
    path: str | os.PathLike, cfg: GoldTaskConfig, n_train: int, n_eval: int
) -> tuple[list[str], list[str]]:
    """Disjoint preference-data prompts and evaluation prompts from a base folder's held-out text."""
    heldout = json.loads((Path(path) / "heldout.json").read_text())
    prompts = prompts_from_heldout(heldout, cfg.prompt_words)
    if len(prompts) < n_train + n_eval:
        raise SqlmError(
            f"only {len(prompts)} distinct prompts in the held-out text, but n_train_prompts + n_eval_prompts "
            f"= {n_train + n_eval}; raise heldout_sentences or lower the prompt counts"
        )
    return prompts[:n_train], prompts[n_train : n_train + n_eval]


def preference_pairs(
    prompts: list[str],
    samples: list[list[str]],
    scores: list[list[float]],
    max_pairs_per_prompt: int | None = None,
) -> list[dict]:
    """Rows ``{prompt, chosen, rejected, chosen_score, rejected_score}`` from ``k`` scored samples per
    prompt: every pair of non-empty, different completions with different gold scores, higher score chosen (at most
    ``max_pairs_per_prompt`` per prompt, the widest score gaps first)."""
    rows = []
    for prompt, texts, vals in zip(prompts, samples, scores):
        cands = []
        for i in range(len(texts)):
            for j in range(i + 1, len(texts)):
                if vals[i] == vals[j] or texts[i] == texts[j] or not texts[i].strip() or not texts[j].strip():
                    continue  # ties, duplicates, and empty completions (TRL's formats need text)
                hi, lo = (i, j) if vals[i] > vals[j] else (j, i)
                cands.append((vals[hi] - vals[lo], hi, lo))
        cands.sort(key=lambda c: -c[0])
        if max_pairs_per_prompt is not None:
            cands = cands[:max_pairs_per_prompt]
        for _, hi, lo in cands:
            rows.append(
                {
                    "prompt": prompt,
                    "chosen": texts[hi],
                    "rejected": texts[lo],
                    "chosen_score": vals[hi],
                    "rejected_score": vals[lo],
                }
            )
    return rows


def completion_text(tokenizer, ids: list[int]) -> str:
    """Decoded completion without special tokens (the text the gold reward reads)."""
    return tokenizer.decode(ids, skip_special_tokens=True)


def sample_preferences(
    model,
    tokenizer,
    prompts: list[str],
    k: int,
    max_new_tokens: int,
    seed: int,
    max_pairs_per_prompt: int | None = None,
    progress: bool = True,
) -> list[dict]:
    """``k`` base-model samples per prompt, scored by the gold reward, paired (see :func:`preference_pairs`)."""
    from .sampling import sample_k_per_prompt

    _, comp = sample_k_per_prompt(
        model,
        tokenizer,
        prompts,
        k,
        max_new_tokens=max_new_tokens,
        seed=seed,
        desc="sampling preference data",
        progress=progress,
    )
    texts = [completion_text(tokenizer, c) for c in comp]
    vals = gold_reward(texts)
    samples = [texts[i * k : (i + 1) * k] for i in range(len(prompts))]
    scores = [vals[i * k : (i + 1) * k] for i in range(len(prompts))]
    return preference_pairs(prompts, samples, scores, max_pairs_per_prompt)


def config_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)
