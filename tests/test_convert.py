"""`upcycle convert` with the sparse and btx recipes: exactness where methods.md §7.1 says exact,
the predicted deviation where §7.2 says not, and refusals before any output exists."""

from __future__ import annotations

import shutil

import pytest
import torch
from cli_helpers import assert_refused, run_cli
from convert_helpers import fp64_source, max_logit_diff, write_yaml
from hf_models import build_hf_model

import upcycle
from upcycle.cli import main as cli_main


@pytest.fixture(scope="module")
def seed_dir(tmp_path_factory):
    return fp64_source(tmp_path_factory.mktemp("seed") / "dense")


@pytest.fixture(scope="module")
def branches(tmp_path_factory):
    root = tmp_path_factory.mktemp("branches")
    return [fp64_source(root / f"branch{i}", seed=10 + i) for i in range(3)]


def convert_cli(tmp_path, name: str, config: dict):
    out = tmp_path / name
    result = run_cli("convert", write_yaml(tmp_path / f"{name}.yaml", config), out, "--quiet")
    assert result.returncode == 0, result.stderr
    return out


def test_exact_cases_through_the_cli(seed_dir, tmp_path):
    """F1 (TS, k = 1, 2, 4, random router), F2 (soft), F3 (ST, zero router, W_down × N/k)."""
    cases = {
        "ts_k1": {"top_k": 1, "num_experts": 4},
        "ts_k2": {"top_k": 2, "num_experts": 4, "router_init": {"std": 1.0, "seed": 3}},
        "ts_k4_every_other": {"top_k": 4, "num_experts": 4, "moe_layers": "every_other"},
        "soft": {"routing": "soft", "num_experts": 3, "router_init": {"std": 0.5}},
        "st_zero_router_scaled": {
            "routing": "softmax_topk",
            "top_k": 2,
            "num_experts": 8,
            "router_init": {"std": 0.0},
            "down_scale": 4.0,
        },
    }
    for name, params in cases.items():
        out = convert_cli(tmp_path, name, {"recipe": "sparse", "sources": [str(seed_dir)], **params})
        assert max_logit_diff(out, seed_dir) <= 1e-10, name


def test_st_deviation_is_the_sum_of_selected_probabilities(seed_dir, tmp_path):
    """N1: without renormalisation, ST multiplies the FFN output by Σ_{i∈top-k} p_i, exactly."""
    out = upcycle.convert(
        {"recipe": "sparse", "sources": [str(seed_dir)], "routing": "softmax_topk"},
        tmp_path / "st",
    )
    moe_model, dense_model = upcycle.load_model(out), upcycle.load_model(seed_dir)
    x_TD = torch.randn(17, moe_model.config.hidden_size, dtype=torch.float64)
    moe_layer, dense_ffn = moe_model.model.layers[0].mlp, dense_model.model.layers[0].mlp
    with torch.no_grad():
        probs_TE = torch.softmax(x_TD @ moe_layer.gate.weight.T, dim=-1)
        selected_sum_T = probs_TE.topk(2, dim=-1).values.sum(-1)
        got, _ = moe_layer(x_TD[None])
        expected = dense_ffn(x_TD) * selected_sum_T[:, None]
    assert (got[0] - expected).abs().max().item() <= 1e-12
    assert (selected_sum_T - 1).abs().min().item() > 0.5  # near k/N = 1/4: far from exact


