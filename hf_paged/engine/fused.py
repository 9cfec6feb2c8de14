"""The engine's projections: q/k/v and gate/up as one matmul each, and the skinny matmul for small batches.

A decode step reads every weight once; cuBLAS reads a 4096 x 4096 projection at little more than half the copy
bandwidth of an H200 and the three of q/k/v concatenated at about 65% (`hf-paged bench kernels`, matmul rows).
At construction the engine lays the weights of each group out as consecutive rows of one tensor (the parameters
stay the same `nn.Parameter` objects, now views of it, so `state_dict` and `save_pretrained` are unchanged). During
the engine's forwards the first projection of a group that runs computes the whole group in one matmul and leaves
its siblings their slices; a sibling called with another input computes its own. Outside the engine's forwards the
model runs its own code.

With `HF_PAGED_SKINNY_MATMUL=on` every plain projection (the fused groups, o/down, the LM head) runs through
`ops.linear` in the engine's forwards, which takes the Triton skinny matmul (kernels/skinny_matmul.py) for decode
steps of up to 16 sequences on a GPU (32 or 64 with `=32`, `=64`), and cuBLAS otherwise.
"""

from __future__ import annotations

import types
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from hf_paged.kernels import ops

GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def _fusable(module) -> bool:
    """A plain nn.Linear running its own forward: no quantized subclass, no hooks, no accelerate wrapper, no DTensor."""
    return (type(module) is torch.nn.Linear and "forward" not in module.__dict__ and not module._forward_hooks
            and not module._forward_pre_hooks and type(module.weight.data) is torch.Tensor)


def _compatible(members: list[torch.nn.Linear]) -> bool:
    first = members[0].weight
    return all(m.weight.shape[1] == first.shape[1] and m.weight.dtype == first.dtype and m.weight.device == first.device
               for m in members) and len({m.bias is None for m in members}) == 1


def _concat_in_place(params: list[torch.nn.Parameter]) -> torch.Tensor:
    """Move the parameters into consecutive rows of one new tensor; each becomes a view of it. Returns it."""
    fused = torch.cat([p.detach() for p in params])  # (sum N, K) or (sum N,)
    start = 0
    for p in params:
        p.data = fused[start : start + p.shape[0]]
        start += p.shape[0]
    return fused


class FusedGroup:
    """Sibling projections (same input) whose weights are consecutive rows of one tensor."""

    def __init__(self, members: list[torch.nn.Linear], skinny: int = 0):
        self.members = members
        self.weight = _concat_in_place([m.weight for m in members])  # (sum N, K)
        self.bias = _concat_in_place([m.bias for m in members]) if members[0].bias is not None else None
        self.forwards = [types.MethodType(_fused_forward, m) for m in members]
        self.pointers = [m.weight.data_ptr() for m in members]
        sizes = tuple(m.out_features for m in members)
        for index, m in enumerate(members):
            # NOTE: plain attributes (not registered): the compiled layers see them as graph inputs, like the
            # bound KV pools, so every layer still shares one graph.
            m.__dict__.update(hf_paged_fused_weight=self.weight, hf_paged_fused_bias=self.bias,
                              hf_paged_fused_sizes=sizes, hf_paged_fused_index=index,
                              hf_paged_siblings=tuple(members), hf_paged_out=None, hf_paged_out_of=None,
                              hf_paged_skinny=skinny)

    def intact(self) -> bool:
        """The parameters are still the views made at fusion (not replaced by a load or an adapter since)."""
        return [m.weight.data_ptr() for m in self.members] == self.pointers


def _fused_forward(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    out = self.hf_paged_out
    if out is not None and self.hf_paged_out_of is x:  # a sibling computed it, from this very input
        self.hf_paged_out = self.hf_paged_out_of = None
        return out
    if self.hf_paged_skinny:  # HF_PAGED_SKINNY_MATMUL: up to this many rows on the skinny matmul
        y = ops.linear(x, self.hf_paged_fused_weight, self.hf_paged_fused_bias, self.hf_paged_skinny)  # (..., sum N)
    else:
        y = F.linear(x, self.hf_paged_fused_weight, self.hf_paged_fused_bias)
    outs = y.split(self.hf_paged_fused_sizes, dim=-1)
    for i, sibling in enumerate(self.hf_paged_siblings):
        if i != self.hf_paged_fused_index:
            sibling.hf_paged_out, sibling.hf_paged_out_of = outs[i], x
    return outs[self.hf_paged_fused_index]


class SkinnyLinear:
    """A plain projection outside the fused groups, run through `ops.linear` in the engine's forwards."""

    def __init__(self, module: torch.nn.Linear, rows: int = ops.SKINNY_ROWS):
        self.members = [module]
        self.forwards = [types.MethodType(_skinny_forward, module)]
        module.__dict__["hf_paged_skinny"] = rows  # the most rows of x the skinny matmul takes

    def intact(self) -> bool:
        return _fusable(self.members[0])


def _skinny_forward(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return ops.linear(x, self.weight, self.bias, self.hf_paged_skinny)


def fuse_projections(model: torch.nn.Module, fuse: bool = True, skinny: int = 0) -> list[FusedGroup | SkinnyLinear]:
    """With `fuse`, lay out every fusable q/k/v and gate/up group of the model as one weight; returns the groups,
    and with `skinny` (the most rows of x for the skinny matmul; 0: none) every other plain nn.Linear of the model
    as a `SkinnyLinear`."""
    groups = []
    for parent in model.modules() if fuse else ():
        for names in GROUPS:
            members = [getattr(parent, name, None) for name in names]
            if all(isinstance(m, torch.nn.Module) and _fusable(m) for m in members) and _compatible(members):
                groups.append(FusedGroup(members, skinny))
    if skinny:
        fused = {id(m) for group in groups for m in group.members}
        groups += [SkinnyLinear(m, skinny) for m in model.modules() if _fusable(m) and id(m) not in fused]
    return groups


@contextmanager
def fused_forwards(groups: list[FusedGroup | SkinnyLinear]) -> Iterator[None]:
    """Within the block, the groups' projections run fused and the skinny linears through `ops.linear` (groups whose
    parameters were replaced are left out)."""
    active = [g for g in groups if g.intact()]
    for group in active:
        for m, forward in zip(group.members, group.forwards):
            m.__dict__["forward"] = forward
    try:
        yield
    finally:
        for group in active:
            for m in group.members:
                m.__dict__.pop("forward", None)
                if isinstance(group, FusedGroup):
                    m.__dict__.update(hf_paged_out=None, hf_paged_out_of=None)
