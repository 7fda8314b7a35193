"""moco.py: each component against its definition, then real training steps on tiny models."""

import json
import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F
import torchvision

import data
import moco
from conftest import TINY_RESNET, assert_one_sentence_error, make_image_folder, run_script

TINY = TINY_RESNET + ["--bn-group", "4", "--queue", "16"]  # conftest.tiny_argv: the tests of every method run it


def tiny_moco(queue=6, dim=4, momentum=0.9, temperature=0.5, encoder=None):
    encoder = encoder or nn.Sequential(nn.Flatten(), nn.Linear(12, dim))  # no BatchNorm: keys depend on one image
    return moco.MoCo(encoder, queue, dim, momentum, temperature)


def test_info_nce_matches_a_hand_computed_value():
    q = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    k = torch.tensor([[0.8, 0.6], [0.0, 1.0]])
    queue = torch.tensor([[1.0, 0.0], [0.0, -1.0], [-0.6, 0.8]])
    loss, logits = moco.info_nce(q, k, queue, temperature=0.5)
    expected = []
    for qi, ki in zip(q.tolist(), k.tolist()):
        dots = [sum(a * b for a, b in zip(qi, v)) / 0.5 for v in [ki] + queue.tolist()]
        expected.append(-dots[0] + math.log(sum(math.exp(d) for d in dots)))
    assert loss.item() == pytest.approx(sum(expected) / 2, rel=1e-6)
    assert logits.shape == (2, 4) and logits[0, 0].item() == pytest.approx(0.8 / 0.5)


def test_queue_holds_exactly_the_newest_keys_after_wrap_around():
    model = tiny_moco(queue=6, dim=2)
    batches = [torch.full((2, 2), float(i)) for i in range(5)]  # 10 keys through a queue of 6
    for keys in batches:
        model.enqueue(keys)
    assert model.queue_ptr == 10 % 6
    assert sorted(model.queue[:, 0].tolist()) == [2, 2, 3, 3, 4, 4]  # batches 0 and 1 were pushed out
    assert model.queue[2:4, 0].tolist() == [4, 4]  # the newest sits where the pointer was


def test_momentum_update_equals_its_formula_for_every_parameter_projector_included():
    model = moco.MoCo(moco.Encoder("resnet18", 8, 1), 8, 8, 0.99, 0.2)
    for p in model.encoder_q.parameters():
        p.data.add_(torch.randn_like(p))
    before_k = [p.clone() for p in model.encoder_k.parameters()]
    model.momentum_update()
    for p_k, old, p_q in zip(model.encoder_k.parameters(), before_k, model.encoder_q.parameters()):
        torch.testing.assert_close(p_k, 0.99 * old + 0.01 * p_q)
    assert not any(p.requires_grad for p in model.encoder_k.parameters())


def test_split_batchnorm_normalises_each_interleaved_group_on_its_own():
    torch.manual_seed(0)
    x = torch.randn(8, 3, 4, 4) * 3 + 1
    bn = moco.SplitBatchNorm2d(3, groups=2)
    y = bn(x)
    for g in range(2):
        group = x[g::2]
        mean, var = group.mean(dim=(0, 2, 3), keepdim=True), group.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
        torch.testing.assert_close(y[g::2], (group - mean) / torch.sqrt(var + bn.eps))
    group_means = torch.stack([x[g::2].mean(dim=(0, 2, 3)) for g in range(2)]).mean(0)
    torch.testing.assert_close(bn.running_mean, 0.1 * group_means)  # momentum 0.1 from zeros
    assert set(bn.state_dict()) == set(nn.BatchNorm2d(3).state_dict())


def test_one_process_keeps_two_bn_groups_when_its_batch_fits_in_one(tmp_path, image_folder, monkeypatch):
    """Sec. 3.3: with a single group, keys would be normalised over exactly their queries' samples."""
    flags = moco.get_args(["--batch-size", "8", "--bn-group", "32"])
    assert moco.bn_group_count(flags, world=1) == 2 and moco.bn_group_count(flags, world=2) == 1
    flags.batch_size = 64  # one group of 32 per process would fit: one process still keeps two
    assert moco.bn_group_count(flags, world=1) == 2 and moco.bn_group_count(flags, world=2) == 1
    built, encoder = [], moco.Encoder
    monkeypatch.setattr(moco, "Encoder", lambda *a, **k: built.append(encoder(*a, **k)) or built[-1])
    moco.main(
        TINY_RESNET
        + ["--bn-group", "32", "--queue", "16", "--data", image_folder, "--max-steps", "1", "--out", str(tmp_path)]
    )
    assert {m.groups for m in built[0].modules() if isinstance(m, moco.SplitBatchNorm2d)} == {2}


