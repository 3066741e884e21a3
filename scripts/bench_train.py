"""Benchmark: one training step of sqlm against SFT and TRL's DPOTrainer, on the same tokens.

One Qwen2-shaped model built from a config (default hidden 256, 4 layers, vocabulary 32k, sequences
of 512 tokens) and one batch of preference pairs (``--pairs`` prompts of ``--prompt`` tokens, each
with a chosen and a rejected completion filling the sequence). Every row trains on the same
``2 * pairs`` sequences:

* ``sft``: ``transformers.Trainer`` on prompt+completion with the model's own cross-entropy loss;
* ``dpo``: TRL's ``DPOTrainer`` / ``DPOConfig`` (sigmoid loss, a reference model);
* ``sqlm_offline_unified_pcl``: ``SoftQTrainer``, offline, unified PCL, with a reference model;
* ``sqlm_offline_soft_q``: ``SoftQTrainer``, offline, soft-Q with a target network and a reference;
* ``sqlm_online``: ``SoftQTrainer``, online: ``pairs`` prompts x 2 generations sampled with the KV
  cache (``min_new_tokens`` makes them fill the sequence), scored, and trained on, in one step.

Each row runs ``trainer.train()`` for one warm-up step plus ``--steps`` timed steps; a step's time
is the wall time between consecutive ``on_step_end`` callbacks, so it includes building the batch
(and, online, generating it). Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` over the
timed steps minus the memory allocated before them; on a CPU the resident-set high-water mark
(``VmHWM`` after resetting it through ``/proc/self/clear_refs``) over the timed steps minus the
resident set before them. "Model state" counts the parameters of the policy, reference and target
models and the optimizer state. "Tokens/step" counts the tokens of every decoder call of the policy
made with autograd on (so generation is not counted), averaged over the steps.
The warm-up step runs under a dispatch mode that records the largest floating-point tensor any op
(forward or backward) writes, to show which rows materialise ``[B, T, V]`` logits.

    python scripts/bench_train.py            # full size
    python scripts/bench_train.py --small    # a quick reduced run (CI)
"""

from __future__ import annotations

import argparse
import copy
import gc
import os
import random
import statistics
import sys
import tempfile
import time
import traceback


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from transformers import Trainer, TrainerCallback, TrainingArguments  # noqa: E402
from transformers.trainer_callback import PrinterCallback  # noqa: E402


ROWS = ("sft", "dpo", "sqlm_offline_unified_pcl", "sqlm_offline_soft_q", "sqlm_online")
BASELINE = "dpo"
SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>"]


# ----------------------------------------------------------------------------- model, tokenizer, data


