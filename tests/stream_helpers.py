"""A tiny streaming set-up shared by the streaming tests and their worker process (tests/stream_worker.py)."""

from __future__ import annotations

from pathlib import Path

import torch
from tiny_models import tiny_model

from saescope.corpus import Document
from saescope.models import LoadedModel

BOS, EOS, PAD = 1, 2, 0
SITES = ["resid_post/layer_1", "mlp_in/layer_0", "mlp_out/layer_0"]
CONTEXT_LEN, WINDOWS_PER_PASS, BATCH, BUFFER = 16, 3, 32, 100   # a block = 96 rows = 3 batches


class CharTokenizer:
    """Characters → ids 3..96 (no merges)."""

    bos_token_id, eos_token_id, pad_token_id = BOS, EOS, PAD

    def encode(self, text, add_special_tokens=False):
        return [3 + ord(ch) % 94 for ch in text]


def documents() -> list[Document]:
    words = "to be or not to be that is the question whether tis nobler in the mind".split()
    return [Document(id=f"doc{i}", text=" ".join(words[(i * 3 + k) % len(words)] for k in range(8 + 5 * (i % 7))))
            for i in range(40)]


def tiny_loaded(seed: int = 0) -> LoadedModel:
    return LoadedModel(model=tiny_model("gemma3", seed=seed), tokenizer=CharTokenizer(), name="tiny-gemma3",
                       architecture="gemma3", n_layers=3, d_model=32)


def train_config(out: Path, total_tokens: int, checkpoint_every: int = 0):
    from saescope.train import TrainConfig

    specs = [{"site": "resid_post/layer_1", "width": 48, "sparsity_coefficient": 1e-3},
             {"site": "mlp_in/layer_0", "width": 40, "sparsity_coefficient": 1e-3, "kind": "transcoder"}]
    return TrainConfig(saes=specs, total_tokens=total_tokens, batch_size=BATCH, lr=3e-3, lr_warmup_steps=3,
                       sparsity_warmup_steps=4, log_every=1000, checkpoint_every=checkpoint_every, out_dir=out,
                       initial_threshold=0.05, bandwidth=0.05, fast_path_max_density=1.0, model="tiny-gemma3")


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    """Every tensor of every SAE written to the suite (standardized, safetensors)."""
    from safetensors.torch import load_file

    found = {}
    for path in sorted((Path(out) / "suite").rglob("*.safetensors")):
        for key, value in load_file(str(path)).items():
            found[f"{path.relative_to(out)}:{key}"] = value
    return found
