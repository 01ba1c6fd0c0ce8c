"""`upcycle eval` / `evaluate_perplexity`: per-domain perplexity equals exp(mean NLL) computed here
independently (tokens read from the shard files, windows cut by hand, one position at a time),
for a native MoE checkpoint and an HF checkpoint scored by transformers itself; several models
side by side on the same tokens; JSON and Markdown outputs; refusals before any model loads."""

from __future__ import annotations

import json
import math

import pytest
import torch
import transformers
from cli_helpers import assert_refused, run_cli
from eval_helpers import VOCAB, heldout_tokens, no_grad_logits, tiny_native, word_domains, word_tokenizer
from hf_models import build_hf_model

import upcycle
from upcycle.eval import evaluate_perplexity, read_perplexity_report

SEQ_LEN, MAX_SEQUENCES = 16, 5


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    tokenizer = word_tokenizer(root / "tokenizer")
    manifest = word_domains(root, tokenizer)
    moe = tiny_native(root / "moe", tokenizer, seed=1, moe=dict(num_experts=4, top_k=2))
    hf = root / "hf_llama"
    build_hf_model("llama", seed=3, vocab_size=VOCAB).save_pretrained(hf)
    return {"root": root, "manifest": manifest, "prepared": root / "prepared", "moe": moe, "hf": hf}


