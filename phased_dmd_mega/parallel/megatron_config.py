"""megatron-core wants a ``TransformerConfig`` in places that read only a few of its fields (its
parallel linears, its DDP wrapper). One builder for such stand-ins, so their defaults agree."""

from __future__ import annotations


def stand_in_transformer_config(**fields):
    """A TransformerConfig that describes no model: one layer, one head, unless ``fields`` say
    otherwise (the heads only have to divide by TP)."""
    from megatron.core.transformer import TransformerConfig

    fields = {"num_layers": 1, "hidden_size": 1, "num_attention_heads": 1, **fields}
    # The default "full" warns on every build (its deprecated spelling).
    fields.setdefault("cuda_graph_scope", [])
    return TransformerConfig(**fields)