def word_tokenizer(vocab_size: int):
    """A word-level tokenizer with exactly ``vocab_size`` ids: ``t0 t1 ...`` one token each."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {s: i for i, s in enumerate(SPECIALS)}
    for i in range(vocab_size - len(SPECIALS)):
        vocab[f"t{i}"] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>", unk_token="<unk>"
    )


def build_model(args, tokenizer):
    from sqlm.tiny import tiny_causal_lm

    model = tiny_causal_lm(
        len(tokenizer),
        seed=0,
        hidden_size=args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        intermediate_size=args.intermediate,
        max_position_embeddings=max(2 * args.seq, 64),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    if args.dtype != "float32":
        model = model.to(getattr(torch, args.dtype))
    return model


def _words(rng: random.Random, n: int, vocab: int) -> str:
    return " ".join(f"t{rng.randrange(vocab - len(SPECIALS))}" for _ in range(n))


def preference_rows(args) -> list[dict]:
    """``pairs`` rows; prompt + completion + EOS is exactly ``seq`` tokens."""
    rng = random.Random(0)
    completion = args.seq - args.prompt - 1  # DPO and sqlm append EOS
    return [
        {
            "prompt": _words(rng, args.prompt, args.vocab),
            "chosen": " " + _words(rng, completion, args.vocab),
            "rejected": " " + _words(rng, completion, args.vocab),
            "score_chosen": 1.0,
            "score_rejected": -1.0,
        }
        for _ in range(args.pairs)
    ]


# ----------------------------------------------------------------------------- measurement


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _cuda(device: str) -> bool:
    return device.startswith("cuda")


def memory_now(device: str) -> int:
    if _cuda(device):
        return torch.cuda.memory_allocated()
    return _status_kib("VmRSS") * 1024


def reset_peak(device: str) -> int:
    if _cuda(device):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    else:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass  # the peak then also covers earlier rows; the table says which method was used
    return memory_now(device)


def peak(device: str) -> int:
    if _cuda(device):
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    return _status_kib("VmHWM") * 1024


class LargestTensor(TorchDispatchMode):
    """Records the largest floating-point storage written by any op (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.nbytes, self.shape, self.dtype = 0, None, None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.is_floating_point() and t.device.type != "meta":
                n = t.untyped_storage().nbytes()
                if n > self.nbytes:
                    self.nbytes, self.shape, self.dtype = n, tuple(t.shape), t.dtype
        return out


class StepTimer(TrainerCallback):
    """Step times (between consecutive ``on_step_end``) and the peak memory of the timed steps."""

    def __init__(self, device: str, record_largest: bool = True):
        self.device = device
        self.marks: list[float] = []
        self.largest = LargestTensor() if record_largest else None
        self.before = self.peak = 0

    def on_train_begin(self, args, state, control, **kwargs):
        if self.largest is not None:
            self.largest.__enter__()

    def on_step_end(self, args, state, control, **kwargs):
        if _cuda(self.device):
            torch.cuda.synchronize()
        if not self.marks:  # end of the warm-up step
            if self.largest is not None:
                self.largest.__exit__(None, None, None)
            gc.collect()
            self.before = reset_peak(self.device)
        self.marks.append(time.perf_counter())

    def on_train_end(self, args, state, control, **kwargs):
        self.peak = peak(self.device) - self.before

    @property
    def step_times(self) -> list[float]:
        return [b - a for a, b in zip(self.marks, self.marks[1:])]


class TokenCounter:
    """Tokens the policy trains on: the attention mask of every decoder call made with autograd on."""

    def __init__(self):
        self.per_call: list[int] = []

    def install(self, model):
        from sqlm.fused import backbone_of

        def pre_hook(_module, args_, kwargs_):
            if torch.is_grad_enabled():
                mask = kwargs_.get("attention_mask")
                ids = kwargs_.get("input_ids", args_[0] if args_ else None)
                self.per_call.append(int(mask.sum()) if mask is not None else int(ids.numel()))

        return backbone_of(model).register_forward_pre_hook(pre_hook, with_kwargs=True)


def model_state_bytes(trainer) -> int:
    """Bytes of the parameters of the policy, reference and target models and of the optimizer state
    (each storage counted once)."""
    seen: dict[int, int] = {}

    def add(t):
        if isinstance(t, torch.Tensor):
            s = t.untyped_storage()
            seen[s.data_ptr()] = s.nbytes()

    for attr in ("model", "ref_model", "target_model"):
        m = getattr(trainer, attr, None)
        if isinstance(m, torch.nn.Module):
            for p in m.parameters():
                add(p)
    if trainer.optimizer is not None:
        for state in trainer.optimizer.state.values():
            for t in state.values():
                add(t)
    return sum(seen.values())


class GenerationTimer:
    """Times ``sqlm.trainer.generate_completions`` and checks the decoding reuses the KV cache
    (every forward after the first of a ``generate`` call feeds one new token per sequence)."""

    def __init__(self):
        self.seconds: list[float] = []
        self.decode_calls = self.one_token_calls = 0

    def install(self, model):
        import sqlm.trainer as trainer_module

        orig = trainer_module.generate_completions
        timer = self

        def timed(*a, **kw):
            calls: list[int] = []
            handle = model.register_forward_pre_hook(
                lambda m, args_, kwargs_: (
                    calls.append(kwargs_["input_ids"].shape[1]) if kwargs_.get("input_ids") is not None else None
                ),
                with_kwargs=True,
            )
            t0 = time.perf_counter()
            try:
                return orig(*a, **kw)
            finally:
                timer.seconds.append(time.perf_counter() - t0)
                handle.remove()
                timer.decode_calls += max(len(calls) - 1, 0)
                timer.one_token_calls += sum(1 for n in calls[1:] if n == 1)

        trainer_module.generate_completions = timed
        return lambda: setattr(trainer_module, "generate_completions", orig)


# ----------------------------------------------------------------------------- rows


def _common_args(args, out_dir: str, batch_size: int) -> dict:
    cuda = _cuda(args.device)
    return dict(
        output_dir=out_dir,
        per_device_train_batch_size=batch_size,
        max_steps=1 + args.steps,
        learning_rate=1e-5,
        logging_steps=10**6,
        save_strategy="no",
        report_to=[],
        use_cpu=not cuda,
        bf16=args.dtype == "bfloat16",
        activation_checkpointing=False,
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
    )


def make_trainer(name: str, args, base_model, tokenizer, rows, out_dir: str):
    from datasets import Dataset

    policy = copy.deepcopy(base_model)
    ref = copy.deepcopy(base_model).eval()
    common = _common_args(args, out_dir, args.pairs)
    if name == "sft":
        seqs = []
        for r in rows:
            for side in ("chosen", "rejected"):
                ids = tokenizer(r["prompt"] + r[side])["input_ids"] + [tokenizer.eos_token_id]
                seqs.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": ids})
        common["per_device_train_batch_size"] = 2 * args.pairs
        return Trainer(model=policy, args=TrainingArguments(**common), train_dataset=Dataset.from_list(seqs))
    if name == "dpo":
        from trl import DPOConfig, DPOTrainer

        data = Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows])
        config = DPOConfig(**common, beta=0.1, max_length=args.seq + 8, precompute_ref_log_probs=False)
        return DPOTrainer(model=policy, ref_model=ref, args=config, train_dataset=data, processing_class=tokenizer)

    from sqlm.config import SoftQConfig
    from sqlm.trainer import SoftQTrainer

    new = args.seq - args.prompt  # completion tokens with EOS: the same sequences as the other rows
    kw = dict(tau=0.1, max_length=args.seq + 8, max_completion_length=new, use_reference=True)
    reward_funcs = None
    if name == "sqlm_offline_unified_pcl":
        data = Dataset.from_list(rows)
        kw.update(
            loss_type="unified_pcl",
            mode="offline",
            use_target_model=False,
            chosen_score_column="score_chosen",
            rejected_score_column="score_rejected",
        )
    elif name == "sqlm_offline_soft_q":
        data = Dataset.from_list(rows)
        kw.update(
            loss_type="soft_q",
            mode="offline",
            use_target_model=True,
            chosen_score_column="score_chosen",
            rejected_score_column="score_rejected",
        )
    elif name == "sqlm_online":
        data = Dataset.from_list([{"prompt": r["prompt"]} for r in rows])
        kw.update(loss_type="unified_pcl", mode="online", num_generations=2, generation_kwargs={"min_new_tokens": new})
        common["per_device_train_batch_size"] = 2 * args.pairs  # online batches count completions: pairs x 2

        def length_reward(completions, **_):
            return [len(c) / 100.0 for c in completions]

        reward_funcs = [length_reward]
    else:
        raise ValueError(f"unknown row {name!r}")
    config = SoftQConfig(**common, **kw)
    return SoftQTrainer(
        model=policy,
        args=config,
        train_dataset=data,
        processing_class=tokenizer,
        ref_model=ref,
        reward_funcs=reward_funcs,
    )


