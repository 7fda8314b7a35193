"""Fault injection for every script: real signals to real training processes, crashes in the middle of a checkpoint
write, corrupt and odd image files among good ones, a dead DDP process, and every kind of bad input."""

import importlib
import json
import os
import pickle
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

import conftest
import data
import eval_linear
import finetune_cls
import methods
from conftest import REPO, assert_one_sentence_error, make_image_folder, run_script, snapshot

METHODS = {name: importlib.import_module(name) for name in methods.METHODS}  # every method file, found by its banner
EVALS = {"eval_linear": eval_linear, "finetune_cls": finetune_cls}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    return {
        "rs": make_image_folder(root / "rs", classes=2, per_class=8),
        "natural": make_image_folder(root / "natural", classes=2, per_class=8, seed=1),
        "one_image": make_image_folder(root / "one", classes=1, per_class=1),
        "root": root,
    }


def tiny_argv(script, folders, data_folder=None):
    """Arguments of a run of a few real steps for each pre-training script (16 images: 2 or 4 steps per epoch)."""
    return conftest.tiny_argv(script) + ["--data", data_folder or folders["rs"]]


def model_tensors(out):
    return torch.load(os.path.join(out, "checkpoint.pth"), weights_only=True)["model"]


def start(script, argv, **popen):
    return subprocess.Popen(
        [sys.executable, "-u", os.path.join(REPO, f"{script}.py"), *map(str, argv)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **popen,
    )


def wait_for(proc, fragment, timeout=120):
    """Read the process's output until a line contains `fragment`; returns everything read."""
    seen, deadline = [], time.time() + timeout
    for line in proc.stdout:
        seen.append(line)
        if fragment in line or time.time() > deadline:
            break
    assert any(fragment in line for line in seen), "".join(seen)
    return "".join(seen)


# ------------------------------------------------------------------------------------------------ kills
@pytest.mark.parametrize("script", METHODS)
def test_sigterm_then_sigkill_then_resume_ends_where_an_uninterrupted_run_ends(script, folders, tmp_path, capsys):
    argv = tiny_argv(script, folders) + ["--epochs", "4", "--max-steps", "5"]
    METHODS[script].main(argv + ["--out", str(tmp_path / "straight")])
    out, module, steps = tmp_path / "killed", METHODS[script], []
    step = module.train_step

    def signalled_at_step_3(*args, **kwargs):  # what a scheduler sends before pre-emption: save at the current step
        steps.append(step(*args, **kwargs))
        if len(steps) == 3:
            os.kill(os.getpid(), signal.SIGTERM)  # delivered to this process's handler, as from outside
        return steps[-1]

    with pytest.MonkeyPatch.context() as patch, pytest.raises(SystemExit) as stop:
        patch.setattr(module, "train_step", signalled_at_step_3)
        module.main(argv + ["--out", str(out)])  # the run stops, saves, and exits as a SIGTERM'd process does
    printed = capsys.readouterr()
    stopped_at = torch.load(out / "checkpoint.pth", weights_only=True)["step"]
    assert stop.value.code == 128 + signal.SIGTERM and stopped_at == 3
    assert f"stopped by a signal at step {stopped_at}" in printed.out
    assert printed.err == f"{script}.py: stopped by SIGTERM; the same command resumes from {out}/checkpoint.pth.\n"
    proc = start(script, argv + ["--out", out])
    wait_for(proc, f"resuming at step {stopped_at}")
    wait_for(proc, f"step {stopped_at + 1}/")
    proc.kill()  # SIGKILL: no handler runs; whatever checkpoint is on disk must be whole
    proc.wait(timeout=60)
    assert torch.load(out / "checkpoint.pth", weights_only=True)["step"] >= stopped_at
    METHODS[script].main(argv + ["--out", str(out)])
    straight, resumed = model_tensors(tmp_path / "straight"), model_tensors(out)
    assert resumed.keys() == straight.keys()
    for key, value in straight.items():
        if torch.is_tensor(value):
            assert torch.equal(value, resumed[key]), key


def test_a_process_group_sigterm_with_data_workers_saves_before_exiting(folders, tmp_path):
    proc = start(
        "moco",
        tiny_argv("moco", folders) + ["--workers", "2", "--epochs", "50", "--out", tmp_path],
        start_new_session=True,
    )
    wait_for(proc, "step 2/")
    os.killpg(proc.pid, signal.SIGTERM)  # the workers get it too, as from a terminal or a batch scheduler
    rest, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM and "stopped by a signal" in rest, rest  # never 0
    assert torch.load(tmp_path / "checkpoint.pth", weights_only=True)["step"] >= 2


def test_a_crash_in_the_middle_of_a_checkpoint_write_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    """data.save_atomic writes every checkpoint and backbone of the six scripts."""
    path = tmp_path / "checkpoint.pth"
    data.save_atomic({"step": 1, "weights": torch.ones(3)}, str(path))

    def dies_halfway(obj, f):
        f.write(b"\x80\x02 half a pickle")
        raise KeyboardInterrupt  # stands for the kill arriving while the bytes are written

    monkeypatch.setattr(torch, "save", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        data.save_atomic({"step": 2, "weights": torch.zeros(3)}, str(path))
    monkeypatch.undo()
    assert torch.load(path, weights_only=True)["step"] == 1
    for module in (*METHODS.values(), finetune_cls):
        assert "def save_atomic" not in open(module.__file__).read()  # no script writes its own way


def test_when_one_ddp_process_dies_torchrun_restarts_and_the_run_resumes(folders, tmp_path):
    argv = tiny_argv("moco", folders) + ["--epochs", "4", "--out", tmp_path]
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            "--max-restarts=1",
            os.path.join(REPO, "moco.py"),
            *map(str, argv),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"},
    )
    wait_for(proc, "step 3/")  # the checkpoint of epoch 1 (step 2) is on disk
    workers = [int(p) for p in os.listdir("/proc") if p.isdigit() and _parent(int(p)) == proc.pid]
    rank1 = next(p for p in workers if "RANK=1" in open(f"/proc/{p}/environ").read().split("\0"))
    os.kill(rank1, signal.SIGKILL)
    rest, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, rest[-3000:]
    assert "resuming at step" in rest and "done at step 8" in rest
    assert torch.load(tmp_path / "checkpoint.pth", weights_only=True)["step"] == 8


def _parent(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


# ------------------------------------------------------------------------------------------------ files
@pytest.fixture(scope="module")
def messy_folder(tmp_path_factory):
    """24 files: 17 good RGB, 4 in odd modes and sizes (trained on), 3 unreadable (skipped); each unreadable file
    is followed by a readable one in sorted order, so every epoch counts exactly 3 skips."""
    root = make_image_folder(tmp_path_factory.mktemp("messy") / "imgs", classes=1, per_class=17)
    folder = os.path.join(root, "class0")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (40, 40), dtype=np.uint8)).save(os.path.join(folder, "1a_gray.png"))
    Image.fromarray(rng.integers(0, 255, (37, 53, 4), dtype=np.uint8)).save(os.path.join(folder, "3a_rgba.png"))
    Image.fromarray(rng.integers(0, 255, (33, 45, 3), dtype=np.uint8)).convert("P").save(
        os.path.join(folder, "5a_palette.png")
    )
    Image.fromarray(rng.integers(0, 60000, (48, 36), dtype=np.uint16)).save(os.path.join(folder, "7a_16bit.tif"))
    good_jpeg = os.path.join(folder, "9a.jpg")
    Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(good_jpeg)
    with open(good_jpeg, "rb") as f:
        truncated = f.read()[:200]
    with open(os.path.join(folder, "11a_truncated.jpg"), "wb") as f:
        f.write(truncated)
    open(os.path.join(folder, "13a_empty.png"), "wb").close()
    with open(os.path.join(folder, "15a_text.jpg"), "w") as f:
        f.write("not an image at all")
    os.remove(good_jpeg)
    assert len(os.listdir(folder)) == 24
    return root


