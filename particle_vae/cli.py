"""The ``particle-vae`` command line: one module per subcommand under
``particle_vae.commands``, each with ``add_args(parser)`` (train: ``add_args(parser, words)``, its
model's options) and ``main(args)``."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import re
import sys
import textwrap
from pathlib import Path
from typing import Sequence

from particle_vae import __version__
from particle_vae.errors import EXIT_INTERRUPTED, EXIT_OK, EXIT_USER_ERROR, ParticleVAEError

#: subcommand name -> (module under particle_vae.commands, one-line help)
COMMANDS = {
    "simulate": ("simulate", "simulate a cryo-EM particle stack with known poses, CTF and noise"),
    "make-benchmark": ("make_benchmark", "write a paper benchmark set (MNIST(N)/(U), SO(2)/SE(2)) as MRC stack + STAR"),
    "info": ("info", "summarise a STAR file, a cryoSPARC .cs file or an MRC stack"),
    "cache": ("cache", "preprocess particles once into one contiguous cache file for training (train --cache)"),
    "train": ("train", "train a model (TARGET-VAE) on particles or a paper benchmark; writes a run directory"),
    "infer": ("infer", "write per-particle poses and latents of a trained run to a STAR file"),
    "analyze": ("analyze", "cluster inferred latents; class averages, plots and a clustered STAR"),
    "select": ("select", "write a subset of a STAR by class number or a box in latent space"),
    "export": ("export", "write particles back for RELION (.star) or cryoSPARC (.cs), from a STAR or a .cs file"),
}

log = logging.getLogger("particle_vae")

#: what argparse takes for a negative number rather than an option: also 1e9 notation (``select --box -1e9 1e9 ...``)
NEGATIVE_NUMBER = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$|^-inf$", re.IGNORECASE)


class HelpFormatter(argparse.HelpFormatter):
    """The help layout of every command: descriptions keep their indented lines
    (examples, file lists) as written and re-flow only their prose; every option
    with a default shows it as ``(default: VALUE)``.

    Options whose default is ``None`` (set later by a preset, a config class or the
    input) say their default in their own help text, in the same ``(default: ...)`` form.
    """

    # no public hook: argparse documents only whole formatter classes, none of which re-flows prose and keeps indented lines
    def _fill_text(self, text: str, width: int, indent: str) -> str:
        blocks: list[str] = []
        prose: list[str] = []

        def flush_prose() -> None:
            if prose:
                blocks.append(textwrap.fill(" ".join(prose), width, initial_indent=indent, subsequent_indent=indent))
                prose.clear()

        for line in text.splitlines():
            if line.strip() and not line[0].isspace():
                prose.append(line.strip())
            else:
                flush_prose()
                blocks.append(indent + line if line.strip() else "")
        flush_prose()
        return "\n".join(blocks)

    # no public hook: ArgumentDefaultsHelpFormatter would also print (default: None) and the defaults of flags
    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        takes_value = action.nargs != 0  # not a flag (store_true/false/const, count, help, version)
        if (action.option_strings and action.default not in (None, argparse.SUPPRESS) and takes_value
                and "%(default)" not in text and "(default:" not in text):
            text += " (default: %(default)s)"
        return text


class _StoreInto(argparse.Action):
    """Stores its value into another option's ``dest`` (for a hidden old spelling of a renamed option)."""

    def __init__(self, option_strings, dest, target: str, **kwargs):
        super().__init__(option_strings, dest, **kwargs)
        self.target = target

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.target, values)


def add_stack_dir_option(parser: argparse.ArgumentParser, help_text: str = "folder holding the particle stacks that the STAR's rlnImageName names, "
                                                  "e.g. the RELION project folder (default: paths relative to the STAR's "
                                                  "folder); for a cryoSPARC .cs input, the cryoSPARC project folder that "
                                                  "blob/path is relative to") -> None:
    """``--stack-dir FOLDER`` (``args.stack_dir``), with the old spelling ``--datadir`` accepted but not shown
    (``parser``: a parser or one of its argument groups)."""
    parser.add_argument("--stack-dir", dest="stack_dir", type=Path, metavar="FOLDER", help=help_text)
    parser.add_argument("--datadir", dest="_datadir_spelling", action=_StoreInto, target="stack_dir", type=Path,
                        default=argparse.SUPPRESS, help=argparse.SUPPRESS)


def add_project_dir_option(parser: argparse.ArgumentParser) -> None:
    """``--project-dir FOLDER`` (``args.project_dir``): the folder that the output's ``rlnImageName``
    resolves from (:func:`particle_vae.io.paths.project_folder`); ``parser``: a parser or one of its argument groups."""
    parser.add_argument("--project-dir", dest="project_dir", type=Path, metavar="FOLDER",
                        help="the folder RELION runs in (the RELION project folder): the output's rlnImageName names "
                             "the stacks relative to it, or absolutely for stacks outside it "
                             "(default: the current folder)")


def add_launch_options(parser: argparse.ArgumentParser, what: str) -> None:
    """``--gpus N`` and ``--ddp-cpu-processes N`` (:func:`particle_vae.engine.launch.add_launch_args`),
    with their default said in their help."""
    from particle_vae.engine.launch import add_launch_args

    add_launch_args(parser, what, default_help=" (default: one process, no torchrun)")


