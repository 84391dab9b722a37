"""What a new user tripped on (issue 15, point 5): help layout and defaults, the
stack-folder option, `info` on RELION 3.0 STARs, the mixed-box message,
`analyze --k auto` answering "one population" with its confidence, the training
curves' epoch numbers and KL legend, and machine-specific paths in the docs."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from particle_vae import cli
from particle_vae.analysis import clustering
from particle_vae.io.mrc import write_stack
from particle_vae.io.star import image_name, make_particle_star

REPO = Path(__file__).resolve().parents[1]
PFCRT = "FinalRefinement-OriginalParticles-PfCRT"  # a real RELION 3.0.6 STAR (data_images, no optics block), no images


def help_text(name: str, capsys, monkeypatch) -> str:
    monkeypatch.setenv("COLUMNS", "100")
    with pytest.raises(SystemExit) as exit_info:
        cli.main([name, "--help"])
    assert exit_info.value.code == 0
    return capsys.readouterr().out


def listed_arguments(text: str) -> dict[str, tuple[list[str], bool, str]]:
    """The arguments a ``--help`` text lists, in its sections after the description:
    the first long option (or the positional's name) -> (its option strings, whether
    it takes a value, its help text on one line)."""
    body = re.split(r"^(?:positional arguments|options|optional arguments):$", text, maxsplit=1, flags=re.M)[1]
    listed, current = {}, None
    for line in body.splitlines():
        entry = re.match(r"^  (\S.*?)(?:\s{2,}(\S.*))?$", line)
        if entry:  # "  --out OUT, -o OUT   help" (Python 3.13: "  -o, --out OUT   help"), "  input   help"
            forms = [form.split() for form in entry.group(1).split(", ")]
            names = [form[0] for form in forms]
            key = next((name for name in names if name.startswith("--")), names[0])
            current = listed[key] = (names, any(len(form) > 1 for form in forms), [entry.group(2) or ""])
        elif current is not None and line.startswith("   ") and line.strip():  # the help's next line
            current[2].append(line.strip())
        else:
            current = None
    return {key: (names, value, " ".join(part for part in shown if part)) for key, (names, value, shown) in listed.items()}


def required_options(text: str) -> set[str]:
    """The options the usage line of a ``--help`` text shows outside brackets (the required ones)."""
    usage, depth, kept = text.split("\n\n")[0], 0, []
    for char in usage:
        depth += {"[": 1, "]": -1}.get(char, 0)
        if depth == 0 and char not in "[]":
            kept.append(char)
    return {word for word in "".join(kept).split() if word.startswith("-")}


# --------------------------------------------------------------------------- help


def test_every_command_uses_the_one_help_formatter():
    parsers = cli.command_parsers()
    assert list(parsers) == list(cli.COMMANDS)
    for name, parser in parsers.items():
        assert parser.formatter_class is cli.HelpFormatter, name


@pytest.mark.parametrize("name", ["train", "infer", "cache", "select", "analyze"])
def test_help_keeps_each_example_on_its_own_line(name, capsys, monkeypatch):
    import importlib

    module = importlib.import_module(f"particle_vae.commands.{cli.COMMANDS[name][0]}")
    examples = [line.rstrip() for line in module.__doc__.splitlines() if line.startswith("  ") and line.strip()]
    assert examples, f"{name}'s docstring has no indented example lines"
    lines = help_text(name, capsys, monkeypatch).splitlines()
    for example in examples:
        assert example in lines, f"{name} --help ran this line into another: {example!r}"


def test_help_reflows_prose_to_the_terminal_width(capsys, monkeypatch):
    out = help_text("infer", capsys, monkeypatch)
    description = out.split("positional arguments:")[0]
    prose = [line for line in description.splitlines() if line and not line.startswith(" ") and not line.startswith("usage")]
    assert prose and max(len(line) for line in prose) <= 100


def test_every_option_has_help_and_shows_its_default(capsys, monkeypatch):
    for name, parser in cli.command_parsers().items():
        text = help_text(name, capsys, monkeypatch)
        listed, required = listed_arguments(text), required_options(text)
        assert "--help" in listed and "--datadir" not in listed, name  # the old spelling is accepted but not shown
        for key, (names, takes_value, shown) in listed.items():
            assert shown, f"{name} {key} has no help text"
            if not key.startswith("-") or not takes_value or required & set(names):
                continue  # positionals, flags and required options have no default to show
            assert "(default: " in shown, f"{name} {key} does not show its default: {shown!r}"
            default = parser.get_default(key.lstrip("-").replace("-", "_"))
            if default is not None:
                assert f"(default: {default}" in shown, (name, key, shown)


def test_help_parsing_sees_flags_values_and_required_options(capsys, monkeypatch):
    text = help_text("train", capsys, monkeypatch)
    listed = listed_arguments(text)
    assert listed["--out"][:2] == (["--out", "-o"], True) or listed["--out"][:2] == (["-o", "--out"], True)
    assert listed["--resume"][1] is False and listed["--epochs"][1] is True and "input" in listed
    assert listed["--gpus"][2].endswith("(default: one process, no torchrun)")
    assert required_options(text) == {"--out"}


def test_train_options_show_the_training_defaults_and_presets(capsys, monkeypatch):
    from particle_vae.engine.presets import TRAINING_PRESETS
    from particle_vae.engine.trainer import TrainSettings

    shown = {key: text for key, (_, _, text) in listed_arguments(help_text("train", capsys, monkeypatch)).items()}
    defaults = TrainSettings()
    for dest in ("epochs", "batch_size", "lr", "val_fraction", "lr_patience", "early_stop_patience", "seed", "num_workers"):
        option = "--workers" if dest == "num_workers" else "--" + dest.replace("_", "-")
        value = getattr(defaults, dest)
        assert f"(default: {value:g}" in shown[option], (option, shown[option])
    assert f"tiny {TRAINING_PRESETS['tiny']['train']['batch_size']}" in shown["--batch-size"]
    assert f"tiny {TRAINING_PRESETS['tiny']['train']['lr']:g}" in shown["--lr"]


# --------------------------------------------------------------------------- --stack-dir


@pytest.fixture()
def relion30_project(cryoem_dir, tmp_path) -> tuple[Path, Path]:
    """The real RELION 3.0.6 STAR in a folder of its own and, elsewhere, a stack with its 5 images
    (the STAR names them Extract/job012/...mrcs, so they are found only with --stack-dir)."""
    star = tmp_path / "star" / f"{PFCRT}.star"
    star.parent.mkdir()
    shutil.copy(cryoem_dir / "formats" / f"{PFCRT}.star", star)
    stacks = tmp_path / "stacks"
    stacks.mkdir()
    images = np.random.default_rng(0).normal(size=(5, 16, 16)).astype(np.float32)
    write_stack(stacks / f"{PFCRT}.mrcs", images, 1.035)
    return star, stacks


def test_stack_dir_finds_the_stacks_and_old_datadir_still_works(relion30_project, capsys, monkeypatch):
    star, stacks = relion30_project
    assert cli.main(["info", "--json", "--sample", "0", str(star)]) == 2
    assert "--stack-dir" in capsys.readouterr().err
    assert cli.main(["info", "--json", "--sample", "0", "--stack-dir", str(stacks), str(star)]) == 0
    new = json.loads(capsys.readouterr().out)
    assert cli.main(["info", "--json", "--sample", "0", "--datadir", str(stacks), str(star)]) == 0
    assert json.loads(capsys.readouterr().out) == new and new["particles"] == 5
    for name in ("info", "train", "infer", "cache", "analyze", "select"):
        out = help_text(name, capsys, monkeypatch)
        assert "--stack-dir FOLDER" in out and "--datadir" not in out, name


def test_relaunch_keeps_the_old_stack_folder_spelling_working(tmp_path):
    from particle_vae.engine.launch import launch_argv

    parser = cli.build_parser(only="train")
    argv = launch_argv(["train", "p.star", "--out", str(tmp_path / "run"), "--datadir", str(tmp_path), "--gpus", "2"], device="auto")
    again = parser.parse_args(argv)
    assert again.stack_dir == tmp_path and again.gpus is None and again.device == "auto"


def test_relaunch_parses_the_words_again_with_the_models_options(tmp_path):
    """A launch parses the user's words again, less the launch options, with the train parser of the first parse."""
    from particle_vae.engine.launch import launch_argv

    user = ["-q", "train", "p.star", "--model", "mce-vae", "--dec-layers", "3", "--gen-hidden", "16", "--gpus", "2",
            "--out", str(tmp_path / "run")]
    _, args = cli.parse_command_line(user)
    again_argv = launch_argv(user, device="auto")
    again = args._launch_parser.parse_args(again_argv[again_argv.index("train") + 1:])
    assert (again.model, again.model_dec_layers, again.model_dec_hidden, again.gpus, again.device) == ("mce-vae", 3, 16, None, "auto")
    assert cli.parse_command_line(again_argv)[1].model_dec_layers == 3  # and so does the process started with them


