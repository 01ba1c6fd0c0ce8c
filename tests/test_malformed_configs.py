"""Malformed train, data-prepare and pipeline YAMLs, each run through the CLI as a user would.

Every case must be refused with exit code 2 and one sentence on stderr that names the key (or the
file) and the fix (`assert_refused`: no traceback), and must write nothing: the case's folder
(its inputs, and where the output would go) and the shared prepared data are byte-for-byte the
same afterwards, so no output folder, staging folder or stage marker is left behind.

The cases cover wrong types (a `true` where a number belongs included: pydantic's lax mode
would read it as 1), unknown keys, out-of-range values, contradictions between keys, and
missing files. Pipeline cases must be refused before the first stage runs, not after training
the seed and the branches. Also here: the convert YAML's bool-for-number cases, the convert
YAML's `top_k` named as the user writes it, and safetensors headers with a key given twice.
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
from cli_helpers import assert_refused, run_cli, tree, write_input
from hf_models import build_hf_model
from pipeline_helpers import reduced_pipeline
from test_train_helpers import DENSE, VOCAB, one_thread, prepared_data_fixture, train_config  # noqa: F401

from upcycle.checkpoint.native import save_native
from upcycle.data.synthetic import synthetic_documents, train_byte_level_bpe
from upcycle.model.config import ModelConfig
from upcycle.model.transformer import Transformer

DELETE = object()


def changed(config: dict, changes: dict[str, object]) -> dict:
    """A deep copy of `config` with each dotted key set to its value (DELETE removes it)."""
    config = json.loads(json.dumps(config))
    for dotted, value in changes.items():
        *parents, last = dotted.split(".")
        section = config
        for key in parents:
            section = section.setdefault(key, {})
        if value is DELETE:
            section.pop(last, None)
        else:
            section[last] = value
    return config


class Case:
    """One refused run: a folder with the inputs, the output path inside it, and what else must
    stay untouched."""

    def __init__(self, root: Path, *untouched: Path) -> None:
        self.root, self.untouched = root, untouched
        self.inputs = root / "inputs"
        self.inputs.mkdir()
        self.out = root / "out"

    def write(self, data: dict | bytes, name: str = "config.yaml") -> Path:
        return write_input(self.inputs / name, data)

    def refused(self, *args: object, fragments: tuple[str, ...]) -> None:
        before = [tree(self.root), *(tree(p) for p in self.untouched)]
        result = run_cli(*args)
        print(result.stderr.strip())  # the refusals, for review: pytest -s
        assert_refused(result, *fragments)
        after = [tree(self.root), *(tree(p) for p in self.untouched)]
        assert after == before, "the refused run wrote or changed files"


@pytest.fixture(scope="module")
def materials(prepared_data, tmp_path_factory) -> dict[str, Path]:
    """The shared data's tokenizer and source files, a native dense model with that tokenizer,
    and another tokenizer."""
    root = tmp_path_factory.mktemp("malformed_configs")
    base = prepared_data.parent
    torch.manual_seed(0)
    model = save_native(Transformer(ModelConfig(**DENSE)), root / "model", tokenizer_from=base / "tokenizer")
    other = train_byte_level_bpe(synthetic_documents(50, seed=9), VOCAB, root / "other_tokenizer")
    return {
        "data": prepared_data,
        "tokenizer": base / "tokenizer",
        "code": base / "code.jsonl",
        "math": base / "math.jsonl",
        "model": model,
        "other_tokenizer": other,
    }


# -- the train YAML -----------------------------------------------------------------------------

# (dotted changes over tests/test_train_helpers.train_config, fragments of the refusal)
TRAIN: dict[str, tuple[dict[str, object], tuple[str, ...]]] = {
    "unknown_top_level_key": ({"optimiser": {"lr": 1e-3}}, ("optimiser: unknown key", "spelling")),
    "unknown_nested_key": ({"batch.micro_batch": 4}, ("batch.micro_batch: unknown key",)),
    "missing_output": ({"output": DELETE}, ("output: required key is missing; add it",)),
    "missing_seq_len": ({"data.seq_len": DELETE}, ("data.seq_len: required key is missing",)),
    "seq_len_a_string": ({"data.seq_len": "long"}, ("data.seq_len:", "valid integer")),
    "batch_size_true": ({"batch.global_batch_size": True}, ("batch.global_batch_size: got true", "a number")),
    "lr_true": ({"optimizer.lr": True}, ("optimizer.lr: got true where a number is expected",)),
    "max_steps_false": ({"stop.max_steps": False}, ("stop.max_steps: got false",)),
    "lr_zero": ({"optimizer.lr": 0}, ("optimizer.lr: Input should be greater than 0",)),
    "min_lr_ratio_above_one": (
        {"schedule.min_lr_ratio": 1.5},
        ("schedule.min_lr_ratio:", "less than or equal to 1"),
    ),
    "beta_of_one": ({"optimizer.betas": [0.9, 1.0]}, ("optimizer:", "must each be in [0, 1)")),
    "negative_seed": ({"seed": -1}, ("seed: Input should be greater than or equal to 0",)),
    "precision_typo": (
        {"precision": "fp16"},
        ("precision: Input should be 'auto', 'bf16', 'fp32' or 'bf16-weights'",),
    ),
    "freeze_typo": ({"freeze": "routers"}, ("freeze:", "'all_but_routers'")),
    "two_stop_rules": (
        {"stop.max_tokens": 1000},
        ("stop:", "set exactly one of max_steps, max_tokens, max_flops"),
    ),
    "no_stop_rule": ({"stop.max_steps": DELETE}, ("set exactly one of max_steps",)),
    "path_and_config": ({"model.path": "MODEL"}, ("model:", "give either `path`", "or `config`")),
    "init_seed_with_a_path": (
        {"model.config": DELETE, "model.path": "MODEL", "model.init_seed": 3},
        ("`init_seed` and `init_std` only apply to a fresh `config`; remove them",),
    ),
    "keep_last_k_one": ({"checkpoint.keep_last_k": 1}, ("checkpoint:", "keep_last_k 1", "use 2 or more")),
    "inline_model_top_k_above_experts": (
        {"model.config.moe.top_k": 5},
        ("moe.top_k (5) exceeds moe.num_experts (4)",),
    ),
    "micro_batch_not_dividing": ({"batch.micro_batch_size": 3}, ("micro_batch_size 3 does not divide",)),
    "micro_and_accumulation_disagree": (
        {"batch.grad_accumulation": 3},
        ("micro_batch_size 4 × grad_accumulation 3", "give only one of"),
    ),
    "eval_without_enough_heldout": (
        {"data.seq_len": 100_000, "eval.every_steps": 5},
        ("no domain", "100001 held-out tokens", "eval.every_steps: 0"),
    ),
    "weights_name_an_unknown_domain": ({"data.weights": {"cod": 1.0}}, ("'cod'",)),
    "missing_data_folder": ({"data.path": "MISSING"}, ("does not exist", "upcycle data prepare")),
    "data_folder_not_prepared": ({"data.path": "INPUTS"}, ("manifest.json",)),
    "missing_model_folder": (
        {"model.config": DELETE, "model.path": "MISSING"},
        ("does not exist",),
    ),
    "model_with_another_tokenizer": (
        {"model.config": DELETE, "model.path": "MODEL", "model.tokenizer": "OTHER_TOKENIZER"},
        ("tokenizer",),
    ),
    "vocabulary_too_small": (
        {"model.config.vocab_size": 100},
        ("token ids up to", "vocab_size is 100"),
    ),
}


def _placeholders(value: object, case: Case, materials: dict[str, Path]) -> object:
    names = {
        "MODEL": materials["model"],
        "MISSING": case.inputs / "missing",
        "INPUTS": case.inputs,
        "OTHER_TOKENIZER": materials["other_tokenizer"],
    }
    return str(names[value]) if isinstance(value, str) and value in names else value


@pytest.mark.parametrize("name", TRAIN)
def test_bad_train_yaml(name, materials, tmp_path):
    changes, fragments = TRAIN[name]
    case = Case(tmp_path, materials["data"])
    changes = {key: _placeholders(value, case, materials) for key, value in changes.items()}
    config = changed(train_config(materials["data"], case.out), changes)
    case.refused("train", case.write(config), "--quiet", fragments=fragments)


@pytest.mark.parametrize(
    "raw, fragment",
    [(b"model: {config: \n  - [\n", "is not valid YAML"), (b"- model\n- data\n", "must be a mapping")],
    ids=["syntax_error", "a_list"],
)
def test_unreadable_train_yaml(raw, fragment, materials, tmp_path):
    case = Case(tmp_path)
    case.refused("train", case.write(raw), "--quiet", fragments=(fragment,))


def test_missing_train_yaml(tmp_path):
    case = Case(tmp_path)
    case.refused("train", case.inputs / "absent.yaml", fragments=("does not exist", "check the path"))


# -- the data-prepare YAML ----------------------------------------------------------------------


def data_yaml(materials: dict[str, Path]) -> dict:
    return {
        "domains": {"code": {"paths": [str(materials["code"])]}, "math": {"paths": [str(materials["math"])]}},
        "tokenizer": str(materials["tokenizer"]),
        "heldout": {"fraction": 0.1},
        "num_workers": 1,
    }


DATA: dict[str, tuple[dict[str, object], tuple[str, ...]]] = {
    "unknown_top_level_key": ({"tokeniser": "x"}, ("tokeniser: unknown key",)),
    "unknown_domain_key": ({"domains.code.weigth": 2.0}, ("domains.code.weigth: unknown key",)),
    "paths_misspelt": (
        {"domains.code.path": ["a.jsonl"], "domains.code.paths": DELETE},
        ("domains.code.", "(and 1 more problem(s))"),
    ),
    "missing_tokenizer_key": ({"tokenizer": DELETE}, ("tokenizer: required key is missing",)),
    "paths_not_a_list": ({"domains.code.paths": "CODE"}, ("domains.code.paths:", "valid list")),
    "weight_a_string": ({"domains.code.weight": "heavy"}, ("domains.code.weight:", "valid number")),
    "weight_true": ({"domains.code.weight": True}, ("domains.code.weight: got true where a number",)),
    "seed_true": ({"seed": True}, ("seed: got true where a number is expected",)),
    "negative_weight": ({"domains.code.weight": -1}, ("domains.code.weight:", "greater than or equal to 0")),
    "heldout_fraction_one": ({"heldout.fraction": 1.0}, ("heldout.fraction:", "less than 1")),
    "heldout_fraction_and_tokens": ({"heldout.tokens": 100}, ("heldout:", "either `fraction` or `tokens`")),
    "heldout_neither": ({"heldout.fraction": DELETE}, ("heldout:", "set `fraction`")),
    "every_weight_zero": (
        {"domains.code.weight": 0, "domains.math.weight": 0},
        ("at least one domain needs a positive `weight`",),
    ),
    "no_domains": ({"domains": {}}, ("domains:", "at least 1")),
    "domain_name_with_a_slash": (
        {"domains": {"co/de": {"paths": ["CODE"]}}},
        ("domain name 'co/de'", "rename it"),
    ),
    "format_typo": ({"domains.code.format": "jsnol"}, ("domains.code.format:", "'jsonl'")),
    "empty_text_field": ({"domains.code.text_field": ""}, ("domains.code.text_field:", "at least 1")),
    "num_workers_zero": ({"num_workers": 0}, ("num_workers:", "greater than or equal to 1")),
    "negative_seed": ({"seed": -3}, ("seed:", "greater than or equal to 0")),
    "missing_source_file": ({"domains.code.paths": ["MISSING"]}, ("does not exist",)),
    "glob_matching_nothing": ({"domains.code.paths": ["GLOB"]}, ("matches no file", "fix the path")),
    "same_file_twice": ({"domains.code.paths": ["CODE", "CODE"]}, ("is reached twice", "list it once")),
    "missing_tokenizer": ({"tokenizer": "MISSING"}, ("tokenizer",)),
    "eos_token_not_in_vocabulary": ({"eos_token": "<|no-such-token|>"}, ("<|no-such-token|>",)),
    "text_field_not_in_the_records": ({"domains.code.text_field": "content"}, ("'content'",)),
    "jsonl_read_as_parquet": (
        {"domains.code.format": "parquet"},
        ("is not a readable Parquet file", "`format`"),
    ),
}


@pytest.mark.parametrize("name", DATA)
def test_bad_data_yaml(name, materials, tmp_path):
    changes, fragments = DATA[name]
    case = Case(tmp_path, materials["code"].parent)
    names = {"CODE": materials["code"], "MISSING": case.inputs / "missing.jsonl"}
    names["GLOB"] = case.inputs / "nothing-*.jsonl"

    def fill(value: object) -> object:
        if isinstance(value, list):
            return [fill(v) for v in value]
        if isinstance(value, dict):
            return {k: fill(v) for k, v in value.items()}
        return str(names[value]) if isinstance(value, str) and value in names else value

    config = changed(data_yaml(materials), {key: fill(value) for key, value in changes.items()})
    case.refused("data", "prepare", case.write(config), case.out, "--quiet", fragments=fragments)


def test_data_out_dir_holding_other_files(materials, tmp_path):
    case = Case(tmp_path, materials["code"].parent)
    case.out.mkdir()
    (case.out / "notes.txt").write_text("mine")
    config = case.write(data_yaml(materials))
    case.refused(
        "data", "prepare", config, case.out, "--quiet", fragments=("holds other files", "empty or new")
    )


# -- the pipeline YAML --------------------------------------------------------------------------


def data_pipeline(out: Path, materials: dict[str, Path]) -> dict:
    """The reduced pipeline on the user's files instead of the built-in corpus."""
    config = reduced_pipeline(out)
    del config["corpus"]
    config["data"] = {
        "tokenizer": str(materials["tokenizer"]),
        "domains": {"code": {"paths": [str(materials["code"])]}, "math": {"paths": [str(materials["math"])]}},
    }
    config["seed"]["config"] = {**config["seed"]["config"], "vocab_size": VOCAB}
    return config