def run_row(name: str, args, base_model, tokenizer, rows) -> dict:
    gc.collect()
    restore = None
    with tempfile.TemporaryDirectory() as out_dir:
        trainer = make_trainer(name, args, base_model, tokenizer, rows, out_dir)
        trainer.remove_callback(PrinterCallback)
        timer = StepTimer(args.device)
        trainer.add_callback(timer)
        counter = TokenCounter()
        hook = counter.install(trainer.model)
        gen = None
        if name == "sqlm_online":
            gen = GenerationTimer()
            restore = gen.install(trainer.model)
        try:
            trainer.train()
        finally:
            hook.remove()
            if restore is not None:
                restore()
    n_steps = 1 + args.steps
    result = {
        "name": name,
        "times": timer.step_times,
        "tokens": sum(counter.per_call) / n_steps,
        "peak": timer.peak,
        "resident": model_state_bytes(trainer),
        "largest": (timer.largest.nbytes, timer.largest.shape, timer.largest.dtype),
    }
    if gen is not None:
        # the first generate call is the warm-up step's
        timed = gen.seconds[1:] or gen.seconds
        result["generation"] = statistics.median(timed)
        result["kv_cache"] = (gen.one_token_calls, gen.decode_calls)
    del trainer
    gc.collect()
    return result


# ----------------------------------------------------------------------------- report


