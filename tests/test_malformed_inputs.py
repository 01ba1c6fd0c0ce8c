"""A corpus of malformed inputs, each run through the CLI as a user would type it.

Every case must be refused with exit code 2 and one sentence on stderr (`assert_refused`: no
traceback), and must write nothing: the file tree of the case's folder (its inputs, and where
OUT_DIR would go) is byte-for-byte the same afterwards, so there is no OUT_DIR, no staging folder
beside it, and no input was touched. `--debug` turns the sentence back into a traceback.

The cases cover the convert YAML (syntax, structure, types, unknown keys, ranges, contradictions),
source checkpoints (hostile or damaged safetensors headers, non-finite weights, missing or
misshaped tensors, indexes, pickled `.bin` files), the source `config.json`, mixing sources, the
output path, and `upcycle init`.
"""

from __future__ import annotations

import io
import json
import shutil
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from cli_helpers import assert_refused, run_cli, tree, write_input
from hf_models import build_hf_model
from safetensors.torch import load_file, save_file

import upcycle

SMALL = dict(
    vocab_size=64, hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2
)
WEIGHTS = "model.safetensors"


@pytest.fixture(scope="module")
def good_source(tmp_path_factory) -> Path:
    """A tiny fp32 Llama (2 layers, F = 48) with a tokenizer file, which converts fine."""
    folder = tmp_path_factory.mktemp("good") / "dense"
    build_hf_model("llama", **SMALL).save_pretrained(folder)
    (folder / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "BPE"}}')
    return folder


@pytest.fixture(scope="module")
def moe_source(good_source, tmp_path_factory) -> Path:
    """An already upcycled model, which must not be used as a dense source."""
    return upcycle.convert(
        {"recipe": "sparse", "sources": [str(good_source)], "num_experts": 2},
        tmp_path_factory.mktemp("moe") / "moe",
    )


class Case:
    """One malformed-input run: a folder with the inputs, and where OUT_DIR would be."""

    def __init__(self, root: Path, good_source: Path) -> None:
        self.root, self._good = root, good_source
        self.inputs = root / "inputs"
        self.inputs.mkdir()
        self.out = root / "out"

    def source(self, mutate: Callable[[Path], object] | None = None, name: str = "source") -> Path:
        folder = shutil.copytree(self._good, self.inputs / name)
        if mutate is not None:
            mutate(folder)
        return folder

    def config(self, data: dict | bytes, name: str = "convert.yaml") -> Path:
        return write_input(self.inputs / name, data)

    def refused(self, *args: object, fragments: tuple[str, ...]) -> None:
        before = tree(self.root)
        result = run_cli(*args)
        assert_refused(result, *fragments)
        assert tree(self.root) == before, "the refused run wrote or changed files"


@pytest.fixture
def case(tmp_path, good_source) -> Case:
    return Case(tmp_path, good_source)


# -- the convert YAML ---------------------------------------------------------------------------

RAW_CONFIGS = {
    "yaml_syntax_error": (b"recipe: sparse\nsources: [a, b\n", ("is not valid YAML", "line")),
    "yaml_is_a_list": (b"- recipe: sparse\n- sources: []\n", ("must be a mapping",)),
    "yaml_empty_file": (b"", ("must be a mapping",)),
    "yaml_not_utf8": (b"recipe: sp\xffarse\nsources: []\n", ("is not a UTF-8 text file",)),
    "yaml_only_a_string": (b"sparse\n", ("must be a mapping",)),
}


@pytest.mark.parametrize("name", RAW_CONFIGS)
def test_unreadable_convert_yaml(case, name):
    raw, fragments = RAW_CONFIGS[name]
    case.refused("convert", case.config(raw), case.out, "--quiet", fragments=fragments)


def test_missing_convert_yaml(case):
    case.refused("convert", case.inputs / "absent.yaml", case.out, fragments=("does not exist",))


