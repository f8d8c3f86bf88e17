"""A real training process on the tiny streaming set-up: ``stream_worker.py OUT TRACE TOKENS`` trains from the
model's forward passes (checkpoint every 2 steps) and prints ``batch <k>`` as each batch is drawn, pausing a
little so that a test can SIGKILL it at a known point."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
from stream_helpers import (
    BATCH,
    BUFFER,
    CONTEXT_LEN,
    SITES,
    WINDOWS_PER_PASS,
    documents,
    tiny_loaded,
    train_config,
)

from saescope.stream import ModelChunks, StreamingSource
from saescope.train import train


def main() -> None:
    out, trace, tokens = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
    torch.set_num_threads(1)
    chunks = ModelChunks(tiny_loaded(), documents, SITES, context_len=CONTEXT_LEN,
                         windows_per_pass=WINDOWS_PER_PASS, held_out_fraction=0.2)
    source = StreamingSource(chunks, BATCH, buffer_rows=BUFFER, seed=5, max_rows=tokens, norm_sample_rows=200,
                             trace=trace)
    scales = source.norm_scales()

    class Announcing:          # the trainer's source, printing each draw
        def __iter__(self):
            for k, batch in enumerate(source):
                print(f"batch {k}", flush=True)
                time.sleep(0.05)
                yield batch

        def state_dict(self):
            return source.state_dict()

        def load_state_dict(self, state):
            source.load_state_dict(state)

    train(train_config(out, tokens, checkpoint_every=2), Announcing(), scales, progress=False)
    print("done", flush=True)


if __name__ == "__main__":
    main()
