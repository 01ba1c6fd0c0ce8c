"""BTM (methods.md §3.3, §9.12): the tf-idf statistics match their definition, the prefix
similarity matches a brute-force count at every position (and so never sees a later token), one
expert gives exactly that expert, two experts route each domain's text to its own expert and mix
output distributions as log Σ w·p, and the ensemble folder round-trips through the CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_helpers import assert_refused, run_cli
from eval_helpers import heldout_tokens, tiny_native, word_domains, word_tokenizer

import upcycle
from upcycle.data import HeldoutBatches
from upcycle.eval import BTMEnsemble, DomainTfidf, build_btm, evaluate_perplexity
from upcycle.eval.tfidf import earlier_occurrences

SEQ_LEN = 24


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("btm")
    tokenizer = word_tokenizer(root / "tokenizer")
    manifest = word_domains(root, tokenizer)
    experts = {
        d: tiny_native(root / f"expert_{d}", tokenizer, seed=i) for i, d in enumerate(("alpha", "beta"))
    }
    experts["moe"] = tiny_native(root / "expert_moe", tokenizer, seed=2, moe=dict(num_experts=4, top_k=2))
    return {"root": root, "manifest": manifest, "prepared": root / "prepared", "experts": experts}


def test_tfidf_statistics_follow_their_definition(setup):
    manifest = setup["manifest"]
    tfidf = DomainTfidf.from_manifest(manifest, chunk_len=50, chunks_per_domain=7)
    chunk_tokens = {}
    for domain in ("alpha", "beta"):
        stream = manifest.token_stream(domain, "train")
        available = stream.num_tokens // 50
        starts = np.unique(np.linspace(0, available - 1, num=7).round().astype(int)) * 50
        chunk_tokens[domain] = [stream.read(s, s + 50).astype(np.int64) for s in starts]
    counts = {
        d: [np.bincount(c, minlength=64).astype(float) for c in chunks] for d, chunks in chunk_tokens.items()
    }
    everything = [c for d in counts for c in counts[d]]
    df = np.sum([c > 0 for c in everything], axis=0)
    idf = np.log((1 + len(everything)) / (1 + df)) + 1
    np.testing.assert_allclose(tfidf.idf_V.numpy(), idf, rtol=1e-6)
    for n, domain in enumerate(("alpha", "beta")):
        vectors = [c * idf / np.linalg.norm(c * idf) for c in counts[domain]]
        np.testing.assert_allclose(
            tfidf.centroids_NV[n].numpy(), np.mean(vectors, axis=0), rtol=1e-5, atol=1e-7
        )
    assert tfidf.chunks == [7, 7]


def test_prefix_similarity_equals_brute_force_at_every_position(setup):
    tfidf = DomainTfidf.from_manifest(setup["manifest"], chunk_len=64)
    generator = torch.Generator().manual_seed(0)
    ids_BS = torch.randint(4, 30, (3, 20), generator=generator)  # spans both domains, many repeats
    mask_BS = torch.ones_like(ids_BS)
    mask_BS[1, :5] = 0  # left padding: not context
    ids_BS[1, :5] = 0
    similarity_BSN = tfidf.prefix_similarity(ids_BS, mask_BS).double()
    idf = tfidf.idf_V.double()
    centroids = tfidf.centroids_NV.double()
    for b in range(3):
        counts = torch.zeros(64, dtype=torch.float64)
        for s in range(20):
            if mask_BS[b, s]:
                counts[ids_BS[b, s]] += 1
            vector = counts * idf
            for n in range(2):
                denominator = vector.norm() * centroids[n].norm()
                expected = float(vector @ centroids[n] / denominator) if denominator > 0 else 0.0
                assert float(similarity_BSN[b, s, n]) == pytest.approx(expected, abs=1e-6), (b, s, n)
    # Prefix only: changing the future leaves the past untouched.
    changed = ids_BS.clone()
    changed[:, 12:] = 40
    assert torch.equal(tfidf.prefix_similarity(changed, mask_BS)[:, :12], similarity_BSN[:, :12].float())


def test_earlier_occurrences_counts_each_row_separately():
    ids = torch.tensor([[5, 6, 5, 5, 6], [5, 5, 7, 0, 5]])
    real = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 1]]).bool()
    assert earlier_occurrences(ids, real, 8).tolist() == [[0, 0, 1, 2, 1], [0, 1, 0, 0, 2]]


def test_btm_with_one_expert_equals_that_expert(setup, tmp_path):
    expert_path = setup["experts"]["moe"]  # an MoE expert: its routers' buffers must load too
    folder = build_btm({"alpha": expert_path}, setup["manifest"], tmp_path / "btm1", chunk_len=64)
    ensemble = upcycle.eval.load_evaluable(folder)
    assert isinstance(ensemble, BTMEnsemble) and len(ensemble.experts) == 1
    expert = upcycle.load_model(expert_path)
    ids_BS = torch.randint(4, 44, (2, SEQ_LEN), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        mixed = ensemble(ids_BS).logits
        reference = torch.log_softmax(expert(ids_BS).logits.float(), dim=-1)
    assert (mixed - reference).abs().max().item() <= 1e-6
    report = evaluate_perplexity(
        {"btm": folder, "expert": expert_path}, setup["manifest"], seq_len=SEQ_LEN, device="cpu"
    )
    for domain in ("alpha", "beta"):
        btm, alone = report.scores["btm"][domain].perplexity, report.scores["expert"][domain].perplexity
        assert btm == pytest.approx(alone, rel=1e-6)


def test_two_experts_route_each_domain_to_its_expert_and_mix_distributions(setup):
    experts = [upcycle.load_model(setup["experts"][d]) for d in ("alpha", "beta")]
    tfidf = DomainTfidf.from_manifest(setup["manifest"], chunk_len=64)
    ensemble = BTMEnsemble(experts, tfidf, top_k=2, temperature=0.1).eval()
    for n, domain in enumerate(("alpha", "beta")):
        batch = next(iter(HeldoutBatches(setup["manifest"], domain, SEQ_LEN, 2)))
        with torch.no_grad():
            log_weights_BSN = ensemble.route(batch.input_ids_BS)
            mixed_BSV = ensemble(batch.input_ids_BS).logits
            expert_log_probs = [torch.log_softmax(e(batch.input_ids_BS).logits.double(), -1) for e in experts]
            similarity_BSN = tfidf.prefix_similarity(batch.input_ids_BS).double()
        weights_BSN = log_weights_BSN.double().exp()
        # Disjoint vocabularies: the other domain's similarity is exactly 0, so the own expert's
        # weight is softmax([s, 0] / τ)_0 = sigmoid(s / τ); it grows as the context grows.
        assert bool((similarity_BSN[..., 1 - n] == 0).all()) and bool((similarity_BSN[..., n] > 0).all())
        own = torch.sigmoid(similarity_BSN[..., n] / 0.1)
        assert torch.allclose(weights_BSN[..., n], own, atol=1e-6)
        assert bool((own > 0.85).all()) and bool((own[:, -1] > 0.99).all())
        assert torch.allclose(weights_BSN.sum(-1), torch.ones_like(weights_BSN[..., 0]))
        expected = torch.log(sum(weights_BSN[..., k, None] * expert_log_probs[k].exp() for k in range(2)))
        assert (mixed_BSV.double() - expected).abs().max().item() < 1e-5
    # top-1: only the chosen expert's distribution, exactly.
    top1 = BTMEnsemble(experts, tfidf, top_k=1).eval()
    ids = torch.as_tensor(heldout_tokens(setup["prepared"], "beta")[:SEQ_LEN])[None]
    with torch.no_grad():
        assert torch.equal(top1(ids).logits, torch.log_softmax(experts[1](ids).logits.float(), dim=-1))


def test_cli_builds_a_btm_folder_that_evaluates_and_refuses_bad_input(setup, tmp_path):
    experts = setup["experts"]
    out = tmp_path / "ensemble"
    pairs = [f"--expert=alpha={experts['alpha']}", f"--expert=beta={experts['beta']}"]
    result = run_cli("btm", out, *pairs, "--data", setup["prepared"], "--chunk-len", 64, "--top-k", 2)
    assert result.returncode == 0, result.stderr
    spec = json.loads((out / "btm.json").read_text())
    assert [e["domain"] for e in spec["experts"]] == ["alpha", "beta"]
    for entry in spec["experts"]:  # relative to the BTM folder, so the tree can move as a whole
        assert not Path(entry["path"]).is_absolute()
        assert (out / entry["path"]).resolve() == experts[entry["domain"]].resolve()
    assert spec["top_k"] == 2 and spec["temperature"] == 0.1 and spec["tfidf"]["chunk_len"] == 64
    evaluated = run_cli("eval", out, "--data", setup["prepared"], "--seq-len", SEQ_LEN, "--device", "cpu")
    assert evaluated.returncode == 0, evaluated.stderr
    assert "| ensemble |" in evaluated.stdout
    perplexity = float(evaluated.stdout.split("| ensemble |")[1].split("|")[1])
    assert 1 < perplexity < 64 * 4 and math.isfinite(perplexity)

    data = ("--data", setup["prepared"])
    assert_refused(run_cli("btm", tmp_path / "x", f"--expert=gamma={experts['alpha']}", *data), "'gamma'")
    assert_refused(run_cli("btm", tmp_path / "x", f"--expert={experts['alpha']}", *data), "DOMAIN=CHECKPOINT")
    assert_refused(run_cli("btm", out, *pairs, *data), "already exists")
    assert_refused(run_cli("btm", tmp_path / "x", *pairs, *data, "--temperature", 0), "temperature")
    assert not (tmp_path / "x").exists()