@pytest.mark.parametrize("script", METHODS)
def test_unreadable_files_are_skipped_counted_and_odd_images_trained_on(
    script, folders, messy_folder, tmp_path, capsys
):
    argv = tiny_argv(script, folders, messy_folder) + ["--epochs", "1", "--out", str(tmp_path)]
    METHODS[script].main(argv)
    out = capsys.readouterr().out
    for name in ("11a_truncated.jpg", "13a_empty.png", "15a_text.jpg"):
        assert name in out
    records = [json.loads(line) for line in open(tmp_path / "log.jsonl")]
    assert sum(r["skipped_images"] for r in records if "loss" in r) == 3  # in the windows that read them
    assert all(np.isfinite(r["loss"]) for r in records if "loss" in r)


# ------------------------------------------------------------------------------------------------ bad input
class RunsCode:
    """Unpickling this with plain pickle would run a shell command that leaves a marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_pickle_that_would_run_code_is_one_line_on_the_command_line(folders, tmp_path):
    """As a user sees it (pytest's own warning capture would hide anything torch prints on stderr in-process)."""
    out = tmp_path / "out"
    out.mkdir()
    with open(out / "checkpoint.pth", "wb") as f:  # plain pickle: protocol 4, which torch warns about
        pickle.dump({"model": RunsCode(tmp_path / "pwned")}, f)
    before = snapshot(out)
    result = run_script("moco.py", *tiny_argv("moco", folders), "--out", out)
    assert_one_sentence_error(result, "moco.py", "loads with weights_only=True")
    assert snapshot(out) == before
    result = run_script(
        "eval_linear.py",
        "--data",
        folders["rs"],
        "--weights",
        out / "checkpoint.pth",
        "--arch",
        "resnet18",
        "--out",
        tmp_path / "eval",
    )
    assert_one_sentence_error(result, "eval_linear.py", "loads with weights_only=True")
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "eval").exists()


