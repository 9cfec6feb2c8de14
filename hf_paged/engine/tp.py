"""Tensor-parallel serving: every rank runs the same engine; rank 0 decides what each step contains.

Under transformers' tensor parallelism every rank must run every forward. Rank 0 takes the requests (the HTTP
server runs there); before each step it broadcasts the requests that arrived and the aborts, then all ranks apply
them to their own engine and step. The engines stay identical because the scheduler is deterministic and the
engine broadcasts rank 0's sampled tokens. Followers (ranks > 0) loop in `StepSync.follow` until rank 0 sends
"shutdown".
"""

from __future__ import annotations

import torch.distributed as dist

from hf_paged.engine.engine import LLMEngine
from hf_paged.engine.request import Request


def init_tensor_parallel(size: int) -> None:
    """Join the process group torchrun set up (NCCL on GPUs, gloo on CPU) and check it has `size` ranks."""
    import os

    import torch

    if "WORLD_SIZE" not in os.environ:
        raise ValueError(
            f"tensor_parallel_size={size} needs {size} processes started by torchrun, e.g. "
            f"torchrun --nproc_per_node {size} $(which hf-paged) serve MODEL --tensor-parallel-size {size}"
        )
    if int(os.environ["WORLD_SIZE"]) != size:
        raise ValueError(f"tensor_parallel_size={size} but torchrun started {os.environ['WORLD_SIZE']} processes")
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend)


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) without torch.distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class StepSync:
    """Broadcasts each step's new requests and aborts from rank 0 to the other ranks."""

    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self.rank, self.size = world()

    def lead(self, added: list[Request], aborted: list[str], step: bool) -> None:
        """Rank 0: announce this step's changes (the caller applies them to its own engine)."""
        ops = [("add", r.request_id, r.prompt_ids, r.params, r.adapter) for r in added]
        ops += [("abort", request_id) for request_id in aborted]
        if step:
            ops.append(("step",))
        self._broadcast(ops)

    def shutdown(self) -> None:
        self._broadcast([("shutdown",)])

    def follow(self) -> None:
        """Ranks > 0: mirror rank 0's engine until it shuts down."""
        assert self.rank > 0, "rank 0 leads"
        from hf_paged.patches.generate import paged_attention

        with paged_attention(self.engine.model):
            self._follow()

    def _follow(self) -> None:
        while True:
            for op in self._broadcast(None):
                if op[0] == "shutdown":
                    return
                if op[0] == "add":
                    _, request_id, prompt_ids, params, adapter = op
                    self.engine.add_request(request_id, prompt_ids, params, adapter=adapter)
                elif op[0] == "abort":
                    self.engine.abort(op[1])
                elif op[0] == "step":
                    try:
                        self.engine.step()
                    except Exception:  # noqa: BLE001 - rank 0 saw the same failure and reports it
                        pass

    def _broadcast(self, ops: list | None) -> list:
        box = [ops]
        dist.broadcast_object_list(box, src=0)
        return box[0]
