"""Data-parallel training and sharded inference on PyTorch's own distributed engine.

A run is *distributed* when it was started by ``torchrun`` (``torch.distributed.run``),
which sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and
``MASTER_PORT`` in every process; ``particle-vae train --gpus N`` starts
``torchrun`` itself for one node (:mod:`particle_vae.engine.launch`).
:func:`init_distributed` reads those variables and joins the process group
(NCCL on CUDA, gloo on CPU); without them it returns a single-process
:class:`DistContext` and nothing here communicates.

Conventions used by the trainer and inference:

* every rank builds the same model from the same seed; DistributedDataParallel
  (DDP) broadcasts rank 0's parameters once and averages gradients after each
  backward pass;
* models compute their objective in ``loss()``, not ``forward()``, and DDP only
  hooks ``forward()``; :class:`LossModule` is the thin module DDP wraps, whose
  ``forward`` calls ``model.loss``;
* only rank 0 writes files (run directory, checkpoints, STAR output);
  :func:`run_on_main` runs a step on rank 0 and hands its result, or its error,
  to every rank so that no rank waits forever for a rank that failed.
"""

from __future__ import annotations

import datetime
import logging
import os
import sys
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn

from particle_vae.errors import ParticleVAEError

log = logging.getLogger(__name__)

#: environment variables torchrun sets in every process it starts
TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass
class DistContext:
    """Where this process stands in a (possibly single-process) run.

    Attributes:
        rank: global rank ``0..world_size-1``.
        world_size: number of processes ``W`` (1: not distributed).
        local_rank: rank on this node (picks the GPU ``cuda:local_rank``).
        backend: ``"nccl"``, ``"gloo"`` or ``None`` when not distributed.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def distributed(self) -> bool:
        """True when there are several processes (``world_size > 1``)."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """True on rank 0, the process that writes files and logs."""
        return self.rank == 0


SINGLE = DistContext()


def launched_by_torchrun() -> bool:
    """True when torchrun's variables say this process is one of several."""
    return all(name in os.environ for name in ("RANK", "WORLD_SIZE")) and int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_distributed(device: str = "auto", timeout_s: float = 1800.0) -> DistContext:
    """Join the process group described by torchrun's environment variables.

    Args:
        device: the ``--device`` setting; ``auto`` or ``cuda*`` with CUDA available
            selects NCCL and ``cuda:LOCAL_RANK``, anything else gloo on CPU.
        timeout_s: how long collective operations wait for a missing rank, seconds.
    Returns:
        The context; a single-process one (nothing initialised) when the
        variables are absent or ``WORLD_SIZE`` is 1.
    Raises:
        ParticleVAEError: a variable is missing or malformed, or a GPU per
            process is asked for but fewer are visible.
    """
    if not launched_by_torchrun():
        return SINGLE
    missing = [name for name in TORCHRUN_VARIABLES if name not in os.environ]
    if missing:
        raise ParticleVAEError(f"distributed launch without {', '.join(missing)} in the environment; start the run with torchrun "
                               "(see docs/scale.md)")
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    use_cuda = torch.cuda.is_available() and (device == "auto" or device.startswith("cuda"))
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ParticleVAEError(f"--device {device} was requested but this PyTorch sees no CUDA GPU; use --device cpu for gloo")
    if use_cuda:
        if local >= torch.cuda.device_count():
            raise ParticleVAEError(f"rank {rank} has LOCAL_RANK {local} but only {torch.cuda.device_count()} GPU(s) are visible; "
                                   "start at most one process per GPU (--nproc-per-node)")
        torch.cuda.set_device(local)
    backend = "nccl" if use_cuda else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, rank=rank, world_size=world, timeout=datetime.timedelta(seconds=timeout_s))
    return DistContext(rank=rank, world_size=world, local_rank=local, backend=backend)


def device_for(context: DistContext, device: str = "auto") -> torch.device:
    """The device of this rank: ``cuda:LOCAL_RANK`` under NCCL, else the ``--device`` choice."""
    from particle_vae.engine.device import resolve_device

    if context.backend == "nccl":
        return torch.device("cuda", context.local_rank)
    if context.distributed:
        return torch.device("cpu")
    return resolve_device(device)


