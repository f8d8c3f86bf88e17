"""Sites: where in a language model saescope reads activations and splices reconstructions in.

Gemma Scope (§3, "Sites per layer") trains SAEs at three sites of every layer of Gemma 2; transcoders
(Appendix B) read a fourth, the MLP input after its norm:

* ``resid_post`` — the residual stream after block L (the block's output);
* ``attn_out`` — the concatenated per-head outputs *before* the attention output projection ``W_O``
  (the input of ``o_proj``; width ``n_heads · head_dim``, which for Gemma 3 270M is 1024, not d_model);
* ``mlp_out`` — the MLP sublayer's output (for Gemma 2/3 after the post-feedforward RMSNorm);
* ``mlp_in`` — the MLP input just after the pre-MLP norm (fold its gain first with
  :func:`saescope.folding.fold_mlp_in_norm` to get the gain-free normalized vector of Appendix B).

Every architecture is one row of :data:`ARCHITECTURES` (module names, relative to a decoder block). A site
is a *point*: a module and whether we want its input or its output. :func:`hook_site` is the one
abstraction that both reads a point (the callback returns ``None``) and replaces it (the callback returns
a tensor); :func:`read_sites` and :mod:`saescope.splice` are built on it.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Iterable, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from saescope.config import SITE_KINDS, Site
from saescope.errors import SaescopeError


@dataclass(frozen=True)
class ArchitectureSpec:
    """One row of the site table: where each site lives in a decoder block of this architecture.

    Module paths are dotted attribute paths; ``layers`` is relative to the causal-LM object, the others are
    relative to one decoder block (``""`` is the block itself).
    """

    name: str
    model_types: tuple[str, ...]
    layers: str
    attn_out: str  # its INPUT is attn_out (the output projection W_O)
    mlp_out: str  # its OUTPUT is mlp_out
    mlp_in: str  # its OUTPUT is mlp_in (the pre-MLP norm)
    mlp_in_weights: tuple[str, ...]  # the matrices that read mlp_in (where the norm gain is folded)
    norm_gain_offset: float = 0.0  # RMSNorm multiplies by (offset + weight): Gemma uses (1 + w)
    examples: str = ""

    def point(self, kind: str) -> tuple[str, Literal["input", "output"]]:
        """The module (relative to a block) and which end of it holds the site ``kind``."""
        if kind == "resid_post":
            return "", "output"
        if kind == "attn_out":
            return self.attn_out, "input"
        if kind == "mlp_out":
            return self.mlp_out, "output"
        if kind == "mlp_in":
            return self.mlp_in, "output"
        raise SaescopeError(f"unknown site kind {kind!r}; supported kinds: {', '.join(SITE_KINDS)}")


_GATED_MLP = ("mlp.gate_proj", "mlp.up_proj")

#: The site table of ``shared/DESIGN.md``. Adding an architecture is adding a row here.
ARCHITECTURES: dict[str, ArchitectureSpec] = {
    spec.name: spec
    for spec in (
        ArchitectureSpec(
            name="gemma3", model_types=("gemma3_text",), layers="model.layers",
            attn_out="self_attn.o_proj", mlp_out="post_feedforward_layernorm",
            mlp_in="pre_feedforward_layernorm", mlp_in_weights=_GATED_MLP, norm_gain_offset=1.0,
            examples="Gemma 3 (text), e.g. the embedded gemma-3-270m",
        ),
        ArchitectureSpec(
            name="gemma3_multimodal", model_types=("gemma3",), layers="model.language_model.layers",
            attn_out="self_attn.o_proj", mlp_out="post_feedforward_layernorm",
            mlp_in="pre_feedforward_layernorm", mlp_in_weights=_GATED_MLP, norm_gain_offset=1.0,
            examples="Gemma 3 4B/12B/27B (Gemma3ForConditionalGeneration; text sites of its language model)",
        ),
        ArchitectureSpec(
            name="gemma2", model_types=("gemma2",), layers="model.layers",
            attn_out="self_attn.o_proj", mlp_out="post_feedforward_layernorm",
            mlp_in="pre_feedforward_layernorm", mlp_in_weights=_GATED_MLP, norm_gain_offset=1.0,
            examples="Gemma 2 (the Gemma Scope models)",
        ),
        ArchitectureSpec(
            name="gemma", model_types=("gemma",), layers="model.layers",
            attn_out="self_attn.o_proj", mlp_out="mlp", mlp_in="post_attention_layernorm",
            mlp_in_weights=_GATED_MLP, norm_gain_offset=1.0,
            examples="Gemma 1 (pre-norm only)",
        ),
        ArchitectureSpec(
            name="llama", model_types=("llama", "mistral", "qwen2", "qwen3"), layers="model.layers",
            attn_out="self_attn.o_proj", mlp_out="mlp", mlp_in="post_attention_layernorm",
            mlp_in_weights=_GATED_MLP, norm_gain_offset=0.0,
            examples="Llama, Mistral, Qwen2/3, SmolLM (e.g. the embedded smollm2-135m)",
        ),
        ArchitectureSpec(
            name="gpt2", model_types=("gpt2",), layers="transformer.h",
            attn_out="attn.c_proj", mlp_out="mlp", mlp_in="ln_2", mlp_in_weights=("mlp.c_fc",),
            norm_gain_offset=0.0, examples="GPT-2 (LayerNorm, Conv1D weights)",
        ),
    )
}


def _supported_text() -> str:
    rows = [f"{spec.name} (model_type {', '.join(spec.model_types)}: {spec.examples})"
            for spec in ARCHITECTURES.values()]
    return "; ".join(rows)


def _unwrap(model: Any) -> nn.Module:
    """A LoadedModel or a bare Hugging Face causal LM → the causal LM module."""
    inner = getattr(model, "model", None)
    if not isinstance(model, nn.Module) and isinstance(inner, nn.Module):
        return inner
    if isinstance(model, nn.Module):
        return model
    raise SaescopeError(f"expected a Hugging Face causal LM or a saescope LoadedModel, got {type(model).__name__}")


def architecture_of(model: Any) -> str:
    """The site-table key (e.g. ``"gemma3"``, ``"llama"``) of a Hugging Face causal LM.

    Raises :class:`SaescopeError` listing the supported architectures for anything else.
    """
    lm = _unwrap(model)
    config = getattr(lm, "config", None)
    model_type = getattr(config, "model_type", None)
    for spec in ARCHITECTURES.values():
        if model_type in spec.model_types:
            if _get_module(lm, spec.layers, strict=False) is None:
                break
            return spec.name
    raise SaescopeError(
        f"unsupported architecture: {type(lm).__name__} (model_type {model_type!r}). saescope reads the "
        f"causal-LM classes of: {_supported_text()}. To add one, add a row to saescope.sites.ARCHITECTURES."
    )


def spec_of(model: Any) -> ArchitectureSpec:
    return ARCHITECTURES[architecture_of(model)]


def _get_module(root: nn.Module, path: str, *, strict: bool = True) -> nn.Module | None:
    module = root
    for part in path.split(".") if path else ():
        nxt = getattr(module, part, None)
        if nxt is None:
            if strict:
                raise SaescopeError(f"{type(root).__name__} has no module {path!r} (missing {part!r})")
            return None
        module = nxt
    return module


def decoder_layers(model: Any) -> nn.ModuleList:
    """The list of decoder blocks of ``model``."""
    lm = _unwrap(model)
    return _get_module(lm, spec_of(lm).layers)  # type: ignore[return-value]


def n_layers(model: Any) -> int:
    return len(decoder_layers(model))


def d_model(model: Any) -> int:
    lm = _unwrap(model)
    return int(lm.get_input_embeddings().weight.shape[1])


def _check_site(lm: nn.Module, site: Site | str) -> Site:
    try:
        parsed = Site.parse(site)
    except ValueError as exc:
        raise SaescopeError(str(exc)) from None
    count = n_layers(lm)
    if parsed.layer >= count:
        raise SaescopeError(
            f"site {parsed.id} does not exist: {type(lm).__name__} has {count} layers (0..{count - 1}); "
            f"sites are {', '.join(SITE_KINDS)} at layers 0..{count - 1}"
        )
    return parsed


def hook_point(model: Any, site: Site | str) -> str:
    """The module path of a site, e.g. ``"model.layers.5.self_attn.o_proj:input"`` (stored in SAE configs)."""
    lm = _unwrap(model)
    parsed = _check_site(lm, site)
    spec = spec_of(lm)
    relative, end = spec.point(parsed.kind)
    path = f"{spec.layers}.{parsed.layer}" + (f".{relative}" if relative else "")
    return f"{path}:{end}"


def site_module(model: Any, site: Site | str) -> tuple[nn.Module, Literal["input", "output"]]:
    """The module holding ``site`` and whether the site is its input or its output."""
    lm = _unwrap(model)
    parsed = _check_site(lm, site)
    relative, end = spec_of(lm).point(parsed.kind)
    block = decoder_layers(lm)[parsed.layer]
    return _get_module(block, relative), end  # type: ignore[return-value]


def _in_features(module: nn.Module) -> int:
    if isinstance(module, nn.Linear):
        return module.in_features
    if hasattr(module, "nx"):  # transformers Conv1D (GPT-2): weight is [in, out]
        return int(module.nx)
    weight = getattr(module, "weight", None)
    if weight is not None and weight.dim() == 2:
        return int(weight.shape[1])
    raise SaescopeError(f"cannot tell the input width of {type(module).__name__}")


def site_width(model: Any, site: Site | str) -> int:
    """Width of the activation at ``site`` (``attn_out``: n_heads · head_dim; the others: d_model)."""
    parsed = _check_site(_unwrap(model), site)
    if parsed.kind == "attn_out":
        module, _ = site_module(model, parsed)
        return _in_features(module)
    return d_model(model)


def list_sites(model: Any) -> list[tuple[Site, int]]:
    """Every site of every layer with its width, layer by layer in forward order."""
    count = n_layers(model)
    return [(Site(kind=kind, layer=layer), site_width(model, Site(kind=kind, layer=layer)))
            for layer in range(count) for kind in ("attn_out", "mlp_in", "mlp_out", "resid_post")]


# --------------------------------------------------------------------------------------------- hooks

SiteCallback = Callable[[torch.Tensor], "torch.Tensor | None"]


def hook_site(model: Any, site: Site | str, callback: SiteCallback) -> torch.utils.hooks.RemovableHandle:
    """Call ``callback(activation)`` each time the forward pass reaches ``site``.

    The one abstraction for reading and splicing: if ``callback`` returns ``None`` the activation is left
    as it was (a read); if it returns a tensor, that tensor replaces the activation for the rest of the
    forward pass (a splice). Returns the hook handle; call ``.remove()`` when done (or use :func:`hooked`).
    """
    module, end = site_module(model, site)
    if end == "input":
        def pre_hook(_module: nn.Module, args: tuple, kwargs: dict):
            if args:
                new = callback(args[0])
                return None if new is None else ((new, *args[1:]), kwargs)
            key = next(iter(kwargs))
            new = callback(kwargs[key])
            return None if new is None else (args, {**kwargs, key: new})

        return module.register_forward_pre_hook(pre_hook, with_kwargs=True)

    def post_hook(_module: nn.Module, _args: tuple, output: Any):
        tensor = output[0] if isinstance(output, tuple) else output
        new = callback(tensor)
        if new is None:
            return None
        return (new, *output[1:]) if isinstance(output, tuple) else new

    return module.register_forward_hook(post_hook)


@contextmanager
def hooked(model: Any, callbacks: Iterable[tuple[Site | str, SiteCallback]]):
    """Install several :func:`hook_site` hooks for the duration of a ``with`` block."""
    handles = []
    try:
        for site, callback in callbacks:
            handles.append(hook_site(model, site, callback))
        yield handles
    finally:
        for handle in handles:
            handle.remove()


class _StopForward(Exception):
    """Raised from a hook once every requested site is captured, to skip the rest of the forward pass.

    It carries the token of the :func:`read_sites` call that raised it, so a call only swallows its own stop.
    """

    def __init__(self, call: object) -> None:
        super().__init__()
        self.call = call


#: The :func:`read_sites` call whose forward pass is running in this thread (each thread has its own value).
#: Hooks live on the shared modules, so a forward pass also meets the hooks other threads installed; each
#: hook acts only when the forward pass it sees is its own call's.
_current_read: ContextVar[object | None] = ContextVar("saescope_current_read", default=None)

_forward_locks: weakref.WeakKeyDictionary[nn.Module, threading.Lock] = weakref.WeakKeyDictionary()
_forward_locks_guard = threading.Lock()


def forward_lock(model: Any) -> threading.Lock:
    """One lock per causal LM, for callers that share a model between threads (``saescope browse``).

    :func:`read_sites` is correct without it (each call's hooks react only to its own forward pass), but
    hooks that splice or steer change every forward pass through the module while installed, and parallel
    forward passes of one model only compete for the same cores/memory: hold this lock around them.
    """
    lm = _unwrap(model)
    with _forward_locks_guard:
        lock = _forward_locks.get(lm)
        if lock is None:
            lock = _forward_locks[lm] = threading.Lock()
        return lock


def _as_sites(model: nn.Module, sites: Site | str | Sequence[Site | str]) -> list[Site]:
    if isinstance(sites, (str, Site)):
        sites = [sites]
    parsed = [_check_site(model, site) for site in sites]
    if not parsed:
        raise SaescopeError("no sites given: pass at least one site such as 'resid_post/layer_6'")
    return list(dict.fromkeys(parsed))


def read_sites(
    model: Any,
    input_ids: torch.Tensor,
    sites: Site | str | Sequence[Site | str],
    attention_mask: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Read many sites in ONE forward pass, stopped right after the last layer needed.

    Returns ``{site.id: tensor[batch, seq, width]}``. The forward pass runs the decoder blocks up to the
    deepest requested layer and stops there (an internal exception raised from a hook on that block): no
    later blocks, no final norm, no unembedding. Runs without gradients.
    """
    lm = _unwrap(model)
    parsed = _as_sites(lm, sites)
    if input_ids.dim() == 1:
        input_ids = input_ids.unsqueeze(0)
    device = next(lm.parameters()).device
    captured: dict[str, torch.Tensor] = {}
    call = object()  # this call's token: its hooks ignore every other forward pass through the model

    def reader(site_id: str) -> SiteCallback:
        def capture(tensor: torch.Tensor) -> None:
            if _current_read.get() is call:
                captured[site_id] = tensor.detach()
        return capture

    last_block = decoder_layers(lm)[max(site.layer for site in parsed)]

    def stop(_module: nn.Module, _args: tuple, _output: Any) -> None:
        if _current_read.get() is call:
            raise _StopForward(call)

    stopped = False
    with hooked(lm, [(site, reader(site.id)) for site in parsed]):
        stop_handle = last_block.register_forward_hook(stop)  # after the readers, so they run first
        running = _current_read.set(call)
        try:
            with torch.no_grad():
                lm(input_ids=input_ids.to(device),
                   attention_mask=None if attention_mask is None else attention_mask.to(device),
                   use_cache=False)
        except _StopForward as exc:
            if exc.call is not call:
                raise
            stopped = True
        finally:
            _current_read.reset(running)
            stop_handle.remove()
    missing = [site.id for site in parsed if site.id not in captured]
    if missing:
        # only this call's own forward pass fills `captured`: a site is missing because the model's forward
        # (which ran to its end unless `stopped`) skipped the module the site table names
        ended = "stopped at" if stopped else "ran to its end without reaching the end of"
        raise SaescopeError(f"the forward pass never reached {', '.join(missing)}: it {ended} block "
                            f"{max(site.layer for site in parsed)} "
                            f"({type(lm).__name__} may not follow the {architecture_of(lm)} layout)")
    return {site.id: captured[site.id] for site in parsed}