def bad_cases(folders, tmp):
    """(name, scripts, extra argv, fragment of the message, setup of --out) for every bad input of issue 7."""
    empty = tmp / "empty"
    empty.mkdir(exist_ok=True)
    a_file = tmp / "a_file.txt"
    a_file.write_text("x")

    def garbage_checkpoint(out):
        out.mkdir()
        (out / "checkpoint.pth").write_text("not a checkpoint")

    def pickle_checkpoint(out):
        out.mkdir()
        with open(out / "checkpoint.pth", "wb") as f:
            pickle.dump({"model": RunsCode(tmp / "pwned")}, f)

    pre = tuple(METHODS)
    return [
        ("missing data", pre, ["--data", str(tmp / "missing")], "is not a folder", None),
        ("no images", pre, ["--data", str(empty)], "holds no images", None),
        ("smaller than a batch", pre, ["--data", folders["one_image"]], "fewer than one batch", None),
        ("zero epochs", pre, ["--epochs", "0"], "--epochs must be positive", None),
        ("negative lr", pre, ["--lr", "-0.1"], "--lr must be positive", None),
        ("unknown arch", pre, ["--arch", "resnet9000"], "invalid choice", None),
        ("out is a file", pre, ["--out", str(a_file)], "is a file", None),
        ("out below a file", pre, ["--out", str(a_file / "run")], "is below the file", None),
        ("garbage checkpoint", pre, [], "move it away to start afresh", garbage_checkpoint),
        ("code in the checkpoint", pre, [], "move it away to start afresh", pickle_checkpoint),
        ("resnet image too small", ("moco", "gersp"), ["--img-size", "16"], "too small", None),
        ("vit image too small", ("pera",), ["--img-size", "8"], "too small", None),
        ("swin mask unit", ("preco",), ["--mask-unit", "6"], "not a multiple of Swin's 4-px patch", None),
        ("queue", ("moco", "gersp"), ["--queue", "20"], "not a multiple of --batch-size", None),
        ("mask ratios sum", ("pera",), ["--mask-ratios", "0.3", "0.3", "0.3"], "sum", None),
        ("mask ratio zero", ("pera",), ["--mask-ratios", "0.5", "0", "0.5"], "positive", None),
        ("natural missing", ("gersp",), ["--natural", str(tmp / "missing")], "is not a folder", None),
        ("natural unlabeled", ("gersp",), ["--natural", str(empty)], "class folder", None),
        ("negative seed", pre, ["--seed", "-1"], "--seed: must be an integer from 0 to 4294967295", None),
        ("negative workers", pre, ["--workers", "-1"], "--workers must be 0 or more", None),
        (
            "batchnorm of one image",
            ("moco", "gersp"),
            ["--batch-size", "2", "--queue", "16"],
            "groups of 1 image",
            None,
        ),
        ("vis without extension", ("pera", "preco"), ["--vis", str(tmp / "vis")], "has no image extension", None),
        ("vis below a file", ("pera", "preco"), ["--vis", str(a_file / "vis.png")], "--vis's folder", None),
    ]


