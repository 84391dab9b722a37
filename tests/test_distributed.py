"""Data-parallel training and sharded inference: 2 CPU processes (gloo) against 1.

What is compared, and why it can be compared:

* The global batch is the same: with ``W`` processes the chunk-shuffle sampler
  hands rank ``r`` the ``r``-th contiguous slice of every global batch of the
  single-process run, and DDP averages gradients of per-rank means scaled by
  ``n_rank * W / n_global``, i.e. the gradient of the global batch mean.
* The sampling noise is not the same: a rank draws its reparameterisation
  noise from its own generator, so rank 1's noise for image ``i`` differs from
  the single process's. The equivalence test therefore runs with the noise
  switched off (``torch.randn_like`` returns zeros, so ``z`` is the posterior
  mean): the objective is then a deterministic function of the parameters and
  the batch, and the first step's losses and gradients must agree up to the
  order of float32 summation (``reordering_rel``). The step is one global batch
  split unevenly (38 + 37 images), so the scaling of the per-rank means is
  checked too. Later steps are not compared: training amplifies rounding
  differences step by step, by an amount that depends on the processor.
* With the noise on, the test checks what DDP guarantees exactly: every rank
  holds the same parameters after every step, and a run stopped by
  ``max_steps`` in the middle of an epoch and resumed gives bit-identical
  parameters to one that was not interrupted (every rank's random state is in
  the checkpoint).
"""

from __future__ import annotations

import math
import os
import socket
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import starfile
import torch
import torch.multiprocessing as mp

from particle_vae import cli
from particle_vae.data.particles import ParticleDataset
from particle_vae.data.sampling import ChunkShuffleBatchSampler
from particle_vae.engine.distributed import DistContext, shard_bounds, split_counts
from particle_vae.engine.launch import launch_argv
from particle_vae.engine.run import RunDirectory
from particle_vae.engine.trainer import Trainer, TrainSettings, seed_everything
from particle_vae.errors import ParticleVAEError
from particle_vae.io.mrc import write_stack
from particle_vae.io.star import image_name, make_particle_star
from particle_vae.models.vae import VAE, VAEConfig

REPO = Path(__file__).resolve().parents[1]
N_IMAGES, BOX = 100, 16
# 75 training images in global batches of 16: 16, 16, 16, 16, 11 (the last split 6 + 5 over two ranks)
SETTINGS = dict(epochs=2, batch_size=16, lr=3e-3, val_fraction=0.25, seed=5, device="cpu", early_stop_patience=0)
# the equivalence check: one step on one global batch of all 75 training images, 38 on rank 0 and 37 on rank 1
FIRST_STEP = {"batch_size": 80, "max_steps": 1}


def reordering_rel(*lengths: int, margin: float = 16.0) -> float:
    """Relative change of a float32 result when its sums of ``lengths`` terms are taken in another order
    (other ranks, other kernels): a sum of n terms moves by about sqrt(n) * 2^-24 relative to its size (rounding
    errors of 2^-24 per addition adding up like a random walk), added along the chain of sums; ``margin`` leaves
    room for terms that cancel and errors that line up."""
    return margin * sum(math.sqrt(n) for n in lengths) * 2.0 ** -24


# the VAE's loss per image: encoder 256 pixels -> 24 -> 2 + 2, decoder 2 -> 24 -> 256, Gaussian likelihood over 256
# pixels; then the mean over the 75 images (38 + 37 across ranks): about 5e-5
LOSS_REL = reordering_rel(256, 24, 2, 24, 256, 75)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _random_stack(folder: Path) -> Path:
    images = np.random.default_rng(0).normal(size=(N_IMAGES, BOX, BOX)).astype(np.float32)
    return write_stack(folder / "random.mrcs", images, pixel_size=2.0)


def _vae() -> VAE:
    return VAE(VAEConfig(box=BOX, zdim=2, hidden=24, layers=1, likelihood="gaussian", gaussian_sigma=1.0))


