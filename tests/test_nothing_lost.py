"""Nothing lost, by construction: every path a run reads or writes is declared once (READS, WRITES) and checked by
data.check_paths before any work; a run folder knows its script (run.json); one process check; one signal policy,
from the first line of work, and an interrupted run that never looks finished. Each test is a situation a careful
user met, as the user met it: through the script's main()."""

import json
import os
import signal
import subprocess
import sys

import pytest
import torch
import torchvision

import data
import eval_linear
import finetune_cls
import methods
import moco
import pera
from conftest import REPO, make_image_folder, refusal, snapshot, tiny_argv

PROBE = ["--arch", "resnet18", "--img-size", "32", "--epochs", "2", "--runs", "1", "--train-ratio", "0.5"]
PROBE += ["--workers", "0"]
FINETUNE = PROBE[:4] + ["--epochs", "1", "--batch-size", "4", "--runs", "1", "--train-ratio", "0.5", "--workers", "0"]


@pytest.fixture
def scenes(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("data") / "scenes", classes=2, per_class=8)


def backbone_file(path):
    """A resnet18 backbone.pth as moco.py writes it."""
    torch.manual_seed(0)
    state = {k: v for k, v in torchvision.models.resnet18().state_dict().items() if not k.startswith("fc.")}
    torch.save({"arch": "resnet18", "method": "moco", "config": {}, "state_dict": state}, path)
    return str(path)


def pera_argv(scenes, out, *extra):
    return tiny_argv("pera") + ["--data", scenes, "--max-steps", "1", "--out", str(out), *map(str, extra)]


# ------------------------------------------------------------------------------------------------ declared paths
def test_no_output_is_or_lies_inside_an_input_and_nothing_is_touched(scenes, tmp_path, capsys):
    bb = backbone_file(tmp_path / "bb.pth")
    old_run = tmp_path / "old"
    old_run.mkdir()
    (old_run / "checkpoint.pth").write_bytes(open(bb, "rb").read())  # a checkpoint given back as --weights
    cases = [
        (finetune_cls, ["--weights", bb, "--save-backbone", bb, "--out", tmp_path / "ft"], f"--save-backbone {bb} is"),
        (eval_linear, ["--out", f"{scenes}/probe"], f"--out {scenes}/probe lies inside --data {scenes}, which"),
        (pera, ["--out", f"{scenes}/run", "--vis", f"{scenes}/run/vis.png"], f"--out {scenes}/run lies inside --data"),
        (pera, ["--out", tmp_path / "p", "--vis", f"{scenes}/class0/0.png"], f"--vis {scenes}/class0/0.png lies"),
        (moco, ["--knn-monitor", tmp_path, "--out", tmp_path / "m"], f"--out {tmp_path / 'm'} lies inside --knn-mon"),
        (finetune_cls, ["--weights", old_run / "checkpoint.pth", "--out", old_run], "is the checkpoint.pth this run"),
        (finetune_cls, ["--save-backbone", tmp_path / "ft" / "log.jsonl", "--out", tmp_path / "ft"], "a file this"),
    ]
    before = (snapshot(tmp_path), snapshot(scenes))
    for module, extra, fragment in cases:
        argv = tiny_argv(module.__name__) if module in (moco, pera) else FINETUNE
        err = refusal(module, argv + ["--data", scenes, *map(str, extra)], capsys)
        assert fragment in err, err
    assert (snapshot(tmp_path), snapshot(scenes)) == before  # nothing written, the weights file whole


def test_a_run_folder_belongs_to_its_script_and_no_other_writes_into_it(scenes, tmp_path, capsys):
    run, tuned = tmp_path / "moco_run", tmp_path / "tuned"
    moco.main(tiny_argv("moco") + ["--data", scenes, "--max-steps", "1", "--out", str(run)])
    assert json.load(open(run / "run.json"))["script"] == "moco.py"
    finetune_cls.main(FINETUNE + ["--data", scenes, "--weights", str(run / "backbone.pth"), "--out", str(tuned)])
    before = snapshot(tmp_path)
    for module, folder, owner in ((eval_linear, run, "moco.py"), (eval_linear, tuned, "finetune_cls.py")):
        err = refusal(module, PROBE + ["--data", scenes, "--out", str(folder)], capsys)
        assert f"--out {folder} is the run folder of {owner} (run.json); give {module.__name__}.py a folder" in err
    err = refusal(moco, tiny_argv("moco") + ["--data", scenes, "--out", str(tuned)], capsys)
    assert "is the run folder of finetune_cls.py" in err, err
    assert snapshot(tmp_path) == before  # not a line appended to either log.jsonl
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("a user's file")
    err = refusal(eval_linear, PROBE + ["--data", scenes, "--out", str(notes)], capsys)
    assert f"--out {notes} holds todo.txt and no run.json, so it is no run folder of eval_linear.py" in err, err
    os.remove(run / "run.json")  # a run folder of an earlier version: only moco's files, its checkpoint among them
    moco.main(tiny_argv("moco") + ["--data", scenes, "--max-steps", "2", "--out", str(run)])
    assert "resuming at step 1" in capsys.readouterr().out and json.load(open(run / "run.json"))["script"] == "moco.py"