def test_shuffled_keys_come_back_in_the_order_of_their_images():
    torch.manual_seed(0)
    model = tiny_moco()
    images = torch.randn(5, 3, 2, 2)
    local, all_keys = model.keys(images)
    expected = F.normalize(model.encoder_k(images), dim=1)
    torch.testing.assert_close(local, expected)
    torch.testing.assert_close(all_keys, expected)


def test_shuffle_bn_gives_keys_other_batch_statistics_than_their_queries():
    """With BatchNorm in 2 groups, an unshuffled key batch would equal the query features exactly."""
    torch.manual_seed(0)
    encoder = nn.Sequential(nn.Conv2d(3, 4, 1), moco.SplitBatchNorm2d(4, groups=2), nn.Flatten())
    model = moco.MoCo(encoder, 8, 16, 0.9, 0.2)
    images = torch.randn(8, 3, 2, 2)
    local, _ = model.keys(images)
    assert not torch.allclose(local, F.normalize(model.encoder_q(images), dim=1))


def _two_process_keys(rank, init_file, result_file):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    torch.manual_seed(0)  # the same weights on both processes
    model = tiny_moco(queue=8)
    images = torch.full((2, 3, 2, 2), float(rank + 1)) + torch.arange(2.0).view(2, 1, 1, 1)
    local, all_keys = model.keys(images)
    model.enqueue(all_keys)
    everyone = torch.cat(
        [torch.full((2, 3, 2, 2), float(r + 1)) + torch.arange(2.0).view(2, 1, 1, 1) for r in range(2)]
    )
    expected = F.normalize(model.encoder_k(everyone), dim=1)
    ok = torch.allclose(local, expected[2 * rank : 2 * rank + 2]) and torch.allclose(model.queue[:4], expected)
    torch.save({"ok": ok, "ptr": model.queue_ptr}, f"{result_file}.{rank}")
    dist.destroy_process_group()


def test_keys_and_queue_gather_both_processes_in_order(tmp_path):
    mp.spawn(_two_process_keys, args=(str(tmp_path / "init"), str(tmp_path / "result")), nprocs=2)
    for rank in range(2):
        result = torch.load(tmp_path / f"result.{rank}", weights_only=True)
        assert result == {"ok": True, "ptr": 4}  # each process enqueued the 4 keys of both, in global order


def test_train_step_updates_the_query_encoder_only_through_sgd():
    torch.manual_seed(0)
    model = tiny_moco()
    optimizer = torch.optim.SGD(model.encoder_q.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    k_before = [p.clone() for p in model.encoder_k.parameters()]
    q_before = [p.clone() for p in model.encoder_q.parameters()]
    im_q, im_k = torch.randn(4, 3, 2, 2), torch.randn(4, 3, 2, 2)
    with torch.no_grad():  # Eq. 1 on the weights before the step; the encoder has no BN, so shuffling is invisible
        expected, logits = moco.info_nce(
            F.normalize(model.encoder_q(im_q), dim=1),
            F.normalize(model.encoder_k(im_k), dim=1),
            model.queue.clone(),
            0.5,
        )
    loss, accuracy = moco.train_step(model, model.encoder_q, im_q, im_k, optimizer, scaler, None)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6) and logits.shape == (4, 7)
    assert accuracy.item() == pytest.approx((logits.argmax(1) == 0).float().mean().item() * 100)
    assert all(p.grad is None for p in model.encoder_k.parameters())
    for p_k, old_k, p_q, old_q in zip(model.encoder_k.parameters(), k_before, model.encoder_q.parameters(), q_before):
        assert not torch.equal(p_q, old_q)
        torch.testing.assert_close(p_k, 0.9 * old_k + 0.1 * p_q)  # EMA towards the updated query encoder
    assert model.queue_ptr == 4


