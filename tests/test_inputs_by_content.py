"""A run knows what it was given by content, and refuses before any work: two datasets of one folder name, a fine-tune
checkpoint whose weights or data changed, a fine-tuned backbone back on its source dataset under any path or file
kind, a resume whose data changed, two runs on one --out, a folder that cannot be written, a disk that fills."""

import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch
import torchvision

import eval_linear
import finetune_cls
import moco
from conftest import REPO, TINY_RESNET, assert_one_sentence_error, make_image_folder, refusal, run_script

PROBE = [
    "--arch",
    "resnet18",
    "--img-size",
    "32",
    "--epochs",
    "2",
    "--runs",
    "1",
    "--train-ratio",
    "0.5",
    "--workers",
    "0",
]
FINETUNE = PROBE[:4] + ["--epochs", "1", "--batch-size", "4", "--runs", "1", "--train-ratio", "0.5", "--workers", "0"]


# ------------------------------------------------------------------------------------------------ evaluation tables
def test_two_datasets_of_one_folder_name_get_a_column_each_and_the_same_files_twice_are_refused(tmp_path, capsys):
    x = make_image_folder(tmp_path / "x" / "images", classes=2, per_class=4, seed=0)
    y = make_image_folder(tmp_path / "y" / "images", classes=3, per_class=4, seed=1)
    data = ["--data", x, "--data", y, "--weights", "random"]
    probed = eval_linear.evaluate(eval_linear.get_args(PROBE + data + ["--out", str(tmp_path / "probe")]))
    tuned = finetune_cls.evaluate(finetune_cls.get_args(FINETUNE + data + ["--out", str(tmp_path / "tune")]))
    for entries, out in ((probed, "probe"), (tuned, "tune")):
        assert {"x/images", "y/images"} <= set(entries[0])  # one result each, not y's number under both names
        assert len(entries[0]["x/images"]["classes"]) == 2 and len(entries[0]["y/images"]["classes"]) == 3
        assert "| x/images top-1 | y/images top-1 |" in (tmp_path / out / "results.md").read_text()
        datasets = json.loads((tmp_path / out / "results.json").read_text())["datasets"]
        assert datasets["x/images"]["data"] == x and datasets["x/images"]["files"] == 8
    for module in (eval_linear, finetune_cls):
        err = refusal(module, PROBE + ["--data", x, "--data", f"{x}/", "--out", str(tmp_path / "n")], capsys)
        assert f"--data {x} and --data {x}/ hold the same files" in err, err
        err = refusal(module, PROBE + ["--data", x, "--dataset", "s", "--data", y, "--dataset", "S"], capsys)
        assert "--dataset s is given twice" in err, err
    assert not (tmp_path / "n").exists()


def test_a_finetune_checkpoint_is_resumed_only_with_the_weights_and_images_it_was_written_for(tmp_path, capsys):
    folder = make_image_folder(tmp_path / "scenes", classes=2, per_class=4)
    weights = tmp_path / "backbone.pth"
    torch.manual_seed(0)
    state = {k: v for k, v in torchvision.models.resnet18().state_dict().items() if not k.startswith("fc.")}
    torch.save({"arch": "resnet18", "method": "moco", "config": {}, "state_dict": state}, weights)
    argv = FINETUNE + ["--data", folder, "--weights", str(weights), "--out", str(tmp_path / "ft")]
    first = finetune_cls.evaluate(finetune_cls.get_args(argv))
    results = (tmp_path / "ft" / "results.json").read_bytes()
    kept = finetune_cls.evaluate(finetune_cls.get_args(argv))  # the same inputs: the results are kept, not redone
    assert "holds the results of this evaluation" in capsys.readouterr().out and kept == first
    retyped = FINETUNE + ["--data", f"{folder}/", "--weights", str(weights), "--out", str(tmp_path / "ft")]
    finetune_cls.evaluate(finetune_cls.get_args(retyped + ["--workers", "1"]))  # a path typed with its slash
    assert "holds the results of this evaluation" in capsys.readouterr().out
    assert (tmp_path / "ft" / "results.json").read_bytes() == results
    before = (tmp_path / "ft" / "checkpoint.pth").read_bytes()
    state["conv1.weight"] += 1  # the backbone trained further: the same name, another file
    torch.save({"arch": "resnet18", "method": "moco", "config": {}, "state_dict": state}, weights)
    err = refusal(finetune_cls, argv, capsys)
    assert f"was written for other files behind --weights {weights} (compared by content)" in err, err
    torch.save({"arch": "resnet18", "method": "moco", "config": {}, "state_dict": state}, tmp_path / "b2.pth")
    shutil.copy(tmp_path / "b2.pth", weights)
    make_image_folder(tmp_path / "scenes", classes=3, per_class=4)  # a class folder added
    err = refusal(finetune_cls, argv, capsys)
    assert f"--weights {weights}, --data {folder} (compared by content)" in err, err
    assert (tmp_path / "ft" / "checkpoint.pth").read_bytes() == before


