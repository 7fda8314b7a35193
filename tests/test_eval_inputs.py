"""Inputs that used to give a misleading sentence or a silent wrong result: real checkpoint files that are not a
backbone of ours (a CIFAR ResNet, a Lightning checkpoint with a pickled config, a non-image Lightning model, a
TorchScript archive), a dataset name for the built-in textures, nan / inf flags, and weights that become non-finite
while fine-tuning."""

import importlib
import json
import re
import shlex
import sys
import warnings

import pytest
import torch
import torchvision

import data
import eval_linear
import finetune_cls
from conftest import make_image_folder, refusal
from methods import METHODS

EVALUATIONS = (eval_linear, finetune_cls)


class DictConfig:
    """Stands for omegaconf's DictConfig in a Lightning checkpoint's hyper_parameters: a class weights_only refuses."""

    def __init__(self, content):
        self.content = content


def extract(sentence):
    """Run the code of the python -c command a refusal prints, as a user who trusts the file would (here, without
    starting another interpreter) -> the file that the sentence says to give as --weights."""
    command, out = re.search(r" with (python -c '.*') and give --weights (\S+)\.$", sentence).groups()
    python, flag, code = shlex.split(command)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.load's deprecation notice: the user's command, not ours
        exec(code, {"__name__": "__main__"})
    return out


@pytest.fixture
def scenes(tmp_path):
    return make_image_folder(tmp_path / "scenes", classes=2, per_class=4)


# ------------------------------------------------------------------------------------------------ checkpoint files
def cifar_resnet20():
    """pytorch_resnet_cifar10's resnet20 checkpoint: DataParallel keys, 16-32-64 channels, 3 x 3 stem, `linear`."""
    bn = ("weight", "bias", "running_mean", "running_var")  # saved before PyTorch counted num_batches_tracked
    state = {"module.conv1.weight": torch.randn(16, 3, 3, 3)} | {f"module.bn1.{k}": torch.randn(16) for k in bn}
    width = 16
    for stage, channels in enumerate((16, 32, 64), 1):
        for block in range(3):
            b = f"module.layer{stage}.{block}."
            state |= {
                b + "conv1.weight": torch.randn(channels, width, 3, 3),
                b + "conv2.weight": torch.randn(channels, channels, 3, 3),
            }
            state |= {b + f"bn{i}.{k}": torch.randn(channels) for i in (1, 2) for k in bn}
            width = channels
    state |= {"module.linear.weight": torch.randn(10, 64), "module.linear.bias": torch.randn(10)}
    return {"epoch": 200, "best_prec1": 91.73, "state_dict": state}


def test_a_cifar_resnet_is_read_by_torchvision_key_names_and_refused_by_the_shapes_that_differ(
    scenes, tmp_path, capsys
):
    torch.save(cifar_resnet20(), tmp_path / "resnet20-12fca82f.th")
    for module in EVALUATIONS:
        printed = []
        err = refusal(
            module,
            [
                "--data",
                scenes,
                "--weights",
                str(tmp_path / "resnet20-12fca82f.th"),
                "--arch",
                "resnet18",
                "--workers",
                "0",
                "--out",
                str(tmp_path / "out"),
            ],
            capsys,
            printed,
        )
        assert "torchvision key names under 'state_dict.module.'" in printed[0], printed  # names, not a layout
        assert (
            "matches only 0 of the 120 tensors of resnet18: the file's conv1.weight is (16, 3, 3, 3) where "
            "resnet18 needs (64, 3, 7, 7), so it holds another architecture." in err
        ), err
    assert not (tmp_path / "out").exists()


def test_a_lightning_checkpoint_with_a_pickled_config_names_the_global_and_prints_a_command_that_works(
    scenes, tmp_path, capsys
):
    torch.manual_seed(0)
    backbone = torchvision.models.resnet18()
    torch.save(
        {
            "epoch": 9,
            "global_step": 900,
            "pytorch-lightning_version": "2.1.3",
            "state_dict": {f"backbone.{k}": v for k, v in backbone.state_dict().items()},
            "hyper_parameters": {"cfg": DictConfig({"lr": 0.1})},
        },
        tmp_path / "epoch=9-step=900.ckpt",
    )
    for module in EVALUATIONS:
        err = refusal(
            module,
            [
                "--data",
                scenes,
                "--weights",
                str(tmp_path / "epoch=9-step=900.ckpt"),
                "--arch",
                "resnet18",
                "--workers",
                "0",
                "--out",
                str(tmp_path / "out"),
            ],
            capsys,
        )
        assert (
            f"weights_only=True (UnpicklingError); it pickles {DictConfig.__module__}.DictConfig, which could "
            "run code: if you trust the file, keep only its tensors with python -c" in err
        ), err
        assert "weights_only=False" in err, err
    out = extract(err)
    model, _, arch, _, _, _ = eval_linear.load_backbone(out, "resnet18")
    assert arch == "resnet18" and torch.equal(model.conv1.weight, backbone.conv1.weight)


