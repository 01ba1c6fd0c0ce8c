"""The model maths: config, norms, RoPE, attention, MLP, blocks and the `Transformer`.

No file I/O and no training here (see ../../docs/architecture.md).

Shape letters used in tensor names across upcycle:
B batch, S sequence, T tokens (B·S flattened), D model width, F FFN width, E experts,
K top-k, G granularity, H query heads, Hk KV heads, Dh head width, V vocabulary.
`x_BSD` is a tensor of shape [B, S, D]; `w_gate_up_E2FD` one of shape [E, 2F, D].
"""

from upcycle.model.config import ModelConfig, RopeConfig
from upcycle.model.transformer import Transformer, TransformerOutput

__all__ = ["ModelConfig", "RopeConfig", "Transformer", "TransformerOutput"]