def test_a_weights_file_that_changes_during_a_finetune_is_refused_before_its_next_run(tmp_path, capsys):
    folder = make_image_folder(tmp_path / "scenes", classes=2, per_class=4)
    weights = tmp_path / "backbone.pth"
    state = {k: v for k, v in torchvision.models.resnet18().state_dict().items() if not k.startswith("fc.")}
    torch.save({"arch": "resnet18", "method": "moco", "config": {}, "state_dict": state}, weights)
    real_test_confusion = finetune_cls.test_confusion

    def train_the_backbone_further(*args, **kwargs):  # a pre-training run still writing the file
        state["conv1.weight"] += 1
        torch.save({"arch": "resnet18", "method": "moco", "config": {}, "state_dict": state}, weights)
        return real_test_confusion(*args, **kwargs)

    argv = FINETUNE + ["--data", folder, "--weights", str(weights), "--runs", "2", "--out", str(tmp_path / "ft")]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(finetune_cls, "test_confusion", train_the_backbone_further)
        err = refusal(finetune_cls, argv, capsys)
    assert f"error: --weights {weights} changed during the evaluation; run it again when the file is final." in err
    assert len(torch.load(tmp_path / "ft" / "checkpoint.pth", weights_only=True)["done"]) == 1  # run 0 is kept


def test_a_backbone_fine_tuned_on_a_dataset_is_refused_there_whatever_path_or_file_reaches_the_check(tmp_path, capsys):
    """Paper 004: source and target differ. The interrupted fine-tune's checkpoint.pth, and the dataset named with or
    without its wrapper folder, used to pass the name comparison."""
    make_image_folder(tmp_path / "ds" / "inner", classes=2, per_class=4)
    out = tmp_path / "ft"
    argv = FINETUNE + ["--data", str(tmp_path / "ds"), "--weights", "random", "--epochs", "2"]
    argv += ["--save-backbone", str(tmp_path / "dapt.pth"), "--out", str(out)]
    real_train_epoch = finetune_cls.train_epoch

    def stop_after_one_epoch(*args, **kwargs):
        real_train_epoch(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGTERM)  # the job stops after its first saved epoch: checkpoint.pth holds it

    with pytest.MonkeyPatch.context() as patch, pytest.raises(SystemExit):
        patch.setattr(finetune_cls, "train_epoch", stop_after_one_epoch)
        finetune_cls.main(argv)
    assert f"stopped by SIGTERM; the same command resumes from {out / 'checkpoint.pth'}" in capsys.readouterr().err
    assert torch.load(out / "checkpoint.pth", weights_only=True)["current"]["epoch"] == 1
    shutil.copy(out / "checkpoint.pth", tmp_path / "interrupted.pth")
    finetune_cls.main(argv)  # resumed to the end: dapt.pth written
    for weights in (tmp_path / "interrupted.pth", tmp_path / "dapt.pth"):
        for root in (tmp_path / "ds", tmp_path / "ds" / "inner"):
            err = refusal(eval_linear, PROBE + ["--data", str(root), "--weights", str(weights)], capsys)
            assert f"--weights {weights}" in err and "was fine-tuned on" in err and "include its training" in err, err
    finished = PROBE + ["--data", str(tmp_path / "ds"), "--weights", str(out / "checkpoint.pth")]
    err = refusal(eval_linear, finished, capsys)
    assert "is a checkpoint of finished fine-tuning runs: it holds their results, not weights" in err, err
    other = make_image_folder(tmp_path / "other", classes=2, per_class=4, seed=5)
    [entry] = eval_linear.evaluate(
        eval_linear.get_args(
            PROBE + ["--data", other, "--weights", str(tmp_path / "dapt.pth"), "--out", str(tmp_path / "probe")]
        )
    )
    assert entry["method"] == "random+finetune:ds" and entry["arch"] == "resnet18"