def test_btx_mixes_exactly(branches, tmp_path):
    out = convert_cli(tmp_path, "btx", {"recipe": "btx", "sources": [str(b) for b in branches]})
    moe = upcycle.load_model(out).state_dict()
    dense = [upcycle.load_model(b).state_dict() for b in branches]
    for name in ("model.embed_tokens.weight", "model.layers.1.self_attn.k_proj.weight", "model.norm.weight"):
        expected = (dense[0][name] + dense[1][name] + dense[2][name]) / 3
        assert torch.equal(moe[name], expected), name
    for layer in range(2):
        gate_up = moe[f"model.layers.{layer}.mlp.experts.gate_up_proj"]
        down = moe[f"model.layers.{layer}.mlp.experts.down_proj"]
        for i, source in enumerate(dense):
            prefix = f"model.layers.{layer}.mlp."
            expected_gate_up = torch.cat(
                [source[prefix + "gate_proj.weight"], source[prefix + "up_proj.weight"]]
            )
            assert torch.equal(gate_up[i], expected_gate_up)
            assert torch.equal(down[i], source[prefix + "down_proj.weight"])
    config = upcycle.load_config(out)
    assert (config.moe.num_experts, config.moe.top_k, config.moe.aux_loss) == (3, 2, "btx")


def test_btx_of_identical_sources_is_the_seed(seed_dir, tmp_path):
    """F6: BTX without branch training reduces to sparse upcycling: exact."""
    out = convert_cli(tmp_path, "btx_same", {"recipe": "btx", "sources": [str(seed_dir)] * 4})
    assert max_logit_diff(out, seed_dir) <= 1e-10


def test_btx_split_and_blend_layouts(branches, tmp_path):
    sources = [str(b) for b in branches[:2]]
    split = upcycle.load_model(
        upcycle.convert(
            {"recipe": "btx", "sources": sources, "expert_layout": "split", "split_chunks": 4}, tmp_path / "s"
        )
    )
    blend = upcycle.load_model(
        upcycle.convert(
            {"recipe": "btx", "sources": sources, "expert_layout": "blend", "split_chunks": 4}, tmp_path / "b"
        )
    )
    dense = [upcycle.load_model(s).state_dict() for s in sources]
    down = [d["model.layers.0.mlp.down_proj.weight"] for d in dense]  # [D, 80]
    assert split.config.moe.num_experts == 8 and split.config.moe_intermediate_size == 20
    assert torch.equal(split.state_dict()["model.layers.0.mlp.experts.down_proj"][5], down[1][:, 20:40])
    assert blend.config.moe.num_experts == 4 and blend.config.moe_intermediate_size == 40
    expected = torch.cat([down[0][:, 60:80], down[1][:, 60:80]], dim=1)
    assert torch.equal(blend.state_dict()["model.layers.0.mlp.experts.down_proj"][3], expected)


def _mismatched_source(tmp_path, name: str, **overrides):
    return fp64_source(tmp_path / name, **overrides)


def test_refusals_leave_no_output(seed_dir, tmp_path):
    qwen = fp64_source(tmp_path / "qwen", family="qwen2")
    wide = _mismatched_source(tmp_path, "wide", hidden_size=64)
    vocab = _mismatched_source(tmp_path, "vocab", vocab_size=99)
    other_tokenizer = shutil.copytree(seed_dir, tmp_path / "tok")
    (other_tokenizer / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "BPE"}}')
    seed_tokenizer = shutil.copytree(seed_dir, tmp_path / "tok_seed")
    (seed_tokenizer / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "WordPiece"}}')
    s = str(seed_dir)
    cases = [
        ({"recipe": "btx", "sources": [s, str(qwen)]}, ["differ in architecture"]),
        ({"recipe": "btx", "sources": [s, str(wide)]}, ["differ in hidden_size"]),
        ({"recipe": "btx", "sources": [s, str(vocab)]}, ["differ in vocab_size"]),
        ({"recipe": "btx", "sources": [str(seed_tokenizer), str(other_tokenizer)]}, ["different tokenizer"]),
        (
            {"recipe": "sparse", "sources": [s], "top_k": 9, "num_experts": 8},
            ["top_k (9) exceeds", "num_experts (8)"],
        ),
        ({"recipe": "sparse", "sources": [str(tmp_path / "missing")]}, ["does not exist"]),
        (
            {"recipe": "sparse", "sources": [s], "granularity": 2},
            ["granularity is not a parameter of recipe sparse"],
        ),
        ({"recipe": "sparse", "sources": [s, s]}, ["takes exactly 1 source"]),
        ({"recipe": "nope", "sources": [s]}, ["unknown recipe 'nope'"]),
        ({"recipe": "sparse", "sources": [s], "top_k": "two"}, ["top_k"]),
    ]
    for index, (config, fragments) in enumerate(cases):
        out = tmp_path / f"out{index}"
        result = run_cli(
            "convert", write_yaml(tmp_path / f"c{index}.yaml", config), out, subprocess=index == 0
        )
        assert_refused(result, *fragments)
        assert not out.exists()
        assert not list(tmp_path.glob(f".out{index}*")), "staging folder left behind"