def cleanup(context: DistContext) -> None:
    """Leave the process group (no effect for a single process).

    On a normal exit every rank first waits for the others: a gloo rank that tears its group down while a peer still
    has traffic in flight to it can abort ("terminate called without an active exception"). While an exception is
    propagating (called from a ``finally``), the other ranks may never get here, so the group is left at once.
    """
    if context.distributed and dist.is_initialized():
        if sys.exc_info()[0] is None:
            barrier(context)
        dist.destroy_process_group()


def barrier(context: DistContext) -> None:
    """Wait until every rank gets here (no effect for a single process)."""
    if context.distributed:
        dist.barrier()


def _collective_device(context: DistContext) -> torch.device:
    return torch.device("cuda", context.local_rank) if context.backend == "nccl" else torch.device("cpu")


def all_reduce_sum(context: DistContext, values: torch.Tensor) -> torch.Tensor:
    """Element-wise sum of ``values`` over all ranks (a float64 copy, on CPU)."""
    values = values.detach().to(torch.float64)
    if not context.distributed:
        return values.cpu()
    buffer = values.to(_collective_device(context))
    dist.all_reduce(buffer, op=dist.ReduceOp.SUM)
    return buffer.cpu()


def any_rank(context: DistContext, flag: bool) -> bool:
    """True when ``flag`` is true on at least one rank."""
    if not context.distributed:
        return bool(flag)
    buffer = torch.tensor([1.0 if flag else 0.0], device=_collective_device(context))
    dist.all_reduce(buffer, op=dist.ReduceOp.MAX)
    return bool(buffer.item() > 0)


def all_gather_objects(context: DistContext, value: Any) -> list:
    """``[value of rank 0, value of rank 1, ...]`` on every rank (picklable values)."""
    if not context.distributed:
        return [value]
    out: list = [None] * context.world_size
    dist.all_gather_object(out, value)
    return out


def gather_to_main(context: DistContext, value: Any) -> list | None:
    """``[value of rank 0, ...]`` on rank 0, ``None`` elsewhere (picklable values)."""
    if not context.distributed:
        return [value]
    out: list | None = [None] * context.world_size if context.is_main else None
    dist.gather_object(value, out, dst=0)
    return out