# ------------------------------------------------------------------------------------------------ pre-training runs
def tiny_moco(folder, out, *extra):
    return TINY_RESNET + ["--data", str(folder), "--queue", "16", "--out", str(out), *extra]


def test_a_resume_knows_its_data_by_its_files_not_by_how_the_folder_is_typed(tmp_path, capsys):
    folder = make_image_folder(tmp_path / "images", classes=2, per_class=8)
    moco.main(tiny_moco(folder, tmp_path / "run", "--max-steps", "1"))
    moco.main(tiny_moco(f"{folder}/", tmp_path / "run", "--max-steps", "2"))  # tab completion's slash: the same files
    assert "resuming at step 1" in capsys.readouterr().out
    before = (tmp_path / "run" / "checkpoint.pth").read_bytes()
    make_image_folder(tmp_path / "images", classes=2, per_class=12, seed=3)  # 16 -> 24 images: the epochs would move
    err = refusal(moco, tiny_moco(folder, tmp_path / "run", "--max-steps", "3"), capsys)
    assert "was written with other --data (16 files then, 24 now, compared by name and size)" in err, err
    assert (tmp_path / "run" / "checkpoint.pth").read_bytes() == before
    (tmp_path / "run" / "backbone.pth").rename(tmp_path / "run" / "checkpoint.pth")  # a backbone given as checkpoint
    err = refusal(moco, tiny_moco(folder, tmp_path / "run"), capsys)
    assert "checkpoint.pth is not a moco.py training checkpoint; move it away to start afresh" in err, err


def test_a_second_run_on_a_live_out_is_refused_and_a_dead_runs_out_is_taken_over(tmp_path, capsys):
    folder = make_image_folder(tmp_path / "images", classes=2, per_class=8)
    argv = [sys.executable, "-u", os.path.join(REPO, "moco.py"), *tiny_moco(folder, tmp_path / "run", "--epochs", "50")]
    first = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in first.stdout:  # the first run holds --out once it trains
        if "step 3/" in line:  # the checkpoint of step 2, the first epoch's end, is on disk
            break
    second = run_script("moco.py", *tiny_moco(folder, tmp_path / "run", "--lr", "0.3"))
    assert_one_sentence_error(second, "moco.py", f"--out {tmp_path / 'run'} is in use by process {first.pid} on")
    first.kill()  # SIGKILL: no handler runs, the lock's holder is left written
    first.wait(timeout=60)
    log_lines = len((tmp_path / "run" / "log.jsonl").read_text().splitlines())
    (segment,) = json.loads((tmp_path / "run" / "args.json").read_text())["segments"]
    assert segment["args"]["lr"] == 0.03  # the refused run wrote nothing
    saved = torch.load(tmp_path / "run" / "checkpoint.pth", weights_only=True)["step"]
    moco.main(tiny_moco(folder, tmp_path / "run", "--epochs", "50", "--max-steps", str(saved + 2)))  # a third run
    third = capsys.readouterr().out
    assert f"note: --out {tmp_path / 'run'} was held by process {first.pid} on" in third
    assert "which ended without releasing it; this run takes it over" in third
    assert f"resuming at step {saved}" in third and f"done at step {saved + 2}" in third
    assert len((tmp_path / "run" / "log.jsonl").read_text().splitlines()) == log_lines + 2


@pytest.fixture
def read_only_folder(tmp_path):
    """A folder nothing can be written to: a read-only tmpfs where this user may mount one (root), else a folder
    without write permission (which root would ignore: then the test is skipped, saying so)."""
    folder = tmp_path / "read_only"
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(folder)], capture_output=True)
    if mounted.returncode != 0:
        folder.chmod(0o555)
        if os.access(folder, os.W_OK):
            pytest.skip("no read-only folder here: mounting a tmpfs needs root, and root ignores file permissions")
    yield folder
    if mounted.returncode == 0:
        subprocess.run(["umount", "--lazy", str(folder)], check=True)  # lazy: even if a failed test left a file open
    folder.chmod(0o755)