def independent_perplexity(model, tokens, seq_len: int, max_windows: int) -> tuple[float, int]:
    """exp(mean NLL) by a direct loop: window w is tokens[w·S : w·S + S + 1], each label scored alone."""
    nll, count = 0.0, 0
    for w in range(min((len(tokens) - 1) // seq_len, max_windows)):
        window = tokens[w * seq_len : w * seq_len + seq_len + 1]
        logits = no_grad_logits(model, window[:-1])
        for position in range(seq_len):
            log_probs = torch.log_softmax(logits[position], dim=-1)
            nll -= float(log_probs[int(window[position + 1])])
            count += 1
    return math.exp(nll / count), count


def test_perplexity_equals_exp_mean_nll_computed_independently(setup):
    report = evaluate_perplexity(
        [setup["moe"], setup["hf"]],
        setup["manifest"],
        seq_len=SEQ_LEN,
        batch_size=3,  # 5 windows: batches of 3 and 2
        max_sequences=MAX_SEQUENCES,
        device="cpu",
    )
    references = {
        "moe": upcycle.load_model(setup["moe"]),
        "hf_llama": transformers.AutoModelForCausalLM.from_pretrained(setup["hf"]).eval(),
    }
    assert list(report.scores) == ["moe", "hf_llama"]
    for name, model in references.items():
        pooled_nll, pooled_tokens = 0.0, 0
        for domain in ("alpha", "beta"):
            tokens = heldout_tokens(setup["prepared"], domain)
            expected, count = independent_perplexity(model, tokens, SEQ_LEN, MAX_SEQUENCES)
            score = report.scores[name][domain]
            assert score.tokens == count == SEQ_LEN * MAX_SEQUENCES
            assert score.perplexity == pytest.approx(expected, rel=1e-5), (name, domain)
            pooled_nll += math.log(expected) * count
            pooled_tokens += count
        assert report.overall(name).perplexity == pytest.approx(
            math.exp(pooled_nll / pooled_tokens), rel=1e-5
        )
    # The two models are different functions: a test that compared a model with itself would pass too.
    assert report.scores["moe"]["alpha"].perplexity != pytest.approx(
        report.scores["hf_llama"]["alpha"].perplexity
    )


def test_cli_eval_writes_json_and_markdown_for_models_side_by_side(setup, tmp_path):
    dense = tiny_native(tmp_path / "dense", setup["root"] / "tokenizer", seed=5)
    out = tmp_path / "out"
    result = run_cli(
        "eval", setup["moe"], dense, "--data", setup["prepared"], "--seq-len", 8, "--max-sequences", 2,
        "--batch-size", 2, "--device", "cpu", "--out", out,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    data = json.loads((out / "eval.json").read_text())
    assert list(data["models"]) == ["moe", "dense"]
    assert data["domains"]["alpha"]["tokens"] == 16 and len(data["domains"]["alpha"]["sha256"]) == 64
    assert data["domains"]["alpha"]["sha256"] != data["domains"]["beta"]["sha256"]
    report = read_perplexity_report(out / "eval.json")
    api = evaluate_perplexity(
        {"moe": setup["moe"]}, setup["prepared"], seq_len=8, max_sequences=2, device="cpu"
    )
    assert report.scores["moe"]["beta"].perplexity == pytest.approx(
        api.scores["moe"]["beta"].perplexity, rel=1e-6
    )
    table = (out / "eval.md").read_text()
    assert "| model | alpha | beta | all |" in table
    assert "| moe |" in table and "| dense |" in table and "| tokens | 16 | 16 | 32 |" in table
    assert table.strip() in result.stdout


def test_eval_refuses_before_loading_any_model(setup, tmp_path):
    data = ("--data", setup["prepared"], "--seq-len", 8)
    small = tiny_native(tmp_path / "small_vocab", None, vocab_size=32)
    assert_refused(run_cli("eval", setup["moe"], small, *data), "vocabulary of 32", "small_vocab")
    assert_refused(run_cli("eval", setup["moe"], tmp_path / "missing", *data), "missing")
    assert_refused(run_cli("eval", setup["moe"], *data, "--domains", "gamma"), "'gamma'", "alpha")
    assert_refused(run_cli("eval", setup["moe"], "--data", setup["prepared"]), "seq_len + 1 = 513")
    other_tokenizer = word_tokenizer(tmp_path / "other_tokenizer", vocab_size=VOCAB + 1)
    mismatched = tiny_native(tmp_path / "mismatched", other_tokenizer, vocab_size=VOCAB + 1)
    assert_refused(run_cli("eval", mismatched, *data), "--no-tokenizer-check")
    result = run_cli(
        "eval", mismatched, "--data", setup["prepared"], "--no-tokenizer-check", "--seq-len", 4,
        "--max-sequences", 1, "--device", "cpu",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_evaluation_matches_cpu(setup, tmp_path):
    """The GPU path: bf16 autocast close to CPU fp32, fp32 on CUDA equal to it; BTM and routing run there."""
    from upcycle.eval import analyze_routing, build_btm

    btm = build_btm(
        {"alpha": setup["moe"], "beta": setup["hf"]}, setup["manifest"], tmp_path / "btm", chunk_len=64
    )
    models = {"moe": setup["moe"], "hf": setup["hf"], "btm": btm}
    settings = dict(seq_len=SEQ_LEN, max_sequences=MAX_SEQUENCES, check_tokenizer=False)
    cpu = evaluate_perplexity(models, setup["manifest"], device="cpu", **settings)
    bf16 = evaluate_perplexity(models, setup["manifest"], device="cuda", **settings)
    fp32 = evaluate_perplexity(models, setup["manifest"], device="cuda", precision="fp32", **settings)
    assert bf16.precision == "bf16-autocast" and fp32.precision == "fp32"
    for name in models:
        for domain in ("alpha", "beta"):
            reference = cpu.scores[name][domain].perplexity
            assert bf16.scores[name][domain].perplexity == pytest.approx(reference, rel=3e-2), (name, domain)
            assert fp32.scores[name][domain].perplexity == pytest.approx(reference, rel=1e-4), (name, domain)
    on_cpu = analyze_routing(setup["moe"], setup["manifest"], seq_len=SEQ_LEN, max_sequences=2, device="cpu")
    on_gpu = analyze_routing(setup["moe"], setup["manifest"], seq_len=SEQ_LEN, max_sequences=2, device="cuda")
    for a, b in zip(on_cpu.layers, on_gpu.layers, strict=True):
        for domain in ("alpha", "beta"):
            assert sum(b["assignments"][domain]) == sum(a["assignments"][domain]) == 2 * SEQ_LEN * 2
            assert b["mean_probability"][domain] == pytest.approx(a["mean_probability"][domain], abs=2e-2)
