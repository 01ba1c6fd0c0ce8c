"""SIGKILL during `upcycle convert`: afterwards OUT_DIR is absent or complete, and an existing
complete output being overwritten survives intact (or is replaced by a complete new one)."""

from __future__ import annotations

import hashlib
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import transformers
from convert_helpers import write_yaml

from upcycle.checkpoint.loading import load_model


def folder_digest(folder: Path) -> str:
    digest = hashlib.sha256()
    for file in sorted(folder.iterdir()):
        digest.update(file.name.encode() + file.read_bytes())
    return digest.hexdigest()


@pytest.fixture(scope="module")
def big_source(tmp_path_factory):
    """A source large enough (~20M parameters) that conversion takes a noticeable time."""
    config = transformers.LlamaConfig(
        vocab_size=8000,
        hidden_size=256,
        intermediate_size=1024,
        num_hidden_layers=6,
        num_attention_heads=8,
        num_key_value_heads=4,
    )
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("kill") / "dense"
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def _start(config: Path, out: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "upcycle", "convert", str(config), str(out), "--quiet", *extra],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def _kill_mid_write(proc: subprocess.Popen, staging_parent: Path, prefix: str, at_bytes: int) -> bool:
    """SIGKILL `proc` once its staging folder holds `at_bytes` of safetensors; False if it ended first."""
    while proc.poll() is None:
        written = sum(
            f.stat().st_size
            for folder in staging_parent.glob(f"{prefix}.staging-*")
            for f in folder.glob("*.safetensors")
            if f.exists()
        )
        if written >= at_bytes:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return True
        time.sleep(0.002)
    return False


def test_sigkill_leaves_nothing_or_a_complete_output(big_source, tmp_path):
    configs = {
        n: write_yaml(
            tmp_path / f"e{n}.yaml", {"recipe": "sparse", "sources": [str(big_source)], "num_experts": n}
        )
        for n in (8, 4)
    }
    reference, previous = tmp_path / "reference", tmp_path / "previous"
    assert _start(configs[8], reference).wait() == 0
    assert _start(configs[4], previous).wait() == 0
    expected, previous_digest = folder_digest(reference), folder_digest(previous)
    total = sum(f.stat().st_size for f in reference.glob("*.safetensors"))

    rng = random.Random(1234)
    for trial in range(4):
        overwrite = trial % 2 == 1
        out = tmp_path / f"out{trial}"
        if overwrite:
            shutil.copytree(previous, out)
        proc = _start(configs[8], out, *(["--overwrite"] if overwrite else []))
        killed = _kill_mid_write(proc, tmp_path, f".out{trial}", int(rng.uniform(0.05, 0.95) * total))
        assert killed, f"trial {trial}: the conversion finished before the kill"
        if overwrite:
            assert folder_digest(out) == previous_digest, f"trial {trial}: the previous output was damaged"
        else:
            assert not out.exists(), f"trial {trial}: a partial output appeared"

    # The next run removes what the killed ones left beside their targets and succeeds.
    final = _start(configs[8], tmp_path / "out0")
    assert final.wait() == 0, final.stderr.read().decode()
    assert folder_digest(tmp_path / "out0") == expected
    assert not list(tmp_path.glob(".out0.staging-*"))
    load_model(tmp_path / "out0")
