"""Crash-safe outputs (issue 15, point 3): infer's STAR and .npz as a pair, and no piling temporaries.

A real tiny run is trained once; ``infer`` is then killed with SIGKILL at precise
points of writing its outputs (in a child process whose ``numpy.savez``,
``os.fsync`` or ``os.replace`` kills it), and the files left are checked: the old
pair, the new pair, or (killed between the two renames) the old STAR beside the
new .npz, which the readers refuse in one line.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from particle_vae import cli
from particle_vae.errors import InputFileError
from particle_vae.io.atomic import remove_stale_temporaries, writer_has_ended
from particle_vae.io.infer_pair import PAIR_ID_KEY, check_pair, load_pair_npz, npz_pair_id, star_pair_id
from particle_vae.io.mrc import write_stack
from particle_vae.io.star import image_name, make_particle_star

# the tiny training settings of tests/test_train.py
TINY = ["--preset", "tiny", "--fields", "4", "--gen-hidden", "32", "--fourier-features", "16", "--group", "4",
        "--downsample-to", "24", "--batch-size", "16", "--seed", "3"]
N, BOX, APIX = 20, 24, 2.0

#: run in a child: infer over an existing pair, killed (SIGKILL) at the point named by argv[1]
_KILLED_INFER = r"""
import os, signal, sys
import numpy as np

point, run, out = sys.argv[1], sys.argv[2], sys.argv[3]
replace, fsync = os.replace, os.fsync

def die():
    os.kill(os.getpid(), signal.SIGKILL)

def partial_savez(handle, *args, **kwargs):  # killed half-way through writing the .npz
    handle.write(b"PK\x03\x04 half an npz")
    handle.flush()
    die()

def fsync_then_die(fd):  # both temporaries written, nothing renamed yet
    die()

def replace_or_die(src, dst, *args, **kwargs):
    if str(dst).endswith(point.split("_")[1]):  # "replace_.npz": before renaming the .npz; "replace_.star": between the renames
        die()
    return replace(src, dst, *args, **kwargs)

if point == "savez":
    np.savez = partial_savez
elif point == "fsync":
    os.fsync = fsync_then_die
elif point.startswith("replace_"):
    os.replace = replace_or_die
from particle_vae import cli
sys.exit(cli.main(["-q", "infer", run, "--out", out, "--overwrite", "--no-refine"]))
"""


def write_inputs(folder: Path) -> Path:
    """A 20-particle stack and its RELION 3.1 STAR in ``folder``; returns the STAR."""
    folder.mkdir(parents=True, exist_ok=True)
    images = np.random.default_rng(0).normal(size=(N, BOX, BOX)).astype(np.float32)
    write_stack(folder / "p.mrcs", images, APIX, overwrite=True)
    star = make_particle_star([image_name(i, "p.mrcs") for i in range(N)], APIX, BOX)
    return star.write(folder / "p.star", overwrite=True)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, single_thread) -> Path:
    """A one-epoch tiny run directory."""
    root = tmp_path_factory.mktemp("crash")
    run = root / "run"
    assert cli.main(["-q", "train", str(write_inputs(root / "in")), *TINY, "--epochs", "1", "--out", str(run)]) == 0
    return run


def infer(run: Path, out: Path, *extra: str) -> int:
    return cli.main(["-q", "infer", str(run), "--out", str(out), "--no-refine", *extra])


def killed_infer(point: str, run: Path, out: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", _KILLED_INFER, point, str(run), str(out)], capture_output=True, text=True,
                            env=env, timeout=300, check=False)
    assert result.returncode == -9, result.stderr  # killed by SIGKILL where the point says, not finished or failed
    return result


def temporaries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob(".*.tmp"))


def dead_pid() -> int:
    """The id of a process that has ended."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0], err
    return err[0]


def test_infer_writes_a_pair_tied_by_one_id(trained, tmp_path):
    out = tmp_path / "poses.star"
    assert infer(trained, out) == 0
    pair_id = star_pair_id(out)
    assert pair_id is not None and len(pair_id) == 32
    assert npz_pair_id(out.with_suffix(".npz")) == pair_id
    assert out.read_text().startswith(f"# particle-vae infer pair {pair_id}")
    assert check_pair(out) is None
    arrays = load_pair_npz(out)
    assert PAIR_ID_KEY not in arrays and arrays["z_mean"].shape == (N, 2)
    assert temporaries(tmp_path) == []
    # a rerun writes a new pair under a new id
    assert infer(trained, out, "--overwrite") == 0
    assert star_pair_id(out) == npz_pair_id(out.with_suffix(".npz")) != pair_id


