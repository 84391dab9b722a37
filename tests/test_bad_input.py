"""Bad input a new user may give (issue 15, point 2): each case is one row of a table.

Every case runs the command line in-process and checks the exit code, that stderr
holds exactly the expected number of lines (one for an error: the project's
one-line message), no traceback, the words the message must contain, and that
every input file is byte-identical afterwards.
"""

from __future__ import annotations

import gzip
import hashlib
import shutil
from pathlib import Path

import numpy as np
import pytest

from particle_vae import cli
from particle_vae.engine.run import RunDirectory
from particle_vae.io.mrc import HEADER_DTYPE_LE, write_stack
from particle_vae.io.star import ParticleStar, image_name, make_particle_star, write_star

# the tiny training settings of tests/test_train.py
TINY = ["--preset", "tiny", "--fields", "4", "--gen-hidden", "32", "--fourier-features", "16", "--group", "4",
        "--downsample-to", "24", "--batch-size", "16", "--seed", "3"]
N, BOX, APIX = 20, 24, 2.0


def write_inputs(folder: Path, pixel_size: float | None = APIX) -> Path:
    """A 20-particle stack and its RELION 3.1 STAR (with CTF columns) in ``folder``; returns the STAR."""
    folder.mkdir(parents=True, exist_ok=True)
    images = np.random.default_rng(0).normal(size=(N, BOX, BOX)).astype(np.float32)
    write_stack(folder / "p.mrcs", images, pixel_size, overwrite=True)
    columns = {"rlnDefocusU": np.full(N, 15000.0), "rlnDefocusV": np.full(N, 14000.0), "rlnDefocusAngle": np.full(N, 10.0),
               "pvaeZ1": np.linspace(-2, 2, N), "pvaeZ2": np.linspace(1, 3, N)}
    star = make_particle_star([image_name(i, "p.mrcs") for i in range(N)], pixel_size or 1.0, BOX, columns=columns)
    return star.write(folder / "p.star", overwrite=True)


def edit_text(path: Path, old: str, new: str, count: int = 1) -> None:
    text = path.read_text()
    assert old in text, old
    path.write_text(text.replace(old, new, count))


def hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def trained(tmp_path_factory, single_thread):
    """A one-epoch tiny run and the STAR its infer wrote (copied by the cases that change them)."""
    root = tmp_path_factory.mktemp("trained")
    star = write_inputs(root / "in")
    run = root / "run"
    assert cli.main(["-q", "train", str(star), *TINY, "--epochs", "1", "--out", str(run)]) == 0
    assert cli.main(["-q", "infer", str(run), "--out", str(root / "poses.star")]) == 0
    return run, root / "poses.star"


# --------------------------------------------------------------------------- the cases
# Each builds its inputs under ``tmp / "in"`` (hashed before and after) and returns the command line.


def pixel_size_in_star(value: str, command: str):
    def build(tmp, trained):
        star = write_inputs(tmp / "in")
        edit_text(star, f" {APIX} {BOX} 2\n", f" {value} {BOX} 2\n")  # the optics row: ... pixel size, box, dimensionality
        if command == "info":
            return ["info", str(star)]
        if command == "infer":
            return ["infer", str(trained[0]), "--particles", str(star), "--out", str(tmp / "out.star")]
        return ["train", str(star), *TINY, "--epochs", "1", "--out", str(tmp / "run")]
    return build


def missing_field(command: str):
    def build(tmp, trained):
        star = write_inputs(tmp / "in")
        text = star.read_text()
        line = next(i for i, row in enumerate(text.splitlines(), 1) if row.startswith("000003@"))
        build.line = line
        edit_text(star, "000003@p.mrcs 1 15000.0 14000.0 10.0 ", "000003@p.mrcs 1 15000.0 14000.0 ")  # no rlnDefocusAngle
        if command == "train --ctf":
            return ["train", str(star), *TINY, "--ctf", "--epochs", "1", "--out", str(tmp / "run")]
        return [command, str(star)]
    return build


def nan_defocus(tmp, trained):
    star = write_inputs(tmp / "in")
    edit_text(star, "000003@p.mrcs 1 15000.0 14000.0 10.0 ", "000003@p.mrcs 1 15000.0 14000.0 nan ")
    return ["train", str(star), *TINY, "--ctf", "--epochs", "1", "--out", str(tmp / "run")]


def encoded(kind: str):
    def build(tmp, trained):
        star = write_inputs(tmp / "in")
        text = star.read_bytes()
        if kind == "latin-1 comment":
            star.write_bytes(b"# written on a caf\xe9 laptop\n" + text)
        elif kind == "utf-16":
            star.write_bytes(text.decode().encode("utf-16"))
        elif kind == "gzip":
            star.write_bytes(gzip.compress(text))
        return ["info", str(star)]
    return build