@pytest.mark.parametrize("script", METHODS)
def test_every_bad_input_of_a_pretraining_script_is_one_sentence_and_touches_nothing(
    script, folders, tmp_path, capsys, monkeypatch
):
    cases = [c for c in bad_cases(folders, tmp_path) if script in c[1]]
    cases.append(("batch per process", (script,), ["--batch-size", "6"], "not divisible by the 4 processes", None))
    if script in ("moco", "gersp"):  # torchrun --nproc_per_node=4 ... --batch-size 4: one image a process
        cases.append(("batchnorm per process", (script,), ["--batch-size", "4"], "groups of 1 image", None))
    for name, _, extra, fragment, setup in cases:
        out = tmp_path / f"out_{name.replace(' ', '_')}"
        if setup:
            setup(out)
        before = snapshot(out)
        if "per process" in name:  # rank 0 of 4 processes, as torchrun starts it
            for key, value in (("RANK", "0"), ("WORLD_SIZE", "4"), ("LOCAL_RANK", "0")):
                monkeypatch.setenv(key, value)
        data_folder = extra[extra.index("--data") + 1] if "--data" in extra else None  # --data is repeatable
        extra = [a for i, a in enumerate(extra) if "--data" not in extra[max(i - 1, 0) : i + 1]]
        with pytest.raises(SystemExit) as exit_info:
            METHODS[script].main(tiny_argv(script, folders, data_folder) + ["--out", str(out)] + extra)
        for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
            monkeypatch.delenv(key, raising=False)
        err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert exit_info.value.code == 2, name
        assert len(err) == 1 and err[0].startswith(f"{script}.py: error:") and fragment in err[0], (name, err)
        assert snapshot(out) == before and snapshot(tmp_path / "a_file.txt") is not None, name
    assert not (tmp_path / "pwned").exists()  # the crafted pickle never ran


