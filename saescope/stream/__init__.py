"""Streaming: train SAEs straight from a language model's forward passes, with no activation store on disk.

- :mod:`~saescope.stream.shuffle` — the bounded, resumable block shuffle over a stream of token rows
- :mod:`~saescope.stream.source` — the rows from the model (:class:`ModelChunks`) and the trainer's batch
  source (:class:`StreamingSource`), with the norm scale ``C`` estimated from the start of the stream
"""

from saescope.stream.shuffle import BlockShuffle, Chunk
from saescope.stream.source import DEFAULT_NORM_SAMPLE_ROWS, ModelChunks, StreamingSource

__all__ = ["DEFAULT_NORM_SAMPLE_ROWS", "BlockShuffle", "Chunk", "ModelChunks", "StreamingSource"]