def build_parser(only: str | None = None, argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The whole command line; with ``only`` (a subcommand name) the other subcommands
    are listed by name and help line without importing their modules (faster start).

    ``argv``: the command line the parser is for (after the program name): ``train`` offers the
    options of the model it names with ``--model`` (without ``argv``, or without ``--model``: the
    default model's), and accepts no other model (:func:`parse_command_line` parses any command line).
    """
    return _build(only, argv)[0]


def command_parsers() -> dict[str, argparse.ArgumentParser]:
    """The parser of every subcommand, by name, as :func:`build_parser` builds them (``train``'s with
    the default model's options)."""
    return _build(None, None)[1]


def _command_in(argv: Sequence[str]) -> str | None:
    """The subcommand ``argv`` names: its first word that is not an option (the global options take no value)."""
    return next((arg for arg in argv if not arg.startswith("-")), None)


def _words_of(argv: Sequence[str], name: str) -> list[str]:
    """The words of ``argv`` after the subcommand ``name`` (none when ``argv`` names another)."""
    argv = list(argv)
    return argv[argv.index(name) + 1:] if _command_in(argv) == name else []


def _build(only: str | None, argv: Sequence[str] | None) -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    parser = argparse.ArgumentParser(
        prog="particle-vae",
        description="Pose-invariant representation learning for cryo-EM particle images.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"particle-vae {__version__}")
    verbosity = parser.add_mutually_exclusive_group()
    verbosity.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    verbosity.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands = {}
    for name, (module_name, help_text) in COMMANDS.items():
        if only is not None and name != only:
            commands[name] = sub.add_parser(name, help=help_text, formatter_class=HelpFormatter)
            continue
        module = importlib.import_module(f"particle_vae.commands.{module_name}")
        command = sub.add_parser(name, help=help_text, description=(module.__doc__ or help_text).strip(),
                                 formatter_class=HelpFormatter)
        # no public hook: argparse reads "-1e9" as an option unless this private matcher accepts it
        command._negative_number_matcher = NEGATIVE_NUMBER
        if name == "train":  # its model options are those of the model its words name
            module.add_args(command, _words_of(argv or [], name))
        else:
            module.add_args(command)
        command.set_defaults(_handler=module.main)
        commands[name] = command
    return parser, commands


def parse_command_line(argv: Sequence[str]) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    """The parser of ``argv`` (the command line after the program name, :func:`build_parser`) and what
    it parses ``argv`` into. Exits with status 2 after an error, as argparse does; the errors that the
    model of ``train`` decides (no such model, an option of another model or of none) are one line."""
    argv = list(argv)
    chosen = _command_in(argv)
    parser, commands = _build(chosen if chosen in COMMANDS else None, argv)
    train = commands.get("train")  # absent when COMMANDS is narrowed (tests, embedding programs)
    if chosen == "train" and train is not None:
        from particle_vae.commands.train import refusal_before_parsing

        message = refusal_before_parsing(_words_of(argv, "train"))
        if message:
            train.exit(EXIT_USER_ERROR, f"{train.prog}: error: {message}\n")
    args, extras = parser.parse_known_args(argv)
    if extras:
        if getattr(args, "command", None) == "train" and train is not None:
            from particle_vae.commands.train import refusal_of_unknown

            message = refusal_of_unknown(_words_of(argv, "train"), extras, train.prog)
            if message:
                train.exit(EXIT_USER_ERROR, f"{train.prog}: error: {message}\n")
        parser.error(f"unrecognized arguments: {' '.join(extras)}")  # what parse_args says
    return parser, args


def _configure_logging(verbose: int, quiet: bool) -> None:
    """Console shows WARNING (-q), INFO (default) or DEBUG (-vv); the package
    logger always passes INFO on, so run logs (train.log) are complete."""
    level = logging.WARNING if quiet else (logging.DEBUG if verbose >= 2 else logging.INFO)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S", force=True)
    root = logging.getLogger()
    root.setLevel(min(level, logging.INFO))
    for handler in root.handlers:
        handler.setLevel(level)


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit code (0 ok, 2 user error, 130 interrupted).

    ``argv``: the command line after the program name (default ``sys.argv[1:]``).
    """
    from particle_vae import enable_huge_pages

    enable_huge_pages()  # before the commands import torch
    argv = sys.argv[1:] if argv is None else list(argv)
    parser, args = parse_command_line(argv)
    if not getattr(args, "_handler", None):
        parser.print_help()
        return EXIT_USER_ERROR
    args._argv = argv  # what a multi-process launch starts again (particle_vae.engine.launch.relaunch)
    _configure_logging(args.verbose, args.quiet)
    try:
        result = args._handler(args)
    except ParticleVAEError as error:
        print(f"particle-vae {args.command}: error: {error}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("particle-vae: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # output piped into e.g. `head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except OSError as error:  # the file system refused (permissions, a full disk, a file where a folder should be)
        if error.errno is None:
            raise
        log.debug("file system error", exc_info=True)
        where = f"{error.filename}: " if error.filename is not None else ""
        print(f"particle-vae {args.command}: error: {where}{error.strerror or error}; check the path, its permissions "
              f"and the free space", file=sys.stderr)
        return EXIT_USER_ERROR
    return EXIT_OK if result is None else int(result)


if __name__ == "__main__":
    sys.exit(main())