@pytest.mark.parametrize("point", ["savez", "fsync", "replace_.npz", "replace_.star"])
def test_a_killed_infer_leaves_the_old_pair_or_a_mismatch_the_readers_refuse(trained, tmp_path, capsys, point):
    """Killed while writing the .npz, after writing both temporaries, before the first rename:
    the old pair, byte for byte. Killed between the renames: the old STAR (intact) beside the new .npz,
    which check_pair, analyze and info recognise. Never a new STAR beside an old .npz."""
    out, npz = tmp_path / "poses.star", tmp_path / "poses.npz"
    assert infer(trained, out) == 0
    old_star, old_npz, old_id = out.read_bytes(), npz.read_bytes(), star_pair_id(out)
    killed_infer(point, trained, out)
    assert out.read_bytes() == old_star  # the STAR is renamed last: a kill never leaves a new one
    if point != "replace_.star":
        assert npz.read_bytes() == old_npz
        assert check_pair(out) is None
    else:
        new_id = npz_pair_id(npz)
        assert new_id is not None and new_id != old_id
        with pytest.raises(InputFileError) as refused:
            check_pair(out)
        assert "\n" not in str(refused.value) and "poses.npz" in str(refused.value) and "rerun particle-vae infer" in str(refused.value)
        with pytest.raises(InputFileError):
            load_pair_npz(out)
        capsys.readouterr()
        assert cli.main(["-q", "analyze", str(out), "--out", str(tmp_path / "analysis"), "--no-images", "--k", "2"]) == 2
        line = one_error_line(capsys)
        assert "poses.star" in line and "does not belong with poses.npz" in line
        assert not (tmp_path / "analysis").exists()
        from particle_vae.commands.info import format_summary, summarize

        assert "does not belong with poses.npz" in format_summary(summarize(out, sample=0))
        try:
            from napari_particle_vae.run_data import open_particle_run
        except ImportError:  # the plugin is not installed
            open_particle_run = None
        if open_particle_run is not None:
            with pytest.raises(InputFileError, match="does not belong with poses.npz"):
                open_particle_run(out)
    # what the killed process left: the temporaries it had written and not yet renamed
    expected = {"savez": [".poses.npz"], "fsync": [".poses.npz", ".poses.star"], "replace_.npz": [".poses.npz", ".poses.star"],
                "replace_.star": [".poses.star"]}[point]
    assert [name.rsplit(".", 2)[0] for name in temporaries(tmp_path)] == expected
    # the next infer of the same output removes what the killed one left, and writes a new pair
    assert infer(trained, out, "--overwrite") == 0
    assert temporaries(tmp_path) == []
    assert check_pair(out) is None and star_pair_id(out) not in (None, old_id)


def test_a_first_infer_killed_between_the_renames_leaves_no_star(trained, tmp_path):
    """With no earlier output, a kill between the renames leaves the .npz alone: never a STAR without its .npz."""
    out = tmp_path / "poses.star"
    killed_infer("replace_.star", trained, out)
    assert not out.exists() and (tmp_path / "poses.npz").exists()


def test_a_star_without_its_npz_warns_in_analyze_and_refuses_a_loader(trained, tmp_path, capsys):
    out = tmp_path / "poses.star"
    assert infer(trained, out) == 0
    (tmp_path / "poses.npz").unlink()
    with pytest.raises(InputFileError, match="poses.npz"):
        load_pair_npz(out)
    message = check_pair(out, allow_missing_npz=True)
    assert message is not None and "\n" not in message and "poses.npz" in message
    capsys.readouterr()
    assert cli.main(["-q", "analyze", str(out), "--out", str(tmp_path / "analysis"), "--no-images", "--k", "2"]) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if "poses.npz" in line]
    assert len(warnings) == 1 and "WARNING" in warnings[0]


def test_a_star_written_over_by_another_command_no_longer_pairs_with_the_npz(trained, tmp_path):
    """A STAR without a pair id (select, the plugin's export, an older version) beside an .npz that has one: refused."""
    out = tmp_path / "poses.star"
    assert infer(trained, out) == 0
    text = out.read_text()
    out.write_text(text[text.index("\n") + 1:])  # the same table without the pair line
    with pytest.raises(InputFileError, match="does not belong"):
        check_pair(out)


def test_stale_temporaries_of_ended_processes_are_removed_at_the_next_start(trained, tmp_path):
    """infer and train --resume remove the temporaries of their outputs left by processes that have
    ended; a live process's, and files that only look alike, are kept."""
    out = tmp_path / "poses.star"
    gone = dead_pid()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        stale = [tmp_path / f".poses.star.{gone}.tmp", tmp_path / f".poses.npz.{gone}.tmp"]
        kept = [tmp_path / f".poses.npz.{live.pid}.tmp",  # another infer still writing
                tmp_path / ".poses.star.notes.tmp", tmp_path / f".other.star.{gone}.tmp", tmp_path / f"poses.star.{gone}.tmp"]
        for path in stale + kept:
            path.write_bytes(b"partial")
        assert infer(trained, out) == 0
        assert not any(path.exists() for path in stale)
        assert all(path.exists() for path in kept)

        run = tmp_path / "run"
        import shutil

        shutil.copytree(trained, run)
        checkpoint_stale = [run / "checkpoints" / f".last.pt.{gone}.tmp", run / "checkpoints" / f".best.pt.{gone}.tmp",
                            run / f".config.json.{gone}.tmp"]
        checkpoint_live = run / "checkpoints" / f".last.pt.{live.pid}.tmp"
        for path in (*checkpoint_stale, checkpoint_live):
            path.write_bytes(b"partial")
        assert cli.main(["-q", "train", "--out", str(run), "--resume", "--epochs", "2"]) == 0
        assert not any(path.exists() for path in checkpoint_stale)
        assert checkpoint_live.exists()
    finally:
        live.kill()
        live.wait()


def test_a_reused_pid_does_not_keep_an_older_temporary(tmp_path, unavailable):
    """A file last written before its pid's process started was written by an earlier process with that id."""
    if not Path("/proc/self/stat").exists():  # elsewhere the start time is unknown and every such file is kept
        unavailable("needs Linux /proc for process start times")
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        time.sleep(0.2)
        path = tmp_path / f".x.star.{live.pid}.tmp"
        path.write_bytes(b"partial")
        assert not writer_has_ended(live.pid, path.stat().st_mtime)
        assert remove_stale_temporaries(tmp_path / "x.star") == []
        an_hour_ago = time.time() - 3600
        os.utime(path, (an_hour_ago, an_hour_ago))
        assert writer_has_ended(live.pid, an_hour_ago)
        assert remove_stale_temporaries(tmp_path / "x.star") == [path]
    finally:
        live.kill()
        live.wait()
    assert not writer_has_ended(os.getpid(), 0.0)  # this process's own temporaries are never stale
