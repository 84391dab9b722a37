"""The command-line shell: help, exit codes, one-line errors, and `info`."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from particle_vae import cli


def test_every_subcommand_has_help(capsys):
    for name in cli.COMMANDS:
        with pytest.raises(SystemExit) as exit_info:
            cli.main([name, "--help"])
        assert exit_info.value.code == 0
        assert f"particle-vae {name}" in capsys.readouterr().out


def test_no_command_prints_help_and_fails(capsys):
    assert cli.main([]) == 2
    assert "COMMAND" in capsys.readouterr().out


def _environment_after(code: str, **env: str) -> str:
    """``THP_MEM_ALLOC_ENABLE`` in a fresh Python after ``code`` (started without it, or with ``env``)."""
    import os

    base = {key: value for key, value in os.environ.items() if key != "THP_MEM_ALLOC_ENABLE"}
    done = subprocess.run([sys.executable, "-c", code + "\nimport os; print(os.environ.get('THP_MEM_ALLOC_ENABLE'))"],
                          capture_output=True, text=True, env={**base, **env}, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().splitlines()[-1]


def test_huge_pages_are_asked_for_by_the_command_line_only():
    """The command line sets THP_MEM_ALLOC_ENABLE=1 before torch is imported; importing the package sets nothing,
    a user's THP_MEM_ALLOC_ENABLE=0 stays, and after torch is imported nothing is set."""
    run_cli = ("import sys\nfrom particle_vae import cli\nassert 'torch' not in sys.modules\n"
               "assert cli.main(['infer', 'absent_run', '--out', 'absent.star']) == 2\nassert 'torch' in sys.modules")
    assert _environment_after(run_cli) == "1"
    assert _environment_after(run_cli, THP_MEM_ALLOC_ENABLE="0") == "0"
    assert _environment_after("import particle_vae") == "None"
    assert _environment_after("import torch, particle_vae\nparticle_vae.enable_huge_pages()") == "None"


def test_info_on_relion31_star(cryoem_dir, capsys):
    assert cli.main(["info", str(cryoem_dir / "relion31" / "relion31.star")]) == 0
    out = capsys.readouterr().out
    assert "RELION 3.1+" in out and "2.806 A" in out and "256 px" in out and "rlnAnglePsi" in out


def test_info_json_on_relion30_star(cryoem_dir, capsys):
    assert cli.main(["info", "--json", str(cryoem_dir / "toy_projections" / "toy_projections.star")]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["star_format"] == "RELION 3.0" and summary["particles"] == 1000 and summary["box_px"] == 30
    assert "dummyVariable" in summary["columns"]


def test_info_on_a_bare_stack(cryoem_dir, capsys):
    assert cli.main(["info", "--pixel-size", "2.5", str(cryoem_dir / "relion31" / "relion31.mrcs")]) == 0
    out = capsys.readouterr().out
    assert "2.5 A (from user)" in out and "particles       5" in out


@pytest.mark.parametrize(
    "make_input, expected",
    [
        (lambda d, tmp: d / "empiar10025_metadata" / "ctf_params.star", "rlnImageName"),
        (lambda d, tmp: tmp / "missing.star", "missing.star: file not found"),
        (lambda d, tmp: d / "empiar10025_metadata" / "particles.star", "--stack-dir"),
    ],
)
def test_bad_input_gives_one_line_error(cryoem_dir, tmp_path, capsys, make_input, expected):
    assert cli.main(["info", str(make_input(cryoem_dir, tmp_path))]) == 2
    err = capsys.readouterr().err.strip()
    assert expected in err and "\n" not in err and "Traceback" not in err


def test_truncated_stack_behind_a_star(cryoem_dir, tmp_path, capsys):
    shutil.copy(cryoem_dir / "relion31" / "relion31.star", tmp_path / "p.star")
    data = (cryoem_dir / "relion31" / "relion31.mrcs").read_bytes()
    (tmp_path / "relion31.mrcs").write_bytes(data[: len(data) // 2])
    assert cli.main(["info", str(tmp_path / "p.star")]) == 2
    err = capsys.readouterr().err.strip()
    assert "relion31.mrcs" in err and "truncated" in err and "\n" not in err


def test_module_entry_point_runs_without_traceback(tmp_path):
    result = subprocess.run([sys.executable, "-m", "particle_vae", "info", str(tmp_path / "nope.mrcs")], capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "nope.mrcs" in result.stderr


def test_core_imports_no_gui_toolkit():
    """The core (every command module) must run without Qt or napari installed: importing it pulls in neither."""
    import subprocess
    import sys
    code = ("import sys, particle_vae.cli, particle_vae.analysis.plots\n"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in {'napari', 'PyQt5', 'PyQt6', 'PySide2', 'PySide6', 'qtpy', 'magicgui'})\n"
            "print(','.join(bad))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == ""