# --------------------------------------------------------------------------- info and the mixed-box error


def test_info_names_the_blocks_of_relion30_and_31_stars(relion30_project, cryoem_dir, tmp_path, capsys):
    star, stacks = relion30_project
    assert cli.main(["info", "--sample", "0", "--stack-dir", str(stacks), str(star)]) == 0
    out = capsys.readouterr().out
    assert "blocks          data_images (5 particles); no optics block (RELION 3.0 layout" in out
    assert "0 optics group" not in out and "1.035 A" in out
    assert cli.main(["info", "--json", "--sample", "0", "--stack-dir", str(stacks), str(star)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["optics_groups"] is None and summary["particles_block"] == "images" and summary["optics_block"] is None
    # RELION 3.0 files often have an unnamed block: "data_" on its own
    toy = cryoem_dir / "toy_projections"
    shutil.copy(toy / "toy_projections.mrcs", tmp_path / "toy_projections.mrcs")
    unnamed = tmp_path / "unnamed.star"
    text = (toy / "toy_projections.star").read_text()
    assert "\ndata_images\n" in text
    unnamed.write_text(text.replace("\ndata_images\n", "\ndata_\n"))
    assert cli.main(["info", "--sample", "0", str(unnamed)]) == 0
    out = capsys.readouterr().out
    assert "blocks          data_ (1000 particles); no optics block" in out and "0 optics group" not in out
    assert cli.main(["info", "--sample", "0", str(cryoem_dir / "relion31" / "relion31.star")]) == 0
    assert "blocks          data_optics (1 optics group), data_particles (5 particles)\n" in capsys.readouterr().out


def test_mixed_box_error_counts_the_other_stacks(cryoem_dir, tmp_path, capsys):
    small = cryoem_dir / "toy_projections" / "toy_projections.mrcs"  # 30 px
    big = cryoem_dir / "relion31" / "relion31.mrcs"  # 256 px
    two = tmp_path / "two.txt"
    two.write_text(f"{small}\n{big}\n")
    assert cli.main(["info", str(two)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err
    assert f"images are 256x256 px but two.txt's stack {small} holds 30x30 px images" in err and "other" not in err
    shutil.copy(small, tmp_path / "small_copy.mrcs")
    three = tmp_path / "three.txt"
    three.write_text(f"{small}\n{big}\n{tmp_path / 'small_copy.mrcs'}\n")
    assert cli.main(["info", str(three)]) == 2
    assert f"but three.txt's stack {small} and 1 other(s) hold 30x30 px images" in capsys.readouterr().err


# --------------------------------------------------------------------------- analyze --k auto


def one_cloud(n: int, seed: int = 0) -> np.ndarray:
    """Latent means of one population: an elongated, tilted Gaussian cloud (as a VAE's are)."""
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 2)) @ np.array([[0.5, 0.0], [-0.2, 0.4]]) + [0.25, 0.5]


def two_clouds(n: int, seed: int = 0) -> np.ndarray:
    """Two populations 6 standard deviations apart."""
    rng = np.random.default_rng(seed)
    return np.concatenate([rng.normal(0, 0.5, (n // 2, 2)), rng.normal(0, 0.5, (n - n // 2, 2)) + [3.0, 0.0]])


@pytest.mark.parametrize("n", [60, 1000, 20000])
def test_gap_test_keeps_one_population_and_finds_two_at_any_size(n):
    one = clustering.gap_test(one_cloud(n), seed=1)
    assert one.one_population and one.z <= 0, one
    assert one.particles == min(n, clustering.SILHOUETTE_SAMPLE)
    two = clustering.gap_test(two_clouds(n), seed=1)
    assert not two.one_population and two.z > 1, two


@pytest.mark.parametrize("method", ["kmeans", "ward", "gmm"])
def test_k_auto_answers_one_population_and_says_how_sure(method):
    selection = clustering.suggest_k(one_cloud(1000), method)
    assert selection.k == 1 and selection.caution is None
    assert selection.strength in ("strong", "very strong") and selection.evidence
    assert selection.single_population is not None
    if method == "gmm":
        assert sum(selection.probabilities.values()) == pytest.approx(1.0)
        assert selection.single_population["p_one_population"] == pytest.approx(selection.probabilities[1]) and selection.probabilities[1] > 0.9
    else:
        assert selection.single_population["one_population"] is True
    two = clustering.suggest_k(two_clouds(1000), method)
    assert two.k == 2 and two.caution is None and two.strength in ("reasonable", "strong", "very strong"), two.evidence


def test_k_auto_without_k1_cautions_when_the_clusters_overlap():
    selection = clustering.suggest_k(one_cloud(1000), "kmeans", (2, 6))
    assert selection.k >= 2 and selection.strength in ("weak", "none") and selection.single_population is None
    assert "not tested" in selection.caution


def latent_star(tmp_path: Path, z: np.ndarray) -> Path:
    star = make_particle_star([image_name(i, "absent.mrcs") for i in range(len(z))], 1.0, 16,
                              columns={"pvaeZ1": z[:, 0], "pvaeZ2": z[:, 1]})
    return star.write(tmp_path / "latents.star")


def test_analyze_writes_the_confidence_of_k_in_log_and_record(tmp_path, capsys):
    star = latent_star(tmp_path, one_cloud(1000))
    assert cli.main(["analyze", str(star), "--no-images", "--out", str(tmp_path / "one")]) == 0
    log_text = capsys.readouterr().err
    assert "suggested k = 1 (evidence strong): gap statistic z = " in log_text
    record = json.loads((tmp_path / "one" / "analysis.json").read_text())
    assert record["k"] == 1 and [c["count"] for c in record["classes"]] == [1000]
    confidence = record["k_confidence"]
    assert confidence["strength"] == "strong" and confidence["caution"] is None
    assert confidence["single_population"]["test"] == "gap statistic" and confidence["single_population"]["one_population"]
    # a range without k = 1 on the same cloud: the weak split is flagged in the log and the record
    assert cli.main(["analyze", str(star), "--no-images", "--k-range", "2", "4", "--out", str(tmp_path / "forced")]) == 0
    assert re.search(r"WARNING k = \d is uncertain: the clusters overlap", capsys.readouterr().err)
    assert "not tested" in json.loads((tmp_path / "forced" / "analysis.json").read_text())["k_confidence"]["caution"]
    # a given k records no selection
    assert cli.main(["-q", "analyze", str(star), "--no-images", "--k", "2", "--out", str(tmp_path / "given")]) == 0
    assert json.loads((tmp_path / "given" / "analysis.json").read_text())["k_confidence"] is None


# --------------------------------------------------------------------------- training curves


def test_training_curves_count_epochs_from_one_and_explain_the_kl_terms(tmp_path):
    from particle_vae.analysis.plots import KL_TERMS, plot_training_curves, training_curves_figure

    # rows as the trainer writes them to metrics.jsonl: epoch 0-based, ELBO = -(recon + KL terms)
    rows = [{"epoch": epoch, "step": 10 * (epoch + 1), "lr": 1e-3, "train_elbo": -100.0 + epoch, "val_elbo": -99.0 + epoch,
             "train_recon": 90.0 - epoch, "train_kl_pose": 2.0, "train_kl_theta": 3.0, "train_kl_z": 4.0,
             "train_kl_offset": 1.0} for epoch in range(3)]
    fig, frame = training_curves_figure(rows)
    elbo, kl, _ = fig.axes
    assert list(elbo.lines[0].get_xdata()) == [1, 2, 3] and frame["epoch"].tolist() == [1, 2, 3]
    assert all("train.log" in ax.get_xlabel() for ax in fig.axes)
    labels = kl.get_legend_handles_labels()[1]
    assert labels == [f"{term}: {KL_TERMS[term]}" for term in ("kl_pose", "kl_theta", "kl_z", "kl_offset")]
    png, csv = plot_training_curves(rows, tmp_path / "curves.png", tmp_path / "curves.csv")
    assert png.read_bytes().startswith(b"\x89PNG") and csv.read_text().splitlines()[1].startswith("1,")


# --------------------------------------------------------------------------- docs


def test_docs_hold_no_machine_specific_paths():
    pattern = re.compile(r"(?<![\w.~])/(work|tmp|root|home)/")
    for path in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        for number, line in enumerate(path.read_text().splitlines(), 1):
            assert not pattern.search(line), f"{path.name}:{number}: {line.strip()}"


def test_readme_says_what_the_demo_time_depends_on():
    readme = (REPO / "README.md").read_text()
    assert "1-2 minutes" not in readme
    paragraph = readme[readme.index("How long the demo takes"):].split("\n\n")[0]
    for factor in ("cores", "busy", "pose", "--no-refine", "--epochs", "--n"):
        assert factor in paragraph, factor


def test_readme_test_command_is_what_ci_runs():
    """README's second set-up command is the line .ci/run runs, with CI=true (data-dependent tests fail, not skip)
    and ruff on the whole repository."""
    readme = (REPO / "README.md").read_text()
    commands = re.findall(r"```bash\n# [^\n]*\n([^\n]+)\n```", readme)
    assert len(commands) >= 2
    ci = (REPO / ".ci" / "run").read_text()
    assert commands[1] in ci.splitlines()
    assert "ruff check . && python -m pytest" in commands[1]
    assert re.search(r"^export CI=true$", ci[:ci.index(commands[1])], flags=re.M)
