"""The `drop` recipe (Drop-Upcycling, methods.md §6): permutation, re-initialisation, seeding.

Kept neurons are found by matching each expert row (gate, up) or column (down) against the
dense ones bit for bit; what matches nothing was re-drawn. The source gives each FFN matrix its
own mean and spread, so statistics borrowed from the wrong matrix would show.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml
from cli_helpers import assert_refused, run_cli
from hf_models import build_hf_model, padded_batch

import upcycle
from upcycle.recipes.base import SourceModel
from upcycle.recipes.drop import DropParams, DropUpcycling, reinitialised_count

F, D, LAYER = 80, 48, 1
# (mean, std) per dense FFN matrix of the fp32 source
MATRIX_STATS = {"gate": (0.1, 0.03), "up": (-0.05, 0.01), "down": (0.02, 0.05)}


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> SourceModel:
    folder = tmp_path_factory.mktemp("dense32")
    model = build_hf_model("llama")
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            which = name.rsplit(".", 2)[-2].removesuffix("_proj")
            if ".mlp." in name and which in MATRIX_STATS:
                mean, std = MATRIX_STATS[which]
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * std + mean)
    model.save_pretrained(folder)
    return SourceModel.open(folder)


def recipe(source: SourceModel, **params) -> DropUpcycling:
    return DropUpcycling(DropParams(**params), [source])


def expert_neurons(recipe: DropUpcycling, layer: int = LAYER) -> dict[str, torch.Tensor]:
    """For each matrix, [E, F]: the dense neuron at each expert position, -1 where re-drawn."""
    gate_up = recipe.build(f"model.layers.{layer}.mlp.experts.gate_up_proj")
    down = recipe.build(f"model.layers.{layer}.mlp.experts.down_proj")
    experts = {"gate": gate_up[:, :F], "up": gate_up[:, F:], "down": down.transpose(1, 2)}
    found = {}
    for which, rows_EFD in experts.items():
        dense = recipe.seed.tensor(f"model.layers.{layer}.mlp.{which}_proj.weight")
        dense_rows = dense.t() if which == "down" else dense
        index = {tuple(row.tolist()): i for i, row in enumerate(dense_rows)}
        found[which] = torch.tensor(
            [[index.get(tuple(row.tolist()), -1) for row in rows] for rows in rows_EFD]
        )
    return found


def test_defaults_follow_the_drop_upcycling_code(source):
    built = recipe(source)
    moe = built.target.moe
    assert (moe.num_experts, moe.top_k, moe.routing) == (8, 2, "topk_softmax")
    assert (moe.aux_loss, moe.aux_loss_coef, built.params.ratio) == ("switch", 0.02, 0.5)
    router = built.router(0)
    assert router.abs().max() <= 0.02 * math.sqrt(3)  # uniform on ±0.02·√3, so std 0.02
    assert router.std().item() == pytest.approx(0.02, rel=0.1)


@pytest.mark.parametrize(
    ("ratio", "width", "count"), [(0.0, 80, 0), (0.5, 80, 40), (0.33, 80, 26), (0.29, 100, 29), (1.0, 80, 80)]
)
def test_reinitialised_count_is_the_floor_of_r_times_f(ratio, width, count):
    assert reinitialised_count(ratio, width) == count


def test_ratio_zero_permutes_each_expert_differently(source):
    neurons = expert_neurons(recipe(source, ratio=0.0))
    gate = neurons["gate"]
    assert torch.equal(gate.sort(dim=1).values, torch.arange(F).expand(8, F))  # a permutation each
    assert torch.equal(neurons["up"], gate) and torch.equal(neurons["down"], gate)  # one per expert
    assert len({tuple(p.tolist()) for p in gate}) == 8
    assert not (gate == torch.arange(F)).all(dim=1).any()


def reinitialised_positions(neurons: dict[str, torch.Tensor], expert: int) -> dict[str, set[int]]:
    return {which: set(torch.where(found[expert] < 0)[0].tolist()) for which, found in neurons.items()}


def test_per_expert_reinitialises_the_same_neurons_in_every_matrix(source):
    neurons = expert_neurons(recipe(source, ratio=0.5))
    for expert in range(8):
        positions = reinitialised_positions(neurons, expert)
        assert len(positions["gate"]) == reinitialised_count(0.5, F)
        assert positions["gate"] == positions["up"] == positions["down"]
        kept = neurons["gate"][expert] >= 0
        assert torch.equal(neurons["up"][expert][kept], neurons["gate"][expert][kept])
        assert torch.equal(neurons["down"][expert][kept], neurons["gate"][expert][kept])


def test_per_matrix_draws_independent_sets(source):
    neurons = expert_neurons(recipe(source, ratio=0.5, index_sets="per_matrix"))
    for expert in range(8):
        positions = reinitialised_positions(neurons, expert)
        assert all(len(p) == 40 for p in positions.values())
        assert positions["gate"] != positions["up"] != positions["down"] != positions["gate"]


@pytest.mark.parametrize("index_sets", ["per_expert", "per_matrix"])
def test_new_entries_have_the_statistics_of_the_entries_they_replace(source, index_sets):
    built = recipe(source, ratio=0.5, index_sets=index_sets)
    neurons = expert_neurons(built)
    for expert in (0, 5):
        for which, found in neurons.items():
            dense = built.seed.tensor(f"model.layers.{LAYER}.mlp.{which}_proj.weight")
            dense_rows = dense.t() if which == "down" else dense
            expert_rows = built.expert_matrix(LAYER, which, expert)
            expert_rows = expert_rows.t() if which == "down" else expert_rows
            replaced = sorted(set(range(F)) - set(found[expert].tolist()))
            old, new = dense_rows[replaced], expert_rows[found[expert] < 0]
            samples = new.numel()  # 40 neurons × 48 entries
            assert abs(new.mean() - old.mean()) < 5 * old.std() / math.sqrt(samples)
            assert abs(new.std() / old.std() - 1) < 5 / math.sqrt(2 * samples)
            assert abs(old.mean() - MATRIX_STATS[which][0]) < 0.3 * MATRIX_STATS[which][1]  # own stats


def test_same_seed_same_experts_in_any_order(source):
    first, second = recipe(source, seed=3), recipe(source, seed=3)
    name = f"model.layers.{LAYER}.mlp.experts.down_proj"
    late = second.expert_matrix(LAYER, "down", 5)  # asked for before the rest
    stacked = first.build(name)
    assert torch.equal(stacked, second.build(name))
    assert torch.equal(stacked[5], late)
    assert not torch.equal(stacked, recipe(source, seed=4).build(name))
    assert not torch.equal(stacked, first.build("model.layers.0.mlp.experts.down_proj"))


# -- through the CLI ---------------------------------------------------------------------------


def write_config(folder: Path, source: Path, **params) -> Path:
    path = folder / "drop.yaml"
    path.write_text(yaml.safe_dump({"recipe": "drop", "sources": [str(source)], **params}))
    return path


def logits_at(folder: Path) -> torch.Tensor:
    model = upcycle.load_model(folder)
    ids, mask = padded_batch(model.config.vocab_size)
    with torch.no_grad():
        return model(ids, mask).logits


def test_ratio_zero_is_exactly_the_dense_model(tmp_path):
    """F5: a consistent neuron permutation leaves every FFN unchanged (TS top-2)."""
    dense = tmp_path / "dense64"
    build_hf_model("llama").to(torch.float64).save_pretrained(dense)
    result = run_cli("convert", write_config(tmp_path, dense, ratio=0.0), tmp_path / "out")
    assert result.returncode == 0, result.stderr
    torch.testing.assert_close(logits_at(tmp_path / "out"), logits_at(dense), rtol=0, atol=1e-10)


def test_ratio_above_one_is_refused(source, tmp_path):
    out = tmp_path / "out"
    result = run_cli("convert", write_config(tmp_path, source.folder, ratio=1.5), out)
    assert_refused(result, "ratio", "choose a value in [0, 1]")
    assert not out.exists()
