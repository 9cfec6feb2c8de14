"""Regional torch.compile: each decoder layer compiled, every layer running one shared compiled graph.

The decoder layers of an HF model are instances of one class running the same code, so the others reuse the
graph compiled for the first (their weights are graph inputs): a 32-layer model compiles about as fast as a
1-layer one (SmolLM2's 30 layers on CPU, cold cache: 100 s whole-model, 16 s by layer). Two things keep the graph
shared: the KV pools reach the attention through its module (`attention.bind_pools`), not through the cache by
layer index, and the layers' token dimension is marked dynamic at each call. The embedding, the final norm and the
LM head stay eager (a handful of kernels, inside the CUDA graphs for decode steps). Compiled layers and bound pools
are installed for the engine's own forwards only: the user's model is left as it was for anything else.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from hf_paged.attention import bind_pools
from hf_paged.cache import PagedCache
from hf_paged.kernels.ops import env_choice


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's repeated blocks: the modules whose class is one of its `_no_split_modules` (HF's own list)."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    return [module for module in model.modules() if type(module).__name__ in names]


def attention_modules(model: torch.nn.Module) -> dict[int, torch.nn.Module]:
    """layer index -> the attention module that passes it to `cache.update`."""
    return {module.layer_idx: module for module in model.modules()
            if type(module).__name__.endswith("Attention") and isinstance(getattr(module, "layer_idx", None), int)}


def caches_latents(model: torch.nn.Module) -> bool:
    """Whether the model's attention caches latents and expands them itself (multi-head latent attention: an
    attention module with `expand_kv`, DeepSeek-V2/V3, MiniCPM3, ...). Its paged attention runs in torch, reading
    lengths on the host: no CUDA graphs, no compiled forwards."""
    return any(callable(getattr(module, "expand_kv", None)) for module in model.modules())


def on_one_device(model: torch.nn.Module) -> bool:
    """Every parameter on one device (no accelerate placement over several devices, nothing offloaded)."""
    return len({param.device for param in model.parameters()}) == 1


def compile_options(device: torch.device) -> dict | None:
    """Inductor options for the engine's compilations: with `HF_PAGED_PDL=1` on a Hopper or newer GPU the compiled
    kernels use programmatic dependent launch too, as the attention kernels then do (kernels/tuning.py use_pdl),
    where this torch has the option."""
    if device.type != "cuda":
        return None
    import torch._inductor.config as inductor_config

    from hf_paged.kernels.tuning import use_pdl

    if use_pdl(device) and hasattr(inductor_config.triton, "enable_pdl"):
        return {"triton.enable_pdl": True}
    return None


COMPILE_SCOPES = ("layers", "model")


def compile_scope() -> str:
    """`HF_PAGED_COMPILE_SCOPE`: `layers` (the default) compiles the decoder layers into one shared graph; `model`
    (an experiment) compiles the whole forward as one graph, as the engine did before 2026-12-01: a cold compile
    takes minutes instead of seconds, but inductor then fuses across layers (one layer's last residual add into the
    next one's norm; the rotary tables, the embedding and the final norm into the graph). Else a ValueError."""
    return env_choice("HF_PAGED_COMPILE_SCOPE", COMPILE_SCOPES)


def compiles_by_layer(model: torch.nn.Module, cache: PagedCache) -> bool:
    """Whether the layers can share a graph: one device (the step metadata is not moved per layer), decoder layers
    HF names, and one attention module per cache layer. Such a model's attention modules can hold their pools
    (`bind_pools`), whichever `compile_scope` compiles them."""
    if not on_one_device(model):
        return False
    return bool(decoder_layers(model)) and sorted(attention_modules(model)) == list(range(len(cache.layers)))


class CompiledLayers:
    """`call(*args)` with every decoder layer running its compiled forward and every attention holding its pools;
    with `whole_model` (`HF_PAGED_COMPILE_SCOPE=model`) `call` itself compiled as one graph instead, the attention
    modules holding their pools all the same (so a decode step still stores and attends in one launch a layer)."""

    def __init__(self, model: torch.nn.Module, cache: PagedCache, call: Callable, whole_model: bool = False):
        self.cache, self.call = cache, call
        self.layers = decoder_layers(model)
        self.attention = attention_modules(model)
        options = compile_options(next(model.parameters()).device)
        if whole_model:
            self.compiled, self.call = [], torch.compile(call, options=options)
        else:
            self.compiled = [_marking_token_dim(torch.compile(layer._call_impl, options=options))
                             for layer in self.layers]

    def __call__(self, *args):
        for layer, compiled in zip(self.layers, self.compiled):
            layer._compiled_call_impl = compiled  # what nn.Module.compile() sets, for this call only
        for index, module in self.attention.items():
            bind_pools(module, self.cache.layers[index].pools())
        self.cache.pools_bound = True
        try:
            return self.call(*args)
        finally:
            self.cache.pools_bound = False
            for module in self.attention.values():
                bind_pools(module, None)
            for layer in self.layers:
                layer._compiled_call_impl = None


def _marking_token_dim(compiled: Callable) -> Callable:
    """Mark dim 1 (tokens) of the layer's [1, T, ...] inputs dynamic: they come from eager code, unmarked."""

    def run(*args, **kwargs):
        hidden = args[0] if args else kwargs.get("hidden_states")
        if isinstance(hidden, torch.Tensor) and hidden.dim() >= 2:
            tokens = hidden.shape[1]
            for value in (*args, *kwargs.values()):
                for tensor in value if isinstance(value, (tuple, list)) else (value,):
                    if isinstance(tensor, torch.Tensor) and tensor.dim() >= 2 and tensor.shape[1] == tokens:
                        torch._dynamo.mark_dynamic(tensor, 1)
        return compiled(*args, **kwargs)

    return run