# Convert-YAML contents: (keys merged over {recipe: sparse, sources: [the good source]}, fragments).
CONFIGS: dict[str, tuple[dict, tuple[str, ...]]] = {
    "missing_sources": ({"sources": None}, ("sources: required key is missing",)),
    "empty_sources": ({"sources": []}, ("sources:", "at least 1")),
    "sources_not_a_list": ({"sources": "model"}, ("sources: Input should be a valid list",)),
    "missing_recipe": ({"recipe": None}, ("recipe: required key is missing",)),
    "unknown_recipe": ({"recipe": "spars"}, ("unknown recipe 'spars'", "sparse")),
    "unknown_parameter": ({"num_expert": 8}, ("num_expert is not a parameter of recipe sparse",)),
    "parameter_of_another_recipe": ({"granularity": 2}, ("granularity is not a parameter of recipe sparse",)),
    "unknown_output_key": ({"output": {"fromat": "native"}}, ("output.fromat: unknown key",)),
    "unknown_router_init_key": ({"router_init": {"sd": 0.1}}, ("router_init.sd: unknown key",)),
    "output_not_a_mapping": ({"output": ["native"]}, ("output:", "valid dictionary")),
    "num_experts_wrong_type": ({"num_experts": "eight"}, ("num_experts:", "valid integer")),
    "top_k_fractional": ({"top_k": 2.5}, ("top_k:", "fractional part")),
    "top_k_negative": ({"top_k": -1}, ("top_k: Input should be greater than 0",)),
    "num_experts_zero": ({"num_experts": 0}, ("num_experts: Input should be greater than 0",)),
    "router_std_negative": (
        {"router_init": {"std": -0.1}},
        ("router_init.std:", "greater than or equal to 0"),
    ),
    "router_std_infinite": ({"router_init": {"std": float("inf")}}, ("router_init.std:", "finite number")),
    "router_std_nan": ({"router_init": {"std": float("nan")}}, ("router_init.std:",)),
    "router_distribution_typo": ({"router_init": {"distribution": "gauss"}}, ("router_init.distribution:",)),
    "down_scale_infinite": ({"down_scale": float("inf")}, ("down_scale:", "finite number")),
    "down_scale_zero": ({"down_scale": 0}, ("down_scale: Input should be greater than 0",)),
    "aux_loss_coef_negative": ({"aux_loss_coef": -0.01}, ("aux_loss_coef:",)),
    "capacity_factor_zero": ({"capacity_factor": 0}, ("capacity_factor:",)),
    "routing_typo": ({"routing": "topk_sofmax"}, ("routing: Input should be 'topk_softmax'",)),
    "aux_loss_typo": ({"aux_loss": "swtich"}, ("aux_loss:",)),
    "output_format_typo": ({"output": {"format": "mixtrall"}}, ("output.format:", "'mixtral'")),
    "output_dtype_typo": ({"output": {"dtype": "fp8"}}, ("output.dtype:", "'bfloat16'")),
    "shard_size_zero": ({"output": {"shard_size_mb": 0}}, ("output.shard_size_mb:",)),
    "moe_layers_out_of_range": ({"moe_layers": [5]}, ("moe_layers [5] are outside 0..1",)),
    "moe_layers_negative": ({"moe_layers": [-1]}, ("moe_layers [-1] are outside 0..1",)),
    "moe_layers_empty": ({"moe_layers": []}, ("moe_layers is empty",)),
    "moe_layers_repeated": ({"moe_layers": [1, 1]}, ("repeats an index",)),
    "moe_layers_typo": ({"moe_layers": "every_second"}, ("moe_layers",)),
    "top_k_above_num_experts": ({"top_k": 9, "num_experts": 8}, ("top_k (9) exceeds", "num_experts (8)")),
    "renormalize_with_topk_softmax": ({"renormalize": True}, ("renormalize only applies to softmax_topk",)),
    "sample_top1_with_top_k_2": ({"routing": "sample_top1"}, ("sample_top1 picks one expert",)),
    "two_sources_for_sparse": ({"sources": ["SOURCE", "SOURCE"]}, ("takes exactly 1 source(s), got 2",)),
    "one_source_for_btx": ({"recipe": "btx"}, ("takes at least 2 source(s), got 1",)),
    "btx_num_experts_contradiction": (
        {"recipe": "btx", "sources": ["SOURCE", "SOURCE"], "num_experts": 3},
        ("makes 2 experts", "set it to 2"),
    ),
    "btx_split_chunks_not_dividing": (
        {"recipe": "btx", "sources": ["SOURCE", "SOURCE"], "expert_layout": "split", "split_chunks": 5},
        ("split_chunks (5) must divide intermediate_size (48)",),
    ),
    "nvidia_granularity_not_dividing": (
        {"recipe": "nvidia", "granularity": 5},
        ("granularity (5) must divide the dense intermediate_size (48)",),
    ),
    "nvidia_top_k_not_whole_copies": (
        {"recipe": "nvidia", "granularity": 2, "top_k": 3},
        ("top_k (3) must be a multiple of granularity (2)",),
    ),
    "nvidia_sample_top1": ({"recipe": "nvidia", "routing": "sample_top1"}, ("no weight-scaling rule",)),
    "drop_ratio_above_one": ({"recipe": "drop", "ratio": 1.5}, ("ratio:", "choose a value in [0, 1]")),
    "bam_attention_top_k_with_soft": (
        {"recipe": "bam", "sources": ["SOURCE", "SOURCE"], "attention": {"top_k": 1}},
        ("attention.top_k is only used by routing topk",),
    ),
    "bam_parallel_block_unconfirmed": (
        {"recipe": "bam", "sources": ["SOURCE", "SOURCE"], "attention": {"block": "parallel"}},
        ("convert_to_parallel",),
    ),
}