PIPELINE: dict[str, tuple[dict[str, object], tuple[str, ...]]] = {
    "unknown_top_level_key": ({"finetuning": {"steps": 3}}, ("finetuning: unknown key",)),
    "unknown_train_key": ({"seed.train.learning_rate": 0.1}, ("seed.train.learning_rate: unknown key",)),
    "seq_len_zero": ({"seq_len": 0}, ("seq_len: Input should be greater than 0",)),
    "seq_len_a_string": ({"seq_len": "long"}, ("seq_len:", "valid integer")),
    "finetune_steps_true": ({"finetune.steps": True}, ("finetune.steps: got true where a number",)),
    "heldout_fraction_one": ({"heldout_fraction": 1.0}, ("heldout_fraction:", "less than 1")),
    "launch_typo": ({"branches.launch": "paralel"}, ("branches.launch:", "'parallel'")),
    "budget_typo": ({"finetune.budget": "flops"}, ("finetune.budget:", "'compute_matched'")),
    "corpus_vocab_too_small": (
        {"corpus.vocab_size": 100},
        ("corpus.vocab_size:", "greater than or equal to 300"),
    ),
    "corpus_and_data": (
        {
            "data": {
                "tokenizer": "TOKENIZER",
                "domains": {"a": {"paths": ["a.txt"]}, "b": {"paths": ["b.txt"]}},
            }
        },
        ("either `corpus`",),
    ),
    "neither_corpus_nor_data": ({"corpus": DELETE}, ("either `corpus`",)),
    "seed_path_and_config": ({"seed.path": "SEED"}, ("seed:", "give either `path`")),
    "seed_config_without_steps": ({"seed.steps": 0}, ("seed:", "needs `steps` > 0")),
    "seed_model_invalid": (
        {"seed.config.num_key_value_heads": 3},
        ("seed.config:", "multiple of num_key_value_heads"),
    ),
    "mix_names_repeated": ({"mixes": [{"name": "a", "recipe": "btx"}] * 2}, ("own `name`",)),
    "mix_name_with_a_slash": ({"mixes": [{"name": "a/b", "recipe": "btx"}]}, ("mixes.0.name:", "pattern")),
    "compute_matched_without_a_reference": (
        {"mixes": [{"name": "dense", "recipe": "dense"}]},
        ("compute_matched needs a btx or bam entry",),
    ),
    "no_mixes": ({"mixes": []}, ("mixes:", "at least 1")),
    # Caught before the first stage runs (they used to surface only after the seed and branches).
    "unknown_corpus_domain": ({"corpus.domains": ["code", "klingon"]}, ("klingon", "fix the list")),
    "unknown_recipe": (
        {"mixes": [{"name": "btx", "recipe": "btx"}, {"name": "x", "recipe": "btz"}]},
        ("mixes.x: unknown recipe 'btz'", "dense, btm"),
    ),
    "mix_parameter_typo": (
        {"mixes": [{"name": "btx", "recipe": "btx"}, {"name": "sp", "recipe": "sparse", "num_expert": 2}]},
        ("mixes.sp:", "num_expert is not a parameter of recipe sparse"),
    ),
    "mix_parameter_out_of_range": (
        {"mixes": [{"name": "btx", "recipe": "btx", "top_k": 0}]},
        ("mixes.btx:", "top_k:", "greater than 0"),
    ),
    "mix_parameter_contradiction": (
        {"mixes": [{"name": "btx", "recipe": "btx", "routing": "sample_top1"}]},
        ("mixes.btx:", "sample_top1", "set top_k to 1"),
    ),
    "dense_with_parameters": (
        {"mixes": [{"name": "btx", "recipe": "btx"}, {"name": "d", "recipe": "dense", "top_k": 2}]},
        ("mixes.d:", "top_k", "dense"),
    ),
    "btm_parameter_typo": (
        {"mixes": [{"name": "btx", "recipe": "btx"}, {"name": "m", "recipe": "btm", "topk": 1}]},
        ("mixes.m: topk: unknown key",),
    ),
    "btm_temperature_zero": (
        {"mixes": [{"name": "btx", "recipe": "btx"}, {"name": "m", "recipe": "btm", "temperature": 0}]},
        ("mixes.m: temperature:", "greater than 0"),
    ),
    "unknown_branch_domain": (
        {"branches.domains": ["code", "poetry"]},
        ("branches.domains names ['poetry']", "fix the list"),
    ),
    "extra_train_key_unknown": (
        {"finetune.train.extra": {"chekpoint": {}}},
        ("finetune", "chekpoint: unknown key"),
    ),
    "extra_train_value_invalid": (
        {"branches.train.extra": {"checkpoint": {"keep_last_k": 1}}},
        ("branches", "keep_last_k 1"),
    ),
    "micro_batch_not_dividing": (
        {"seed.train.micro_batch_size": 3},
        ("seed", "micro_batch_size 3 does not divide"),
    ),
    "missing_seed_checkpoint": ({"seed": {"path": "MISSING"}}, ("does not exist",)),
    "finetune_expert_parallel_in_process": (
        {"finetune.train.extra": {"parallel": {"expert_parallel": 2}}},
        ("finetune.train", "expert_parallel 2 does not divide the 1 rank"),
    ),
    "branch_expert_parallel_on_dense_seed": (
        {"branches.train.extra": {"parallel": {"expert_parallel": 2}}},
        ("branches.train", "no MoE layer"),
    ),
}

