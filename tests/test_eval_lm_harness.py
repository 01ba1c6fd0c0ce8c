"""lm-eval-harness through its Hugging Face backend, on CPU, with a task defined here from local
files only (a task YAML whose dataset is a JSONL file on disk): it runs on a native BAM
checkpoint (loaded through upcycle's Auto-class registration) and on a Mixtral export (loaded
by transformers' own class), and the log-likelihoods it reports equal our model's."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from eval_helpers import VOCAB, word_tokenizer
from hf_models import build_hf_model

import upcycle

lm_eval = pytest.importorskip(
    "lm_eval", reason="lm-eval-harness is not installed (pip install 'lm-eval[hf]')"
)

from lm_eval.tasks import TaskManager  # noqa: E402

from upcycle.eval.harness import hf_lm  # noqa: E402

DOCUMENTS = [
    {"question": "w5 w6 w7", "choices": ["w8", "w9 w10", "w11"], "label": 0},
    {"question": "w12 w13 w14 w15", "choices": ["w16", "w17"], "label": 1},
    {"question": "w20", "choices": ["w21 w22 w23", "w24"], "label": 1},
]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("harness")
    sources = []
    for seed in range(2):
        source = root / f"source{seed}"
        build_hf_model("llama", seed=seed, vocab_size=VOCAB).save_pretrained(source)
        sources.append(word_tokenizer(source))
    recipes = {
        "bam": {"recipe": "bam", "sources": [str(s) for s in sources]},
        "mixtral": {
            "recipe": "sparse", "sources": [str(sources[0])], "num_experts": 4, "top_k": 2,
            "router_init": {"std": 1.0, "seed": 0}, "output": {"format": "mixtral"},
        },
    }  # fmt: skip
    out = {}
    for name, recipe in recipes.items():
        (root / f"{name}.yaml").write_text(yaml.safe_dump(recipe))
        out[name] = upcycle.convert(root / f"{name}.yaml", root / name, quiet=True)
    return out


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    """A multiple-choice task whose documents are a local JSONL file: no hub, no network."""
    folder = tmp_path_factory.mktemp("tasks")
    data = folder / "tiny.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in DOCUMENTS))
    task = {
        "task": "upcycle_tiny_local",
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data)}},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "{{question}}",
        "doc_to_choice": "{{choices}}",
        "doc_to_target": "{{label}}",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
    }
    (folder / "upcycle_tiny_local.yaml").write_text(yaml.safe_dump(task))
    return folder


def our_log_likelihood(model, context: str, continuation: str) -> float:
    ids = [int(word[1:]) for word in f"{context} {continuation}".split()]
    start = len(context.split())
    with torch.no_grad():
        log_probs = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), dim=-1)
    return sum(float(log_probs[p - 1, ids[p]]) for p in range(start, len(ids)))


@pytest.mark.parametrize("name", ["bam", "mixtral"])
def test_local_task_runs_on_native_bam_and_mixtral_export(checkpoints, task_dir, name, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    config = json.loads((checkpoints[name] / "config.json").read_text())
    assert config["model_type"] == {"bam": "upcycle", "mixtral": "mixtral"}[name]
    lm = hf_lm(checkpoints[name], device="cpu", batch_size=4)
    assert type(lm.model).__name__ == {"bam": "UpcycleForCausalLM", "mixtral": "MixtralForCausalLM"}[name]
    results = lm_eval.simple_evaluate(
        model=lm,
        tasks=["upcycle_tiny_local"],
        task_manager=TaskManager(include_path=str(task_dir), include_defaults=False),
        bootstrap_iters=0,
        log_samples=True,
    )
    assert results["results"]["upcycle_tiny_local"]["acc,none"] in (0.0, 1 / 3, 2 / 3, 1.0)
    samples = results["samples"]["upcycle_tiny_local"]
    assert len(samples) == len(DOCUMENTS)
    model = upcycle.load_model(checkpoints[name])
    for sample in samples:
        document = sample["doc"]
        reported = [float(response[0][0]) for response in sample["resps"]]
        expected = [our_log_likelihood(model, document["question"], c) for c in document["choices"]]
        assert reported == pytest.approx(expected, abs=1e-4), (name, document)
