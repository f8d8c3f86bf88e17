"""The activation store: cache LM activations once to sharded files, stream shuffled batches to many SAEs."""

from saescope.store.index import StoreIndex
from saescope.store.loader import ActivationLoader, LoaderOutput, verify_store
from saescope.store.norm_scale import estimate_norm_scale
from saescope.store.writer import StoreWriter

__all__ = [
    "ActivationLoader",
    "LoaderOutput",
    "StoreFormat",
    "StoreIndex",
    "StoreWriter",
    "cache_activations",
    "estimate_norm_scale",
    "verify_store",
]


def __getattr__(name: str):
    if name in ("cache_activations", "StoreFormat"):  # imports the model stack only when asked for
        from saescope.store import cache

        return getattr(cache, name)
    raise AttributeError(name)
