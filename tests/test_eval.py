"""eval_linear.py and finetune_cls.py: splits, frozen features, probe, loading every kind of weights, fine-tuning,
domain-adaptive chaining, resume, and bad input."""
import json
import os
import pickle
import signal

import pytest
import torch
import torchvision

import data
import eval_linear
import finetune_cls
import moco
from conftest import (TINY_RESNET, assert_one_sentence_error, assert_ran_cleanly, make_image_folder, run_script,
                      run_torchrun)

FAST_PROBE = ["--img-size", "32", "--epochs", "3", "--workers", "0", "--extract-batch-size", "16"]
FAST_FINETUNE = ["--img-size", "32", "--epochs", "1", "--batch-size", "8", "--workers", "0", "--log-every", "1"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A labeled folder and a 2-step moco.py run on it (its backbone.pth and checkpoint.pth)."""
    root = tmp_path_factory.mktemp("eval")
    folder = make_image_folder(root / "scenes", classes=3, per_class=10)
    moco.main(TINY_RESNET + ["--data", folder, "--queue", "16", "--max-steps", "2", "--out", str(root / "moco")])
    return folder, root / "moco"


def test_mean_and_std_over_runs():
    assert data.mean_std([90.0, 92.0, 94.0]) == pytest.approx((92.0, 2.0))  # sample std
    assert data.mean_std([75.0]) == (75.0, 0.0)


def test_probe_separates_separable_features_and_reports_the_confusion_matrix():
    torch.manual_seed(0)
    labels = torch.arange(3).repeat_interleave(20)
    features = torch.nn.functional.one_hot(labels, 3).float() * 5 + torch.randn(60, 3) * 0.3
    train, test = (torch.from_numpy(i) for i in data.stratified_split(labels.tolist(), 0.5, seed=0))
    args = eval_linear.get_args(["--epochs", "50", "--lr", "0.05"])
    accuracy, confusion = eval_linear.train_probe(features, labels, train, test, 3, args, seed=0)
    assert accuracy == 100.0 and confusion == [[10, 0, 0], [0, 10, 0], [0, 0, 10]]


def test_backbone_file_and_checkpoint_give_the_same_frozen_features(trained):
    folder, run = trained
    paths = data.list_images([folder])[:6]
    args = eval_linear.get_args(FAST_PROBE + ["--stages"])
    feats = []
    for name in ("backbone.pth", "checkpoint.pth"):
        model, width, arch, method = data.load_backbone(str(run / name))
        assert (width, arch, method) == (512, "resnet18", "moco")
        before = eval_linear.fingerprint(model)
        feats.append(eval_linear.extract_features(model, paths, args, torch.device("cpu")))
        assert eval_linear.fingerprint(model) == before
    assert torch.equal(feats[0]["final"], feats[1]["final"])
    assert [f.shape[1] for f in (feats[0][f"stage{i}"] for i in range(1, 5))] == [64, 128, 256, 512]
    torch.testing.assert_close(feats[0]["stage4"], feats[0]["final"])  # layer4 pooled is the ResNet feature


def test_linear_evaluation_of_several_backbones_writes_one_table(trained, tmp_path):
    folder, run = trained
    results = eval_linear.evaluate(eval_linear.get_args(FAST_PROBE + [
        "--data", folder, "--dataset", "scenes", "--weights", str(run / "backbone.pth"), "--weights", "random",
        "--arch", "resnet18", "--runs", "2", "--train-ratio", "0.5", "--stages", "--out", str(tmp_path)]))
    assert [r["method"] for r in results] == ["moco", "random"] and all(r["backbone_unchanged"] for r in results)
    for r in results:
        scenes = r["scenes"]
        assert len(scenes["accuracies"]) == 2 and (scenes["mean"], scenes["std"]) == pytest.approx(
            data.mean_std(scenes["accuracies"]))
        assert sum(map(sum, scenes["confusion_last_run"])) == 15 and set(scenes["stages"]) == {
            "stage1", "stage2", "stage3", "stage4"}
    table = (tmp_path / "results.md").read_text().splitlines()
    assert table[2].startswith("| weights | method | arch | scenes top-1 |") and len(table) == 6
    assert json.loads((tmp_path / "results.json").read_text())["protocol"] == "linear"


def test_finetuning_resumes_after_a_signal_and_matches_an_uninterrupted_evaluation(trained, tmp_path, monkeypatch):
    folder, run = trained
    argv = FAST_FINETUNE + ["--data", folder, "--weights", str(run / "backbone.pth"), "--runs", "2",
                            "--epochs", "2", "--train-ratio", "0.5"]
    straight = finetune_cls.evaluate(finetune_cls.get_args(argv + ["--out", str(tmp_path / "a")]))
    real_train_epoch = finetune_cls.train_epoch

    def train_epoch_then_sigterm(*args, **kwargs):
        real_train_epoch(*args, **kwargs)
        signal.raise_signal(signal.SIGTERM)  # what a scheduler sends before pre-emption

    monkeypatch.setattr(finetune_cls, "train_epoch", train_epoch_then_sigterm)
    finetune_cls.main(argv + ["--out", str(tmp_path / "b")])
    ckpt = torch.load(tmp_path / "b" / "checkpoint.pth", weights_only=True)
    assert ckpt["current"]["epoch"] == 1 and not ckpt["done"] and not (tmp_path / "b" / "results.json").exists()
    monkeypatch.setattr(finetune_cls, "train_epoch", real_train_epoch)
    resumed = finetune_cls.evaluate(finetune_cls.get_args(argv + ["--out", str(tmp_path / "b")]))
    assert resumed[0]["scenes"]["accuracies"] == straight[0]["scenes"]["accuracies"]
    assert sum(map(sum, straight[0]["scenes"]["confusion_last_run"])) == 15


def test_domain_adaptive_chain_saved_backbone_reloads_everywhere(trained, tmp_path):
    folder, run = trained
    saved = tmp_path / "dapt" / "backbone.pth"
    finetune_cls.main(FAST_FINETUNE + ["--data", folder, "--weights", str(run / "checkpoint.pth"), "--runs", "1",
                                       "--recipe", "risojevic", "--save-backbone", str(saved),
                                       "--out", str(tmp_path / "ft")])
    obj = torch.load(saved, weights_only=True)
    assert obj["arch"] == "resnet18" and obj["method"] == "moco+finetune:scenes"
    result = torchvision.models.resnet18().load_state_dict(obj["state_dict"], strict=False)
    assert sorted(result.missing_keys) == ["fc.bias", "fc.weight"] and not result.unexpected_keys
    model, _, _, method = data.load_backbone(str(saved))
    torch.testing.assert_close(model.conv1.weight, obj["state_dict"]["conv1.weight"])


def test_risojevic_recipe_schedule_and_transforms():
    args = finetune_cls.get_args(["--recipe", "risojevic"])
    assert finetune_cls.peak_lr(args, "random") == 3e-3 and finetune_cls.peak_lr(args, "imagenet") == 3e-4
    lrs = [finetune_cls.lr_at(args, e, 3e-4) for e in (0, 4, 5, 50, 70, 90)]
    assert lrs == pytest.approx([6e-5, 3e-4, 3e-4, 6e-5, 1.2e-5, 2.4e-6])
    train, test = finetune_cls.transforms_for(args)
    image = data.synthetic_image(0)
    assert train(image).shape == test(image).shape == (3, 256, 256)
    args = finetune_cls.get_args([])
    assert (args.batch_size, finetune_cls.peak_lr(args, "x.pth"), args.img_size) == (64, 0.01, 224)
    assert [finetune_cls.lr_at(args, e, 0.01) for e in (29, 30, 60, 90)] == pytest.approx([0.01, 1e-3, 1e-4, 1e-5])


def test_two_process_finetuning_completes(trained, tmp_path):
    folder, run = trained
    result = run_torchrun("finetune_cls.py", 2, *FAST_FINETUNE, "--data", folder, "--weights", run / "backbone.pth",
                          "--runs", "1", "--train-ratio", "0.5", "--out", tmp_path)
    assert_ran_cleanly(result)
    accuracy = json.loads((tmp_path / "results.json").read_text())["backbones"][0]["scenes"]["accuracies"]
    assert len(accuracy) == 1 and 0 <= accuracy[0] <= 100


class RunsCode:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def write_bad_weights(tmp_path, kind):
    path = tmp_path / f"{kind}.pth"
    state = {k: v for k, v in torchvision.models.resnet18().state_dict().items()}
    if kind == "other_arch":
        torch.save(torchvision.models.resnet50().state_dict(), path)
    elif kind == "other_keys":
        torch.save({f"encoder.{k}": v for k, v in state.items()}, path)
    elif kind == "pickle":
        with open(path, "wb") as f:
            pickle.dump({"state_dict": RunsCode()}, f)
    elif kind == "text":
        path.write_text("this is not a checkpoint")
    return path


@pytest.mark.parametrize("kind, fragment", [
    ("other_arch", "matches only"), ("other_keys", "matches only 0 of"), ("pickle", "weights_only=True"),
    ("text", "weights_only=True")])
def test_bad_weights_are_refused_in_one_sentence_and_nothing_is_written(trained, tmp_path, capsys, kind, fragment):
    folder, _ = trained
    path = write_bad_weights(tmp_path, kind)
    for module in (eval_linear, finetune_cls):
        with pytest.raises(SystemExit) as exit_info:
            module.main(["--data", folder, "--weights", "random", "--weights", str(path), "--arch", "resnet18",
                         "--out", str(tmp_path / "out"), "--workers", "0"])
        err = capsys.readouterr().err.strip().splitlines()
        assert exit_info.value.code == 2 and len(err) == 1 and fragment in err[0], err
        assert not (tmp_path / "out").exists()


def test_bad_datasets_and_missing_imagenet_weights_are_one_sentence(tmp_path, capsys, monkeypatch):
    few = make_image_folder(tmp_path / "few", classes=2, per_class=2)
    result = run_script("eval_linear.py", "--data", few, "--arch", "resnet18", "--train-ratio", "0.2",
                        "--out", tmp_path / "out")
    assert_one_sentence_error(result, "eval_linear.py", "leaves it without training images")
    os.makedirs(tmp_path / "few" / "class7")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "hub"))
    missing_cache = ["not in the local cache", "resnet18-", str(tmp_path / "hub")]
    for argv, fragments in [(["--data", few], ["class7 holds no images"]), (["--weights", "imagenet"], missing_cache)]:
        with pytest.raises(SystemExit) as exit_info:
            finetune_cls.main(argv + ["--arch", "resnet18", "--out", str(tmp_path / "out")])
        err = capsys.readouterr().err.strip().splitlines()
        assert exit_info.value.code == 2 and len(err) == 1 and all(f in err[0] for f in fragments), err
    assert not (tmp_path / "out").exists()