def test_a_second_evaluation_into_one_out_keeps_the_first_results_or_is_refused(scenes, tmp_path, capsys):
    argv = PROBE + ["--data", scenes, "--out", str(tmp_path / "probe")]
    first = eval_linear.evaluate(eval_linear.get_args(argv))
    kept = {name: snapshot(tmp_path / "probe" / name) for name in ("results.json", "results.md", "log.jsonl")}
    capsys.readouterr()
    assert eval_linear.evaluate(eval_linear.get_args(argv + ["--workers", "1"])) == first  # --workers: no number
    assert "holds the results of this evaluation (the same flags and files); kept" in capsys.readouterr().out
    for other in (["--seed", "1"], ["--epochs", "3"], ["--knn"]):  # other splits, another probe, another protocol
        err = refusal(eval_linear, argv + other, capsys)
        assert f"--out {tmp_path / 'probe'} holds the results of another evaluation" in err, err
    assert {name: snapshot(tmp_path / "probe" / name) for name in kept} == kept


def test_an_existing_file_is_replaced_only_by_the_run_that_wrote_it(scenes, tmp_path, capsys):
    picture = tmp_path / "picture.png"
    picture.write_bytes(open(f"{scenes}/class0/0.png", "rb").read())
    err = refusal(pera, pera_argv(scenes, tmp_path / "a", "--vis", picture), capsys)
    assert f"--vis {picture} exists and the run of --out {tmp_path / 'a'} did not write it" in err, err
    assert picture.read_bytes() == open(f"{scenes}/class0/0.png", "rb").read() and not (tmp_path / "a").exists()
    vis = tmp_path / "vis.png"
    pera.main(pera_argv(scenes, tmp_path / "a", "--vis", vis))
    assert json.load(open(tmp_path / "a" / "run.json"))["outputs"] == {str(vis): data.sha256(vis)}
    pera.main(pera_argv(scenes, tmp_path / "a", "--vis", vis))  # the same run again: its own picture, redrawn
    err = refusal(pera, pera_argv(scenes, tmp_path / "b", "--vis", vis), capsys)  # another run: not its picture
    assert f"--vis {vis} exists and the run of --out {tmp_path / 'b'} did not write it" in err, err
    bb = backbone_file(tmp_path / "bb.pth")
    argv = FINETUNE + ["--data", scenes, "--weights", bb, "--out", str(tmp_path / "ft")]
    err = refusal(finetune_cls, argv + ["--save-backbone", str(vis)], capsys)
    assert f"--save-backbone {vis} exists and the run of --out {tmp_path / 'ft'} did not write it" in err, err


# ------------------------------------------------------------------------------------------------ one process check
@pytest.mark.parametrize(
    "env, fragment",
    [
        ({"RANK": "1"}, "RANK=1 is set but WORLD_SIZE and LOCAL_RANK are not: torchrun sets all three"),
        ({"WORLD_SIZE": "2"}, "WORLD_SIZE=2 is set but RANK and LOCAL_RANK are not"),
        ({"RANK": "0", "WORLD_SIZE": "2"}, "RANK=0, WORLD_SIZE=2 is set but LOCAL_RANK is not"),
        ({"RANK": "one", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}, "must be integers, as torchrun sets them"),
        ({"RANK": "2", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}, "names no process of a group of 2"),
    ],
)
def test_every_script_refuses_a_partial_torchrun_environment_before_any_write(
    env, fragment, scenes, tmp_path, capsys, monkeypatch
):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    for name in methods.METHODS + ["eval_linear", "finetune_cls"]:
        module = sys.modules.get(name) or __import__(name)
        argv = tiny_argv(name) if name in methods.METHODS else FINETUNE
        err = refusal(module, argv + ["--data", scenes, "--out", str(tmp_path / name)], capsys)
        assert fragment in err, (name, err)
    assert os.listdir(tmp_path) == []