def table(results: list[list[dict]], args) -> str:
    """One line per row; times are medians over all timed steps of all repeats, ratios are the
    median [min, max] over repeats of the ratio to DPO measured in the same repeat."""
    tokens = 2 * args.pairs * args.seq
    btv = 2 * args.pairs * args.seq * args.vocab * 4
    # the fp32 logits of every completion token at once: [B, T - prompt, V]
    completion_logits = 2 * args.pairs * (args.seq - args.prompt) * args.vocab * 4
    mib = 2**20
    by_name: dict[str, list[dict]] = {}
    for rep in results:
        for r in rep:
            by_name.setdefault(r["name"], []).append(r)
    base_per_rep = [{r["name"]: r for r in rep}.get(BASELINE) for rep in results]
    dev = args.device if not _cuda(args.device) else torch.cuda.get_device_name()
    lines = [
        f"Qwen2-shaped: hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}, {args.dtype}; "
        f"{args.pairs} pairs x 2 sequences x {args.seq} tokens = {tokens} tokens; device {dev}, "
        f"threads {args.threads}; {len(results)} repeat(s) x {args.steps} timed steps; "
        f"[B,T,V] fp32 = {btv / mib:.0f} MiB, completion part {completion_logits / mib:.0f} MiB",
        "",
        "| row | s/step | steps/s | tokens/step | tokens/s | time/token vs DPO | peak step memory (MiB) "
        "| vs DPO | model state (MiB) | largest tensor (MiB) | notes |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in ROWS:
        reps = by_name.get(name, [])
        ok = [r for r in reps if "error" not in r]
        if not reps:
            continue  # not selected with --rows
        if not ok:
            lines.append(f"| {name} | - | - | - | - | - | - | - | - | - | failed: {reps[0]['error']} |")
            continue
        st = statistics.median([t for r in ok for t in r["times"]])
        t_ratios, m_ratios = [], []
        for r, b in zip(reps, base_per_rep):
            if "error" in r or b is None or "error" in b:
                continue
            per_token = statistics.median(r["times"]) / max(r["tokens"], 1)
            t_ratios.append(per_token / (statistics.median(b["times"]) / max(b["tokens"], 1)))
            m_ratios.append(r["peak"] / max(b["peak"], 1))

        def rng(v):
            if not v:
                return "-"
            return f"{statistics.median(v):.2f}" + (f" [{min(v):.2f}, {max(v):.2f}]" if len(v) > 1 else "")

        peak_mem = statistics.median([r["peak"] for r in ok]) / mib
        resident = statistics.median([r["resident"] for r in ok]) / mib
        nbytes, shape, dtype = ok[0]["largest"]
        notes = [f"largest {list(shape) if shape else '-'} {str(dtype).replace('torch.', '')}"]
        if nbytes >= completion_logits:
            notes.append("holds all completion logits at once")
        if "generation" in ok[0]:
            g = statistics.median([r["generation"] for r in ok])
            one, calls = ok[0]["kv_cache"]
            notes.append(f"generation {g:.2f} s = {100 * g / st:.0f}% of the step")
            notes.append(f"KV cache: {one}/{calls} decode forwards fed 1 new token")
        n_tok = statistics.median([r["tokens"] for r in ok])
        lines.append(
            f"| {name} | {st:.3g} | {1 / st:.3f} | {n_tok:.0f} | {n_tok / st:.0f} | {rng(t_ratios)} | {peak_mem:.0f} "
            f"| {rng(m_ratios)} | {resident:.1f} | {nbytes / mib:.1f} | {'; '.join(notes)} |"
        )
    method = "cuda.max_memory_allocated" if _cuda(args.device) else "VmHWM (resident-set high-water mark)"
    lines.append("")
    lines.append(f"memory: {method}; time/token and memory ratios: median [min, max] over repeats")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--intermediate", type=int, default=None, help="MLP width; default 2 x hidden")
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--seq", type=int, default=512, help="tokens per sequence (prompt + completion + EOS)")
    p.add_argument("--prompt", type=int, default=128, help="prompt tokens")
    p.add_argument("--pairs", type=int, default=4, help="preference pairs (prompts) per step")
    p.add_argument("--steps", type=int, default=2, help="timed steps per row, after one warm-up step")
    p.add_argument("--repeats", type=int, default=1, help="run every row this many times, interleaved")
    p.add_argument("--rows", default=",".join(ROWS), help="comma-separated subset of " + ",".join(ROWS))
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads on a CPU")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--small", action="store_true", help="a quick reduced run (CI)")
    args = p.parse_args(argv)
    if args.small:
        args.hidden, args.layers, args.heads, args.kv_heads = 32, 1, 2, 1
        args.vocab, args.seq, args.prompt, args.pairs, args.steps = 512, 32, 8, 2, 1
    if not 0 < args.prompt < args.seq - 1:
        p.error(f"--prompt must be in (0, --seq - 1), got {args.prompt}")
    unknown = set(args.rows.split(",")) - set(ROWS)
    if unknown:
        p.error(f"unknown --rows {sorted(unknown)}; choose from {list(ROWS)}")
    return args


def main(argv=None) -> int:
    import datasets
    import transformers

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    tokenizer = word_tokenizer(args.vocab)
    base = build_model(args, tokenizer)
    if _cuda(args.device):
        base = base.to(args.device)
    rows = preference_rows(args)
    names = [n for n in ROWS if n in args.rows.split(",")]
    results = []
    for _ in range(args.repeats):
        rep = []
        for name in names:
            try:
                rep.append(run_row(name, args, base, tokenizer, rows))
            except Exception as e:  # one failing row must not hide the others
                traceback.print_exc(file=sys.stderr)
                rep.append({"name": name, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"})
        results.append(rep)
    print(table(results, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
