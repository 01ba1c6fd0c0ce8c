"""`upcycle analyze routing`: a model whose routers are set by hand (domain alpha's tokens to FFN
expert 0 and attention expert 0, beta's to 1; layer 1's FFN router swapped) is reported exactly
so, with the dead experts and the load imbalance that follow; the heatmap PNGs are written; an
HF Mixtral export is analysed too, and a dense model is refused."""

from __future__ import annotations

import json

import matplotlib.image
import pytest
import torch
import yaml
from cli_helpers import assert_refused, run_cli
from eval_helpers import DOMAIN_IDS, VOCAB, tiny_config, tiny_native, word_domains, word_tokenizer
from hf_models import build_hf_model

import upcycle
from upcycle.eval import analyze_routing

SEQ_LEN, WINDOWS = 16, 3


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("routing")
    tokenizer = word_tokenizer(root / "tokenizer")
    word_domains(root, tokenizer)
    return {"root": root, "tokenizer": tokenizer, "prepared": root / "prepared"}


def hand_routed_model(folder, tokenizer):
    """Residual stream = token embedding in every layer (attention and experts output 0), the
    embedding marks alpha ids on dimension 0 and beta ids on dimension 1, and each router reads
    those two dimensions."""
    config = tiny_config(
        moe=dict(num_experts=4, top_k=1, routing="softmax_topk"),
        moa=dict(num_experts=2, implementation="eager"),
    )
    model = upcycle.Transformer(config)
    generator = torch.Generator().manual_seed(0)
    e0, e1 = torch.eye(config.hidden_size)[:2]
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.02)
        for name, parameter in model.named_parameters():
            if name.endswith("norm.weight"):
                parameter.fill_(1.0)
        embed = model.model.embed_tokens.weight
        embed[slice(*DOMAIN_IDS["alpha"]), 0] += 3.0
        embed[slice(*DOMAIN_IDS["beta"]), 1] += 3.0
        for index, layer in enumerate(model.model.layers):
            layer.self_attn.experts.o_proj.zero_()
            layer.mlp.experts.down_proj.zero_()
            ffn_rows = (e0, e1) if index == 0 else (e1, e0)
            layer.mlp.gate.weight.copy_(torch.stack([*ffn_rows, 0 * e0, 0 * e0]) * 10)
            layer.self_attn.router.weight.copy_(torch.stack([e0, e1]) * 10)
    return upcycle.save_native(model, folder, tokenizer_from=tokenizer)


def test_hand_set_routers_are_reported_exactly_and_heatmaps_written(setup):
    model = hand_routed_model(setup["root"] / "hand_routed", setup["tokenizer"])
    out = setup["root"] / "analysis"
    result = run_cli(
        "analyze", "routing", model, "--data", setup["prepared"], "--seq-len", SEQ_LEN,
        "--max-sequences", WINDOWS, "--device", "cpu", "--out", out,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "routing.json").read_text())
    tokens = SEQ_LEN * WINDOWS
    assert report["tokens"] == {"alpha": tokens, "beta": tokens}
    ffn = [r for r in report["routers"] if r["kind"] == "ffn"]
    attention = [r for r in report["routers"] if r["kind"] == "attention"]
    assert [r["layer"] for r in ffn] == [0, 1] and [r["layer"] for r in attention] == [0, 1]
    assert ffn[0]["assignment_share"] == {"alpha": [1.0, 0.0, 0.0, 0.0], "beta": [0.0, 1.0, 0.0, 0.0]}
    assert ffn[1]["assignment_share"] == {"alpha": [0.0, 1.0, 0.0, 0.0], "beta": [1.0, 0.0, 0.0, 0.0]}
    for record in ffn:
        own, other = [tokens, 0, 0, 0], [0, tokens, 0, 0]
        expected = {"alpha": own, "beta": other} if record["layer"] == 0 else {"alpha": other, "beta": own}
        assert record["assignments"] == expected
        assert record["dead_experts"] == [2, 3]
        assert record["load_imbalance"] == 2.0  # loads [n, n, 0, 0]: max / mean = n / (n/2)
        assert record["entropy_all"] < 0.01 and record["max_entropy"] == pytest.approx(1.3862943611)
    for record in attention:
        assert record["mean_gate"]["alpha"][0] > 0.999 and record["mean_gate"]["beta"][1] > 0.999
        assert record["dead_experts"] == []
        assert record["load_imbalance"] == pytest.approx(1.0, abs=1e-3)
    assert report["images"] == {"ffn": "routing_ffn.png", "attention": "routing_attention.png"}
    for name in report["images"].values():
        height, width, _ = matplotlib.image.imread(out / name).shape
        assert height > 200 and width > 300
    assert "| 0 | FFN | softmax_topk (k=1/4) |" in (out / "routing.md").read_text()
    assert "dead experts" in result.stdout


def test_mixtral_export_is_analysed_with_consistent_statistics(setup, tmp_path):
    source = tmp_path / "dense"
    build_hf_model("llama", seed=4, vocab_size=VOCAB).save_pretrained(source)
    recipe = {
        "recipe": "sparse", "sources": [str(source)], "num_experts": 4, "top_k": 2,
        "router_init": {"std": 1.0, "seed": 1}, "output": {"format": "mixtral"},
    }  # fmt: skip
    (tmp_path / "convert.yaml").write_text(yaml.safe_dump(recipe))
    mixtral = upcycle.convert(tmp_path / "convert.yaml", tmp_path / "mixtral", quiet=True)
    assert json.loads((mixtral / "config.json").read_text())["model_type"] == "mixtral"
    report = analyze_routing(mixtral, setup["prepared"], seq_len=SEQ_LEN, max_sequences=2, device="cpu")
    assert [r["layer"] for r in report.layers] == [0, 1]
    for record in report.layers:
        assert record["top_k"] == 2 and record["routing"] == "topk_softmax"
        for domain in ("alpha", "beta"):
            assert sum(record["assignments"][domain]) == 2 * SEQ_LEN * 2
            assert sum(record["assignment_share"][domain]) == pytest.approx(1.0)
            assert sum(record["mean_probability"][domain]) == pytest.approx(1.0)
            assert 0 < record["entropy"][domain] <= record["max_entropy"]
        assert 1.0 <= record["load_imbalance"] <= 4.0


def test_dense_model_is_refused(setup, tmp_path):
    dense = tiny_native(tmp_path / "dense", setup["tokenizer"])
    result = run_cli(
        "analyze", "routing", dense, "--data", setup["prepared"], "--seq-len", 8, "--out", tmp_path / "o"
    )
    assert_refused(result, "no router", "MoE or BAM")