def no_pixel_size(tmp, trained):
    star = write_inputs(tmp / "in", pixel_size=None)
    stack = tmp / "in" / "p.mrcs"
    raw = bytearray(stack.read_bytes())
    header = np.frombuffer(bytes(raw[:1024]), dtype=HEADER_DTYPE_LE).copy()
    header["cella"] = 0  # no pixel size in the MRC header either
    raw[:1024] = header.tobytes()
    stack.write_bytes(bytes(raw))
    table = ParticleStar(star).particles.drop(columns=["rlnOpticsGroup"])
    write_star(star, {"particles": table}, overwrite=True)  # RELION 3.0: no optics block, no pixel size
    return ["train", str(star), *TINY, "--epochs", "1", "--out", str(tmp / "run")]


def unwritable(command: str):
    def build(tmp, trained):
        star = write_inputs(tmp / "in")
        blocker = tmp / "not_a_folder"
        blocker.write_text("a file where the output's folder should be\n")
        if command == "train":
            return ["train", str(star), *TINY, "--epochs", "1", "--out", str(blocker / "run")]
        if command == "infer":
            return ["infer", str(trained[0]), "--out", str(blocker / "poses.star")]
        return ["select", str(star), "--box", "-5", "5", "-5", "5", "--out", str(blocker / "subset.star")]
    return build


def bad_option(*options: str):
    def build(tmp, trained):
        star = write_inputs(tmp / "in")
        return ["train", str(star), *TINY, "--epochs", "1", *options, "--out", str(tmp / "run")]
    return build


def copy_of_run(tmp, trained) -> Path:
    run = tmp / "in" / "run"
    shutil.copytree(trained[0], run)
    return run


def before_first_epoch(rerun: str):
    def build(tmp, trained):
        run = RunDirectory(copy_of_run(tmp, trained))
        for path in (run.last_checkpoint, run.best_checkpoint, run.metrics_path):  # as when killed in epoch 1
            path.unlink()
        config = run.read_config()
        if rerun == "resume":
            return ["train", "--out", str(run.path), "--resume"]
        return ["train", config["data"]["path"], *TINY, "--epochs", "1", "--out", str(run.path)]
    return build


