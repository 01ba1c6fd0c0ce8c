"""Property tests: every recipe case that methods.md §7.1 calls exact stays exact on random small
models.

Hypothesis draws a dense source (family llama, qwen2 or qwen3; hidden size, query and KV heads,
head size, 1 or 2 layers, vocabulary, FFN width, activation, tied embeddings, attention bias;
Qwen3 adds QK-norm and Qwen2 its q/k/v bias) with every weight random at unit scale, saves it in
float64, converts it in-process with `upcycle.convert`, and compares the logits of the converted
model with the source's on a padded batch: the largest difference must be ≤ 1e-10 (methods.md §7,
"compare logits with atol ≈ 1e-10"). A control case (softmax-then-top-k without
renormalisation, §7.2 N1) must fail that bound, which shows the comparison can see a deviation.

Exact cases: F1 sparse topk-then-softmax with any k and router; F2 sparse soft routing; F3 sparse
softmax-then-top-k with a zero router and W_down × N/k; F4 nvidia topk-then-softmax with virtual
groups and k = m·G, `down_only` scaling (any activation) or `balanced` (ReLU); F5 drop with
r = 0; F6 btx of identical sources; F7 bam of identical sources with an exact FFN routing (soft,
topk-then-softmax, or renormalised softmax-then-top-k).

`UPCYCLE_PROPERTY_EXAMPLES` sets the examples per case (default 15).
"""

from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path

import pytest
import torch
from hf_models import FAMILIES, padded_batch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import upcycle

EXAMPLES = int(os.environ.get("UPCYCLE_PROPERTY_EXAMPLES", "15"))
PROPERTY = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,  # no .hypothesis folder in the repository
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
TOLERANCE = 1e-10


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A folder for the examples' models; torch runs on one thread meanwhile (these models are
    tiny, and on a shared machine the thread pool costs ten times the work)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield tmp_path_factory.mktemp("properties")
    torch.set_num_threads(threads)


@st.composite
def dense_sources(draw) -> tuple[str, dict]:
    """(family, HF config overrides) of a small random dense model."""
    family = draw(st.sampled_from(["llama", "qwen2", "qwen3"]))
    head_dim = draw(st.sampled_from([2, 4, 8]))
    kv_heads = draw(st.integers(1, 2))
    heads = kv_heads * draw(st.integers(1, 3))
    hidden = draw(st.sampled_from([8, 12, 16, 24])) if family == "qwen3" else heads * head_dim
    config = dict(
        vocab_size=draw(st.integers(8, 48)),
        hidden_size=hidden,
        intermediate_size=draw(st.sampled_from([4, 6, 8, 12, 16, 24])),
        num_hidden_layers=draw(st.integers(1, 2)),
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        hidden_act=draw(st.sampled_from(["silu", "gelu", "relu"])),
        tie_word_embeddings=draw(st.booleans()),
        max_position_embeddings=64,
    )
    if family != "qwen2":  # Qwen2 always has a q/k/v bias
        config["attention_bias"] = draw(st.booleans())
    return family, config


def moe_layers(draw, layers: int):
    options = ["all", [0]] + (["every_other", [1], [0, 1]] if layers == 2 else [])
    return draw(st.sampled_from(options))


def router_init(draw, zero_allowed: bool = True) -> dict:
    stds = [0.02, 1.0, 4.0] + ([0.0] if zero_allowed else [])
    return {"std": draw(st.sampled_from(stds)), "seed": draw(st.integers(0, 1000))}


def save_source(folder: Path, family: str, overrides: dict, seed: int) -> Path:
    """The model in float64 with every weight drawn at unit scale (so no term is negligible)."""
    config_cls, model_cls, extra = FAMILIES[family]
    config = config_cls(**{**extra, **overrides, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0})
    torch.manual_seed(seed)
    model = model_cls(config).to(torch.float64).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("norm.weight"):
                values = torch.rand(parameter.shape, generator=generator, dtype=torch.float64) + 0.5
            elif name.endswith("bias"):
                values = torch.randn(parameter.shape, generator=generator, dtype=torch.float64) * 0.3
            else:
                fan_in = parameter.shape[-1] if "embed" not in name else 1
                values = torch.randn(parameter.shape, generator=generator, dtype=torch.float64) / fan_in**0.5
            parameter.copy_(values)
    model.save_pretrained(folder)
    return folder


def logits(folder: Path, vocab_size: int) -> torch.Tensor:
    ids, mask = padded_batch(vocab_size, seed=7)
    with torch.no_grad():
        return upcycle.load_model(folder)(ids, mask).logits[mask.bool()]


def conversion_error(
    workdir: Path, family: str, overrides: dict, recipe: dict, copies: int = 1, seed: int = 0
) -> float:
    """Largest |logit difference| between the source and its conversion by `recipe`."""
    with tempfile.TemporaryDirectory(dir=workdir) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # TS top-1 warns that the router gets no gradient
        source = save_source(Path(tmp) / "dense", family, overrides, seed)
        out = upcycle.convert({**recipe, "sources": [str(source)] * copies}, Path(tmp) / "moe")
        vocab = overrides["vocab_size"]
        return (logits(out, vocab) - logits(source, vocab)).abs().max().item()


seeds = st.integers(0, 2**16)


@PROPERTY
@given(dense_sources(), st.data(), seeds)
def test_f1_sparse_topk_softmax_any_k(workdir, source, data, seed):
    family, overrides = source
    experts = data.draw(st.integers(1, 6))
    recipe = {
        "recipe": "sparse",
        "num_experts": experts,
        "top_k": data.draw(st.integers(1, experts)),
        "routing": "topk_softmax",
        "router_init": router_init(data.draw),
        "moe_layers": moe_layers(data.draw, overrides["num_hidden_layers"]),
    }
    assert conversion_error(workdir, family, overrides, recipe, seed=seed) <= TOLERANCE, recipe


