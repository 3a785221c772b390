"""`stepnet train` and `stepnet evaluate` as a user runs them: real processes, real digits."""

import json
import signal
import subprocess
import sys
import time

import pytest

from models import checkpoint

STEPNET = [sys.executable, "-m", "stepnet.cli"]
pytestmark = pytest.mark.timeout(600)       # training under a loaded machine: 30 s idle, 3 x under load


def run(*args, timeout=600):
    return subprocess.run([*STEPNET, *map(str, args)], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("train") / "digits"
    result = run("train", "--epochs", "3", "--quiet", "--out", out)   # about 30 s on 2 idle cores
    assert result.returncode == 0, result.stderr
    return out, result


def test_short_training_on_digits_beats_chance(trained):
    out, result = trained
    config = checkpoint.read_config(out)
    assert config["test_accuracy"] > 0.6          # chance is 0.1
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert rows[-1]["test_accuracy"] == config["test_accuracy"]
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "metrics.jsonl", "model.safetensors"]
    assert not list(out.parent.glob(".*partial*"))


def test_evaluate_prints_accuracy_and_layer_table(trained):
    out, _ = trained
    result = run("evaluate", out)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    accuracy = float(lines[0].split("accuracy: ")[1].split()[0])
    assert accuracy == pytest.approx(checkpoint.read_config(out)["test_accuracy"], abs=1e-4)
    table = [line.split() for line in lines[2:]]
    assert [row[0] for row in table] == [f"stage{s}.block{b}" for s in (1, 2, 3) for b in (1, 2, 3)]
    assert all(row[3] == "-" for row in table[::3])
    assert all(0 < float(row[2]) < 1 and float(row[3]) > 0 for row in table if row[3] != "-")


def test_training_refuses_to_overwrite(trained):
    out, _ = trained
    result = run("train", "--epochs", "1", "--out", out)
    assert result.returncode == 2
    assert "already exists" in result.stderr


@pytest.mark.parametrize("args, message", [
    (["train", "--family", "vit"], "unknown family"),
    (["train", "--depth", "21"], "unknown depth"),
    (["train", "--dataset", "mnist"], "unknown dataset"),
    (["train", "--dataset", "cifar10"], "needs --data-dir"),
    (["train", "--dataset", "cifar10", "--data-dir", "{tmp}"], "cifar-10-batches-py"),
    (["train", "--dataset", "imagefolder", "--data-dir", "{tmp}/missing"], "does not exist"),
    (["train", "--train-images", "0"], "number of training images"),
    (["evaluate", "{tmp}"], "config.json: missing"),
    (["train", "--ink-normalization", "wide"], "--ink-normalization takes auto, off or a margin"),
    (["train", "--ink-normalization", "-0.1"], "margin from 0 to 1"),
    (["train", "--ink-normalization", "nan"], "margin from 0 to 1"),
    (["train", "--dataset", "imagefolder", "--data-dir", "{tmp}", "--ink-normalization", "0.1"],
     "ink normalization is for handwritten digits"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, args, message):
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    if args[0] == "train":
        args += ["--out", str(tmp_path / "out")]
    result = run(*args, timeout=120)
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and message in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_corrupt_checkpoint_is_one_line_and_exit_2(trained, tmp_path):
    out, _ = trained
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("config.json", "model.safetensors"):
        (broken / name).write_bytes((out / name).read_bytes())
    (broken / "model.safetensors").write_bytes(b"\0" * 100)
    result = run("evaluate", broken, timeout=60)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "model.safetensors" in result.stderr


def _sigint_as_a_terminal_sends_it():
    """A shell's background job (`make test &`, a CI runner's) starts with SIGINT ignored, and a
    child inherits that: Ctrl-C's default action is what this test is about."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_training_interrupted_before_its_first_snapshot_leaves_nothing(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.Popen([*STEPNET, "train", "--epochs", "50", "--quiet", "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_sigint_as_a_terminal_sends_it)
    try:
        deadline = time.monotonic() + 60
        while not out.is_dir() and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)                                    # inside the first epoch
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()                                        # never left training when the test fails
        proc.wait()
    assert proc.returncode == 130, err
    assert list(tmp_path.iterdir()) == []


def test_help_lists_commands_and_options():
    result = run("--help", timeout=60)
    assert result.returncode == 0
    listed = result.stdout.split("COMMAND", 1)[1]
    for command in ("train", "evaluate", "export", "graph", "serve", "analyze", "bench"):
        assert f"\n    {command} " in listed, command        # argparse's list of subcommands
    result = run("train", "--help", timeout=60)
    for option in ("--dataset", "--family", "--depth", "--epochs", "--out"):
        assert option in result.stdout