def test_lr_schedules_follow_the_official_code():
    args = moco.get_args(["--version", "v1", "--epochs", "200"])
    assert [moco.lr_at(args, e) for e in (0, 119, 120, 160)] == pytest.approx([0.03, 0.03, 0.003, 0.0003])
    args = moco.get_args(["--epochs", "200"])
    assert (args.head, args.temperature, args.aug) == ("mlp", 0.2, "moco_v2")
    assert [moco.lr_at(args, e) for e in (0, 100)] == pytest.approx([0.03, 0.015])


def train_tiny(folder, out, *extra):
    moco.main(TINY_RESNET + ["--data", folder, "--queue", "16", "--out", str(out), *extra])
    return torch.load(os.path.join(out, "checkpoint.pth"), weights_only=True)


@pytest.mark.smoke  # real training steps and one exact resume
def test_an_interrupted_run_resumes_exactly_where_it_stopped(tmp_path, image_folder):
    straight = train_tiny(image_folder, tmp_path / "a", "--epochs", "2", "--max-steps", "5")
    train_tiny(image_folder, tmp_path / "b", "--epochs", "2", "--max-steps", "2")  # stopped mid-epoch
    resumed = train_tiny(image_folder, tmp_path / "b", "--epochs", "2", "--max-steps", "5")
    assert straight["step"] == resumed["step"] == 5
    for key, value in straight["model"].items():
        if torch.is_tensor(value):
            assert torch.equal(value, resumed["model"][key]), key
    assert straight["model"]["_extra_state"] == resumed["model"]["_extra_state"] == {"queue_ptr": (5 * 8) % 16}
    for a, b in zip(straight["optimizer"]["state"].values(), resumed["optimizer"]["state"].values()):
        assert torch.equal(a["momentum_buffer"], b["momentum_buffer"])
    log = [json.loads(line) for line in open(tmp_path / "b" / "log.jsonl")]
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5] and all(r["images_per_s"] > 0 for r in log)


def test_backbone_loads_into_torchvision_with_only_fc_missing(tmp_path, image_folder):
    train_tiny(image_folder, tmp_path, "--max-steps", "1")
    saved = torch.load(tmp_path / "backbone.pth", weights_only=True)
    assert (saved["arch"], saved["method"]) == ("resnet18", "moco")
    result = torchvision.models.resnet18().load_state_dict(saved["state_dict"], strict=False)
    assert sorted(result.missing_keys) == ["fc.bias", "fc.weight"] and not result.unexpected_keys


def test_corrupt_image_among_good_ones_is_skipped_counted_and_logged(tmp_path, capsys):
    folder = make_image_folder(tmp_path / "imgs", classes=2, per_class=4)
    with open(os.path.join(folder, "class1", "2.png"), "wb") as f:
        f.write(b"not a png at all")
    train_tiny(folder, tmp_path / "out", "--epochs", "1")
    out = capsys.readouterr().out
    assert "skipping unreadable image" in out and "skipped_images 1 |" in out
    records = [json.loads(line) for line in open(tmp_path / "out" / "log.jsonl")]
    assert [r["skipped_images"] for r in records] == [1]  # one step of the 8 images, one of them replaced


