"""Tiny mixture-of-experts models of four transformers families, built from configs (random
weights, nothing from a hub): 2 layers, 4 experts, top-2, router loss coefficient 0.5."""

from __future__ import annotations

import torch
import transformers

from support.hf import VOCAB

COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, output_router_logits=True, router_aux_loss_coef=0.5,
              attention_dropout=0.0)
FAMILIES = {
    "mixtral": (transformers.MixtralConfig, transformers.MixtralForCausalLM, dict(num_local_experts=4, num_experts_per_tok=2)),
    "qwen3_moe": (transformers.Qwen3MoeConfig, transformers.Qwen3MoeForCausalLM,
                  dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24, head_dim=8)),
    "olmoe": (transformers.OlmoeConfig, transformers.OlmoeForCausalLM,
              dict(num_experts=4, num_experts_per_tok=2, eos_token_id=1, pad_token_id=0, bos_token_id=None)),
    "gpt_oss": (transformers.GptOssConfig, transformers.GptOssForCausalLM,
                dict(num_local_experts=4, num_experts_per_tok=2, head_dim=8, layer_types=["full_attention"] * 2,
                     rope_parameters={"rope_type": "default", "rope_theta": 10000.0})),
}


def model(family: str, seed: int = 0, **overrides) -> torch.nn.Module:
    config_cls, model_cls, extra = FAMILIES[family]
    config = config_cls(**{**COMMON, **extra, **overrides})
    # The experts as a loop over experts: the grouped matmul kernel has no float64 (the reference).
    config._experts_implementation = "eager"
    torch.manual_seed(seed)
    return model_cls(config)
