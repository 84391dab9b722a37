"""The low-SNR benchmark continues a stopped RELION peer run from its last finished iteration.

A stand-in ``relion_refine`` (a small Python script on PATH) writes one optimiser and data file per
iteration, as RELION does; the first call stops after iteration 3 with an error, as a killed run
would leave it; the second call must be a ``--continue`` from iteration 3."""

from __future__ import annotations

import importlib.util
import json
import os
import stat
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "lowsnr_mixture.py"

FAKE_RELION = """#!{python}
import sys
from pathlib import Path
args = sys.argv[1:]
value = lambda name: args[args.index(name) + 1]
out, last = value("--o"), int(value("--iter"))
calls = Path(out).parent / "calls.txt"
with open(calls, "a") as handle:
    handle.write(" ".join(args) + "\\n")
start = int(value("--continue").rsplit("_it", 1)[1][:3]) + 1 if "--continue" in args else 0
stop_after = {stop}
for iteration in range(start, last + 1):
    for kind in ("optimiser", "data"):
        Path(f"{{out}}_it{{iteration:03d}}_{{kind}}.star").write_text("data_\\n")
    if stop_after is not None and iteration == stop_after and "--continue" not in args:
        sys.exit(1)
"""


def load_benchmark():
    spec = importlib.util.spec_from_file_location("lowsnr_mixture", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fake_relion(folder: Path, stop: int | None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "relion_refine"
    path.write_text(FAKE_RELION.format(python=sys.executable, stop=stop))
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


def test_a_stopped_peer_run_is_continued_and_its_pieces_are_summed(tmp_path, monkeypatch):
    bench = load_benchmark()
    sim, work = tmp_path / "sim", tmp_path / "relion_k10"
    sim.mkdir()
    (sim / "particles.mrcs").write_bytes(b"stack")
    fake_relion(tmp_path / "bin", stop=3)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    with pytest.raises(SystemExit):
        bench.run_relion(sim, work, 10, 8, 2)
    record = json.loads((work / "relion_run.json").read_text())
    assert len(record["pieces"]) == 1 and record["pieces"][0]["seconds"] is None and "timing" not in record
    assert bench.last_relion_iteration(work / "run") == 3

    timing, final = bench.run_relion(sim, work, 10, 8, 2)
    calls = (work / "calls.txt").read_text().splitlines()
    assert len(calls) == 2 and "--continue" not in calls[0]
    assert f"--continue {work / 'run'}_it003_optimiser.star" in calls[1] and "--iter 8" in calls[1]
    assert final == Path(f"{work / 'run'}_it008_data.star") and final.exists()
    record = json.loads((work / "relion_run.json").read_text())
    pieces = record["pieces"]
    assert [p["from_iteration"] for p in pieces] == [0, 3] and [p["to_iteration"] for p in pieces] == [3, 8]
    total = timing["relion_refine_k10"]
    assert total["pieces"] == 2 and total["cpu_seconds"] is None  # the killed piece's CPU time is unknown
    assert total["seconds"] == pytest.approx(sum(p["seconds"] for p in pieces), abs=0.11)

    # finished: the next benchmark run reuses it without starting RELION again
    again, _ = bench.run_relion(sim, work, 10, 8, 2)
    assert again == timing and len((work / "calls.txt").read_text().splitlines()) == 2
    # another stack: the stopped pieces of the old one are not continued
    (sim / "particles.mrcs").write_bytes(b"another stack")
    fake_relion(tmp_path / "bin", stop=None)
    bench.run_relion(sim, work, 10, 8, 2)
    assert "--continue" not in (work / "calls.txt").read_text().splitlines()[-1]