@pytest.mark.parametrize("name", CONFIGS)
def test_bad_convert_config(case, name):
    changes, fragments = CONFIGS[name]
    source = str(case.source())
    data = {"recipe": "sparse", "sources": [source]}
    data.update(changes)
    if isinstance(data.get("sources"), list):
        data["sources"] = [source if s == "SOURCE" else s for s in data["sources"]]
    data = {key: value for key, value in data.items() if value is not None}
    case.refused("convert", case.config(data), case.out, "--quiet", fragments=fragments)


# -- source checkpoints: safetensors files ------------------------------------------------------


def split_file(folder: Path) -> tuple[dict, bytes]:
    data = (folder / WEIGHTS).read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + length]), data[8 + length :]


def edit_header(edit: Callable[[dict], dict | bytes]) -> Callable[[Path], None]:
    """A mutation that rewrites the header of model.safetensors (the data section is kept)."""

    def mutate(folder: Path) -> None:
        header, body = split_file(folder)
        new = edit(header)
        raw = new if isinstance(new, bytes) else json.dumps(new).encode()
        (folder / WEIGHTS).write_bytes(struct.pack("<Q", len(raw)) + raw + body)

    return mutate


def edit_entry(name: str, **fields) -> Callable[[Path], None]:
    def edit(header: dict) -> dict:
        header[name].update(fields)
        return header

    return edit_header(edit)


def edit_bytes(edit: Callable[[bytes], bytes]) -> Callable[[Path], None]:
    def mutate(folder: Path) -> None:
        (folder / WEIGHTS).write_bytes(edit((folder / WEIGHTS).read_bytes()))

    return mutate


def edit_tensors(edit: Callable[[dict[str, torch.Tensor]], None]) -> Callable[[Path], None]:
    def mutate(folder: Path) -> None:
        tensors = load_file(folder / WEIGHTS)
        edit(tensors)
        save_file(tensors, folder / WEIGHTS, metadata={"format": "pt"})

    return mutate


def set_value(name: str, value: float) -> Callable[[dict[str, torch.Tensor]], None]:
    def edit(tensors: dict[str, torch.Tensor]) -> None:
        tensors[name][3, 5] = value

    return edit


def overlap(header: dict) -> dict:
    """o_proj of layer 0 is given the bytes of q_proj (same size, so only the overlap is wrong)."""
    header["model.layers.0.self_attn.o_proj.weight"]["data_offsets"] = header[
        "model.layers.0.self_attn.q_proj.weight"
    ]["data_offsets"]
    return header


def past_the_end(header: dict) -> dict:
    entry = header["model.norm.weight"]
    end = max(e["data_offsets"][1] for k, e in header.items() if k != "__metadata__")
    entry["data_offsets"] = [end, end + entry["data_offsets"][1] - entry["data_offsets"][0]]
    return header


def without(name: str) -> Callable[[dict[str, torch.Tensor]], None]:
    return lambda tensors: tensors.pop(name)


def with_extra(tensors: dict[str, torch.Tensor]) -> None:
    tensors["model.layers.0.mlp.extra_proj.weight"] = torch.zeros(4, 4)


def reshaped(tensors: dict[str, torch.Tensor]) -> None:
    tensors["model.layers.1.mlp.down_proj.weight"] = torch.zeros(32, 40)


def write_index(weight_map: object) -> Callable[[Path], None]:
    def mutate(folder: Path) -> None:
        (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))

    return mutate


def only_file(name: str, payload: bytes) -> Callable[[Path], None]:
    """Replace the weights by one file `name` holding `payload`."""

    def mutate(folder: Path) -> None:
        (folder / WEIGHTS).unlink()
        (folder / name).write_bytes(payload)

    return mutate