def test_too_little_disk_is_refused_up_front(seed_dir, tmp_path, monkeypatch, capsys):
    import shutil as shutil_module

    real = shutil_module.disk_usage
    monkeypatch.setattr(shutil_module, "disk_usage", lambda p: real(p)._replace(free=10_000))
    config = write_yaml(tmp_path / "c.yaml", {"recipe": "sparse", "sources": [str(seed_dir)]})
    assert cli_main(["convert", str(config), str(tmp_path / "out")]) == 2
    message = capsys.readouterr().err.strip()
    assert "kB are free" in message and "free some space" in message and len(message.splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_overwrite_replaces_and_refuses_without_flag(seed_dir, tmp_path):
    config = write_yaml(
        tmp_path / "c.yaml", {"recipe": "sparse", "sources": [str(seed_dir)], "num_experts": 2}
    )
    out = tmp_path / "out"
    assert run_cli("convert", config, out, "--quiet").returncode == 0
    assert_refused(run_cli("convert", config, out), "already exists", "--overwrite")
    write_yaml(config, {"recipe": "sparse", "sources": [str(seed_dir)], "num_experts": 3})
    assert run_cli("convert", config, out, "--overwrite", "--quiet").returncode == 0
    assert upcycle.load_config(out).moe.num_experts == 3
    assert (out / "upcycle_recipe.yaml").is_file() and (out / "README.md").is_file()


def test_bf16_output_and_recipes_command(tmp_path):
    build_hf_model("qwen3").save_pretrained(tmp_path / "q3")
    out = upcycle.convert(
        {"recipe": "sparse", "sources": [str(tmp_path / "q3")], "output": {"dtype": "bfloat16"}},
        tmp_path / "o",
    )
    model = upcycle.load_model(out)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    listing = run_cli("recipes")
    assert listing.returncode == 0 and "sparse" in listing.stdout and "btx" in listing.stdout


def test_btx_of_sources_in_different_dtypes_averages_each_in_its_own_precision(tmp_path):
    """A bf16 source and an fp32 one: the mean is (s_0 + s_1) / 2 in fp32, each source entering
    the sum at its own precision, cast to source 0's dtype (bf16); experts are copied exactly."""
    sources = []
    for i, dtype in enumerate((torch.bfloat16, torch.float32)):
        model = build_hf_model("llama", seed=20 + i).to(dtype)
        model.save_pretrained(tmp_path / f"src{i}")
        sources.append(tmp_path / f"src{i}")
    out = convert_cli(tmp_path, "btx_mixed", {"recipe": "btx", "sources": [str(s) for s in sources]})
    moe = upcycle.load_model(out).state_dict()
    dense = [upcycle.load_model(s).state_dict() for s in sources]
    for name in ("model.embed_tokens.weight", "model.layers.1.self_attn.q_proj.weight", "model.norm.weight"):
        expected = ((dense[0][name].float() + dense[1][name].float()) / 2).to(torch.bfloat16)
        assert moe[name].dtype == torch.bfloat16
        assert torch.equal(moe[name], expected), name
    down = moe["model.layers.0.mlp.experts.down_proj"]
    assert torch.equal(down[1], dense[1]["model.layers.0.mlp.down_proj.weight"].to(torch.bfloat16))