def test_a_leftover_rank_is_one_sentence_not_a_process_waiting_forever(scenes, tmp_path):
    argv = [sys.executable, os.path.join(REPO, "moco.py"), *tiny_argv("moco"), "--data", scenes, "--out", tmp_path]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=120, env={**os.environ, "RANK": "1"})
    assert result.returncode == 2 and "RANK=1 is set but WORLD_SIZE and LOCAL_RANK are not" in result.stderr
    assert "Traceback" not in result.stderr and os.listdir(tmp_path) == []


# ------------------------------------------------------------------------------------------------ one signal policy
def stop_line(script, name, resumes=None):
    resume = f"resumes from {resumes}" if resumes else "starts it again"
    return f"{script}: stopped by {name}; the same command {resume}.\n"


def test_a_signal_before_anything_is_saved_stops_at_once_and_writes_nothing(scenes, tmp_path, capsys, monkeypatch):
    real = data.list_images

    def listed_then_sigterm(*args, **kwargs):  # a scheduler's notice while a big dataset is listed
        os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    monkeypatch.setattr(data, "list_images", listed_then_sigterm)
    with pytest.raises(SystemExit) as stop:
        moco.main(tiny_argv("moco") + ["--data", scenes, "--out", str(tmp_path / "run")])
    assert stop.value.code == 128 + signal.SIGTERM and capsys.readouterr().err == stop_line("moco.py", "SIGTERM")
    assert not (tmp_path / "run").exists()


def test_ctrl_c_during_feature_extraction_exits_130_and_leaves_no_results(scenes, tmp_path, capsys, monkeypatch):
    real, loads = data.ImageDataset.load, []

    def load_then_ctrl_c(dataset, index, epoch):
        loads.append(index)
        if len(loads) == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return real(dataset, index, epoch)

    monkeypatch.setattr(data.ImageDataset, "load", load_then_ctrl_c)
    with pytest.raises(SystemExit) as stop:
        eval_linear.main(PROBE + ["--data", scenes, "--out", str(tmp_path / "probe")])
    assert stop.value.code == 130 and capsys.readouterr().err == stop_line("eval_linear.py", "SIGINT")
    assert len(loads) == 3 and sorted(os.listdir(tmp_path / "probe")) == [".lock", "run.json"]
    monkeypatch.setattr(data.ImageDataset, "load", real)
    assert eval_linear.evaluate(eval_linear.get_args(PROBE + ["--data", scenes, "--out", str(tmp_path / "probe")]))


def test_ctrl_c_during_the_first_knn_measurement_stops_after_one_saved_step(scenes, tmp_path, capsys, monkeypatch):
    real = data.KnnMonitor.top1

    def measured_during_ctrl_c(monitor, *args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)
        return real(monitor, *args, **kwargs)

    monkeypatch.setattr(data.KnnMonitor, "top1", measured_during_ctrl_c)
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as stop:
        moco.main(tiny_argv("moco") + ["--data", scenes, "--knn-monitor", scenes, "--epochs", "3", "--out", str(out)])
    assert stop.value.code == 130 and capsys.readouterr().err == stop_line("moco.py", "SIGINT", out / "checkpoint.pth")
    assert torch.load(out / "checkpoint.pth", weights_only=True)["step"] == 1


def test_a_second_ctrl_c_during_a_save_interrupts_at_once_and_the_last_checkpoint_stays_whole(
    scenes, tmp_path, capsys, monkeypatch
):
    out, steps, real_save = tmp_path / "run", [], torch.save

    def ctrl_c_at_step_3(*args, **kwargs):
        steps.append(moco_step(*args, **kwargs))
        if len(steps) == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return steps[-1]

    def save_then_ctrl_c(obj, f, *args, **kwargs):  # the second Ctrl-C arrives while step 3's checkpoint is written
        if isinstance(obj, dict) and obj.get("step") == 3:
            f.write(b"half a checkpoint")
            os.kill(os.getpid(), signal.SIGINT)
        return real_save(obj, f, *args, **kwargs)

    moco_step = moco.train_step
    monkeypatch.setattr(moco, "train_step", ctrl_c_at_step_3)
    monkeypatch.setattr(torch, "save", save_then_ctrl_c)
    with pytest.raises(SystemExit) as stop:
        moco.main(tiny_argv("moco") + ["--data", scenes, "--epochs", "4", "--out", str(out)])
    err = capsys.readouterr().err
    assert stop.value.code == 130 and err == stop_line("moco.py", "SIGINT", out / "checkpoint.pth"), err
    assert torch.load(out / "checkpoint.pth", weights_only=True)["step"] == 2  # epoch 1's, whole
    assert not os.path.lexists(out / "checkpoint.pth.tmp") and "disk" not in err


