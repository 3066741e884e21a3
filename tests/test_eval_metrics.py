"""Evaluation metrics: exact per-token KL, its Monte-Carlo estimate against the oracle, win rate,
distinct-n, the frontier summary and the `sqlm eval` report."""

import json
import math
import re

import pytest
import torch

from sqlm.evaluation.metrics import distinct_n, mean_se, sequence_kl, stepwise_kl, win_rate
from sqlm.evaluation.sampling import _right_pad_pairs, completion_logits, exact_sequence_kl, sample_completions


def test_stepwise_kl_equals_the_definition(gen):
    z = torch.randn(3, 5, 11, generator=gen)
    zr = torch.randn(3, 5, 11, generator=gen)
    p, q = z.softmax(-1), zr.softmax(-1)
    naive = (p * (p.log() - q.log())).sum(-1)
    assert torch.allclose(stepwise_kl(z, zr), naive, atol=1e-6)
    assert torch.allclose(stepwise_kl(z, z), torch.zeros(3, 5), atol=1e-6)
    mask = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]])
    assert torch.allclose(sequence_kl(z, zr, mask), (naive * mask).sum(-1), atol=1e-6)


def test_mean_se_win_rate_distinct():
    m, se = mean_se([1.0, 2.0, 3.0, 4.0])
    assert m == pytest.approx(2.5) and se == pytest.approx(math.sqrt(5 / 3) / 2)
    w, _ = win_rate([1.0, 0.0, 0.5, 0.2], [0.0, 1.0, 0.5, 0.1])
    assert w == pytest.approx((1 + 0 + 0.5 + 1) / 4)
    assert distinct_n(["a b a b", "a b c"], 1) == pytest.approx(3 / 7)
    assert distinct_n(["a b a b", "a b c"], 2) == pytest.approx(3 / 5)  # ab, ba, bc over 5 bigrams
    assert distinct_n([""], 2) == 0.0
    with pytest.raises(ValueError, match="paired"):
        win_rate([1.0], [1.0, 2.0])


def _tiny(seed, scale=1.0):
    from sqlm.tiny import tiny_causal_lm

    m = tiny_causal_lm(8, seed=seed, hidden_size=16, num_hidden_layers=1)
    with torch.no_grad():
        m.get_output_embeddings().weight.mul_(scale)
    return m.eval()


def test_padded_logits_equal_unpadded_forward():
    model = _tiny(0, 3.0)
    prompts, comps = [[1, 2, 3], [4]], [[5, 6], [2, 3, 7]]
    ids, attn, comp = _right_pad_pairs(prompts, comps, pad_id=0)
    z = completion_logits(model, ids, attn)
    for b, (p, c) in enumerate(zip(prompts, comps)):
        solo = model(input_ids=torch.tensor([p + c])).logits[0]
        cols = comp[b].nonzero().squeeze(1)
        # logits of the state before each completion token
        assert torch.allclose(z[b, cols], solo[len(p) - 1 : len(p) - 1 + len(c)], atol=1e-5)


def test_kl_estimate_matches_the_oracle_exact_kl():
    """Sampling from pi (KV cache) and summing the exact per-step KL along the samples estimates the
    exact sequence KL(pi || pi_ref) of the oracle within Monte-Carlo error (and so does the sampled
    log-ratio, with a larger error)."""
    from sqlm.oracle import TokenMDP, policy_log_probs
    from sqlm.oracle import sequence_kl as exact_kl

    policy, ref = _tiny(1, 4.0), _tiny(2, 4.0)
    eos, horizon = 7, 3
    mdp = TokenMDP(list(range(8)), eos, horizon, prompt=(0,), sequence_reward=lambda y: 0.0)
    exact = float(exact_kl(mdp, policy_log_probs(policy, mdp), policy_log_probs(ref, mdp)))
    assert exact > 0.1
    n = 3000
    prompts = [[0]] * n
    comps = sample_completions(policy, prompts, max_new_tokens=horizon, eos_token_id=eos, pad_token_id=0,
                               seed=0, batch_size=1000, progress=False)  # fmt: skip
    assert all(len(c) <= horizon and (len(c) == horizon or c[-1] == eos) for c in comps)
    kl, ratio = exact_sequence_kl(policy, ref, prompts, comps, pad_token_id=0, batch_size=1000)
    m, se = mean_se(kl)
    assert abs(m - exact) < 4 * se + 1e-3, (m, se, exact)
    mr, ser = mean_se(ratio)
    assert abs(mr - exact) < 4 * ser + 1e-3, (mr, ser, exact)
    assert se < ser  # the exact per-step sum has the smaller variance


def test_frontier_area_interpolates():
    from sqlm.evaluation.evaluate_report import frontier_area

    rows = [
        {"method": "reference", "kl": 0.0, "gold": 0.0},
        {"method": "a", "kl": 1.0, "gold": 1.0},
        {"method": "a", "kl": 2.0, "gold": 1.0},
    ]
    # trapezoid 0->1 (area 0.5) + flat 1->2 (area 1) over width 2
    assert frontier_area(rows, "a", 2.0) == pytest.approx(0.75)
    assert frontier_area(rows, "a", 1.0) == pytest.approx(0.5)
    assert frontier_area(rows, "a", 4.0) == pytest.approx((0.5 + 3.0) / 4)


