"""The helper block below each method file's banner: the same text in every method file (found by that banner, a new
one included), each file's own train() above it, and what the helpers do for every method (bf16 autocast, window means
in the log, the kNN monitor that never changes the training, a two-node launch)."""

import argparse
import ast
import importlib
import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch
import torchvision
from torch.distributed.run import get_args_parser as torchrun_parser

import moco
from conftest import REPO, TINY_RESNET, make_image_folder, tiny_argv
from methods import BANNER, METHODS, method_files

# Budgets, counted on the ruff-formatted file (CI checks the format): README, Adding a method, states them
TRAIN_LINES, HELPER_LINES, LOG_LINES, FUNCTION_LINES, CLASS_LINES = 90, 220, 40, 80, 60


def assert_helper_blocks_equal(root):
    """Every method file in `root` has the banner once, and the text from it to the end is the same in all."""
    blocks = {}
    for name in method_files(root):
        text = open(os.path.join(root, name)).read()
        assert text.count(BANNER) == 1, name
        blocks[name] = text[text.index(BANNER) :]
    texts = list(blocks.values())
    common = max(texts, key=texts.count)
    assert all(block == common for block in texts), [name for name, block in blocks.items() if block != common]
    assert "def setup(" in common and "def train(" not in common  # the loop is above


def assert_train_decides_and_helpers_only_do(path):
    """README, Reading a method file: the method, then its train() that checks the method's flags, calls train_step()
    and writes the checkpoint in sight, then the helpers, which never check the method's flags, never raise the stop
    of a non-finite run and hold only process facts; within the budgets."""
    text = open(path).read()
    above = text[: text.index(BANNER)]
    helpers = text[text.index(BANNER) :]
    tree = ast.parse(text)
    (train,) = [node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == "train"]
    assert train.lineno < above.count("\n") + 1 and train.end_lineno - train.lineno + 1 <= TRAIN_LINES
    calls = [n.func for n in ast.walk(train) if isinstance(n, ast.Call)]
    called = {f.id for f in calls if isinstance(f, ast.Name)} | {f.attr for f in calls if isinstance(f, ast.Attribute)}
    assert {"setup", "check_args", "make_loader", "read_checkpoint", "train_step", "save_atomic"} <= called, called
    raised = {n.exc.func.id for n in ast.walk(train) if isinstance(n, ast.Raise) and isinstance(n.exc, ast.Call)}
    # the stops on a non-finite loss or weights, and on unreadable data
    assert raised == {"NonFiniteError", "UserError"}
    assert "check_args(" not in helpers and "raise NonFiniteError" not in helpers
    assert helpers.count("\n") <= HELPER_LINES
    for node in ast.walk(tree):
        if node is train or not isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            continue
        limit = LOG_LINES if node.name == "Log" else CLASS_LINES if isinstance(node, ast.ClassDef) else FUNCTION_LINES
        assert node.end_lineno - node.lineno + 1 <= limit, (path, node.name)


def test_the_helper_block_is_the_same_text_in_every_method_file():
    assert {"moco", "gersp", "pera", "preco"} <= set(METHODS)  # found by the banner
    assert_helper_blocks_equal(REPO)
    assert moco.Process._fields == ("rank", "world", "device", "amp_dtype")  # process facts only


@pytest.mark.parametrize("name", method_files())
def test_each_method_file_decides_in_its_own_train_and_its_helpers_only_do(name):
    assert_train_decides_and_helpers_only_do(os.path.join(REPO, name))


def test_a_new_method_file_is_found_and_checked_with_no_edit_and_a_changed_byte_in_its_helpers_fails(tmp_path):
    """README, Adding a method: copy moco.py to mymethod.py. The checks above find it by its banner and hold it to
    the same helper block and budgets as the others; one changed byte below its banner fails them."""
    for name in method_files():
        shutil.copy(os.path.join(REPO, name), tmp_path / name)
    shutil.copy(os.path.join(REPO, "moco.py"), tmp_path / "mymethod.py")
    shutil.copy(os.path.join(REPO, "data.py"), tmp_path / "data.py")  # a module, not a method file
    assert method_files(tmp_path) == sorted(method_files() + ["mymethod.py"])
    assert_helper_blocks_equal(tmp_path)
    assert_train_decides_and_helpers_only_do(tmp_path / "mymethod.py")
    text = (tmp_path / "mymethod.py").read_text()
    changed = text[: text.index(BANNER)] + text[text.index(BANNER) :].replace("def main(", "def Main(")
    assert len(changed) == len(text) and sum(a != b for a, b in zip(changed, text)) == 1  # one byte
    (tmp_path / "mymethod.py").write_text(changed)
    with pytest.raises(AssertionError, match="mymethod.py"):
        assert_helper_blocks_equal(tmp_path)


@pytest.mark.parametrize("name", METHODS + ["eval_linear", "finetune_cls"])
def test_every_flag_reaches_the_script_through_torchrun(name, monkeypatch):
    """torchrun parses the whole command line first: a flag of ours that abbreviates one of its options (--monitor
    for --monitor-interval) stops every torchrun launch with 'ambiguous option' before the script starts."""
    module = importlib.import_module(name)
    parsers = []

    def keep_parser(parser, *args, **kwargs):
        parsers.append(parser)
        raise SystemExit

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", keep_parser)
    with pytest.raises(SystemExit):
        module.get_args([])
    monkeypatch.undo()
    flags = [flag for action in parsers[0]._actions for flag in action.option_strings if flag.startswith("--")]
    assert "--out" in flags and len(flags) > 10
    for flag in flags:
        launch = torchrun_parser().parse_args(["--nproc-per-node", "2", "script.py", flag, "x"])
        assert launch.training_script_args == [flag, "x"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("plumbing") / "images", classes=2, per_class=8)


