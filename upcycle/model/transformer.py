"""`Transformer`: the one model class for dense, MoE and BAM models.

Module names reproduce the HF Llama layout (`model.embed_tokens`, `model.layers.N.self_attn.q_proj`,
`model.norm`, `lm_head`) so that a state dict maps onto HF names with no renaming. With tied
embeddings there is no `lm_head` module at all: the logits use the embedding matrix, and the
checkpoint holds it once.

`forward` returns logits and the auxiliary losses of every MoE layer (keys `layers.N.<name>`),
so that a trainer cannot lose them. `generate` is greedy decoding without a KV cache: simple
and exact, meant for tests, demos and short completions.

Shape letters: B batch, S sequence, D model width, V vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from upcycle.model.attention import build_attention_mask
from upcycle.model.block import Block
from upcycle.model.config import ModelConfig
from upcycle.model.norm import RMSNorm
from upcycle.model.rope import rope_cos_sin


@dataclass
class TransformerOutput:
    logits: torch.Tensor
    aux_losses: dict[str, torch.Tensor] = field(default_factory=dict)


class TransformerBody(nn.Module):
    """Embeddings, blocks and the final norm: HF's `model.*` prefix."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.model = TransformerBody(config)
        self.lm_head = (
            None
            if config.tie_word_embeddings
            else nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        )

    @property
    def output_weight(self) -> torch.Tensor:
        return self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def hidden_states(
        self,
        input_ids_BS: torch.Tensor,
        attention_mask_BS: torch.Tensor | None = None,
        position_ids_BS: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Final-norm hidden states [B, S, D] and the per-layer auxiliary losses."""
        B, S = input_ids_BS.shape
        device = input_ids_BS.device
        if position_ids_BS is None:
            position_ids_BS = torch.arange(S, device=device)[None].expand(B, S)
        x_BSD = self.model.embed_tokens(input_ids_BS)
        cos_BSD, sin_BSD = rope_cos_sin(
            self.config.rope, self.config.attention_head_dim, position_ids_BS, x_BSD.dtype
        )
        mask_B1SS = build_attention_mask(attention_mask_BS, S, self.config.sliding_window, device)
        aux_losses: dict[str, torch.Tensor] = {}
        for index, layer in enumerate(self.model.layers):
            x_BSD, layer_aux = layer(x_BSD, cos_BSD, sin_BSD, mask_B1SS)
            aux_losses.update({f"layers.{index}.{name}": value for name, value in layer_aux.items()})
        return self.model.norm(x_BSD), aux_losses

    def forward(
        self,
        input_ids_BS: torch.Tensor,
        attention_mask_BS: torch.Tensor | None = None,
        position_ids_BS: torch.Tensor | None = None,
    ) -> TransformerOutput:
        h_BSD, aux_losses = self.hidden_states(input_ids_BS, attention_mask_BS, position_ids_BS)
        logits_BSV = torch.nn.functional.linear(h_BSD, self.output_weight)
        return TransformerOutput(logits=logits_BSV, aux_losses=aux_losses)

    @torch.no_grad()
    def generate(
        self,
        input_ids_BS: torch.Tensor,
        max_new_tokens: int,
        attention_mask_BS: torch.Tensor | None = None,
        stop_at_eos: bool = True,
    ) -> torch.Tensor:
        """Greedy decoding; returns the prompt followed by the new tokens [B, S + new].

        Works with left-padded batches: positions count only real tokens, as HF's `generate`
        does. A sequence that produced EOS keeps emitting EOS (or the pad id) until all finish.
        """
        ids_BS = input_ids_BS
        mask_BS = torch.ones_like(ids_BS) if attention_mask_BS is None else attention_mask_BS.to(ids_BS.dtype)
        eos_ids = torch.tensor(self.config.eos_token_ids, device=ids_BS.device, dtype=ids_BS.dtype)
        filler = self.config.pad_token_id if self.config.pad_token_id is not None else None
        finished_B = torch.zeros(ids_BS.shape[0], dtype=torch.bool, device=ids_BS.device)
        for _ in range(max_new_tokens):
            positions_BS = (mask_BS.cumsum(-1) - 1).clamp(min=0)
            logits_BSV = self(ids_BS, mask_BS, positions_BS).logits
            next_B = logits_BSV[:, -1].argmax(-1)
            if stop_at_eos and eos_ids.numel():
                done_token = filler if filler is not None else int(eos_ids[0])
                next_B = torch.where(finished_B, torch.full_like(next_B, done_token), next_B)
                finished_B = finished_B | torch.isin(next_B, eos_ids)
            ids_BS = torch.cat([ids_BS, next_B[:, None]], dim=1)
            mask_BS = torch.cat([mask_BS, torch.ones_like(next_B)[:, None]], dim=1)
            if stop_at_eos and eos_ids.numel() and bool(finished_B.all()):
                break
        return ids_BS
