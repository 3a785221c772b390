"""Training that scales, on the CPU as CI has it: DDP through torchrun (gloo) against one process,
snapshots that survive SIGKILL and SIGTERM bit for bit, bf16 autocast, torch.compile, and the bad
input that must cost one line and exit code 2. Real `stepnet train` processes on real digits."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from models import checkpoint, data
from models.train import fixed_subset

STEPNET = [sys.executable, "-m", "stepnet"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
pytestmark = pytest.mark.timeout(600)


def run(*args, env=None, timeout=600, prefix=STEPNET):
    return subprocess.run([*prefix, *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def weights(folder: Path) -> torch.Tensor:
    state = load_file(str(folder / "model.safetensors"))
    return torch.cat([state[k].double().flatten() for k in sorted(state) if not k.endswith("num_batches_tracked")])


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def epochs_done(out: Path) -> int:
    log = out / "metrics.jsonl"
    return len(log.read_text().splitlines()) if log.is_file() else 0


# ---------------------------------------------------------------- DDP

SHORT = ["train", "--epochs", "1", "--train-images", "128", "--quiet"]      # 2 global steps of 64


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp") / "one"
    result = run(*SHORT, "--batch-size", "64", "--out", out)
    assert result.returncode == 0, result.stderr
    return out


def test_two_gloo_processes_match_one_with_the_same_global_batch(one_process, tmp_path):
    """torchrun --nproc-per-node 2, batch 32 each, --sync-bn, against 1 process with batch 64:
    the same test accuracy, and weights within 2e-4 (relative L2 over every parameter).
    Measured: 1.2e-5, the rounding of a different BatchNorm reduction; per-process BatchNorm
    statistics instead (no --sync-bn) differ by 1.9e-3, and a wrong sampler or gradient average
    by far more."""
    out = tmp_path / "two"
    result = run("--nproc-per-node", "2", "-m", "stepnet", *SHORT, "--batch-size", "32", "--sync-bn",
                 "--out", out, prefix=TORCHRUN)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("checkpoint written") == 1                # rank 0 alone reports
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "metrics.jsonl", "model.safetensors"]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1] and rows[0]["processes"] == 2 and rows[0]["global_batch"] == 64
    one, two = checkpoint.read_config(one_process), checkpoint.read_config(out)
    assert two["test_accuracy"] == one["test_accuracy"]
    assert two["global_batch"] == one["global_batch"] == 64 and two["processes"] == 2
    assert relative(weights(out), weights(one_process)) < 2e-4


def test_skipping_the_test_split_trains_the_same_weights(one_process, tmp_path):
    """--test-every 0 (what the analysis' workers use): no test pass, a null test_accuracy, and the
    same weights bit for bit as the run that tested after its epoch."""
    out = tmp_path / "untested"
    result = run(*SHORT, "--batch-size", "64", "--test-every", "0", "--out", out)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("not tested (--test-every 0); checkpoint written")
    assert checkpoint.read_config(out)["test_accuracy"] is None
    assert "test_accuracy" not in json.loads((out / "metrics.jsonl").read_text())
    assert torch.equal(weights(out), weights(one_process))


def test_test_every_n_tests_every_nth_epoch_and_the_last(tmp_path):
    out = tmp_path / "every2"
    result = run("train", "--epochs", "3", "--train-images", "128", "--quiet", "--test-every", "2", "--out", out)
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(r["epoch"], "test_accuracy" in r) for r in rows] == [(1, False), (2, True), (3, True)]
    assert checkpoint.read_config(out)["test_accuracy"] == rows[-1]["test_accuracy"]


def test_the_shortcut_launches_the_same_through_torch_distributed_run(one_process, tmp_path):
    out = tmp_path / "shortcut"
    result = run(*SHORT, "--batch-size", "32", "--sync-bn", "--nproc-per-node", "2", "--out", out)
    assert result.returncode == 0, result.stderr[-3000:]
    assert checkpoint.read_config(out)["processes"] == 2
    assert relative(weights(out), weights(one_process)) < 2e-4


def test_compiled_training_matches_eager(one_process, tmp_path):
    """--compile (torch.compile, inductor on the CPU): within 1e-4 of eager after the same steps
    (measured 1.4e-5)."""
    out = tmp_path / "compiled"
    result = run(*SHORT, "--batch-size", "64", "--compile", "--out", out)
    assert result.returncode == 0, result.stderr[-3000:]
    assert checkpoint.read_config(out)["compile"] is True
    assert relative(weights(out), weights(one_process)) < 1e-4


# ---------------------------------------------------------------- snapshots

def _start(args, out: Path) -> subprocess.Popen:
    return subprocess.Popen([*STEPNET, *map(str, args), "--out", str(out)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _wait_for(condition, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


RESUMABLE = ["train", "--epochs", "3", "--train-images", "512", "--quiet"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("resume") / "whole"
    result = run(*RESUMABLE, "--out", out)
    assert result.returncode == 0, result.stderr
    return out


def test_a_run_killed_after_its_second_snapshot_resumes_to_the_same_weights(uninterrupted, tmp_path):
    out = tmp_path / "killed"
    proc = _start(RESUMABLE, out)
    info = out / "snapshot" / "snapshot.json"
    _wait_for(lambda: info.is_file() and json.loads(info.read_text())["position"]["epoch"] == 3, proc)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert not (out / "config.json").exists()                  # not a checkpoint: export refuses it
    result = run(*RESUMABLE, "--resume", "--out", out)
    assert result.returncode == 0, result.stderr
    assert torch.equal(weights(out), weights(uninterrupted))      # bit for bit
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "metrics.jsonl", "model.safetensors"]
    assert [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]


def test_sigterm_writes_a_snapshot_and_exits_0_and_the_run_resumes_mid_epoch(uninterrupted, tmp_path):
    out = tmp_path / "terminated"
    proc = _start([*RESUMABLE[:-1]], out)                         # with progress lines on stderr
    _wait_for(lambda: epochs_done(out) == 1, proc)
    time.sleep(0.4)                                               # into epoch 2
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    assert "stopped by SIGTERM" in err
    position = json.loads((out / "snapshot" / "snapshot.json").read_text())["position"]
    assert position["epoch"] >= 2
    result = run(*RESUMABLE, "--resume", "--out", out)
    assert result.returncode == 0, result.stderr
    assert torch.equal(weights(out), weights(uninterrupted))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    whole = [json.loads(line) for line in (uninterrupted / "metrics.jsonl").read_text().splitlines()]
    assert [(r["epoch"], r["train_loss"], r["test_accuracy"]) for r in rows] == \
           [(r["epoch"], r["train_loss"], r["test_accuracy"]) for r in whole]


def test_torchrun_restarts_a_killed_worker_and_it_resumes_from_the_snapshot(uninterrupted, tmp_path):
    """torchrun --max-restarts 1: the worker killed after its second snapshot is started again,
    finds TORCHELASTIC_RESTART_COUNT=1 and the snapshot, and goes on; the weights are those of
    the uninterrupted run."""
    out = tmp_path / "elastic"
    launcher = subprocess.Popen([*TORCHRUN, "--nproc-per-node", "1", "--max-restarts", "1", "-m", "stepnet",
                                 *RESUMABLE, "--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
    info = out / "snapshot" / "snapshot.json"
    _wait_for(lambda: info.is_file() and json.loads(info.read_text())["position"]["epoch"] == 3, launcher)
    workers = subprocess.run(["pgrep", "-P", str(launcher.pid)], capture_output=True, text=True).stdout.split()
    assert len(workers) == 1
    os.kill(int(workers[0]), signal.SIGKILL)
    _, err = launcher.communicate(timeout=300)
    assert launcher.returncode == 0, err[-3000:]
    assert torch.equal(weights(out), weights(uninterrupted))


# ---------------------------------------------------------------- bf16

def native_bf16() -> bool:
    """Whether this CPU computes in bf16 itself (AVX-512 BF16 or AMX); elsewhere oneDNN emulates
    it, and on an AVX2-only CI machine a digits epoch takes 78 s against 10 s in fp32."""
    flags = Path("/proc/cpuinfo").read_text().split() if Path("/proc/cpuinfo").is_file() else []
    return "avx512_bf16" in flags or "amx_bf16" in flags


def assert_bf16_keeps_the_diagnostics(out: Path) -> None:
    """On the same weights, bf16 and fp32 evaluation agree per test image within 0.02 in mean step
    size and 2 % in NSI (the norms behind NSI and s are float32 under autocast)."""
    model, _, _ = checkpoint.load(out)
    test_set, _ = data.load("digits", "test")
    images = torch.stack([test_set[i][0] for i in range(len(test_set))])
    with torch.no_grad():
        _, step32, nsi32 = model(images, diagnostics=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            _, step16, nsi16 = model(images, diagnostics=True)
    defined = ~torch.isnan(nsi32)
    assert torch.equal(defined, ~torch.isnan(nsi16)) and nsi16.dtype == torch.float32
    assert (step16.float()[:, :, 0] - step32[:, :, 0]).abs().max() < 0.02
    assert ((nsi16[defined] - nsi32[defined]).abs() / nsi32[defined]).max() < 0.02


def test_bf16_autocast_follows_fp32_training_and_keeps_the_diagnostics(one_process, tmp_path):
    """--precision bf16 on the CPU, the same two steps as fp32: weights within 5e-3 of fp32's, and
    not equal to them (bf16 did round). Measured 9.6e-4; the diagnostics agree within 0.0025 in
    step size and 0.2 % in NSI."""
    out = tmp_path / "bf16"
    result = run(*SHORT, "--batch-size", "64", "--precision", "bf16", "--out", out)
    assert result.returncode == 0, result.stderr
    assert checkpoint.read_config(out)["precision"] == "bf16"
    assert 1e-5 < relative(weights(out), weights(one_process)) < 5e-3
    assert_bf16_keeps_the_diagnostics(out)
    bf16 = run("evaluate", out, "--precision", "bf16")
    assert bf16.returncode == 0 and bf16.stdout.startswith("digits test accuracy: "), bf16.stderr


@pytest.mark.skipif(not native_bf16(), reason="bf16 is emulated on this CPU: the recipe would take 20 minutes")
def test_bf16_autocast_trains_digits_to_97_percent(tmp_path):
    """The digits recipe shortened to 6 epochs in bf16 reaches >= 97 % (98.1 % measured; 33 s
    against 80 s for the whole 15), and evaluates alike in both precisions."""
    out = tmp_path / "bf16"
    result = run("train", "--precision", "bf16", "--epochs", "6", "--quiet", "--out", out)
    assert result.returncode == 0, result.stderr
    config = checkpoint.read_config(out)
    assert config["precision"] == "bf16" and config["test_accuracy"] >= 0.97
    assert_bf16_keeps_the_diagnostics(out)
    fp32 = run("evaluate", out)
    bf16 = run("evaluate", out, "--precision", "bf16")
    assert fp32.returncode == bf16.returncode == 0
    assert bf16.stdout.splitlines()[0] == f"digits test accuracy: {config['test_accuracy']:.4f} (360 images)"
    fp32_accuracy = float(fp32.stdout.split()[3])     # "digits test accuracy: 0.9833 (360 images)"
    assert abs(fp32_accuracy - config["test_accuracy"]) <= 2 / 360    # bf16's rounding moves an image or two


# ---------------------------------------------------------------- bad input

@pytest.mark.parametrize("args, message", [
    (["--device", "cuda"], "no CUDA GPU"),
    (["--precision", "fp16"], "fp16 needs a CUDA GPU"),
    (["--precision", "fp64"], "unknown precision"),
    (["--recipe", "imagenet-21k"], "unknown recipe"),
    (["--nproc-per-node", "2", "--device", "cuda"], "no CUDA GPU"),
    (["--nproc-per-node", "0"], "at least 1"),
    (["--train-images", "100", "--batch-size", "64", "--nproc-per-node", "2"], "do not fill one global batch"),
    (["--resume"], "holds no training snapshot"),
    (["--test-every", "-1"], "--test-every must be 0 (never) or more"),
])
def test_bad_training_input_is_one_line_and_exit_2(tmp_path, args, message):
    out = tmp_path / "out"
    result = run("train", *args, "--out", out, timeout=120)
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and message in result.stderr, result.stderr
    assert not out.exists()


def test_resume_refuses_another_architecture_or_dataset_and_touches_nothing(tmp_path):
    out = tmp_path / "run"
    proc = _start(["train", "--epochs", "5", "--train-images", "256", "--quiet"], out)
    info = out / "snapshot" / "snapshot.json"
    _wait_for(info.is_file, proc)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    before = {p.name: p.stat().st_mtime_ns for p in out.rglob("*")}
    for args, kind in ((["--depth", "56"], "different architecture or dataset"),
                       (["--family", "se"], "different architecture or dataset"),
                       (["--train-images", "512"], "different architecture or dataset"),
                       (["--lr", "0.05"], "different training settings")):
        result = run("train", "--epochs", "5", "--train-images", "256", *args, "--resume", "--out", out,
                     timeout=120)
        assert result.returncode == 2 and result.stderr.count("\n") == 1 and kind in result.stderr, result.stderr
    assert {p.name: p.stat().st_mtime_ns for p in out.rglob("*")} == before


def test_more_processes_than_gpus_is_refused(monkeypatch):
    from models import distributed
    from stepnet.errors import UserError

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    distributed.check_processes(2, torch.device("cuda"))
    with pytest.raises(UserError, match="--nproc-per-node 3, but this host has 2 CUDA GPU"):
        distributed.check_processes(3, torch.device("cuda"))


def test_the_same_images_are_augmented_alike_in_any_process_and_worker():
    """SeededAugmentation: item (epoch, i) is the same tensor however it is fetched."""
    from models.loading import SeededAugmentation

    train_set, _ = data.load("digits", "train", augment=True)
    seeded = SeededAugmentation(fixed_subset(train_set, 64), seed=3)
    key = 2 * len(seeded) + 5                                    # epoch 2, image 5
    torch.manual_seed(123)
    first = seeded[key][0]
    torch.manual_seed(456)
    state = torch.get_rng_state()
    assert torch.equal(seeded[key][0], first)
    assert torch.equal(torch.get_rng_state(), state)            # the caller's RNG is left alone
    assert not torch.equal(seeded[key + len(seeded)][0], first)  # another epoch, another draw