class _OpensAFile:
    """Unpickling this calls `open(path, "w")`: the marker file would appear if it ever ran."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def pickle_with_global(folder: Path) -> None:
    buffer = io.BytesIO()
    marker = folder.parent.parent / "pickle-ran"  # inside the case folder, so `tree` would see it
    torch.save({"model.embed_tokens.weight": torch.zeros(2), "evil": _OpensAFile(marker)}, buffer)
    only_file("pytorch_model.bin", buffer.getvalue())(folder)


def truncated_bin(folder: Path) -> None:
    buffer = io.BytesIO()
    torch.save(load_file(folder / WEIGHTS), buffer)
    only_file("pytorch_model.bin", buffer.getvalue()[: len(buffer.getvalue()) // 2])(folder)


def broken_bin_index(folder: Path) -> None:
    only_file("pytorch_model.bin.index.json", b'{"weight_map": ')(folder)


EMBED = "model.embed_tokens.weight"
UP1 = "model.layers.1.mlp.up_proj.weight"

SOURCES: dict[str, tuple[Callable[[Path], object], tuple[str, ...]]] = {
    "truncated_data": (edit_bytes(lambda b: b[:-1000]), ("is truncated", WEIGHTS)),
    "shorter_than_the_length_prefix": (edit_bytes(lambda b: b[:5]), ("shorter than a safetensors header",)),
    "header_length_beyond_file": (
        edit_bytes(lambda b: struct.pack("<Q", 2 * len(b)) + b[8:]),
        ("is truncated: its header needs",),
    ),
    "header_over_100_mb": (
        edit_bytes(lambda b: struct.pack("<Q", 200_000_000) + b[8:]),
        ("declares a 200000000-byte header, over the 100 MB limit",),
    ),
    "header_length_max_uint64": (
        edit_bytes(lambda b: b"\xff" * 8 + b[8:]),
        ("over the 100 MB limit",),
    ),
    "header_not_json": (edit_header(lambda h: b"{not json at all"), ("unreadable safetensors header",)),
    "header_not_utf8": (edit_header(lambda h: b'{"\xff\xfe": 1}'), ("unreadable safetensors header",)),
    "header_is_a_json_list": (edit_header(lambda h: [1, 2, 3]), ("malformed safetensors header",)),
    "metadata_not_an_object": (
        edit_header(lambda h: {**h, "__metadata__": ["format", "pt"]}),
        ("malformed __metadata__",),
    ),
    "entry_not_an_object": (edit_header(lambda h: {**h, EMBED: 7}), ("malformed header entry", EMBED)),
    "entry_without_offsets": (
        edit_header(lambda h: {**h, EMBED: {"dtype": "F32", "shape": [64, 32]}}),
        ("malformed header entry",),
    ),
    "overlapping_offsets": (edit_header(overlap), ("overlap",)),
    "offsets_past_the_end": (edit_header(past_the_end), ("'model.norm.weight' ends at byte",)),
    "offsets_reversed": (edit_entry(EMBED, data_offsets=[100, 50]), ("invalid data offsets",)),
    "offsets_not_integers": (edit_entry(EMBED, data_offsets=["0", "8192"]), ("invalid data offsets",)),
    "dtype_disagrees_with_size": (edit_entry(EMBED, dtype="F16"), ("dtype F16 × shape [64, 32] needs 4096",)),
    "shape_disagrees_with_size": (edit_entry(EMBED, shape=[64, 33]), ("needs 8448",)),
    "unknown_dtype": (edit_entry(EMBED, dtype="F12"), ("unsupported dtype 'F12'",)),
    "dtype_not_a_string": (edit_entry(EMBED, dtype=["F32"]), ("unsupported dtype",)),
    "shape_overflow": (edit_entry(EMBED, shape=[2**62, 2**62]), ("holds 8192 bytes but",)),
    "negative_dimension": (edit_entry(EMBED, shape=[-64, -32]), ("invalid shape",)),
    "nan_weight": (edit_tensors(set_value(UP1, float("nan"))), ("NaN or inf", repr(UP1))),
    "inf_weight": (edit_tensors(set_value(EMBED, float("-inf"))), ("NaN or inf", repr(EMBED))),
    "missing_tensor": (edit_tensors(without(UP1)), ("lacks 1 tensor(s)", repr(UP1))),
    "mismatched_shape": (edit_tensors(reshaped), ("has shape (32, 40) but config.json implies (32, 48)",)),
    "unexpected_tensor": (edit_tensors(with_extra), ("extra_proj", "does not have")),
    "no_weights": (lambda f: (f / WEIGHTS).unlink(), ("holds no weights",)),
    "index_names_a_missing_shard": (
        write_index({EMBED: "model-00002-of-00002.safetensors"}),
        ("missing shard model-00002-of-00002.safetensors",),
    ),
    "index_not_json": (
        lambda f: (f / "model.safetensors.index.json").write_text("{"),
        ("not a valid safetensors index",),
    ),
    "index_leaves_the_folder": (write_index({EMBED: "../../etc/passwd"}), ("in the same folder",)),
    "index_weight_map_a_list": (write_index([WEIGHTS]), ("in the same folder",)),
    "pickle_with_forbidden_global": (pickle_with_global, ("refused", "could run code", "safetensors")),
    "truncated_bin": (truncated_bin, ("truncated or not a PyTorch checkpoint",)),
    "bin_index_not_json": (broken_bin_index, ("not a valid checkpoint index",)),
}


def edit_config_json(**changes) -> Callable[[Path], None]:
    def mutate(folder: Path) -> None:
        config = json.loads((folder / "config.json").read_text())
        for key, value in changes.items():
            if value is None:
                config.pop(key, None)
            else:
                config[key] = value
        (folder / "config.json").write_text(json.dumps(config))

    return mutate


CONFIG_JSONS: dict[str, tuple[Callable[[Path], object], tuple[str, ...]]] = {
    "config_json_missing": (lambda f: (f / "config.json").unlink(), ("has no config.json",)),
    "config_json_not_json": (
        lambda f: (f / "config.json").write_text('{"hidden_size": 32,'),
        ("config.json is not valid JSON",),
    ),
    "config_json_a_list": (lambda f: (f / "config.json").write_text("[]"), ("must hold a JSON object",)),
    "config_json_not_utf8": (lambda f: (f / "config.json").write_bytes(b'{"\xff": 1}'), ("not UTF-8",)),
    "config_json_without_hidden_size": (
        edit_config_json(hidden_size=None),
        ("config.json: hidden_size: required key is missing",),
    ),
    "config_json_without_layer_count": (
        edit_config_json(num_hidden_layers=None),
        ("num_hidden_layers: required key is missing",),
    ),
    "config_json_heads_not_dividing": (
        edit_config_json(num_attention_heads=3),
        ("num_attention_heads (3) must be a multiple of num_key_value_heads (2)",),
    ),
    "config_json_hidden_not_divisible": (
        edit_config_json(num_attention_heads=3, num_key_value_heads=3, head_dim=None),
        ("hidden_size (32) is not divisible by num_attention_heads (3)",),
    ),
    "config_json_wrong_type": (edit_config_json(hidden_size="thirty-two"), ("hidden_size:", "valid integer")),
    "config_json_zero_vocab": (edit_config_json(vocab_size=0), ("vocab_size:", "greater than 0")),
    "config_json_unknown_model_type": (
        edit_config_json(model_type="gpt_neox"),
        ("'gpt_neox' is not supported",),
    ),
    "config_json_unknown_activation": (edit_config_json(hidden_act="gelu_new"), ("activation 'gelu_new'",)),
    "config_json_rope_not_an_object": (edit_config_json(rope_parameters=[1, 2]), ("rope_parameters",)),
    "config_json_unsupported_rope": (
        edit_config_json(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}),
        ("RoPE scaling 'yarn' is not supported",),
    ),
}


@pytest.mark.parametrize("name", [*SOURCES, *CONFIG_JSONS])
def test_bad_source_checkpoint(case, name):
    mutate, fragments = {**SOURCES, **CONFIG_JSONS}[name]
    config = case.config({"recipe": "sparse", "sources": [str(case.source(mutate))]})
    case.refused("convert", config, case.out, "--quiet", fragments=fragments)


# -- mixing sources, the output path, init --------------------------------------------------------


def test_sources_with_different_tokenizers(case):
    other = case.source(
        lambda f: (f / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "WordPiece"}}'),
        name="other",
    )
    config = case.config({"recipe": "btx", "sources": [str(case.source()), str(other)]})
    case.refused("convert", config, case.out, "--quiet", fragments=("different tokenizer files",))


def test_sources_with_different_shapes(case):
    other = case.source(
        lambda f: build_hf_model("llama", **{**SMALL, "intermediate_size": 64}).save_pretrained(f),
        name="wide",
    )
    config = case.config({"recipe": "bam", "sources": [str(case.source()), str(other)]})
    case.refused("convert", config, case.out, "--quiet", fragments=("sources differ in intermediate_size",))


def test_float16_output_that_overflows(case):
    source = case.source(edit_tensors(set_value(UP1, 1e5)))
    config = case.config({"recipe": "sparse", "sources": [str(source)], "output": {"dtype": "float16"}})
    fragments = ("'model.layers.1.mlp.experts.gate_up_proj'", "beyond the float16 range", "bfloat16")
    case.refused("convert", config, case.out, "--quiet", fragments=fragments)


def test_source_already_a_mixture(case, moe_source):
    config = case.config({"recipe": "sparse", "sources": [str(moe_source)]})
    case.refused("convert", config, case.out, "--quiet", fragments=("already a mixture model",))


def test_source_is_a_file(case):
    (case.inputs / "weights.safetensors").write_bytes(b"\0" * 16)
    config = case.config({"recipe": "sparse", "sources": [str(case.inputs / "weights.safetensors")]})
    case.refused("convert", config, case.out, fragments=("is a file", "holds config.json"))


def test_missing_source(case):
    config = case.config({"recipe": "sparse", "sources": [str(case.inputs / "absent")]})
    case.refused("convert", config, case.out, fragments=("does not exist",))


def test_output_exists_without_overwrite(case):
    config = case.config({"recipe": "sparse", "sources": [str(case.source())]})
    case.out.mkdir()
    (case.out / "keep.txt").write_text("previous output")
    case.refused("convert", config, case.out, fragments=("already exists", "--overwrite"))


def test_output_is_a_file(case):
    config = case.config({"recipe": "sparse", "sources": [str(case.source())]})
    case.out.write_text("not a folder")
    case.refused("convert", config, case.out, "--overwrite", fragments=("exists and is not a folder",))


def test_output_below_a_file(case):
    config = case.config({"recipe": "sparse", "sources": [str(case.source())]})
    (case.inputs / "plain.txt").write_text("x")
    target = case.inputs / "plain.txt" / "out"
    case.refused("convert", config, target, fragments=("is a file, not a folder",))


MODEL_YAMLS = {
    "init_heads_not_dividing": (
        {"num_attention_heads": 4, "num_key_value_heads": 3},
        ("num_attention_heads (4) must be a multiple of num_key_value_heads (3)",),
    ),
    "init_unknown_key": ({"hiden_size": 64}, ("hiden_size: unknown key",)),
    "init_moe_top_k_too_large": (
        {"moe": {"num_experts": 2, "top_k": 3}},
        ("moe.top_k (3) exceeds moe.num_experts (2)",),
    ),
    "init_odd_head_dim": ({"head_dim": 7}, ("head_dim (7) must be even",)),
}


@pytest.mark.parametrize("name", MODEL_YAMLS)
def test_bad_model_yaml_for_init(case, name):
    changes, fragments = MODEL_YAMLS[name]
    data = {"vocab_size": 64, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2}
    data.update({"num_attention_heads": 4, **changes})
    case.refused("init", case.config(data, "model.yaml"), case.out, fragments=fragments)


@pytest.mark.parametrize("std", ["-0.5", "nan", "inf"])
def test_init_with_bad_std(case, std):
    data = {"vocab_size": 64, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 1}
    config = case.config({**data, "num_attention_heads": 4}, "model.yaml")
    case.refused("init", config, case.out, "--std", std, fragments=("--std must be a finite number ≥ 0",))


def test_debug_shows_the_traceback(case):
    """The same refusal with --debug raises: a traceback that ends in the UpcycleError, exit 1."""
    config = case.config(
        {"recipe": "sparse", "sources": [str(case.source(SOURCES["overlapping_offsets"][0]))]}
    )
    before = tree(case.root)
    proc = subprocess.run(
        [sys.executable, "-m", "upcycle", "--debug", "convert", str(config), str(case.out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 1, proc.stderr
    assert "Traceback (most recent call last)" in proc.stderr
    assert "upcycle.errors.UpcycleError" in proc.stderr and "overlap" in proc.stderr
    assert tree(case.root) == before
    with pytest.raises(upcycle.UpcycleError, match="overlap"):  # in-process: main re-raises
        run_cli("convert", "--debug", config, case.out)