@pytest.mark.parametrize("script", EVALS)
def test_every_bad_input_of_an_evaluation_script_is_one_sentence_and_touches_nothing(script, folders, tmp_path, capsys):
    one_class = make_image_folder(tmp_path / "one_class", classes=1, per_class=4)
    empty_class = make_image_folder(tmp_path / "empty_class", classes=2, per_class=4)
    os.makedirs(os.path.join(empty_class, "class9"))
    few = make_image_folder(tmp_path / "few", classes=2, per_class=2)
    nested = tmp_path / "nested"  # a copy of a dataset split into train/ and test/, each with its class folders
    for part in ("train", "test"):
        make_image_folder(nested / part, classes=2, per_class=4)
    deeper = torchvision.models.resnet.ResNet(torchvision.models.resnet.BasicBlock, [2, 2, 3, 2])  # resnet18 + 1
    weights = {
        "other_arch": torchvision.models.resnet50().state_dict(),
        "other_keys": {f"encoder.{k}": v for k, v in torchvision.models.resnet18().state_dict().items()},
        "deeper": deeper.state_dict(),
        "vit": data.build_model("vit_tiny", 32, 8).state_dict(),
        "dapt": {
            "arch": "resnet18",
            "method": "moco+finetune:rs",
            "state_dict": {
                k: v for k, v in torchvision.models.resnet18().state_dict().items() if not k.startswith("fc.")
            },
        },
    }
    for name, state in weights.items():
        torch.save(state, tmp_path / f"{name}.pth")
    (tmp_path / "text.pth").write_text("not weights")
    with open(tmp_path / "code.pth", "wb") as f:
        pickle.dump({"state_dict": RunsCode(tmp_path / "pwned")}, f)
    (tmp_path / "a_file.txt").write_text("x")
    cases = [
        (["--data", str(tmp_path / "missing")], "is not a folder"),
        (["--data", one_class], "at least two classes"),
        (["--data", empty_class], "class9 holds no images"),
        (["--data", few, "--train-ratio", "0.2"], "without training images"),
        (["--train-ratio", "1.5"], "--train-ratio must be between 0 and 1"),
        (["--weights", str(tmp_path / "other_arch.pth")], "matches only"),
        (["--weights", str(tmp_path / "other_keys.pth")], "matches only 0 of"),
        (["--weights", str(tmp_path / "text.pth")], "weights_only=True"),
        (["--weights", str(tmp_path / "code.pth")], "weights_only=True"),
        (["--weights", str(tmp_path / "nope.pth")], "is not a file"),
        (["--arch", "resnet9000"], "unknown --arch"),
        (["--runs", "0"], "--runs must be positive"),
        (["--out", str(tmp_path / "a_file.txt")], "is a file"),
        (["--out", str(tmp_path / "a_file.txt" / "run")], "is below the file"),
        (["--weights", str(tmp_path / "deeper.pth")], "holds 12 tensor(s) that resnet18 does not use (e.g. layer3.2."),
        (["--weights", str(tmp_path / "vit.pth")], "matches only 0 of the 120 tensors of resnet18"),
        (["--weights", "imagenet:V2"], "torchvision has no IMAGENET1K_V2 weights for resnet18"),
        (["--weights", str(tmp_path / "dapt.pth")], "was fine-tuned on rs"),
        (["--data", str(nested)], "test holds image folders"),
        (["--seed", "-1"], "--seed: must be an integer from 0 to 4294967295"),
        (["--workers", "-1"], "--workers must be 0 or more"),
    ] + {
        "eval_linear": [],
        "finetune_cls": [
            ([], "fewer than one batch of 64"),  # 2 classes x 8 images: a training split of 4
            (["--batch-size", "1"], "leaves one image per process for BatchNorm"),
            (["--save-backbone", str(tmp_path / "a_file.txt" / "backbone.pth")], "--save-backbone's folder"),
        ],
    }[script]
    out = tmp_path / "out"
    for extra, fragment in cases:
        with pytest.raises(SystemExit) as exit_info:
            EVALS[script].main(
                [
                    "--data",
                    folders["rs"],
                    "--arch",
                    "resnet18",
                    "--weights",
                    "random",
                    "--workers",
                    "0",
                    "--out",
                    str(out),
                ]
                + extra
            )
        err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert exit_info.value.code == 2 and len(err) == 1, (extra, err)
        assert err[0].startswith(f"{script}.py: error:") and fragment in err[0], (extra, err)
        assert not out.exists() and (tmp_path / "a_file.txt").read_text() == "x"
    assert not (tmp_path / "pwned").exists()