def broadcast_object(context: DistContext, value: Any) -> Any:
    """Rank 0's ``value`` on every rank."""
    if not context.distributed:
        return value
    box = [value if context.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def run_on_main(context: DistContext, step: Callable[[], Any]) -> Any:
    """Run ``step`` on rank 0 only and return its result on every rank.

    A :class:`ParticleVAEError` raised on rank 0 is raised again, with the same
    one-line message, on every rank (instead of the others waiting for rank 0
    at the next collective until the timeout).
    """
    if not context.distributed:
        return step()
    result, error = None, None
    if context.is_main:
        try:
            result = step()
        except ParticleVAEError as exc:
            error = (type(exc), str(exc), None if exc.path is None else str(exc.path))
    result, error = broadcast_object(context, (result, error))
    if error is not None:
        kind, message, path = error
        exc = kind.__new__(kind)
        Exception.__init__(exc, message)
        exc.path = path
        raise exc
    return result


def shard_bounds(n: int, context: DistContext) -> tuple[int, int]:
    """Contiguous share ``[start, stop)`` of ``range(n)`` for this rank.

    Shares differ in size by at most one and, concatenated in rank order, give
    ``range(n)`` again (so gathered results are in input order).
    """
    base, extra = divmod(int(n), context.world_size)
    start = context.rank * base + min(context.rank, extra)
    return start, start + base + (1 if context.rank < extra else 0)


def split_counts(n: int, parts: int) -> list[int]:
    """Sizes of ``parts`` contiguous shares of ``n`` items (differing by at most one, larger first)."""
    base, extra = divmod(int(n), int(parts))
    return [base + (1 if i < extra else 0) for i in range(int(parts))]


class LossModule(nn.Module):
    """The module DistributedDataParallel wraps: ``forward`` computes ``model.loss``.

    DDP registers its gradient all-reduce when ``forward`` is called, so calling
    ``model.loss`` directly on a DDP-wrapped model would skip the
    synchronisation. ``forward`` returns a tuple of tensors (DDP walks the
    output to find the autograd graph): ``(loss, elbo, term names, term values)``.

    DDP broadcasts every buffer of the module it wraps (once at the start, and
    at every training step). Most of a model's buffers need no broadcast: e2cnn's
    sampled filter bases (hundreds of MB) and the non-persistent buffers are
    rebuilt from the config, the same on every rank. So the model is not a
    submodule here; this module registers the model's parameters and its own
    persistent buffers (:func:`~particle_vae.models.base.learnable_names`, e.g.
    EquiVAE's class-mean bank), the same tensor objects, under ``tensors``. DDP
    writes its broadcasts into those tensors in place, so the model sees them.
    The model must therefore be on its device before it is wrapped, and must
    update these buffers in place (as ``load_state_dict`` and the models do).

    Args:
        model: a :class:`~particle_vae.models.base.PoseVAE`.

    ``forward(images, scale=1.0, **kwargs)`` multiplies the loss by ``scale``
    (the trainer uses it so that the averaged gradients of unequal per-rank
    batches equal the gradient of the global batch mean).
    """

    def __init__(self, model: nn.Module):
        from particle_vae.models.base import learnable_names

        super().__init__()
        self._model = (model,)  # in a tuple, so that nn.Module does not register it as a submodule
        self.tensors = nn.Module()
        parameters = dict(model.named_parameters())
        for name, parameter in parameters.items():
            self.tensors.register_parameter(name.replace(".", "/"), parameter)
        for name in learnable_names(model):
            if name not in parameters:
                self.tensors.register_buffer(name.replace(".", "/"), model.get_buffer(name))

    @property
    def model(self) -> nn.Module:
        """The wrapped model."""
        return self._model[0]

    def train(self, mode: bool = True) -> LossModule:
        """Set training mode here and on the model (which is not a submodule)."""
        super().train(mode)
        self.model.train(mode)
        return self

    def forward(self, images: torch.Tensor, scale: float = 1.0, **kwargs):
        terms = self.model.loss(images, **kwargs)
        names = tuple(terms.terms)
        return terms.loss * scale, terms.elbo, names, tuple(terms.terms[name] for name in names)


def unused_parameters(model: nn.Module, device: torch.device) -> list[str]:
    """Names of trainable parameters that one training-mode loss on two random
    images leaves without a gradient (a branch an ablation switches off).

    The random-number states are restored and the gradients cleared afterwards.
    """
    box = int(model.config.box)
    devices = [device] if device.type == "cuda" else []
    mode = model.training
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(0)
        model.train(True)
        images = torch.randn(2, 1, box, box, device=device)
        if getattr(model.config, "likelihood", None) == "bernoulli":
            images = torch.sigmoid(images)
        model.loss(images).loss.backward()
    unused = [name for name, p in model.named_parameters() if p.requires_grad and p.grad is None]
    model.zero_grad(set_to_none=True)
    model.train(mode)
    return unused


def wrap_ddp(model: nn.Module, context: DistContext, device: torch.device) -> nn.Module:
    """``DistributedDataParallel(LossModule(model))`` for this rank.

    e2cnn's sampled filter bases (buffers rebuilt from the config, hundreds of
    MB) are left out of DDP's buffer synchronisation (:class:`LossModule`); the
    models' own buffers (e.g. EquiVAE's class-mean bank) are taken from rank 0 at
    every step, as DDP does by default. DDP looks for parameters without a gradient at every
    step (an extra walk over the autograd graph) only when a probe step finds
    some (:func:`unused_parameters`).
    """
    from torch.nn.parallel import DistributedDataParallel

    wrapper = LossModule(model)
    unused = any_rank(context, bool(unused_parameters(model, device)))
    device_ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(wrapper, device_ids=device_ids, find_unused_parameters=unused)
