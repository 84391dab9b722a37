"""The benchmark scripts run end to end at toy size (their real sizes are benchmarks, not tests)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import torch

from particle_vae.analysis.evaluate import evaluate_transformed_set, object_centre
from particle_vae.conventions import object_pose_to_model

SCRIPTS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_object_centre_inverts_the_generator_pose():
    alpha = np.array([0.3, -1.2])
    d = np.array([[2.0, -1.0], [0.5, 4.0]])
    theta, t = object_pose_to_model(alpha, d)
    np.testing.assert_allclose(object_centre(theta, t), d, atol=1e-12)


class OraclePose(torch.nn.Module):
    """A fake model whose readout is the true pose: scores must be perfect."""

    def __init__(self, theta, t, z):
        super().__init__()
        self.theta, self.t, self.z = theta, t, z
        self.calls = 0

    def readout(self, images):
        from particle_vae.models.base import Readout

        sl = slice(0, images.shape[0])
        if self.calls % 2 == 0:  # transformed images
            out = Readout(torch.as_tensor(self.theta[sl]), torch.as_tensor(self.t[sl]), torch.as_tensor(self.z[sl]), torch.ones(len(self.z[sl]), 2))
        else:  # canonical images: identity pose
            n = images.shape[0]
            out = Readout(torch.zeros(n), torch.zeros(n, 2), torch.as_tensor(self.z[sl]), torch.ones(n, 2))
        self.calls += 1
        return out


def test_evaluation_scores_an_oracle_perfectly():
    rng = np.random.default_rng(0)
    n = 60
    alpha, d = rng.uniform(0, 2 * np.pi, n), rng.normal(0, 3, (n, 2))
    labels = np.repeat(np.arange(3), 20)
    z = np.array([[0, 0], [9, 0], [0, 9]])[labels] + rng.normal(0, 0.1, (n, 2))
    theta, t = object_pose_to_model(alpha, d)
    model = OraclePose(theta, t, z)
    images = np.zeros((n, 4, 4), dtype=np.float32)
    scores = evaluate_transformed_set(model, images, images, alpha, d, labels)
    assert scores.rotation_correlation > 0.999 and scores.translation_correlation > 0.999
    assert scores.clustering_accuracy == 1.0


def test_mnist_benchmark_script_runs_at_toy_size(tmp_path, data_root):
    script = load_script("mnist_target_vs_vae")
    results = script.main(["--data-dir", str(data_root), "--out", str(tmp_path), "--n-train", "64", "--n-test", "40",
                           "--epochs", "1", "--fields", "4", "--gen-hidden", "16", "--fourier", "8", "--vae-hidden", "16",
                           "--device", "cpu"])
    assert set(results["models"]) == {"target-vae", "vae"}
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["models"]["target-vae"]["scores"]["n"] == 40
    assert "| target-vae |" in (tmp_path / "results.md").read_text()


def test_elbo_per_epoch_script_accumulates_settings_at_toy_size(tmp_path, data_root):
    script = load_script("elbo_per_epoch")
    out = tmp_path / "elbo.json"
    toy = ["--data-dir", str(data_root), "--out", str(out), "--n", "40", "--epochs", "2", "--batch-size", "10",
           "--fields", "4", "--gen-hidden", "16", "--fourier-features", "8"]
    fixed = script.main([*toy, "--label", "fixed"])
    trained = script.main([*toy, "--label", "trained", "--learnable-fourier", "--no-subpixel", "--extra-validation", "10",
                           "--leaky-relu-slope", "0.01"])
    assert [row["epoch"] for row in fixed["epochs"]] == [1, 2]
    assert all(row["val_elbo"] < 0 and row["train_elbo"] < 0 for row in fixed["epochs"] + trained["epochs"])
    assert "train_kl_offset" in fixed["epochs"][0] and "train_kl_offset" not in trained["epochs"][0]
    saved = json.loads(out.read_text())
    assert set(saved) == {"fixed", "trained"} and saved["trained"]["settings"]["extra_validation"] == 10
    assert "| 2 |" in script.table(saved) and saved["trained"]["settings"]["leaky_relu_slope"] == 0.01


def test_throughput_script_runs_at_toy_size():
    rows = load_script("throughput").main(["--configs", "particle-32", "--batch-size", "4", "--steps", "1", "--warmup", "0", "--device", "cpu"])
    assert rows[0]["train_images_per_s"] > 0 and rows[0]["infer_particles_per_s"] > 0 and rows[0]["peak_memory_mb"] > 0


def test_equivae_script_runs_at_toy_size(tmp_path, data_root):
    results = load_script("equivae_mnist").main(["--data-dir", str(data_root), "--out", str(tmp_path), "--labels", "10,-1",
                                                 "--n-train", "60", "--n-test", "30", "--epochs", "1", "--hidden", "16",
                                                 "--device", "cpu"])
    assert [row["labels"] for row in results["rows"]] == [10, 60]
    assert all(0 <= row["error_percent"] <= 100 for row in results["rows"])


def test_plot_curves_script(tmp_path):
    from particle_vae.engine.run import RunDirectory

    runs = []
    for name in ("a", "b"):
        run = RunDirectory(tmp_path / name)
        run.path.mkdir()
        run.write_metrics([{"epoch": 0, "val_recon": 10.0}, {"epoch": 1, "val_recon": 8.0}])
        runs.append(str(run.path))
    out = load_script("plot_curves").main([*runs, "--out", str(tmp_path / "c.png")])
    assert out.exists() and (tmp_path / "c.csv").read_text().count("\n") == 5


def test_paper_tables_script_runs_each_kind_of_table_at_toy_size(tmp_path, data_root):
    """Tables 3 (rotation sweep) and 4 (ablations, through the shared train-and-score path)."""
    script = load_script("paper_tables")
    toy = ["--data-dir", str(data_root), "--n-train", "48", "--n-test", "30", "--epochs", "1", "--fields", "4",
           "--gen-hidden", "16", "--fourier", "8", "--vae-hidden", "16", "--device", "cpu"]
    out = tmp_path / "table3.json"
    results = script.main(["--table", "3", "--out", str(out), "--rotations", "8", "--rotation-images", "12", *toy])
    rmse = results["rows"]["target-vae-p8"]["rotation_rmse"]
    assert rmse["n_rotations"] == 8 and rmse["n"] == 12 and 0 <= rmse["mean_deg"] <= 180
    assert json.loads(out.read_text())["rows"]["target-vae-p8"]["config"]["group_order"] == 8
    assert "| target-vae-p8 |" in out.with_suffix(".md").read_text()
    assert (tmp_path / "table3" / "target-vae-p8" / "metrics.jsonl").exists()  # default --work: OUT without suffix

    results = script.main(["--table", "4", "--out", str(tmp_path / "t4.json"), "--rows", "full,plain-conv", *toy])
    assert list(results["rows"]) == ["full", "plain-conv"]
    assert results["rows"]["plain-conv"]["config"]["encoder"] == "plain"
    assert results["rows"]["full"]["scores"]["n"] == 30
    # the quick preset's sizes come from the table, the command line overrides them
    assert results["settings"]["n_train"] == 48 and results["settings"]["kernel"] == 28


def test_paper_tables_rows_and_markdown():
    script = load_script("paper_tables")
    names = [row[0] for row in script.table_rows(1)]
    assert len(names) == 8 and "mnist-n/target-vae-p16" in names and "mnist-u/spatial-vae" in names
    assert {row[3].get("zdim") for row in script.table_rows(2)} == {None, 32}
    scores = {"rotation_correlation": 0.5, "translation_correlation": 0.25, "clustering_accuracy": 0.5, "n": 1}
    text = script.markdown(1, {"mnist-u/target-vae-p8": {"scores": scores}})
    assert "| target-vae-p8 | n/a | n/a | 0.500 | 0.250 |" in text and "target-vae-p4" not in text


def test_cryoem_snr_script_runs_at_toy_size(tmp_path, data_root):
    out = tmp_path / "snr.json"
    results = load_script("cryoem_snr").main(["--data-dir", str(data_root), "--out", str(out), "--snrs", "10", "--n", "40",
                                              "--epochs", "1", "--extra-train", "--fields", "4", "--gen-hidden", "16",
                                              "--group", "4"])
    row = results["rows"][0]
    assert row["snr"] == 10 and 0.5 <= row["clustering_accuracy"] <= 1
    assert len(row["classes"]) == 2 and all(-1 <= c["sharpness"] <= 1 for c in row["classes"])
    assert "| 10 |" in out.with_suffix(".md").read_text()


def test_kernels_script_reports_every_measure_and_its_fft_matches_the_convolution():
    results = load_script("kernels").main(["--threads", "1", "--repeats", "1", "--batch", "1"])
    assert results["first_layer_fft_max_error_rel"] < 1e-4
    for key in ("matmul_fp32_gflops", "matmul_bf16_gflops", "sin_cos_ns_per_element", "first_layer_direct_fp32_images_per_s",
                "first_layer_fft_fp32_images_per_s", "first_layer_patches_fp32_images_per_s", "first_layer_patches_bf16_images_per_s"):
        assert results[key] > 0, key