def first_logged(module, argv, out):
    module.main(argv + ["--out", str(out)])
    return json.loads(open(out / "log.jsonl").readline())


@pytest.mark.parametrize("name", METHODS)
def test_every_method_trains_under_bf16_autocast_and_computes_the_same_loss(name, folder, tmp_path):
    """CUDA runs use bf16 by default; the CPU runs the same autocast path. Step 1 starts from the same weights and
    batch, so its loss under bf16 must differ from float32's only by rounding."""
    module, argv = importlib.import_module(name), tiny_argv(name)
    argv = argv + ["--data", folder, "--max-steps", "1"]
    exact = first_logged(module, argv + ["--amp", "off"], tmp_path / "fp32")
    rounded = first_logged(module, argv + ["--amp", "bf16"], tmp_path / "bf16")
    assert rounded["loss"] != exact["loss"]  # autocast did run in bf16
    assert rounded["loss"] == pytest.approx(exact["loss"], rel=0.1)
    weights = torch.load(tmp_path / "bf16" / "checkpoint.pth", weights_only=True)["model"]
    assert all(
        w.dtype == torch.float32 and torch.isfinite(w).all()
        for w in weights.values()
        if torch.is_tensor(w) and w.is_floating_point()
    )  # the master weights stay float32


def test_logged_values_are_means_over_the_window_acc_included(folder, tmp_path):
    argv = TINY_RESNET + ["--data", folder, "--queue", "16", "--max-steps", "2"]
    moco.main(argv + ["--out", str(tmp_path / "every"), "--log-every", "1"])
    moco.main(argv + ["--out", str(tmp_path / "window"), "--log-every", "2"])
    every = [json.loads(line) for line in open(tmp_path / "every" / "log.jsonl")]
    (window,) = [json.loads(line) for line in open(tmp_path / "window" / "log.jsonl")]
    assert every[0]["acc"] != every[1]["acc"]  # the last step alone would not be the mean
    for key in ("loss", "acc"):
        assert window[key] == pytest.approx((every[0][key] + every[1][key]) / 2, abs=1e-4), key


def test_the_knn_monitor_logs_the_backbone_and_leaves_a_resumed_run_bit_identical(folder, tmp_path, capsys):
    argv = TINY_RESNET + ["--data", folder, "--queue", "16", "--epochs", "3"]
    moco.main(argv + ["--out", str(tmp_path / "plain")])
    watched = argv + ["--out", str(tmp_path / "watched"), "--knn-monitor", folder]
    moco.main(watched + ["--max-steps", "3"])  # stopped mid-epoch, then resumed
    moco.main(watched)
    plain, resumed = (torch.load(tmp_path / d / "checkpoint.pth", weights_only=True) for d in ("plain", "watched"))
    for key, value in plain["model"].items():
        if torch.is_tensor(value):
            assert torch.equal(value, resumed["model"][key]), key  # BN running statistics included
    log = [json.loads(line) for line in open(tmp_path / "watched" / "log.jsonl")]
    knn = [(r["step"], r["knn_top1"]) for r in log if "knn_top1" in r]
    assert [step for step, _ in knn] == [0, 2, 3, 4, 6] and all(0 <= top1 <= 100 for _, top1 in knn)
    assert "knn_top1" in capsys.readouterr().out
    # the first point is the random init: the same kNN on a fresh torchvision ResNet-18 of the same seed
    import data

    torch.manual_seed(0)
    fresh = moco.Encoder("resnet18", 128, 2).backbone
    assert knn[0][1] == pytest.approx(data.KnnMonitor(folder, 32).top1(fresh, torch.device("cpu")))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_of_one_process_each_train_fill_the_queue_from_both_and_export_a_backbone(folder, tmp_path):
    """Multi-node is plain torchrun: two launchers meet at a c10d rendezvous, here both on 127.0.0.1. (Also moco.py's
    two-process test: two gloo processes, each enqueueing its keys.)"""
    port = free_port()
    launch = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes=2",
        "--nproc_per_node=1",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint=127.0.0.1:{port}",
        "--rdzv-id=two-nodes",
        os.path.join(REPO, "moco.py"),
        *TINY_RESNET,
        "--data",
        folder,
        "--queue",
        "32",
        "--max-steps",
        "3",
        "--out",
        str(tmp_path),
    ]
    nodes = [subprocess.Popen(launch, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outputs = [node.communicate(timeout=240)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs
    assert not any("Warning" in out for out in outputs), outputs
    assert any("2 process(es)" in out and "done at step 3" in out for out in outputs), outputs
    saved = torch.load(tmp_path / "backbone.pth", weights_only=True)
    missing = torchvision.models.resnet18().load_state_dict(saved["state_dict"], strict=False).missing_keys
    assert sorted(missing) == ["fc.bias", "fc.weight"]
    ckpt = torch.load(tmp_path / "checkpoint.pth", weights_only=True)
    assert ckpt["model"]["_extra_state"]["queue_ptr"] == 3 * 8 % 32  # 8 keys a step: 4 from each process
    assert [json.loads(line)["step"] for line in open(tmp_path / "log.jsonl")] == [1, 2, 3]
