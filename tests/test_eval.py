"""eval_linear.py and finetune_cls.py: splits, frozen features, probe, loading every kind of weights, fine-tuning,
domain-adaptive chaining, resume, and bad input."""

import json
import os
import pickle
import signal
from contextlib import nullcontext
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
import torchvision
from PIL import Image

import data
import eval_linear
import finetune_cls
from conftest import assert_one_sentence_error, assert_ran_cleanly, make_image_folder, run_script, run_torchrun

FAST_PROBE = ["--img-size", "32", "--epochs", "3", "--workers", "0", "--extract-batch-size", "16"]
FAST_FINETUNE = ["--img-size", "32", "--epochs", "1", "--batch-size", "8", "--workers", "0", "--log-every", "1"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A labeled folder and the two files a moco.py run writes, built here as moco.py saves them, so that these tests
    do not run a method file: backbone.pth (torchvision's keys, fc removed) and checkpoint.pth (the whole MoCo model:
    the backbone under its backbone_prefix, beside a projector and a key encoder of other values, and the queue)."""
    root = tmp_path_factory.mktemp("eval")
    folder = make_image_folder(root / "scenes", classes=3, per_class=10)
    torch.manual_seed(0)
    backbone = torchvision.models.resnet18()
    backbone.fc = nn.Identity()
    for m in backbone.modules():  # trained statistics, not 0 / 1: a loader that dropped the buffers would show
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    state = backbone.state_dict()
    encoder = {f"backbone.{k}": v for k, v in state.items()} | {
        "projector.0.weight": torch.randn(512, 512),
        "projector.0.bias": torch.randn(512),
        "projector.2.weight": torch.randn(16, 512),
        "projector.2.bias": torch.randn(16),
    }
    model = (
        {f"encoder_q.{k}": v for k, v in encoder.items()}
        | {f"encoder_k.{k}": torch.randn_like(v) if v.is_floating_point() else v for k, v in encoder.items()}
        | {"queue": torch.randn(16, 16), "_extra_state": {"queue_ptr": 0}}
    )
    run, written = root / "moco", {"arch": "resnet18", "method": "moco", "config": {}}
    run.mkdir()
    torch.save({**written, "state_dict": state}, run / "backbone.pth")
    torch.save(
        {
            **written,
            "model": model,
            "optimizer": {"state": {}, "param_groups": []},
            "step": 2,
            "epoch": 0,
            "args": {"arch": "resnet18", "queue": 16},
            "backbone_prefix": "encoder_q.backbone.",
        },
        run / "checkpoint.pth",
    )
    return folder, run


def test_mean_and_std_over_runs():
    assert eval_linear.mean_std([90.0, 92.0, 94.0]) == pytest.approx((92.0, 2.0))  # sample std
    assert eval_linear.mean_std([75.0]) == (75.0, 0.0)


def test_stratified_split_is_deterministic_disjoint_complete_and_per_class():
    labels = [0] * 50 + [1] * 30 + [2] * 20
    names = ["a", "b", "c"]
    train, test = data.stratified_split(labels, 0.2, 3, names)
    again, _ = data.stratified_split(labels, 0.2, 3, names)
    other, _ = data.stratified_split(labels, 0.2, 4, names)
    assert np.array_equal(train, again) and not np.array_equal(train, other)
    assert not set(train) & set(test) and sorted(set(train) | set(test)) == list(range(100))
    assert np.bincount(np.asarray(labels)[train]).tolist() == [10, 6, 4]


def test_stratified_split_refuses_a_class_left_without_training_images():
    with pytest.raises(data.UserError, match="class forest has 2 readable image.*without training images; add images"):
        data.stratified_split([0] * 10 + [1] * 2, 0.2, 0, ["beach", "forest"])


def test_labeled_datasets_names_the_classes_and_drops_unreadable_images_before_splitting(tmp_path, capsys):
    folder = make_image_folder(tmp_path / "scenes", classes=3, per_class=10)
    for bad in ("class0/9.png", "class1/3.png"):  # the last image of class 0 would stand in for class 1's first
        (tmp_path / "scenes" / bad).write_bytes(b"\x89PNG truncated")
    [(name, paths, labels, classes, splits, _)] = eval_linear.labeled_datasets([folder], None, 0.2, 2, seed=0)
    out = capsys.readouterr().out
    assert "scenes: 3 classes: class0, class1, class2" in out
    assert "28 images (2 unreadable image(s) dropped before splitting, e.g." in out
    assert len(paths) == len(labels) == 28 and not any(p.endswith(("class0/9.png", "class1/3.png")) for p in paths)
    assert labels == [0] * 9 + [1] * 9 + [2] * 10
    for train, test in splits:  # drawn over the readable images: 2 + 2 + 2 train, 7 + 7 + 8 test
        assert len(train) == 6 and len(test) == 22
    (tmp_path / "scenes" / "class2").mkdir(exist_ok=True)
    for path in (tmp_path / "scenes" / "class2").iterdir():
        path.write_bytes(b"not an image")
    with pytest.raises(data.UserError, match="no image of class class2 could be read"):
        eval_linear.labeled_datasets([folder], None, 0.2, 1, seed=0, workers=1)  # the decoding pass in a worker


def test_probe_separates_separable_features_and_reports_the_confusion_matrix():
    torch.manual_seed(0)
    labels = torch.arange(3).repeat_interleave(20)
    features = torch.nn.functional.one_hot(labels, 3).float() * 5 + torch.randn(60, 3) * 0.3
    train, test = (torch.from_numpy(i) for i in data.stratified_split(labels.tolist(), 0.5, 0, ["a", "b", "c"]))
    args = eval_linear.get_args(["--epochs", "50", "--lr", "0.05"])
    accuracy, confusion = eval_linear.train_probe(features, labels, train, test, 3, args, seed=0)
    assert accuracy == 100.0 and confusion == [[10, 0, 0], [0, 10, 0], [0, 0, 10]]


def test_backbone_file_and_checkpoint_give_the_same_frozen_features(trained):
    folder, run = trained
    paths = data.list_images([folder])[0][:6]
    args = eval_linear.get_args(FAST_PROBE + ["--stages"])
    feats = []
    for name in ("backbone.pth", "checkpoint.pth"):
        model, width, arch, method, _, _ = eval_linear.load_backbone(str(run / name))
        assert (width, arch, method) == (512, "resnet18", "moco")
        before = eval_linear.fingerprint(model)
        feats.append(eval_linear.extract_features(model, paths, args, torch.device("cpu")))
        assert eval_linear.fingerprint(model) == before
    assert torch.equal(feats[0]["final"], feats[1]["final"])
    assert [f.shape[1] for f in (feats[0][f"stage{i}"] for i in range(1, 5))] == [64, 128, 256, 512]
    torch.testing.assert_close(feats[0]["stage4"], feats[0]["final"])  # layer4 pooled is the ResNet feature


@pytest.mark.smoke
def test_linear_evaluation_of_several_backbones_writes_one_table(trained, tmp_path):
    folder, run = trained
    results = eval_linear.evaluate(
        eval_linear.get_args(
            FAST_PROBE
            + [
                "--data",
                folder,
                "--dataset",
                "scenes",
                "--weights",
                str(run / "backbone.pth"),
                "--weights",
                "random",
                "--arch",
                "resnet18",
                "--runs",
                "2",
                "--train-ratio",
                "0.5",
                "--stages",
                "--out",
                str(tmp_path),
            ]
        )
    )
    assert [r["method"] for r in results] == ["moco", "random"] and all(r["backbone_unchanged"] for r in results)
    for r in results:
        scenes = r["scenes"]
        assert len(scenes["accuracies"]) == 2 and (scenes["mean"], scenes["std"]) == pytest.approx(
            eval_linear.mean_std(scenes["accuracies"])
        )
        assert sum(map(sum, scenes["confusion_last_run"])) == 15 and set(scenes["stages"]) == {
            "stage1",
            "stage2",
            "stage3",
            "stage4",
        }
    table = (tmp_path / "results.md").read_text().splitlines()
    assert table[2] == "| weights | method | arch | protocol | scenes top-1 |" and table[4].startswith(
        f"| {run / 'backbone.pth'} | moco | resnet18 | linear | "
    )
    assert json.loads((tmp_path / "results.json").read_text())["protocol"] == "linear"
    stages = table[table.index("Stage-wise linear probe (GeRSP Fig. 6), top-1 mean +- std") + 2 :]
    assert stages[0] == "| weights | method | arch | dataset | stage1 | stage2 | stage3 | stage4 |" and len(stages) == 4
    for row, r in zip(stages[2:], results):  # results.md carries the numbers of results.json
        assert (
            row
            == f"| {r['weights']} | {r['method']} | resnet18 | scenes | "
            + " | ".join(
                "%.2f +- %.2f" % (r["scenes"]["stages"][k]["mean"], r["scenes"]["stages"][k]["std"])
                for k in ("stage1", "stage2", "stage3", "stage4")
            )
            + " |"
        )


def test_knn_protocol_uses_the_same_features_and_splits_and_has_its_own_rows(trained, tmp_path):
    folder, run = trained
    argv = FAST_PROBE + [
        "--data",
        folder,
        "--weights",
        str(run / "backbone.pth"),
        "--runs",
        "2",
        "--train-ratio",
        "0.5",
        "--knn",
        "--knn-k",
        "5",
        "--out",
        str(tmp_path),
    ]
    [result] = eval_linear.evaluate(eval_linear.get_args(argv))
    [(_, paths, labels, classes, splits, _)] = eval_linear.labeled_datasets([folder], None, 0.5, 2, seed=0)
    features = eval_linear.extract_features(
        eval_linear.load_backbone(str(run / "backbone.pth"))[0], paths, eval_linear.get_args(argv), torch.device("cpu")
    )["final"]
    labels = torch.tensor(labels)
    expected = [
        float(
            (data.knn_predict(features[tr], labels[tr], features[te], 3, k=5, temperature=0.07) == labels[te])
            .float()
            .mean()
            * 100
        )
        for tr, te in splits
    ]
    knn = result["scenes"]["knn"]
    assert knn["accuracies"] == pytest.approx(expected) and (knn["k"], knn["temperature"]) == (5, 0.07)
    table = (tmp_path / "results.md").read_text().splitlines()
    assert "weighted kNN (k 5, temperature 0.07)" in table[0]
    assert [row.split(" | ")[3] for row in table[4:6]] == ["linear", "knn"]
    assert table[5].endswith(" | %.2f +- %.2f |" % (knn["mean"], knn["std"]))


def test_imagenet_means_the_classic_v1_weights_and_v2_is_asked_for(image_folder, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "hub"))
    cache = tmp_path / "hub" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18().state_dict(), cache / "resnet18-f37072fd.pth")  # IMAGENET1K_V1's file
    argv = FAST_PROBE + ["--data", image_folder, "--arch", "resnet18", "--runs", "1", "--train-ratio", "0.5"]
    out = tmp_path / "probe"  # beside the cache, not holding it
    [result] = eval_linear.evaluate(eval_linear.get_args(argv + ["--weights", "imagenet", "--out", str(out)]))
    assert result["method"] == "torchvision IMAGENET1K_V1"
    assert "| imagenet | torchvision IMAGENET1K_V1 | resnet18 | linear |" in (out / "results.md").read_text()
    for weights, arch, fragment in [
        ("imagenet:V2", "resnet18", "no IMAGENET1K_V2 weights for resnet18"),
        ("imagenet", "resnet50", "resnet50-0676ba61.pth"),  # V1; V2 is resnet50-11ad3fa6
        ("imagenet:V2", "resnet50", "resnet50-11ad3fa6.pth"),
    ]:
        with pytest.raises(SystemExit):
            eval_linear.main(argv + ["--weights", weights, "--arch", arch, "--out", str(tmp_path / "no")])
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and fragment in err[0], err
    assert not (tmp_path / "no").exists()


def test_paper004_preprocessing_resizes_to_292_and_crops_the_centre_256_and_extraction_is_float32(
    tmp_path, monkeypatch
):
    pixels = np.zeros((292, 292, 3), dtype=np.uint8)
    pixels[..., 0] = 255  # a red border of 18 px on each side of a 292-px image, blue inside
    pixels[18:274, 18:274] = (0, 0, 255)
    image = Image.fromarray(pixels)
    args = eval_linear.get_args(["--preprocess", "paper004"])
    x = eval_linear.preprocess(args)(image)
    assert args.img_size == 256 and x.shape == (3, 256, 256)
    torch.testing.assert_close(x[0], torch.full_like(x[0], (0 - 0.485) / 0.229))  # the crop holds no red
    args = eval_linear.get_args([])
    assert args.img_size == 224 and eval_linear.preprocess(args)(image)[0].max() > 2  # resize keeps the border
    assert args.amp == "off"  # float32 features by default, as in the papers (bf16 only when asked for)
    calls = []
    monkeypatch.setattr(torch, "autocast", lambda device, dtype, enabled: calls.append(enabled) or nullcontext())
    model = eval_linear.load_backbone("random", "resnet18")[0]
    for amp in ("off", "bf16"):
        eval_linear.extract_features(
            model, ["synthetic://0"], eval_linear.get_args(FAST_PROBE + ["--amp", amp]), torch.device("cpu")
        )
    assert calls == [False, True]


def test_unreadable_images_are_dropped_before_the_split_in_both_scripts(tmp_path):
    folder = make_image_folder(tmp_path / "scenes", classes=3, per_class=10)
    (tmp_path / "scenes" / "class0" / "9.png").write_bytes(b"\x89PNG truncated")  # sorted last in class 0
    argv = ["--data", folder, "--weights", "random", "--arch", "resnet18", "--runs", "1"]
    [linear] = eval_linear.evaluate(eval_linear.get_args(FAST_PROBE + argv + ["--out", str(tmp_path / "a")]))
    [finetuned] = finetune_cls.evaluate(
        finetune_cls.get_args(FAST_FINETUNE + argv + ["--batch-size", "2", "--out", str(tmp_path / "b")])
    )
    for result in (linear, finetuned):  # 2 + 2 + 2 train, 7 + 8 + 8 test: 29 readable images, 1 dropped
        confusion = result["scenes"]["confusion_last_run"]
        assert sum(map(sum, confusion)) == 23 and sum(confusion[0]) == 7


@pytest.mark.smoke
def test_finetuning_resumes_after_a_signal_and_matches_an_uninterrupted_evaluation(trained, tmp_path, monkeypatch):
    folder, run = trained
    argv = FAST_FINETUNE + [
        "--data",
        folder,
        "--weights",
        str(run / "backbone.pth"),
        "--runs",
        "2",
        "--epochs",
        "2",
        "--train-ratio",
        "0.5",
    ]
    straight = finetune_cls.evaluate(finetune_cls.get_args(argv + ["--out", str(tmp_path / "a")]))
    real_train_epoch = finetune_cls.train_epoch

    def train_epoch_then_sigterm(*args, **kwargs):
        real_train_epoch(*args, **kwargs)
        signal.raise_signal(signal.SIGTERM)  # what a scheduler sends before pre-emption

    monkeypatch.setattr(finetune_cls, "train_epoch", train_epoch_then_sigterm)
    with pytest.raises(SystemExit) as stop:
        finetune_cls.main(argv + ["--out", str(tmp_path / "b")])
    assert stop.value.code == 128 + signal.SIGTERM  # never 0: an interrupted evaluation is no result
    ckpt = torch.load(tmp_path / "b" / "checkpoint.pth", weights_only=True)
    assert ckpt["current"]["epoch"] == 1 and not ckpt["done"] and not (tmp_path / "b" / "results.json").exists()
    monkeypatch.setattr(finetune_cls, "train_epoch", real_train_epoch)
    resumed = finetune_cls.evaluate(finetune_cls.get_args(argv + ["--out", str(tmp_path / "b")]))
    assert resumed[0]["scenes"]["accuracies"] == straight[0]["scenes"]["accuracies"]
    assert sum(map(sum, straight[0]["scenes"]["confusion_last_run"])) == 15


def test_domain_adaptive_chain_saved_backbone_reloads_everywhere_but_on_its_source(trained, tmp_path, capsys):
    folder, run = trained
    saved = tmp_path / "dapt" / "backbone.pth"
    finetune_cls.main(
        FAST_FINETUNE
        + [
            "--data",
            folder,
            "--weights",
            str(run / "checkpoint.pth"),
            "--runs",
            "1",
            "--recipe",
            "risojevic",
            "--train-ratio",
            "0.5",
            "--save-backbone",
            str(saved),
            "--out",
            str(tmp_path / "ft"),
        ]
    )
    obj = torch.load(saved, weights_only=True)
    assert obj["arch"] == "resnet18" and obj["method"] == "moco+finetune:scenes"
    result = torchvision.models.resnet18().load_state_dict(obj["state_dict"], strict=False)
    assert sorted(result.missing_keys) == ["fc.bias", "fc.weight"] and not result.unexpected_keys
    model, _, _, method, _, _ = eval_linear.load_backbone(str(saved))
    torch.testing.assert_close(model.conv1.weight, obj["state_dict"]["conv1.weight"])
    for module in (eval_linear, finetune_cls):  # its source's test split holds its training images (paper 004)
        with pytest.raises(SystemExit) as exit_info:
            module.main(
                [
                    "--data",
                    folder,
                    "--dataset",
                    "Scenes",
                    "--weights",
                    str(saved),
                    "--workers",
                    "0",
                    "--out",
                    str(tmp_path / "again"),
                ]
            )
        err = capsys.readouterr().err.strip().splitlines()
        assert exit_info.value.code == 2 and len(err) == 1 and "was fine-tuned on Scenes" in err[0], err
    assert not (tmp_path / "again").exists()


def test_a_resumed_job_keeps_the_method_of_weights_whose_runs_had_finished(trained, tmp_path, monkeypatch):
    folder, run = trained
    argv = FAST_FINETUNE + [
        "--data",
        folder,
        "--weights",
        str(run / "backbone.pth"),
        "--weights",
        "random",
        "--arch",
        "resnet18",
        "--runs",
        "1",
        "--train-ratio",
        "0.5",
        "--out",
        str(tmp_path),
    ]
    real_train_epoch = finetune_cls.train_epoch

    def sigterm_in_the_random_run(*args, **kwargs):
        real_train_epoch(*args, **kwargs)
        if args[7].startswith("random"):  # key: the moco backbone's run is done and recorded
            signal.raise_signal(signal.SIGTERM)

    monkeypatch.setattr(finetune_cls, "train_epoch", sigterm_in_the_random_run)
    assert finetune_cls.evaluate(finetune_cls.get_args(argv)) is None
    monkeypatch.setattr(finetune_cls, "train_epoch", real_train_epoch)
    entries = finetune_cls.evaluate(finetune_cls.get_args(argv))
    assert [(e["method"], e["arch"]) for e in entries] == [("moco", "resnet18"), ("random", "resnet18")]
    assert f"| {run / 'backbone.pth'} | moco | resnet18 | finetune |" in (tmp_path / "results.md").read_text()


def test_a_job_killed_before_its_backbone_was_saved_saves_it_on_resume(trained, tmp_path, monkeypatch):
    folder, run = trained
    saved = tmp_path / "dapt" / "backbone.pth"
    argv = FAST_FINETUNE + [
        "--data",
        folder,
        "--weights",
        str(run / "backbone.pth"),
        "--runs",
        "1",
        "--train-ratio",
        "0.5",
        "--save-backbone",
        str(saved),
        "--out",
        str(tmp_path / "ft"),
    ]
    real_save = data.save_atomic

    def killed_at_the_backbone(obj, path):
        if path == str(saved):
            raise KeyboardInterrupt  # stands for a SIGKILL between the last test and the backbone file
        real_save(obj, path)

    monkeypatch.setattr(data, "save_atomic", killed_at_the_backbone)
    with pytest.raises(KeyboardInterrupt):
        finetune_cls.evaluate(finetune_cls.get_args(argv))
    assert not saved.exists()
    monkeypatch.setattr(data, "save_atomic", real_save)
    [entry] = finetune_cls.evaluate(finetune_cls.get_args(argv))
    assert torch.load(saved, weights_only=True)["method"] == "moco+finetune:scenes"
    assert len(entry["scenes"]["accuracies"]) == 1


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


def test_a_shorter_run_scales_the_recipe_schedule_unless_milestones_are_given():
    args = finetune_cls.get_args(["--epochs", "4"])  # 30 / 60 / 90 of 100 -> the epochs starting at 30 / 60 / 90 %
    assert args.milestones == [2, 3, 4] and args.warmup == 0
    assert [finetune_cls.lr_at(args, e, 0.01) for e in range(4)] == pytest.approx([0.01, 0.01, 1e-3, 1e-4])
    assert finetune_cls.get_args(["--epochs", "4", "--milestones", "1"]).milestones == [1]
    args = finetune_cls.get_args(["--recipe", "risojevic", "--epochs", "10"])
    assert (args.milestones, args.warmup) == ([5, 7, 9], 1)
    args = finetune_cls.get_args(["--recipe", "risojevic", "--epochs", "100"])
    assert (args.milestones, args.warmup) == ([50, 70, 90], 5)


def _test_with_own_batchnorm_statistics(rank, folder, init, out):
    """One of two CPU processes: a model whose BN statistics are its own, tested on the shared test set."""
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    model = nn.Sequential(nn.BatchNorm2d(3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 3, bias=False))
    nn.init.eye_(model[3].weight)  # the class is the strongest normalised colour channel
    model[0].running_mean[1] = 5.0 * rank  # rank 1's own statistics (as after training on its share): never green
    paths, labels, _, _ = data.labeled_images(folder)
    args, cpu, transform = SimpleNamespace(batch_size=4), torch.device("cpu"), eval_linear.eval_transform(16)
    shared = finetune_cls.test_confusion(model, paths, labels, 3, transform, args, (rank, 2, cpu, None, 0))
    if rank == 0:
        alone = finetune_cls.test_confusion(model, paths, labels, 3, transform, args, (0, 1, cpu, None, 0))
        with open(out, "w") as f:
            json.dump([shared.tolist(), alone.tolist()], f)
    dist.destroy_process_group()


def test_processes_without_synchronised_batchnorm_all_test_with_rank_0_statistics(trained, tmp_path):
    folder, _ = trained
    out = tmp_path / "confusions.json"
    torch.multiprocessing.start_processes(
        _test_with_own_batchnorm_statistics,
        nprocs=2,
        start_method="fork",
        args=(folder, f"file://{tmp_path / 'rendezvous'}", str(out)),
    )
    shared, alone = json.loads(out.read_text())
    assert shared == alone and sum(map(sum, shared)) == 30


def test_two_process_finetuning_completes(trained, tmp_path):
    folder, run = trained
    result = run_torchrun(
        "finetune_cls.py",
        2,
        *FAST_FINETUNE,
        "--data",
        folder,
        "--weights",
        run / "backbone.pth",
        "--runs",
        "1",
        "--train-ratio",
        "0.5",
        "--out",
        tmp_path,
    )
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


@pytest.mark.parametrize(
    "kind, fragment",
    [
        ("other_arch", "matches only"),
        ("other_keys", "matches only 0 of"),
        ("pickle", "weights_only=True"),
        ("text", "weights_only=True"),
    ],
)
def test_bad_weights_are_refused_in_one_sentence_and_nothing_is_written(trained, tmp_path, capsys, kind, fragment):
    folder, _ = trained
    path = write_bad_weights(tmp_path, kind)
    for module in (eval_linear, finetune_cls):
        with pytest.raises(SystemExit) as exit_info:
            module.main(
                [
                    "--data",
                    folder,
                    "--weights",
                    "random",
                    "--weights",
                    str(path),
                    "--arch",
                    "resnet18",
                    "--out",
                    str(tmp_path / "out"),
                    "--workers",
                    "0",
                ]
            )
        err = capsys.readouterr().err.strip().splitlines()
        assert exit_info.value.code == 2 and len(err) == 1 and fragment in err[0], err
        assert not (tmp_path / "out").exists()


def test_bad_datasets_and_missing_imagenet_weights_are_one_sentence(tmp_path, capsys, monkeypatch):
    few = make_image_folder(tmp_path / "few", classes=2, per_class=2)
    result = run_script(
        "eval_linear.py", "--data", few, "--arch", "resnet18", "--train-ratio", "0.2", "--out", tmp_path / "out"
    )
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
