"""Registration of the native format with transformers' Auto classes.

After `import upcycle`, `AutoConfig.from_pretrained(native_dir)` returns an `UpcycleConfig` and
`AutoModelForCausalLM.from_pretrained(native_dir)` an `UpcycleForCausalLM`, so tools built on the
Auto classes (lm-eval-harness, TRL) load native checkpoints. The HF model is a thin shell: it
owns the very same `model` and `lm_head` modules as our `Transformer` (so the state-dict names are
the native ones) and delegates the forward to it.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

try:  # transformers 5
    from transformers import PreTrainedConfig
except ImportError:  # transformers 4
    from transformers import PretrainedConfig as PreTrainedConfig

from upcycle.model.config import ModelConfig
from upcycle.model.transformer import Transformer


class UpcycleConfig(PreTrainedConfig):
    model_type = "upcycle"

    def __init__(self, upcycle: dict[str, Any] | None = None, **kwargs: Any) -> None:
        self.upcycle = upcycle or {}
        kwargs["tie_word_embeddings"] = False  # our Transformer ties internally; HF must not re-tie
        super().__init__(**kwargs)

    def model_config(self) -> ModelConfig:
        return ModelConfig.model_validate(self.upcycle)


class UpcycleForCausalLM(PreTrainedModel):
    config_class = UpcycleConfig
    base_model_prefix = "upcycle"
    main_input_name = "input_ids"
    _no_split_modules: ClassVar[list[str]] = ["Block"]
    _supports_sdpa = True

    def __init__(self, config: UpcycleConfig) -> None:
        super().__init__(config)
        core = Transformer(config.model_config())
        self.model = core.model
        self.lm_head = core.lm_head
        object.__setattr__(self, "_core", core)  # shares the modules above; not registered twice
        self.post_init()

    def _init_weights(self, module: torch.nn.Module) -> None:
        """Weights come from the checkpoint; fresh models use PyTorch's default initialisation."""

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.model.embed_tokens

    def get_output_embeddings(self) -> torch.nn.Module | None:
        return self.lm_head

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        out = self._core(input_ids, attention_mask, position_ids)
        loss = None
        if labels is not None:
            logits = out.logits[:, :-1].float()
            loss = F.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100
            )
            if out.aux_losses:
                loss = loss + sum(out.aux_losses.values())
        return CausalLMOutputWithPast(loss=loss, logits=out.logits)


_registered = False


def register_with_transformers() -> None:
    """Make the native format loadable through transformers' Auto classes (idempotent)."""
    global _registered
    if _registered:
        return
    AutoConfig.register(UpcycleConfig.model_type, UpcycleConfig, exist_ok=True)
    AutoModelForCausalLM.register(UpcycleConfig, UpcycleForCausalLM, exist_ok=True)
    _registered = True