DATA_PIPELINE: dict[str, tuple[dict[str, object], tuple[str, ...]]] = {
    "missing_tokenizer": ({"data.tokenizer": "MISSING"}, ("tokenizer",)),
    "missing_domain_file": ({"data.domains.code.paths": ["MISSING"]}, ("does not exist",)),
    "one_domain": ({"data.domains.math": DELETE}, ("data.domains:", "at least 2")),
    "seed_vocabulary_too_small": ({"seed.config.vocab_size": 100}, ("vocab_size", "100")),
}


def _pipeline_case(
    tmp_path: Path, materials: dict[str, Path], config: dict, changes: dict
) -> tuple[Case, Path]:
    case = Case(tmp_path, materials["code"].parent)
    names = {"MISSING": str(case.inputs / "missing"), "SEED": str(materials["model"])}
    names["TOKENIZER"] = str(materials["tokenizer"])

    def fill(value: object) -> object:
        if isinstance(value, list):
            return [fill(v) for v in value]
        if isinstance(value, dict):
            return {k: fill(v) for k, v in value.items()}
        return names.get(value, value) if isinstance(value, str) else value

    config = changed(config, {key: fill(value) for key, value in changes.items()})
    config["output"] = str(case.out)
    return case, case.write(config)


@pytest.mark.parametrize("name", PIPELINE)
def test_bad_pipeline_yaml(name, materials, tmp_path):
    changes, fragments = PIPELINE[name]
    case, path = _pipeline_case(tmp_path, materials, reduced_pipeline(tmp_path / "out"), changes)
    case.refused("run", path, "--quiet", fragments=fragments)