# ------------------------------------------------------------------------------------------------ true numbers
def test_the_same_files_given_twice_are_refused_by_pre_training(scenes, tmp_path, capsys):
    for twice in ([scenes, f"{scenes}/"], [scenes, f"{scenes}/class0"]):
        argv = tiny_argv("moco") + ["--data", twice[0], "--data", twice[1], "--out", str(tmp_path / "run")]
        err = refusal(moco, argv, capsys)
        assert f"--data {twice[0]} and --data {twice[1]} hold the same files; give each dataset once." in err, err
    assert not (tmp_path / "run").exists()


def test_a_resume_with_another_lr_is_noted_and_args_json_keeps_both_segments(scenes, tmp_path, capsys):
    argv = tiny_argv("moco") + ["--data", scenes, "--epochs", "4", "--out", str(tmp_path / "run")]
    moco.main(argv + ["--max-steps", "2"])
    moco.main(argv + ["--max-steps", "4", "--lr", "0.01", "--workers", "0"])
    assert "note: resuming at step 2 with --lr 0.01 (was 0.03); args.json keeps each segment" in capsys.readouterr().out
    segments = json.load(open(tmp_path / "run" / "args.json"))["segments"]
    assert [(s["step"], s["args"]["lr"], s["args"]["max_steps"]) for s in segments] == [(0, 0.03, 2), (2, 0.01, 4)]
    checkpoint = torch.load(tmp_path / "run" / "checkpoint.pth", weights_only=True)
    assert checkpoint["segments"] == segments and checkpoint["args"]["lr"] == 0.01
    log = [json.loads(line) for line in open(tmp_path / "run" / "log.jsonl")]
    assert [r["lr"] for r in log] == pytest.approx(
        [0.03, 0.03] + [moco.lr_at(moco.get_args(argv + ["--lr", "0.01"]), 1)] * 2
    )


def test_every_warm_up_that_does_not_fit_in_the_epochs_is_refused_alike(scenes, tmp_path, capsys):
    for name, extra, flag in (
        ("pera", ["--epochs", "2", "--warmup-epochs", "20"], "--warmup-epochs 20"),
        ("pera", ["--epochs", "2", "--teacher-temp-epochs", "2"], "--teacher-temp-epochs 2"),
        ("preco", ["--epochs", "2", "--warmup-epochs", "2"], "--warmup-epochs 2.0"),
    ):
        err = refusal(__import__(name), tiny_argv(name) + ["--data", scenes, "--out", str(tmp_path), *extra], capsys)
        assert f"{flag} does not fit in --epochs 2:" in err and "give fewer warm-up epochs or more --epochs" in err, err
    assert os.listdir(tmp_path) == []


def test_a_typo_is_reported_under_the_flag_that_holds_it(scenes, tmp_path, capsys):
    for name, flag in (("gersp", "--natural"), ("moco", "--knn-monitor")):
        err = refusal(__import__(name), tiny_argv(name) + ["--data", scenes, flag, str(tmp_path / "typo")], capsys)
        assert f"{flag} {tmp_path / 'typo'} is not a folder" in err, err


def test_a_folder_unzipped_on_a_mac_trains_without_its_twins(scenes, tmp_path, capsys):
    mac = tmp_path / "mac"
    for root, _, files in os.walk(scenes):
        for name in files:
            for folder in (mac / os.path.relpath(root, scenes), mac / "__MACOSX" / os.path.relpath(root, scenes)):
                folder.mkdir(parents=True, exist_ok=True)
                (folder / f"._{name}").write_bytes(b"\x00\x05\x16\x07AppleDouble")  # macOS's resource twins
            (mac / os.path.relpath(root, scenes) / name).write_bytes(open(os.path.join(root, name), "rb").read())
    assert data.list_images([str(mac)])[0] == [p.replace(scenes, str(mac)) for p in data.list_images([scenes])[0]]
    moco.main(tiny_argv("moco") + ["--data", str(mac), "--max-steps", "2", "--out", str(tmp_path / "run")])
    records = [json.loads(line) for line in open(tmp_path / "run" / "log.jsonl")]
    assert [r["skipped_images"] for r in records] == [0, 0] and "unreadable" not in capsys.readouterr().out