def test_a_read_only_out_is_one_sentence_before_any_work(tmp_path, read_only_folder, capsys):
    folder = make_image_folder(tmp_path / "images", classes=2, per_class=8)
    err = refusal(moco, tiny_moco(folder, read_only_folder / "run"), capsys)
    assert f"--out {read_only_folder / 'run'} cannot be written (" in err and "give a folder this user can" in err, err
    err = refusal(eval_linear, PROBE + ["--data", folder, "--out", str(read_only_folder)], capsys)
    assert f"--out {read_only_folder} cannot be written" in err, err
    assert "top-1" not in capsys.readouterr().out  # refused before extraction and probe, not after


def test_a_disk_that_fills_during_a_save_leaves_the_last_good_checkpoint_and_no_partial_file(tmp_path, capsys):
    """/dev/full fails every write with ENOSPC, as a full disk does: the next checkpoint's temp file is made one."""
    folder = make_image_folder(tmp_path / "images", classes=2, per_class=8)
    moco.main(tiny_moco(folder, tmp_path / "run", "--max-steps", "2"))
    before = (tmp_path / "run" / "checkpoint.pth").read_bytes()
    os.symlink("/dev/full", tmp_path / "run" / "checkpoint.pth.tmp")
    with pytest.raises(SystemExit) as exit_info:
        moco.main(tiny_moco(folder, tmp_path / "run", "--max-steps", "4"))
    err = capsys.readouterr().err.strip().splitlines()
    path = tmp_path / "run" / "checkpoint.pth"
    assert exit_info.value.code == 2 and err == [
        f"moco.py: error: writing {path} failed (No space left on device): the partial file is removed and {path} "
        "is left as it was."
    ], err
    assert path.read_bytes() == before and not os.path.lexists(f"{path}.tmp")


def test_a_disk_that_fills_while_logging_is_one_sentence(tmp_path, capsys):
    folder = make_image_folder(tmp_path / "images", classes=2, per_class=8)
    moco.main(tiny_moco(folder, tmp_path / "run", "--max-steps", "1"))
    os.remove(tmp_path / "run" / "log.jsonl")
    os.symlink("/dev/full", tmp_path / "run" / "log.jsonl")
    err = refusal(moco, tiny_moco(folder, tmp_path / "run", "--max-steps", "2"), capsys)
    path = tmp_path / "run" / "log.jsonl"
    assert err == f"moco.py: error: writing {path} failed (No space left on device); the lines written before are kept."


def test_a_small_filesystem_that_fills_during_a_save_leaves_the_last_good_checkpoint(tmp_path, capsys):
    """The same on a real full filesystem: a tmpfs big enough for one checkpoint and the backbone, not for a second
    checkpoint beside the first."""
    folder = make_image_folder(tmp_path / "images", classes=2, per_class=8)
    moco.main(tiny_moco(folder, tmp_path / "sizes", "--max-steps", "1"))
    sizes = [os.path.getsize(tmp_path / "sizes" / name) for name in ("checkpoint.pth", "backbone.pth")]
    disk = tmp_path / "disk"
    disk.mkdir()
    size = sum(sizes) + sizes[0] // 2 + 2**20
    if subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(disk)], capture_output=True
    ).returncode:
        pytest.skip("mounting a small filesystem needs root; the /dev/full test above covers the same code")
    try:
        moco.main(tiny_moco(folder, disk / "run", "--max-steps", "1"))
        before = (disk / "run" / "checkpoint.pth").read_bytes()
        with pytest.raises(SystemExit) as exit_info:
            moco.main(tiny_moco(folder, disk / "run", "--max-steps", "2"))
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and f"writing {disk / 'run' / 'checkpoint.pth'} failed (" in err
        assert "the partial file is removed and" in err and "is left as it was" in err
        assert (disk / "run" / "checkpoint.pth").read_bytes() == before
        assert not os.path.exists(disk / "run" / "checkpoint.pth.tmp")
        subprocess.run(["dd", "if=/dev/zero", f"of={disk / 'filler'}", "bs=64k"], capture_output=True)  # full now
        err = refusal(moco, tiny_moco(folder, disk / "run", "--max-steps", "2"), capsys)
        assert f"--out {disk / 'run'} cannot be written (No space left on device)" in err, err
        assert (disk / "run" / "checkpoint.pth").read_bytes() == before
    finally:
        subprocess.run(["umount", "--lazy", str(disk)], check=True)  # lazy: even if a failed test left a file open
