"""Data-parallel training and sharded inference on PyTorch's own distributed engine.

A run is *distributed* when it was started by ``torchrun`` (``torch.distributed.run``),
which sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and
``MASTER_PORT`` in every process; ``particle-vae train --gpus N`` starts
``torchrun`` itself for one node. :func:`init_distributed` reads those variables
and joins the process group (NCCL on CUDA, gloo on CPU); without them it returns
a single-process :class:`DistContext` and nothing here communicates.

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

import argparse
import datetime
import logging
import os
import subprocess
import sys
from dataclasses import dataclass
from typing import Any, Callable, Sequence

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
    """Leave the process group (no effect for a single process)."""
    if context.distributed and dist.is_initialized():
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


def torchrun_command(n_processes: int, argv: Sequence[str], module: str = "particle_vae") -> list[str]:
    """The command that starts ``python -m module argv`` ``n_processes`` times on this node.

    ``--standalone`` picks a free port on localhost, so several such runs can
    share a machine.
    """
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={int(n_processes)}",
            "-m", module, *argv]


# --------------------------------------------------------------------------- launching from the command line

#: options that only tell the launching process how many processes to start
LAUNCH_FLAGS = ("--gpus", "--ddp-cpu-processes")


def add_launch_args(parser: argparse.ArgumentParser, what: str, default_help: str = "") -> None:
    """``--gpus N`` and ``--ddp-cpu-processes N`` for a subcommand (and remember its parser).

    Args:
        parser: the subcommand's parser.
        what: what runs on several processes, for the help of ``--gpus``.
        default_help: appended to the help of both options (e.g. their default).
    """
    group = parser.add_argument_group("several processes (docs/scale.md)")
    group.add_argument("--gpus", type=int, metavar="N",
                       help=f"{what} on N GPUs of this node (starts torchrun with N processes){default_help}")
    group.add_argument("--ddp-cpu-processes", type=int, metavar="N",
                       help=f"testing the distributed path without GPUs: N CPU processes with the gloo backend{default_help}")
    parser.set_defaults(_launch_parser=parser)


def wants_launch(args: argparse.Namespace) -> bool:
    """True when the user asked for several processes and this is not already one of them."""
    asked = getattr(args, "gpus", None) is not None or getattr(args, "ddp_cpu_processes", None) is not None
    return asked and not launched_by_torchrun()


def _is_option(token: str, flags: Sequence[str]) -> bool:
    """``token`` (without any ``=value``) is one of ``flags`` or an abbreviation of one, as argparse accepts them."""
    name = token.partition("=")[0]
    return name.startswith("--") and len(name) > 2 and any(flag.startswith(name) for flag in flags)


def launch_argv(argv: Sequence[str], device: str | None = None) -> list[str]:
    """The command line of the processes a launch starts: ``argv`` without the launch options.

    Removes ``--gpus N`` and ``--ddp-cpu-processes N``, also written ``--gpus=N``
    or abbreviated (``--gpu N``); everything else stays as the user wrote it.
    Options after ``--`` are not options and stay.

    Args:
        argv: the command line after the program name (``[-q|-v..., command, ...]``).
        device: when given, ``--device DEVICE`` is added after the command's other
            options, so that it overrides a ``--device`` the user gave.
    Returns:
        The command line for ``python -m particle_vae``.
    """
    argv = list(argv)
    end = argv.index("--") if "--" in argv else len(argv)
    kept, words = [], iter(argv[:end])
    for word in words:
        if not _is_option(word, LAUNCH_FLAGS):
            kept.append(word)
        elif "=" not in word:
            next(words, None)  # its value
    return [*kept, *(["--device", device] if device is not None else []), *argv[end:]]


def relaunch(args: argparse.Namespace, parser: argparse.ArgumentParser, command: str) -> int:
    """Run ``particle-vae command`` again with ``--gpus N`` (NCCL) or ``--ddp-cpu-processes N`` (gloo) processes.

    The processes run the command line that started this one
    (``args._argv``, which :func:`particle_vae.cli.main` sets, else ``sys.argv``)
    without the launch options (:func:`launch_argv`).
    ``--gpus`` refuses when CUDA is missing or fewer than ``N`` GPUs are
    visible (pointing to ``--ddp-cpu-processes`` for testing on CPU);
    ``--ddp-cpu-processes`` forces ``--device cpu``. One process runs in
    place; more are started with :func:`torchrun_command` and waited for.

    Args:
        args: the parsed command line.
        parser: the subcommand's parser (``args._launch_parser``).
        command: the subcommand's name.
    Returns:
        0 when every process succeeded.
    Raises:
        ParticleVAEError: impossible launch options, or a failed process (its
            own one-line error has been printed by then).
    """
    gpus, cpus = getattr(args, "gpus", None), getattr(args, "ddp_cpu_processes", None)
    if gpus is not None and cpus is not None:
        raise ParticleVAEError("give either --gpus or --ddp-cpu-processes, not both")
    if gpus is not None:
        count = gpus
        if count < 1:
            raise ParticleVAEError(f"--gpus must be at least 1, got {count}")
        if not torch.cuda.is_available():
            raise ParticleVAEError(f"--gpus {count}: this PyTorch sees no CUDA GPU; run without --gpus, or use "
                                   "--ddp-cpu-processes N to run the multi-process (gloo) path on CPU for testing")
        if torch.cuda.device_count() < count:
            raise ParticleVAEError(f"--gpus {count}: only {torch.cuda.device_count()} GPU(s) visible; "
                                   f"use --gpus {torch.cuda.device_count()} or fewer")
        device = getattr(args, "device", None)
        if device not in (None, "auto") and not str(device).startswith("cuda"):
            raise ParticleVAEError(f"--gpus cannot be combined with --device {device}; use --ddp-cpu-processes for CPU processes")
        device = "auto"  # each process takes cuda:LOCAL_RANK
    else:
        count = cpus
        if count < 1:
            raise ParticleVAEError(f"--ddp-cpu-processes must be at least 1, got {count}")
        device = "cpu"
    argv = launch_argv(getattr(args, "_argv", None) or sys.argv[1:], device=device)
    # the global options (-q, -v) take no value: the first other word is the command
    position = next((i for i, token in enumerate(argv) if not token.startswith("-")), len(argv))
    if argv[position:position + 1] != [command]:
        raise ParticleVAEError(f"cannot start '{command}' again from the command line {' '.join(argv)!r}")
    again = parser.parse_args(argv[position + 1:])
    if wants_launch(again):  # never expected: a launch option the stripping missed would start processes without end
        raise ParticleVAEError(f"could not remove --gpus/--ddp-cpu-processes from the command line {' '.join(argv)}; "
                               "write them out in full")
    if count == 1:
        from particle_vae import cli

        return cli.main(argv)
    launch = torchrun_command(count, argv)
    log.info("starting %d processes: %s", count, " ".join(launch))
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max((os.cpu_count() or 1) // count, 1)))
    code = subprocess.run(launch, env=env).returncode
    if code != 0:
        raise ParticleVAEError(f"the distributed run failed (torchrun exit code {code}); the failing rank's error is printed above")
    return 0