def test_a_non_image_lightning_checkpoint_says_no_backbone_was_found_and_shows_its_keys(scenes, tmp_path, capsys):
    state = {
        "model.embedding.weight": torch.randn(100, 8),
        "model.lstm.weight_ih_l0": torch.randn(32, 8),
        "model.lstm.weight_hh_l0": torch.randn(32, 8),
        "model.lstm.bias_ih_l0": torch.randn(32),
        "model.fc.weight": torch.randn(2, 8),
    }
    torch.save(
        {
            "epoch": 3,
            "global_step": 120,
            "pytorch-lightning_version": "2.4.0",
            "state_dict": state,
            "optimizer_states": [{"state": {}, "param_groups": []}],
            "hyper_parameters": {"hidden": 8},
        },
        tmp_path / "last.ckpt",
    )
    keys = (
        "its first tensors: state_dict.model.embedding.weight, state_dict.model.lstm.weight_ih_l0, "
        "state_dict.model.lstm.weight_hh_l0"
    )
    for module in EVALUATIONS:
        argv = [
            "--data",
            scenes,
            "--weights",
            str(tmp_path / "last.ckpt"),
            "--workers",
            "0",
            "--out",
            str(tmp_path / "out"),
        ]
        err = refusal(module, argv, capsys)
        assert "holds no backbone this project recognises" in err and keys in err and "add --arch" not in err, err
        err = refusal(module, argv + ["--arch", "resnet18"], capsys)
        assert "matches only 0 of the 120 tensors of resnet18: it holds no backbone this project recognises" in err
        assert keys in err, err


def test_a_pickle_whose_module_is_not_installed_names_the_package_the_unpickling_needs(scenes, tmp_path, capsys):
    """Swin's and SimMIM's save_checkpoint pickle their yacs config: the advice to keep the tensors must first say to
    install the package that defines it (here a stand-in module, importable only while the file is written)."""
    (tmp_path / "config_stub").mkdir()
    (tmp_path / "config_stub" / "__init__.py").write_text("class CfgNode(dict):\n    pass\n")
    sys.path.insert(0, str(tmp_path))
    try:
        cfg = importlib.import_module("config_stub").CfgNode(MODEL="swin")
        torch.manual_seed(0)
        backbone = torchvision.models.resnet18()
        torch.save({"model": backbone.state_dict(), "config": cfg}, tmp_path / "ckpt_epoch_99.pth")
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("config_stub")
    argv = ["--data", scenes, "--weights", str(tmp_path / "ckpt_epoch_99.pth"), "--workers", "0"]
    err = refusal(eval_linear, argv + ["--arch", "resnet18", "--out", str(tmp_path / "out")], capsys)
    assert (
        "it pickles config_stub.CfgNode, which could run code: if you trust the file, install the Python package "
        "config_stub (pip install config_stub), then keep only its tensors with python -c" in err
    ), err
    sys.path.insert(0, str(tmp_path))  # installed: the advice works
    try:
        out = extract(err)
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("config_stub")
    loaded = eval_linear.load_backbone(out, "resnet18")
    assert torch.equal(loaded.model.conv1.weight, backbone.conv1.weight)


def test_a_torchscript_archive_is_one_line_without_torch_warnings_and_its_export_command_works(
    scenes, tmp_path, capsys
):
    torch.manual_seed(0)
    original = torchvision.models.resnet18()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.script's own deprecation notice
        torch.jit.script(original).save(str(tmp_path / "resnet18_scripted.pt"))
    argv = [
        "--data",
        scenes,
        "--weights",
        str(tmp_path / "resnet18_scripted.pt"),
        "--arch",
        "resnet18",
        "--workers",
        "0",
        "--out",
        str(tmp_path / "out"),
    ]
    for module in EVALUATIONS:
        with warnings.catch_warnings(record=True) as shown:
            warnings.simplefilter("always")  # whatever escapes the loader would be printed before the sentence
            err = refusal(module, argv, capsys)
        assert not shown, [str(w.message) for w in shown]
        assert "is a TorchScript archive, not a state dict" in err and "torch.jit.load(" in err, err
    out = extract(err)
    model, _, _, _, _, _ = eval_linear.load_backbone(out, "resnet18")
    assert torch.equal(model.layer4[1].conv2.weight, original.layer4[1].conv2.weight)


