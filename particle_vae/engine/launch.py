"""Starting a command again in several processes: the ``--gpus N`` and ``--ddp-cpu-processes N`` options.

``particle-vae train --gpus N`` (and ``infer``) starts ``torchrun`` for one node
with the same command line, less the launch options (:func:`launch_argv`);
each process then joins the process group through
:func:`particle_vae.engine.distributed.init_distributed`. The subcommands call
:func:`add_launch_args` when building their parser, and in ``main`` start the
processes with :func:`relaunch` when :func:`wants_launch` says so.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
from typing import Sequence

import torch

from particle_vae.engine.distributed import launched_by_torchrun
from particle_vae.errors import ParticleVAEError

log = logging.getLogger(__name__)


def torchrun_command(n_processes: int, argv: Sequence[str], module: str = "particle_vae") -> list[str]:
    """The command that starts ``python -m module argv`` ``n_processes`` times on this node.

    ``--standalone`` picks a free port on localhost, so several such runs can
    share a machine.
    """
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={int(n_processes)}",
            "-m", module, *argv]


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