def torn_metrics(command: str):
    def build(tmp, trained):
        run = copy_of_run(tmp, trained)
        metrics = run / "metrics.jsonl"
        whole = metrics.read_bytes()
        metrics.write_bytes(whole + whole[: len(whole) // 2])  # a second line cut off mid-write
        if command == "analyze":
            return ["analyze", str(trained[1]), "--run", str(run), "--k", "2", "--gallery", "2", "--out", str(tmp / "analysis")]
        shutil.copytree(run, tmp / "resumed")
        return ["train", "--out", str(tmp / "resumed"), "--resume", "--epochs", "2"]
    return build


def negative_box(tmp, trained):
    star = write_inputs(tmp / "in")
    return ["select", str(star), "--box", "-1e9", "1e9", "-1E+9", "1e9", "--out", str(tmp / "subset.star")]


CASES = [
    # id, build, exit code, stderr lines, words in stderr
    ("star pixel size 0 (info)", pixel_size_in_star("0", "info"), 2, 1, ["p.star", "optics group 1", "rlnImagePixelSize 0"]),
    ("star pixel size negative (train)", pixel_size_in_star("-1.5", "train"), 2, 1, ["p.star", "optics group 1", "-1.5"]),
    ("star pixel size 0 (infer --particles)", pixel_size_in_star("0.0", "infer"), 2, 1, ["p.star", "optics group 1"]),
    ("missing field (info)", missing_field("info"), 2, 1, ["p.star", "line {line}", "6 value(s)", "7 column(s)"]),
    ("missing field (train --ctf)", missing_field("train --ctf"), 2, 1, ["p.star", "line {line}"]),
    ("nan rlnDefocusAngle (train --ctf)", nan_defocus, 2, 1, ["p.star", "particle 3", "rlnDefocusAngle nan"]),
    ("non-UTF-8 byte in a comment", encoded("latin-1 comment"), 2, 1, ["p.star", "line 1", "not UTF-8", "0xe9"]),
    ("UTF-16 STAR", encoded("utf-16"), 2, 1, ["p.star", "UTF-16"]),
    ("gzip renamed .star", encoded("gzip"), 2, 1, ["p.star", "gzip-compressed", "decompress"]),
    ("no pixel size anywhere (train)", no_pixel_size, 2, 1, ["p.star", "pixel size is unknown", "--pixel-size"]),
    ("unwritable output (train)", unwritable("train"), 2, 1, ["not_a_folder is a file, not a folder"]),
    ("unwritable output (infer)", unwritable("infer"), 2, 1, ["not_a_folder is a file, not a folder"]),
    ("unwritable output (select)", unwritable("select"), 2, 1, ["not_a_folder is a file, not a folder"]),
    ("--batch-size 0", bad_option("--batch-size", "0"), 2, 1, ["--batch-size 0", "at least 1"]),
    ("--lr -1", bad_option("--lr", "-1"), 2, 1, ["--lr -1", "positive"]),
    ("--epochs 0", bad_option("--epochs", "0"), 2, 1, ["--epochs 0"]),
    ("--epochs -3", bad_option("--epochs", "-3"), 2, 1, ["--epochs -3"]),
    ("--resume before the first epoch ended", before_first_epoch("resume"), 2, 1, ["no checkpoint yet", "--overwrite"]),
    ("rerun over a run without a checkpoint", before_first_epoch("again"), 2, 1, ["without a checkpoint", "--overwrite"]),
    ("torn metrics line (train --resume)", torn_metrics("train"), 0, 1, ["metrics.jsonl", "cut off"]),
    ("torn metrics line (analyze --run)", torn_metrics("analyze"), 0, 1, ["metrics.jsonl", "cut off"]),
    ("select --box -1e9 1e9", negative_box, 0, 0, []),
]


@pytest.mark.parametrize("build, code, lines, words", [case[1:] for case in CASES], ids=[case[0] for case in CASES])
def test_bad_input_gives_one_line_and_leaves_inputs_alone(build, code, lines, words, trained, tmp_path, capsys):
    argv = build(tmp_path, trained)
    inputs = hashes(tmp_path / "in"), hashes(trained[0].parent)
    capsys.readouterr()
    assert cli.main(["-q", *argv]) == code
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == lines, err
    for word in words:
        assert word.format(line=getattr(build, "line", None)) in err, (word, err)
    assert (hashes(tmp_path / "in"), hashes(trained[0].parent)) == inputs


def test_refused_options_leave_nothing_so_the_corrected_rerun_works(trained, tmp_path):
    star = write_inputs(tmp_path / "in")
    run = tmp_path / "run"
    assert cli.main(["-q", "train", str(star), *TINY, "--batch-size", "0", "--out", str(run)]) == 2
    assert not run.exists()
    assert cli.main(["-q", "train", str(star), *TINY, "--epochs", "1", "--out", str(run)]) == 0
    assert cli.main(["-q", "train", "--out", str(run), "--resume", "--lr", "-1"]) == 2
    assert [row["epoch"] for row in RunDirectory(run).read_metrics()] == [0]


def test_info_says_plainly_that_the_pixel_size_is_unknown(tmp_path, capsys):
    no_pixel_size(tmp_path, None)
    assert cli.main(["info", str(tmp_path / "in" / "p.star"), "--sample", "0"]) == 0
    line = next(row for row in capsys.readouterr().out.splitlines() if "pixel size" in row)
    assert "unknown" in line and "MRC header" in line and "--pixel-size" in line


def test_torn_metrics_line_is_dropped_and_resume_rewrites_the_file(trained, tmp_path):
    torn_metrics("train")(tmp_path, trained)
    run = RunDirectory(tmp_path / "resumed")
    assert [row["epoch"] for row in run.read_metrics()] == [0]
    assert cli.main(["-q", "train", "--out", str(run.path), "--resume", "--epochs", "2"]) == 0
    assert [row["epoch"] for row in run.read_metrics()] == [0, 1]
    assert all(line.endswith("}") for line in run.metrics_path.read_text().splitlines())


def test_damaged_metrics_line_before_the_last_is_an_error(tmp_path):
    from particle_vae.errors import ParticleVAEError

    run = RunDirectory(tmp_path)
    run.metrics_path.write_text('{"epoch": 0}\n{"epo\n{"epoch": 1}\n')
    with pytest.raises(ParticleVAEError, match="line 2"):
        run.read_metrics()


def test_select_box_takes_negative_numbers_in_any_notation(tmp_path):
    star = write_inputs(tmp_path / "in")
    out = tmp_path / "subset.star"
    assert cli.main(["-q", "select", str(star), "--box", "-1e9", "1e9", "-2.5e0", "2.5", "--out", str(out)]) == 0
    assert ParticleStar(out).particles["pvaeZ2"].max() <= 2.5 and len(ParticleStar(out)) < N