@PROPERTY
@given(dense_sources(), st.data(), seeds)
def test_f2_sparse_soft(workdir, source, data, seed):
    family, overrides = source
    recipe = {
        "recipe": "sparse",
        "num_experts": data.draw(st.integers(1, 6)),
        "routing": "soft",
        "router_init": router_init(data.draw),
    }
    assert conversion_error(workdir, family, overrides, recipe, seed=seed) <= TOLERANCE, recipe


@PROPERTY
@given(dense_sources(), st.data(), seeds)
def test_f3_sparse_softmax_topk_zero_router_scaled(workdir, source, data, seed):
    family, overrides = source
    experts = data.draw(st.integers(1, 6))
    top_k = data.draw(st.integers(1, experts))
    recipe = {
        "recipe": "sparse",
        "num_experts": experts,
        "top_k": top_k,
        "routing": "softmax_topk",
        "router_init": {"std": 0.0},
        "down_scale": experts / top_k,
    }
    assert conversion_error(workdir, family, overrides, recipe, seed=seed) <= TOLERANCE, recipe


@PROPERTY
@given(dense_sources(), st.data(), seeds)
def test_f4_nvidia_virtual_groups_whole_copies(workdir, source, data, seed):
    family, overrides = source
    width = overrides["intermediate_size"]
    granularity = data.draw(st.sampled_from([g for g in (1, 2, 3, 4, 6) if width % g == 0]))
    copies = data.draw(st.integers(1, 4))
    scalings = ["down_only"] + (["balanced"] if overrides["hidden_act"] == "relu" else [])
    recipe = {
        "recipe": "nvidia",
        "granularity": granularity,
        "num_experts": copies * granularity,
        "top_k": data.draw(st.integers(1, copies)) * granularity,
        "routing": "topk_softmax",
        "virtual_groups": True,
        "weight_scaling": data.draw(st.sampled_from(scalings)),
        "router_init": router_init(data.draw, zero_allowed=False),  # tied copies could split
        "moe_layers": moe_layers(data.draw, overrides["num_hidden_layers"]),
    }
    assert conversion_error(workdir, family, overrides, recipe, seed=seed) <= TOLERANCE, recipe


@PROPERTY
@given(dense_sources(), st.data(), seeds)
def test_f5_drop_without_reinitialisation(workdir, source, data, seed):
    family, overrides = source
    experts = data.draw(st.integers(1, 6))
    recipe = {
        "recipe": "drop",
        "ratio": 0.0,
        "num_experts": experts,
        "top_k": data.draw(st.integers(1, experts)),
        "index_sets": data.draw(st.sampled_from(["per_expert", "per_matrix"])),
        "seed": data.draw(st.integers(0, 1000)),
        "router_init": router_init(data.draw),
    }
    assert conversion_error(workdir, family, overrides, recipe, seed=seed) <= TOLERANCE, recipe


@PROPERTY
@given(dense_sources(), st.data(), seeds)
def test_f6_btx_of_identical_sources(workdir, source, data, seed):
    family, overrides = source
    copies = data.draw(st.integers(2, 4))
    recipe = {
        "recipe": "btx",
        "top_k": data.draw(st.integers(1, copies)),
        "router_init": router_init(data.draw),
        "moe_layers": moe_layers(data.draw, overrides["num_hidden_layers"]),
    }
    assert conversion_error(workdir, family, overrides, recipe, copies=copies, seed=seed) <= TOLERANCE, recipe


@PROPERTY
@given(dense_sources(), st.data(), seeds)
def test_f7_bam_of_identical_sources_with_exact_ffn_routing(workdir, source, data, seed):
    family, overrides = source
    copies = data.draw(st.integers(2, 3))
    top_k = data.draw(st.integers(1, copies))
    routing = data.draw(
        st.sampled_from(
            [
                {"routing": "soft"},
                {"routing": "topk_softmax", "top_k": top_k},
                {"routing": "softmax_topk", "top_k": top_k, "renormalize": True},
            ]
        )
    )
    share_kv = data.draw(st.booleans())
    attention = {"share_kv": share_kv}
    if share_kv:
        attention["kv_init"] = data.draw(st.sampled_from(["mean", "seed"]))
    recipe = {
        "recipe": "bam",
        **routing,
        "attention": attention,
        "router_init": router_init(data.draw),
        "moe_layers": moe_layers(data.draw, overrides["num_hidden_layers"]),
    }
    assert conversion_error(workdir, family, overrides, recipe, copies=copies, seed=seed) <= TOLERANCE, recipe


@settings(PROPERTY, max_examples=max(3, EXAMPLES // 4))
@given(dense_sources(), st.data(), seeds)
def test_control_softmax_topk_is_not_exact(workdir, source, data, seed):
    """N1: the same harness sees the Σ p_i ≈ k/N deviation of unrenormalised ST. The router is
    near-uniform (std 0.02), so that Σ p_i over the top k is near k/N: a peaked router (std 4,
    or std 1 over a wide input) can leave 1e-7 of the mass outside the top k, and the deviation
    then falls below the threshold (hypothesis found llama D2, 3 experts top-2, std 4, seed 0)."""
    family, overrides = source
    experts = data.draw(st.integers(2, 6))
    recipe = {
        "recipe": "sparse",
        "num_experts": experts,
        "top_k": data.draw(st.integers(1, experts - 1)),
        "routing": "softmax_topk",
        "router_init": {"std": 0.02, "seed": data.draw(st.integers(0, 1000))},
    }
    assert conversion_error(workdir, family, overrides, recipe, seed=seed) > 1e-6, recipe
