"""Tiny random causal LMs built from ``transformers`` configs, for unit tests (seconds each, no network).

Norm gains are randomised (Gemma initialises them to 0 and Llama to 1, which would make folding tests
trivially pass) and ``attn_out`` is made wider than ``d_model`` (n_heads · head_dim ≠ d_model, as in
Gemma 3 270M) so a test catches a site read from the wrong end of ``o_proj``.
"""

from __future__ import annotations

import torch

VOCAB = 97
D_MODEL = 32
N_LAYERS = 3
ARCHS = ("gemma2", "gemma3", "llama", "gpt2", "gemma3_multimodal")
LLAMA_LIKE = ("mistral", "qwen2", "qwen3")  # same site table row as llama


def tiny_model(arch: str, *, seed: int = 0, dtype: torch.dtype = torch.float32):
    from transformers import (
        AutoModelForCausalLM,
        Gemma2Config,
        Gemma3TextConfig,
        GPT2Config,
        LlamaConfig,
        MistralConfig,
        Qwen2Config,
    )

    common = {"vocab_size": VOCAB, "hidden_size": D_MODEL, "intermediate_size": 56, "num_hidden_layers": N_LAYERS,
                  "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128,
                  "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
    if arch == "gemma2":
        config = Gemma2Config(**common, head_dim=12, sliding_window=6, final_logit_softcapping=5.0,
                              attn_logit_softcapping=20.0, query_pre_attn_scalar=12)
    elif arch == "gemma3":
        config = Gemma3TextConfig(**common, head_dim=12, sliding_window=6, query_pre_attn_scalar=12)
    elif arch == "gemma3_multimodal":  # Gemma3ForConditionalGeneration with a one-layer vision tower
        from transformers import Gemma3Config, SiglipVisionConfig

        text = Gemma3TextConfig(**common, head_dim=12, sliding_window=6, query_pre_attn_scalar=12)
        vision = SiglipVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                    num_attention_heads=2, image_size=28, patch_size=14)
        config = Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4,
                              image_token_index=VOCAB - 1, boi_token_index=VOCAB - 3, eoi_token_index=VOCAB - 2)
    elif arch == "llama":
        config = LlamaConfig(**common, head_dim=12)
    elif arch == "mistral":
        config = MistralConfig(**common, head_dim=12)
    elif arch == "gemma":  # Gemma 1: pre-norms only, (1 + w) gains
        from transformers import GemmaConfig

        config = GemmaConfig(**common, head_dim=12, hidden_activation="gelu_pytorch_tanh")
    elif arch == "qwen2":
        config = Qwen2Config(**common)
    elif arch == "qwen3":
        from transformers import Qwen3Config

        config = Qwen3Config(**common, head_dim=12)
    elif arch == "gpt2":
        config = GPT2Config(vocab_size=VOCAB, n_embd=D_MODEL, n_layer=N_LAYERS, n_head=4, n_positions=128,
                            bos_token_id=1, eos_token_id=2)
    else:
        raise ValueError(arch)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name or ".ln_" in name:
                param.copy_(0.5 + torch.rand(param.shape, generator=generator))
                if name.endswith("bias"):
                    param.sub_(1.0)
    return model.to(dtype).eval()


def tiny_ids(batch: int = 2, seq: int = 10, *, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB - 3, (batch, seq), generator=generator)  # no image tokens
    ids[:, 0] = 1
    return ids