def _params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The gradients of the last step (after DDP's all-reduce: the global batch's)."""
    return {name: p.grad.detach().clone() for name, p in model.named_parameters()}


def _train(stack: Path, run_dir: Path, context: DistContext, **overrides) -> tuple[list[dict], dict, Trainer]:
    seed_everything(SETTINGS["seed"])
    model = _vae()
    run = RunDirectory(run_dir)
    if context.is_main:
        run.create(overwrite=True)
    trainer = Trainer(model, ParticleDataset(stack), TrainSettings(**{**SETTINGS, **overrides}), run, context=context)
    return trainer.fit(), _params(model), trainer


def _resumed(stack: Path, run_dir: Path, context: DistContext) -> dict:
    """Stop after 3 steps (inside epoch 1), then resume to the end in a new Trainer."""
    _train(stack, run_dir, context, max_steps=3)
    seed_everything(123)  # anything: resume must restore the states it needs
    model = _vae()
    trainer = Trainer(model, ParticleDataset(stack), TrainSettings(**SETTINGS), RunDirectory(run_dir), context=context)
    trainer.resume()
    assert trainer.start_epoch == 0 and trainer.start_batch == 3 and trainer.global_step == 3
    trainer.fit()
    return _params(model)


def _worker(rank: int, world: int, port: int, folder: str) -> None:
    """One rank of the 2-process run (started by torch.multiprocessing.spawn)."""
    from particle_vae.engine import distributed as ddp

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    context = ddp.init_distributed("cpu")
    folder = Path(folder)
    stack = folder / "random.mrcs"
    try:
        # with sampling noise: identical parameters on every rank, exact mid-epoch resume
        _, noisy, trainer = _train(stack, folder / "noisy", context)
        assert trainer.ddp_model is not None and not trainer.ddp_model.find_unused_parameters
        resumed = _resumed(stack, folder / "noisy_resumed", context)
        gathered = ddp.all_gather_objects(context, noisy)
        # without sampling noise: comparable with one process, at the first step
        real_randn_like = torch.randn_like
        torch.randn_like = lambda tensor, *args, **kwargs: torch.zeros_like(tensor)
        try:
            rows, quiet, trainer = _train(stack, folder / "quiet", context, **FIRST_STEP)
        finally:
            torch.randn_like = real_randn_like
        if context.is_main:
            same_on_ranks = all(torch.equal(gathered[0][k], gathered[1][k]) for k in noisy)
            resume_exact = all(torch.equal(noisy[k], resumed[k]) for k in noisy)
            torch.save({"rows": rows, "params": quiet, "grads": _grads(trainer.model), "same_on_ranks": same_on_ranks,
                        "resume_exact": resume_exact}, folder / "result.pt")
    finally:
        ddp.cleanup(context)


@pytest.mark.usefixtures("single_thread")  # the one-process reference runs on one thread, as each rank does
def test_two_gloo_processes_match_one_process(tmp_path: Path, monkeypatch):
    stack = _random_stack(tmp_path)
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    result = torch.load(tmp_path / "result.pt", weights_only=False)
    assert result["same_on_ranks"], "parameters differ between ranks after training"
    assert result["resume_exact"], "a 2-process run resumed mid-epoch differs from the uninterrupted run"

    monkeypatch.setattr(torch, "randn_like", lambda tensor, *args, **kwargs: torch.zeros_like(tensor))
    seed_everything(SETTINGS["seed"])
    initial = _params(_vae())
    rows, params, trainer = _train(stack, tmp_path / "single", DistContext(), **FIRST_STEP)
    grads = _grads(trainer.model)
    assert [r["step"] for r in rows] == [r["step"] for r in result["rows"]] == [1]
    # the losses before the step (train) and after it (validation): the validation loss moves by no more,
    # because the first Adam step (lr g / (|g| + eps), about lr sign(g)) is the same for every weight whose
    # gradient is above rounding level, and a weight whose gradient is at rounding level hardly moves the loss
    for one, two in zip(rows, result["rows"]):
        for key in ("train_elbo", "train_recon", "train_kl_z", "val_elbo", "val_recon", "val_kl_z", "lr"):
            assert one[key] == pytest.approx(two[key], rel=LOSS_REL, abs=0), key
    # the gradient of the global batch: the same chain of sums run backwards, each weight's gradient summed over
    # the 75 images, whose contributions differ in sign; compared as a whole, per tensor, relative to its size
    for name, value in grads.items():
        gap = float((result["grads"][name].double() - value.double()).norm())
        assert gap <= LOSS_REL * math.sqrt(75) * float(value.double().norm()), (name, gap, float(value.norm()))
    # the step itself: where a gradient stands clear of rounding (above 1e-3 of its tensor's RMS, where
    # LOSS_REL * sqrt(75) of relative error cannot turn its sign, and far above Adam's eps) both runs moved the
    # weight by the same lr * sign(g), up to float32 rounding of the weights; nearly every weight is such a weight
    lr, clear, total = SETTINGS["lr"], 0, 0
    for name, value in params.items():
        g = grads[name]
        mask = (g.abs() > 1e-3 * g.pow(2).mean().sqrt()) & (g.abs() > 1e-5)
        clear, total = clear + int(mask.sum()), total + mask.numel()
        torch.testing.assert_close(result["params"][name][mask], value[mask], rtol=2.0 ** -20, atol=lr * 2.0 ** -10,
                                   msg=name)
        moved = (value - initial[name]).abs()[mask]
        torch.testing.assert_close(moved, torch.full_like(moved, lr), rtol=2e-3, atol=0, msg=name)
    assert clear >= 0.95 * total, (clear, total)
    # only rank 0 wrote the run directories: one metrics line per epoch, checkpoints present
    noisy = RunDirectory(tmp_path / "noisy")
    assert [r["epoch"] for r in noisy.read_metrics()] == [0, 1]
    assert noisy.last_checkpoint.exists() and noisy.best_checkpoint.exists()
    state = torch.load(noisy.last_checkpoint, weights_only=False)
    assert state["world_size"] == 2 and len(state["rng_per_rank"]) == 2 and state["step"] == 10
    assert [r["step"] for r in RunDirectory(tmp_path / "quiet").read_metrics()] == [1]


def test_ddp_wraps_the_parameters_and_the_models_own_buffers_only():
    """DDP broadcasts every buffer of the module it wraps: the LossModule holds the model's parameters and its
    persistent buffers (here the generator's Fourier frequencies), the same tensor objects, so that DDP's
    broadcasts land in the model; not e2cnn's sampled bases nor the buffers rebuilt from the config."""
    from particle_vae.engine.distributed import LossModule
    from particle_vae.models import TargetVAE, TargetVAEConfig

    model = TargetVAE(TargetVAEConfig(box=16, zdim=2, group_order=8, n_fields=4, kernel=21, padding=4, gen_hidden=32, n_fourier=16))
    wrapper = LossModule(model)
    assert [id(p) for p in wrapper.parameters()] == [id(p) for p in model.parameters()]
    buffers = dict(wrapper.named_buffers())
    assert list(buffers) == ["tensors.generator/features/frequencies"]
    assert buffers["tensors.generator/features/frequencies"] is model.get_buffer("generator.features.frequencies")
    e2cnn = [name for name, module in model.named_modules() if type(module).__module__.startswith("e2cnn")]
    assert e2cnn and any(name.startswith(e2cnn[0] + ".") for name, _ in model.named_buffers())
    assert [name for name, _ in wrapper.named_modules()] == ["", "tensors"]
    wrapper.train(False)
    assert not model.training
    wrapper.train(True)
    assert model.training
    images = torch.randn(2, 1, 16, 16)
    torch.manual_seed(0)
    loss = wrapper(images, scale=2.0)[0]
    torch.manual_seed(0)
    assert torch.equal(loss, 2.0 * model.loss(images).loss)


def test_rank_slices_of_the_chunk_sampler_make_up_the_single_process_batches():
    single = list(ChunkShuffleBatchSampler(203, 32, chunk_size=8, seed=4))
    ranks = [ChunkShuffleBatchSampler(203, 32, chunk_size=8, seed=4, rank=r, world_size=4) for r in range(4)]
    per_rank = [list(sampler) for sampler in ranks]
    assert all(len(batches) == len(single) == len(sampler) for batches, sampler in zip(per_rank, ranks))
    for t, batch in enumerate(single):
        assert sum((per_rank[r][t] for r in range(4)), []) == batch
    # a rank's slice keeps the runs of consecutive images (8 per chunk, slices of 8)
    assert all(np.all(np.diff(np.sort(b)) == 1) or len(set(np.diff(b))) <= 2 for b in per_rank[1][:-1])
    # a final global batch smaller than the number of ranks is skipped by every rank
    tiny = [list(ChunkShuffleBatchSampler(34, 16, rank=r, world_size=4)) for r in range(4)]
    assert all(len(batches) == 2 for batches in tiny)
    # resuming inside an epoch
    sampler = ChunkShuffleBatchSampler(203, 32, chunk_size=8, seed=4)
    sampler.set_epoch(0, start_batch=3)
    assert list(sampler) == single[3:] and len(sampler) == len(single) - 3


def test_shards_cover_the_input_in_order():
    for n in (0, 1, 7, 100):
        for world in (1, 2, 3):
            bounds = [shard_bounds(n, DistContext(rank=r, world_size=world)) for r in range(world)]
            assert bounds[0][0] == 0 and bounds[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
            assert [b - a for a, b in bounds] == split_counts(n, world)


def test_global_batch_must_divide_by_the_number_of_processes(tmp_path: Path):
    stack = _random_stack(tmp_path)
    with pytest.raises(ParticleVAEError, match="not divisible by the 3 processes"):
        Trainer(_vae(), ParticleDataset(stack), TrainSettings(**SETTINGS), RunDirectory(tmp_path / "run"),
                context=DistContext(rank=0, world_size=3, backend="gloo"))


def test_gpus_option_refuses_without_cuda(tmp_path: Path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # also on a machine with a GPU
    stack = _random_stack(tmp_path)
    assert cli.main(["train", str(stack), "--model", "vae", "--gpus", "2", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "sees no CUDA GPU" in err[0] and "--ddp-cpu-processes" in err[0]
    assert not (tmp_path / "run").exists()


def test_launch_command_line_is_the_users_without_the_launch_options():
    parser = cli.build_parser()
    argv = ["-q", "train", "in.star", "--out", "r", "--no-bf16", "--invert", "--batch-size", "8", "--ddp-cpu-processes", "2",
            "--max-steps", "5", "--device", "cuda"]
    args = parser.parse_args(argv)
    again_argv = launch_argv(argv, device="cpu")
    # the user's words in the user's order; the forced device last, where it overrides the user's
    assert again_argv == [*argv[:9], *argv[11:], "--device", "cpu"]
    again = parser.parse_args(again_argv)
    assert vars(again) == {**vars(args), "ddp_cpu_processes": None, "device": "cpu"}
    assert launch_argv(argv) == [*argv[:9], *argv[11:]]


@pytest.mark.parametrize("spelling", [["--gpus", "2"], ["--gpus=2"], ["--gpu", "2"], ["--ddp-cpu-processes=2"], ["--ddp", "2"]])
def test_launch_options_are_removed_however_argparse_accepted_them(spelling):
    parser = cli.build_parser()
    argv = ["train", "--out", "r", *spelling, "--seed", "3", "in.star"]
    args = parser.parse_args(argv)
    assert args.gpus == 2 or args.ddp_cpu_processes == 2
    again = parser.parse_args(launch_argv(argv, device="auto"))
    assert again.gpus is None and again.ddp_cpu_processes is None
    assert (again.out, again.seed, again.input, again.device) == (args.out, 3, Path("in.star"), "auto")


def test_words_after_a_double_dash_are_not_options():
    argv = ["train", "--out", "r", "--gpus", "2", "--", "--gpus"]
    assert launch_argv(argv, device="auto") == ["train", "--out", "r", "--device", "auto", "--", "--gpus"]
    again = cli.build_parser().parse_args(launch_argv(argv, device="auto"))
    assert again.input == Path("--gpus") and again.gpus is None


def test_one_cpu_process_runs_the_command_in_place(tmp_path: Path):
    """``--ddp-cpu-processes=1`` starts no torchrun: the command runs again in this process, on the CPU."""
    stack = _random_stack(tmp_path)
    run = tmp_path / "run"
    argv = ["-q", "train", str(stack), "--model", "vae", "--epochs", "1", "--max-steps", "1", "--batch-size", "8",
            "--ddp-cpu-processes=1", "--device", "auto", "--out", str(run)]
    assert cli.main(argv) == 0
    assert RunDirectory(run).read_config()["train"]["device"] == "cpu"
    assert [row["step"] for row in RunDirectory(run).read_metrics()] == [1]


@pytest.fixture(scope="module")
def particles(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("ddp_cli")
    images = np.random.default_rng(1).normal(size=(48, 20, 20)).astype(np.float32)
    write_stack(folder / "p.mrcs", images, pixel_size=3.0)
    star = make_particle_star([image_name(i, "p.mrcs") for i in range(48)], pixel_size=3.0, box=20)
    return star.write(folder / "p.star")


def _cli(args: list[str]):
    import subprocess

    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
               OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "particle_vae", "-q", *args], capture_output=True, text=True, env=env, timeout=300)


def _cli_worker(rank: int, world: int, ports: tuple[int, int], commands: list[list[str]]) -> None:
    """One rank running ``particle-vae`` commands in turn, as torchrun would start it."""
    torch.set_num_threads(1)
    for port, argv in zip(ports, commands):
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                          LOCAL_RANK=str(rank))
        assert cli.main(argv) == 0, argv


def test_cli_ddp_train_resume_and_sharded_infer(particles: Path, tmp_path: Path):
    """TARGET-VAE (e2cnn) on 2 CPU processes: ``--ddp-cpu-processes 2`` relaunches
    through torchrun and stops at ``--max-steps`` inside an epoch; the run is
    resumed by 2 ranks and read out by 2 ranks, and the sharded STAR equals the
    one written by 1 process."""
    run = tmp_path / "run"
    tiny = ["--preset", "tiny", "--fields", "4", "--gen-hidden", "16", "--fourier-features", "8", "--group", "4",
            "--batch-size", "8", "--seed", "2"]
    done = _cli(["train", str(particles), *tiny, "--epochs", "1", "--max-steps", "3", "--ddp-cpu-processes", "2", "--out", str(run)])
    assert done.returncode == 0, done.stderr
    rows = RunDirectory(run).read_metrics()
    assert len(rows) == 1 and rows[0]["partial"] and rows[0]["step"] == 3

    # both read-outs take the particles in the same batches of 6 (24 per rank), on one thread: every particle goes
    # through the same computation, so a particle whose best cells nearly tie (this barely trained model has
    # some) gets the same one either way; only the centring pass sums in another order (per rank, then combined)
    one, two = tmp_path / "one.star", tmp_path / "two.star"
    commands = [["-q", "train", "--out", str(run), "--resume", "--epochs", "2", "--max-steps", "100", "--device", "cpu"],
                ["-q", "infer", str(run), "--out", str(two), "--batch-size", "6", "--device", "cpu"]]
    mp.spawn(_cli_worker, args=(2, (_free_port(), _free_port()), commands), nprocs=2, join=True)
    rows = RunDirectory(run).read_metrics()
    # 43 training images in global batches of 8: 6 steps per epoch
    assert [r["epoch"] for r in rows] == [0, 1] and rows[-1]["step"] == 12 and "partial" not in rows[-1]
    assert "resuming at epoch 1, batch 4" in (run / "train.log").read_text()

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert cli.main(["-q", "infer", str(run), "--out", str(one), "--batch-size", "6", "--device", "cpu"]) == 0
    finally:
        torch.set_num_threads(threads)
    a, b = starfile.read(one)["particles"], starfile.read(two)["particles"]
    assert list(a.columns) == list(b.columns) and (a["rlnImageName"] == b["rlnImageName"]).all()
    for column in ("rlnAnglePsi", "pvaeZ1", "pvaeZ2", "pvaePoseConfidence"):
        np.testing.assert_array_equal(b[column], a[column], err_msg=column)
    # the group centres: sums over 48 aligned particles of 20 x 20 px, in another order (float32: about
    # sqrt(n) * 2^-24 of the sums, 1e-5 of a pixel at most), far below the 1e-3 A the origins are compared to
    for column in ("rlnOriginXAngst", "rlnOriginYAngst"):
        np.testing.assert_allclose(b[column], a[column], rtol=0, atol=1e-3, err_msg=column)
    assert np.ptp(a["pvaeZ1"]) > 0  # per-particle values, so order matters
    assert not list(tmp_path.glob(".*.tmp"))


def _buffer_worker(rank: int, world: int, port: int, folder: str) -> None:
    """One rank: an EquiVAE whose class-mean bank (a persistent buffer) starts different on each rank."""
    from particle_vae.engine import distributed as ddp
    from particle_vae.models import MODELS

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    context = ddp.init_distributed("cpu")
    try:
        cls = MODELS["equivae"]
        torch.manual_seed(0)
        model = cls(cls.config_class(box=16, n_classes=3, embed_dim=4, hidden=16))
        with torch.no_grad():
            model.class_means.fill_(float(rank + 1))
        wrapped = ddp.wrap_ddp(model, context, torch.device("cpu"))
        at_wrap = model.class_means.clone()
        images = torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(rank))
        wrapped(images, scale=1.0, labels=torch.tensor([rank, rank, -1, -1]))[0].backward()
        gathered = ddp.all_gather_objects(context, {"at_wrap": at_wrap, "grad": next(model.parameters()).grad.clone()})
        if context.is_main:
            torch.save(gathered, Path(folder) / "buffers.pt")
    finally:
        ddp.cleanup(context)


def test_ddp_broadcasts_the_models_own_buffers_into_the_model(tmp_path: Path):
    """Through the LossModule, DDP's broadcast of rank 0's buffers reaches the model itself (EquiVAE's class-mean
    bank), and the gradients are averaged over the ranks."""
    mp.spawn(_buffer_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    gathered = torch.load(tmp_path / "buffers.pt", weights_only=True)
    assert all(torch.equal(rank["at_wrap"], torch.ones_like(rank["at_wrap"])) for rank in gathered)  # rank 0's bank
    assert torch.equal(gathered[0]["grad"], gathered[1]["grad"])


LATE_RANK_DELAY_S = 1.0


def _cleanup_worker(rank: int, world: int, port: int, folder: str) -> None:
    """Rank 0 reaches ``cleanup`` LATE_RANK_DELAY_S late; rank 1 records how long its own ``cleanup`` took."""
    from particle_vae.engine import distributed as ddp

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    context = ddp.init_distributed("cpu")
    ddp.all_reduce_sum(context, torch.ones(1))  # the group is up on both ranks
    if rank == 0:
        time.sleep(LATE_RANK_DELAY_S)
    started = time.perf_counter()
    ddp.cleanup(context)
    torch.save(time.perf_counter() - started, Path(folder) / f"cleanup_{rank}.pt")


def test_cleanup_waits_for_every_rank_on_a_normal_exit(tmp_path: Path):
    """A gloo rank that leaves the group while a peer still has traffic for it can abort the process: on a normal
    exit ``cleanup`` waits for every rank."""
    mp.spawn(_cleanup_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    assert torch.load(tmp_path / "cleanup_1.pt", weights_only=True) >= 0.5 * LATE_RANK_DELAY_S


def test_cleanup_leaves_at_once_while_an_exception_propagates(monkeypatch):
    """Called from a ``finally`` during an error, ``cleanup`` must not wait at a barrier that the failed rank's peers
    may never reach; it still leaves the group."""
    from particle_vae.engine import distributed as ddp

    calls = []
    monkeypatch.setattr(ddp.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(ddp.dist, "barrier", lambda *a, **k: calls.append("barrier"))
    monkeypatch.setattr(ddp.dist, "destroy_process_group", lambda *a, **k: calls.append("destroy"))
    context = DistContext(rank=1, world_size=2, local_rank=1, backend="gloo")
    with pytest.raises(RuntimeError):
        try:
            raise RuntimeError("a rank failing")
        finally:
            ddp.cleanup(context)
    assert calls == ["destroy"]
    ddp.cleanup(context)
    assert calls == ["destroy", "barrier", "destroy"]
