"""Training beyond one process: data parallelism, sharded base models, activation checkpointing.

``softprompt train`` runs unchanged under ``torchrun`` or ``accelerate launch``: both set RANK,
WORLD_SIZE, LOCAL_RANK and MASTER_ADDR/PORT, and :func:`setup` joins the process group they describe.

How one optimizer step is split (N processes, micro-batch size B per process)::

    global micro-batch = B*N rows of the same seeded length-grouped stream a one-process run with
                         batch_size B*N reads -> rank r takes rows [r*B*N/N, (r+1)*B*N/N)
    rank loss          = mean over its rows * (its rows / global rows)   (exact for uneven splits)
    prompt gradient    = all_reduce(SUM) over ranks  ->  the one-process gradient of the global batch
    clip, optimizer    = identical on every rank, so the prompts stay equal without broadcasting

The base model is frozen, so the only thing to synchronise is the prompt's gradient, a (P, D)
tensor: no DDP wrapper is needed. Sharding (FSDP2) splits the frozen decoder layers' weights
across ranks; the embeddings stay whole on every rank because the prompt lives in their space
(init, fingerprint) and every forward reads them before the decoder runs.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from softprompt.errors import UsageError

log = logging.getLogger(__name__)


@dataclass
class DistContext:
    """Where this process sits in the run. One process: rank 0 of 1, and every helper is a no-op."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: str = "auto"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    def shard(self, rows: list[int]) -> tuple[list[int], float]:
        """This rank's contiguous share of a global micro-batch and its loss weight (share / total).

        Shares differ by at most one row. A rank left with no rows (a short last batch) still runs
        one row with weight 0: under FSDP every rank must run every forward, or the all-gathers hang.
        """
        if not self.active:
            return rows, 1.0
        n = len(rows)
        lo, hi = self.rank * n // self.world_size, (self.rank + 1) * n // self.world_size
        if hi == lo:
            return rows[:1], 0.0
        return rows[lo:hi], (hi - lo) / n

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        """In-place sum over ranks (every rank gets the same bits back)."""
        if self.active:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def sum_gradients_(self, params) -> None:
        """Sum each parameter's gradient over ranks; the per-rank losses are already weighted, so the
        sum is the global-batch gradient. Clip after this, never before."""
        if not self.active:
            return
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)

    def broadcast_(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.active:
            dist.broadcast(tensor, src=0)
        return tensor

    def broadcast_object(self, obj):
        """Rank 0's ``obj`` on every rank (e.g. the trainer state after an evaluation)."""
        if not self.active:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.active:
            dist.barrier()


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return int(value) if value not in (None, "") else default


def setup(device: str = "auto") -> DistContext:
    """Join the process group a launcher describes (gloo on CPU, nccl on CUDA), or stay single.

    ``device="auto"`` picks ``cuda:LOCAL_RANK`` when CUDA is available, else the CPU. Processes other
    than rank 0 log warnings only, so a run prints one log however many processes it has.
    """
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        raise UsageError(
            "this run was launched with an accelerate DeepSpeed config, which softprompt does not drive "
            "(every process would silently hold the whole model). Use examples/accelerate/fsdp.yaml to "
            "shard the base model, or examples/accelerate/ddp_gpu.yaml for plain data parallelism."
        )
    world = _env_int("WORLD_SIZE", 1)
    if world <= 1 and not dist.is_initialized():
        return DistContext(device=device)
    local_rank = _env_int("LOCAL_RANK", 0)
    use_cuda = torch.cuda.is_available() and (device == "auto" or device.startswith("cuda"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device = f"cuda:{local_rank}"
    elif device == "auto":
        device = "cpu"
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    ctx = DistContext(dist.get_rank(), dist.get_world_size(), local_rank, device)
    if not ctx.is_main:
        logging.getLogger("softprompt").setLevel(logging.WARNING)
    log.info(
        "distributed: %d processes (%s), this is rank %d on %s",
        ctx.world_size,
        dist.get_backend(),
        ctx.rank,
        device,
    )
    return ctx


def is_main_process() -> bool:
    """True in a single process and on rank 0 of a group; use it to guard printing and writing."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return _env_int("RANK", 0) == 0


def fsdp_requested() -> bool:
    """``accelerate launch`` with an FSDP config sets ACCELERATE_USE_FSDP=true in each process."""
    return os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true", "yes")


# ----------------------------------------------------------------------------- sharded models
def shard_model(model: nn.Module, ctx: DistContext) -> nn.Module:
    """Shard the frozen decoder's weights across ranks with PyTorch FSDP2 (``fully_shard``), in place.

    Each transformer block is one unit (gathered just before it runs, freed after), then the decoder
    stack as the root unit with the input embeddings left out: ``PromptedLM`` looks up token
    embeddings before the decoder runs, and the prompt is initialised and fingerprinted from them.
    The LM head (often tied to the embeddings) stays whole too. Memory per rank: the embeddings
    and head in full, 1/N of everything else.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from softprompt.hf_parts import decoder_layers

    if not ctx.active:
        log.warning("fsdp requested with one process: nothing to shard across; running unsharded")
        return model
    mesh = init_device_mesh("cuda" if str(ctx.device).startswith("cuda") else "cpu", (ctx.world_size,))
    keep_whole = {model.get_input_embeddings().weight}
    head = model.get_output_embeddings()
    if head is not None:
        keep_whole.add(head.weight)
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh)
    fully_shard(model.get_decoder(), mesh=mesh, ignored_params=keep_whole)
    log.info(
        "fsdp: %d blocks sharded over %d ranks; embeddings and head kept whole",
        len(decoder_layers(model)),
        ctx.world_size,
    )
    return model


def teardown() -> None:
    """Leave the process group, if one was joined (the end of a command-line run)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