def test_matched_kl_comparison_uses_only_the_overlap():
    from sqlm.evaluation.evaluate_report import gold_at_kl, matched_kl_comparison

    rows = [
        {"method": "reference", "kl": 0.0, "gold": 0.0},
        {"method": "a", "kl": 1.0, "gold": 0.1}, {"method": "a", "kl": 3.0, "gold": 0.5},
        {"method": "b", "kl": 2.0, "gold": 0.4}, {"method": "b", "kl": 5.0, "gold": 0.7},
    ]  # fmt: skip
    assert gold_at_kl([(1.0, 0.1), (3.0, 0.5)], 2.0) == pytest.approx(0.3)
    assert gold_at_kl([(1.0, 0.1), (3.0, 0.5)], 4.0) is None
    cmp = matched_kl_comparison(rows, ["a", "b"], n=3)  # grid 2, 2.5, 3
    assert cmp["kl_range"] == [2.0, 3.0]
    assert cmp["mean_gold"]["a"] == pytest.approx((0.3 + 0.4 + 0.5) / 3)
    assert cmp["mean_gold"]["b"] == pytest.approx((0.4 + 0.45 + 0.5) / 3)
    assert cmp["best_fraction"]["b"] == pytest.approx(2 / 3) and cmp["best_fraction"]["a"] == 0.0
    assert matched_kl_comparison(rows[:3], ["a", "b"]) is None


def _table_rows(md: str) -> dict[str, list[str]]:
    out = {}
    for line in md.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 8 and cells[0] not in ("model", "---"):
            out[f"{cells[0]}@{cells[1]}"] = cells
    return out


def check_report_matches(report_dir, results):
    """The report's table cells are the returned metrics, formatted."""
    md = (report_dir / "report.md").read_text()
    saved = json.loads((report_dir / "results.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(results["rows"]))
    table = _table_rows(md)
    assert len(table) == len(results["rows"])
    for r in results["rows"]:
        key = f"{r['method']}@{'–' if r['param'] is None else format(r['param'], 'g')}"
        cells = table[key]
        assert cells[2] == f"{r['gold']:.3f} ± {r['gold_se']:.3f}"
        assert cells[3] == f"{r['kl']:.2f} ± {r['kl_se']:.2f}"
        assert cells[5] == f"{r['distinct1']:.3f}" and cells[7] == f"{r['length']:.1f}"
    assert (report_dir / "frontier.png").stat().st_size > 1000
    return md


def test_sqlm_eval_cli_writes_a_report_from_the_run(tmp_path):
    """`sqlm eval` on a reference and two perturbed copies: KL 0 for the reference, > 0 for the
    others; the report is the run's numbers."""
    from sqlm.commands.eval import main
    from sqlm.tiny import tiny_model_for_tokenizer, train_tokenizer

    texts = ["a good day", "a bad day", "the best film", "the worst film", "it was fine"] * 4
    tok = train_tokenizer(texts, vocab_size=300)
    ref = tiny_model_for_tokenizer(tok, seed=0, hidden_size=16, num_hidden_layers=1)
    ref.save_pretrained(tmp_path / "ref")
    tok.save_pretrained(tmp_path / "ref")
    specs = []
    for i, scale in enumerate([1.5, 3.0]):
        m = tiny_model_for_tokenizer(tok, seed=0, hidden_size=16, num_hidden_layers=1)
        with torch.no_grad():
            m.get_output_embeddings().weight.mul_(scale)  # tied: a sharper copy of the reference
        m.save_pretrained(tmp_path / f"m{i}")
        tok.save_pretrained(tmp_path / f"m{i}")
        specs.append(f"{'dpo' if i == 0 else 'sqlm'}@{scale}={tmp_path / f'm{i}'}")
    (tmp_path / "prompts.json").write_text(json.dumps(["a good", "the worst", "it"]))
    out = tmp_path / "eval"
    code = main(["--models", *specs, "--ref_model", str(tmp_path / "ref"), "--prompts_file", str(tmp_path / "prompts.json"),
                 "--samples_per_prompt", "4", "--max_new_tokens", "6", "--output_dir", str(out)])  # fmt: skip
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    by = {r["name"]: r for r in results["rows"]}
    assert by["reference"]["kl"] == pytest.approx(0.0, abs=1e-6)
    assert by["dpo@1.5"]["kl"] > 0 and by["sqlm@3.0"]["kl"] > by["dpo@1.5"]["kl"]
    assert by["dpo@1.5"]["win_rate"] == pytest.approx(0.5)  # against itself
    assert by["sqlm@3.0"]["n"] == 12
    check_report_matches(out, results)
    md = (out / "report.md").read_text()
    assert re.search(r"\| sqlm \| 3 \|", md)