@pytest.mark.parametrize(
    "setup, extra, fragment",
    [
        (lambda tmp: str(tmp / "missing"), [], "is not a folder"),
        (lambda tmp: (os.makedirs(tmp / "empty"), str(tmp / "empty"))[1], [], "holds no images"),
        (lambda tmp: make_image_folder(tmp / "few", classes=1, per_class=4), [], "fewer than one batch"),
        (lambda tmp: make_image_folder(tmp / "ok"), ["--queue", "12"], "not a multiple of --batch-size"),
        (lambda tmp: make_image_folder(tmp / "ok"), ["--epochs", "0"], "--epochs must be positive"),
        (lambda tmp: make_image_folder(tmp / "ok"), ["--out", __file__], "is a file"),
        (lambda tmp: make_image_folder(tmp / "ok"), ["--lr-steps", "30"], "--lr-steps applies to the step schedule"),
        (lambda tmp: make_image_folder(tmp / "ok"), ["--batch-size", "3", "--queue", "3"], "odd"),
        (lambda tmp: make_image_folder(tmp / "ok"), ["--batch-size", "2", "--queue", "2"], "BatchNorm groups of 1"),
        (lambda tmp: make_image_folder(tmp / "ok"), ["--seed", "-1"], "--seed: must be an integer from 0"),
        (lambda tmp: make_image_folder(tmp / "ok"), ["--workers", "-1"], "--workers must be 0 or more"),
    ],
)
def test_bad_input_is_one_sentence_and_writes_nothing(tmp_path, capsys, setup, extra, fragment):
    folder = setup(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        moco.main(TINY_RESNET + ["--data", folder, "--queue", "16", "--out", str(tmp_path / "out"), *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1 and fragment in err[0], err
    assert not os.path.exists(tmp_path / "out")


def test_a_knn_monitor_class_of_one_image_is_refused_by_its_name_before_anything_is_written(tmp_path, capsys):
    folder = make_image_folder(tmp_path / "ok")
    monitor = make_image_folder(tmp_path / "monitor", classes=2, per_class=3)
    for name in ("1.png", "2.png"):
        os.remove(os.path.join(monitor, "class1", name))
    with pytest.raises(SystemExit) as exit_info:
        moco.main(
            TINY_RESNET + ["--data", folder, "--queue", "16", "--knn-monitor", monitor, "--out", str(tmp_path / "out")]
        )
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1, err
    assert "class class1 has 1 readable image(s)" in err[0] and "needs 2 of each class" in err[0], err
    assert "--train-ratio" not in err[0] and not os.path.exists(tmp_path / "out")  # no args.json before the refusal


def test_the_command_line_reports_bad_input_without_a_traceback(tmp_path):
    folder = make_image_folder(tmp_path / "corrupt", classes=1, per_class=4)
    for name in os.listdir(os.path.join(folder, "class0")):
        with open(os.path.join(folder, "class0", name), "wb") as f:
            f.write(b"garbage")
    result = run_script("moco.py", *TINY_RESNET, "--data", folder, "--out", tmp_path / "out")
    assert_one_sentence_error(result, "moco.py", "could not be read")
    assert not os.path.exists(tmp_path / "out")


def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_checkpoint(tmp_path, image_folder, capsys):
    train_tiny(image_folder, tmp_path, "--epochs", "3", "--max-steps", "3")
    before = (tmp_path / "checkpoint.pth").read_bytes()
    with pytest.raises(SystemExit) as exit_info:
        train_tiny(image_folder, tmp_path, "--epochs", "3", "--lr", "1e30")
    err = capsys.readouterr().err
    assert exit_info.value.code == 1 and "the loss became nan at step 5" in err
    assert "checkpoint.pth (step 3)" in err and (tmp_path / "checkpoint.pth").read_bytes() == before


def test_an_update_that_breaks_the_weights_on_the_last_step_writes_nothing(tmp_path, image_folder, capsys, monkeypatch):
    """The loss of a step is computed before its update: only the check before each save catches this."""
    train_tiny(image_folder, tmp_path, "--epochs", "3", "--max-steps", "2")
    before = {name: (tmp_path / name).read_bytes() for name in ("checkpoint.pth", "backbone.pth")}
    step = moco.train_step

    def breaking_step(model, *args):
        values = step(model, *args)
        with torch.no_grad():
            model.encoder_q.backbone.layer1[0].conv1.weight[0, 0, 0, 0] = math.inf
        return values

    monkeypatch.setattr(moco, "train_step", breaking_step)
    with pytest.raises(SystemExit) as exit_info:
        train_tiny(image_folder, tmp_path, "--epochs", "3", "--max-steps", "3")
    err = capsys.readouterr().err
    assert exit_info.value.code == 1 and "encoder_q.backbone.layer1.0.conv1.weight became non-finite at step 3" in err
    assert "checkpoint.pth (step 2), left as it was" in err
    assert {name: (tmp_path / name).read_bytes() for name in before} == before


@pytest.mark.parametrize("name", ["moco_v1", "moco_v2", "gersp"])
def test_augmentations_produce_normalised_crops_of_the_requested_size(name):
    x = moco.augmentation(name, 48)(data.synthetic_image(0))
    assert x.shape == (3, 48, 48) and x.min() < 0 < x.max()
