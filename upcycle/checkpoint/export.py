"""Export targets: how a converted model is laid out on disk, and which configs each can hold.

Every target declares `supports(config) -> None | reason` and refuses with the reason, and a
tensor plan: for each output tensor, which native tensor it comes from and how (identity, or one
expert's slice of a stacked tensor). The conversion engine streams the plan in order, so an
export costs no more memory than the native format.

`native` holds everything (MoE, BAM's attention experts, parallel blocks). HF MoE targets
(`mixtral`, `qwen2_moe`, `qwen3_moe`) are registered by `upcycle.checkpoint.hf_moe` when it is
available.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from upcycle.checkpoint.native import native_config_dict
from upcycle.errors import UpcycleError
from upcycle.model.config import ModelConfig

Transform = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class OutputTensor:
    name: str  # name in the written checkpoint
    shape: tuple[int, ...]
    native_name: str  # the native tensor it is derived from
    transform: Transform | None = None  # e.g. lambda t: t[expert, :F]


class ExportTarget:
    name: str = ""
    description: str = ""

    def supports(self, config: ModelConfig) -> str | None:
        """None when this target can hold `config`, else the reason it cannot (one sentence)."""
        return None

    def config_json(self, config: ModelConfig) -> dict[str, Any]:
        raise NotImplementedError

    def tensor_plan(
        self, config: ModelConfig, native_shapes: dict[str, tuple[int, ...]]
    ) -> list[OutputTensor]:
        raise NotImplementedError


class NativeExport(ExportTarget):
    name = "native"
    description = "upcycle's own HF-style folder: holds every recipe, BAM included"

    def config_json(self, config: ModelConfig) -> dict[str, Any]:
        return native_config_dict(config)

    def tensor_plan(
        self, config: ModelConfig, native_shapes: dict[str, tuple[int, ...]]
    ) -> list[OutputTensor]:
        return [OutputTensor(name, shape, name) for name, shape in native_shapes.items()]


EXPORTS: dict[str, ExportTarget] = {"native": NativeExport()}


def register_export(target: ExportTarget) -> ExportTarget:
    EXPORTS[target.name] = target
    return target


def get_export(name: str) -> ExportTarget:
    if name not in EXPORTS:
        raise UpcycleError(f"unknown output format {name!r}; choose one of {', '.join(sorted(EXPORTS))}")
    return EXPORTS[name]


def check_supported(target: ExportTarget, config: ModelConfig) -> None:
    reason = target.supports(config)
    if reason is not None:
        raise UpcycleError(f"output format {target.name} cannot hold this model: {reason}")


from upcycle.checkpoint import hf_moe as _hf_moe  # noqa: E402, F401  (last: needs the names above)