@pytest.mark.parametrize("name", DATA_PIPELINE)
def test_bad_pipeline_yaml_with_own_data(name, materials, tmp_path):
    changes, fragments = DATA_PIPELINE[name]
    case, path = _pipeline_case(tmp_path, materials, data_pipeline(tmp_path / "out", materials), changes)
    case.refused("run", path, "--quiet", fragments=fragments)


# -- the convert YAML: booleans, key names; safetensors headers with a key given twice ---------------


@pytest.fixture(scope="module")
def dense_source(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("dense") / "dense"
    build_hf_model(
        "llama",
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_attention_heads=4,
        num_key_value_heads=2,
    ).save_pretrained(folder)
    return folder


CONVERT = {
    "top_k_true": ({"top_k": True}, ("top_k: got true where a number is expected", "write a number")),
    "num_experts_true": ({"num_experts": True}, ("num_experts: got true",)),
    "router_std_true": ({"router_init": {"std": True}}, ("router_init.std: got true",)),
    "shard_size_false": ({"output": {"shard_size_mb": False}}, ("output.shard_size_mb: got false",)),
    # The convert YAML's key is `top_k` (the model config's is `moe.top_k`).
    "sample_top1_with_top_k_2": ({"routing": "sample_top1", "top_k": 2}, ("set top_k to 1 (got 2)",)),
    "top_k_above_num_experts": ({"top_k": 3, "num_experts": 2}, ("top_k (3) exceeds num_experts (2)",)),
}


@pytest.mark.parametrize("name", CONVERT)
def test_bad_convert_yaml_values(name, dense_source, tmp_path):
    changes, fragments = CONVERT[name]
    case = Case(tmp_path, dense_source)
    config = case.write({"recipe": "sparse", "sources": [str(dense_source)], **changes})
    case.refused("convert", config, case.out, "--quiet", fragments=fragments)
    if name == "sample_top1_with_top_k_2":
        assert "moe.top_k" not in run_cli("convert", config, case.out).stderr


def _with_duplicate_key(folder: Path, duplicate: str) -> None:
    """Rewrite model.safetensors so that its header names a key twice (the data is kept)."""
    data = (folder / "model.safetensors").read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header, body = json.loads(data[8 : 8 + length]), data[8 + length :]
    name = "model.embed_tokens.weight"
    entry = json.dumps(header[name])
    text = json.dumps(header)
    if duplicate == "tensor":  # a second entry for the embedding, pointing at other bytes
        other = header["model.norm.weight"]["data_offsets"]
        text = text[:-1] + f', "{name}": {{"dtype": "F32", "shape": [4, 2], "data_offsets": {other}}}}}'
    else:  # an entry that gives its dtype twice
        text = text.replace(entry, entry[:-1] + ', "dtype": "F16"}', 1)
    raw = text.encode()
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw + body)


@pytest.mark.parametrize("duplicate", ["tensor", "field"])
def test_safetensors_header_with_a_key_given_twice(duplicate, dense_source, tmp_path):
    case = Case(tmp_path)
    source = shutil.copytree(dense_source, case.inputs / "source")
    _with_duplicate_key(source, duplicate)
    config = case.write({"recipe": "sparse", "sources": [str(source)]})
    key = "'model.embed_tokens.weight'" if duplicate == "tensor" else "'dtype'"
    case.refused("convert", config, case.out, "--quiet", fragments=(f"names {key} twice", "re-create it"))