# ------------------------------------------------------------------------------------------------ dataset names
@pytest.mark.parametrize("data_flags", [[], ["--data", "synthetic"]])
def test_a_dataset_name_for_the_built_in_textures_is_refused(data_flags, tmp_path, capsys):
    for module in EVALUATIONS:
        err = refusal(
            module,
            data_flags
            + [
                "--dataset",
                "eurosat",
                "--weights",
                "random",
                "--arch",
                "resnet18",
                "--img-size",
                "32",
                "--runs",
                "1",
                "--out",
                str(tmp_path / "out"),
            ],
            capsys,
        )
        assert "--dataset eurosat would name the built-in synthetic textures" in err, err
    assert not (tmp_path / "out").exists()


def test_the_built_in_textures_are_reported_as_synthetic(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "SYNTHETIC_IMAGES", 16)  # 4 per class: a second, not minutes
    argv = [
        "--weights",
        "random",
        "--arch",
        "resnet18",
        "--img-size",
        "32",
        "--runs",
        "1",
        "--train-ratio",
        "0.5",
        "--epochs",
        "1",
        "--workers",
        "0",
    ]
    eval_linear.evaluate(eval_linear.get_args(argv + ["--out", str(tmp_path / "a")]))
    finetune_cls.evaluate(finetune_cls.get_args(argv + ["--batch-size", "4", "--out", str(tmp_path / "b")]))
    for out in (tmp_path / "a", tmp_path / "b"):
        table = (out / "results.md").read_text()
        assert "| synthetic top-1 |" in table and "eurosat" not in table.lower()
        results = json.loads((out / "results.json").read_text())
        assert list(results["backbones"][0]) == ["weights", "method", "arch", "sha256", "synthetic"] + (
            ["backbone_unchanged"] if out.name == "a" else []
        )
        assert list(results["datasets"]) == ["synthetic"] and results["datasets"]["synthetic"]["files"] == 16


# ------------------------------------------------------------------------------------------------ nan / inf flags
@pytest.mark.parametrize(
    "script, value",
    [(name, "nan") for name in METHODS + ["eval_linear", "finetune_cls"]] + [("eval_linear", "inf"), ("moco", "-inf")],
)
def test_every_script_refuses_a_non_finite_float_flag_in_one_line(script, value, capsys):
    with pytest.raises(SystemExit) as exit_info:  # what `python SCRIPT --lr=nan` does first: parse its flags
        importlib.import_module(script).get_args([f"--lr={value}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and err == [
        f"{script}.py: error: argument --lr: must be a finite number (got {value}) (see --help)."
    ], err


# ------------------------------------------------------------------------------------------------ non-finite weights
def test_weights_that_become_non_finite_stop_finetuning_and_leave_the_saved_files(
    scenes, tmp_path, capsys, monkeypatch
):
    saved, out = tmp_path / "dapt" / "backbone.pth", tmp_path / "ft"
    real_train_epoch, real_load, epochs_loaded = finetune_cls.train_epoch, data.ImageDataset.load, set()

    def nan_on_the_last_update(model, *args):
        real_train_epoch(model, *args)
        if args[4] == 1:  # epoch
            with torch.no_grad():
                model.backbone.layer1[0].conv1.weight[0, 0, 0, 0] = float("nan")

    def load(dataset, index, epoch):
        epochs_loaded.add(epoch)
        return real_load(dataset, index, epoch)

    monkeypatch.setattr(finetune_cls, "train_epoch", nan_on_the_last_update)
    monkeypatch.setattr(data.ImageDataset, "load", load)
    with pytest.raises(SystemExit) as exit_info:
        finetune_cls.main(
            [
                "--data",
                scenes,
                "--weights",
                "random",
                "--arch",
                "resnet18",
                "--img-size",
                "32",
                "--epochs",
                "2",
                "--batch-size",
                "2",
                "--runs",
                "1",
                "--train-ratio",
                "0.5",
                "--workers",
                "0",
                "--log-every",
                "1",
                "--save-backbone",
                str(saved),
                "--out",
                str(out),
            ]
        )
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 1 and len(err) == 1, err
    assert err[0] == (
        f"finetune_cls.py: error: the weights became non-finite at epoch 2 of random | scenes | run 0 "
        f"(backbone.layer1.0.conv1.weight); the last good checkpoint is {out / 'checkpoint.pth'}, left "
        f"as it was; --save-backbone {saved} is not written."
    ), err
    assert not saved.exists()
    checkpoint = torch.load(out / "checkpoint.pth", weights_only=True)["current"]
    assert checkpoint["epoch"] == 1 and all(
        v.isfinite().all() for v in checkpoint["model"].values() if v.is_floating_point()
    )
    assert not (out / "results.json").exists()
    assert epochs_loaded == {0, 1}  # the training images are augmented afresh each epoch (set_epoch)
