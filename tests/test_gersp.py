"""gersp.py: each component against its definition (Eq. 1-5), alpha = 0 against moco.py, and real training runs."""

import argparse
import json
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

import data
import eval_linear
import gersp
import moco
from conftest import TINY_RESNET, assert_ran_cleanly, make_image_folder, run_torchrun

# conftest.tiny_argv: the tests of every method run it (the built-in textures as the natural images)
TINY = TINY_RESNET + ["--bn-group", "4", "--queue", "16", "--natural", "synthetic"]


def per_sample_gersp(num_classes=3, dim=4, queue=8):
    """A GeRSP whose backbone has no BatchNorm, so every output depends on its own image only."""
    torch.manual_seed(0)
    student = gersp.Student("resnet18", dim, 1, num_classes)
    student.backbone = nn.Sequential(nn.Flatten(), nn.Linear(12, 512))
    return gersp.GeRSP(student, queue, dim, teacher_momentum=0.9, temperature=0.5)


@pytest.mark.parametrize("alpha", [1.0, 0.5])
def test_total_loss_is_l_ct_plus_alpha_l_ce_with_labels_in_their_order(alpha):
    model = per_sample_gersp()
    rs_q, rs_k, natural = torch.randn(4, 3, 2, 2), torch.randn(4, 3, 2, 2), torch.randn(4, 3, 2, 2)
    labels = torch.tensor([2, 0, 1, 2])
    with torch.no_grad():  # Eq. 1 and Eq. 2 written out independently of train_step
        q = F.normalize(model.student.projector(model.student.backbone(rs_q)), dim=1)
        k = F.normalize(model.teacher(rs_k), dim=1)
        logits = torch.cat([(q * k).sum(1, keepdim=True), q @ model.queue.T], dim=1) / 0.5
        l_ct = -torch.log_softmax(logits, dim=1)[:, 0].mean()
        log_p = torch.log_softmax(model.student.predictor(model.student.backbone(natural)), dim=1)
        l_ce = -log_p[torch.arange(4), labels].mean()
        l_ce_shuffled = -log_p[torch.arange(4), labels.roll(1)].mean()
    assert not torch.isclose(l_ce, l_ce_shuffled)  # the check below would catch labels out of order
    optimizer = torch.optim.SGD(model.student.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    loss, loss_ct, loss_ce, _ = gersp.train_step(
        model, model.student, rs_q, rs_k, natural, labels, optimizer, scaler, None, alpha
    )
    torch.testing.assert_close(loss_ct, l_ct)
    torch.testing.assert_close(loss_ce, l_ce)
    torch.testing.assert_close(loss, l_ct + alpha * l_ce)


def test_alpha_zero_switches_nial_off_and_the_step_equals_mocos():
    torch.manual_seed(0)
    mo = moco.MoCo(moco.Encoder("resnet18", 16, 2), 32, 16, 0.996, 0.07)
    student = gersp.Student("resnet18", 16, 2, 5)
    student.predictor.requires_grad_(False)
    ge = gersp.GeRSP(student, 32, 16, 0.996, 0.07)
    ge.student.backbone.load_state_dict(mo.encoder_q.backbone.state_dict())
    ge.student.projector.load_state_dict(mo.encoder_q.projector.state_dict())
    ge.teacher.load_state_dict(mo.encoder_k.state_dict())
    ge.queue.copy_(mo.queue)
    rs_q, rs_k = torch.randn(8, 3, 32, 32), torch.randn(8, 3, 32, 32)
    opt_mo = torch.optim.SGD(mo.encoder_q.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    opt_ge = torch.optim.SGD(
        [p for p in ge.student.parameters() if p.requires_grad], lr=0.1, momentum=0.9, weight_decay=5e-4
    )
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    predictor_before = ge.student.predictor.weight.clone()
    torch.manual_seed(1)  # the same shuffle permutation for both
    loss_mo, _ = moco.train_step(mo, mo.encoder_q, rs_q, rs_k, opt_mo, scaler, None)
    torch.manual_seed(1)
    loss_ge, loss_ct, loss_ce, _ = gersp.train_step(ge, ge.student, rs_q, rs_k, None, None, opt_ge, scaler, None, 0.0)
    assert loss_ce == 0 and ge.student.predictor.weight.grad is None
    assert torch.equal(ge.student.predictor.weight, predictor_before)
    torch.testing.assert_close(loss_ge, loss_mo, rtol=0, atol=1e-6)
    for (name, p_ge), p_mo in zip(ge.student.backbone.named_parameters(), mo.encoder_q.backbone.parameters()):
        torch.testing.assert_close(p_ge, p_mo, rtol=0, atol=1e-6, msg=name)
    torch.testing.assert_close(ge.queue, mo.queue, rtol=0, atol=1e-6)


def test_teacher_gets_no_gradient_and_its_projector_follows_the_ema():
    model = per_sample_gersp()
    optimizer = torch.optim.SGD(model.student.parameters(), lr=0.5)
    teacher_before = [p.clone() for p in model.teacher.parameters()]
    gersp.train_step(
        model,
        model.student,
        torch.randn(4, 3, 2, 2),
        torch.randn(4, 3, 2, 2),
        torch.randn(4, 3, 2, 2),
        torch.tensor([0, 1, 2, 0]),
        optimizer,
        torch.amp.GradScaler("cpu", enabled=False),
        None,
        1.0,
    )
    assert all(p.grad is None and not p.requires_grad for p in model.teacher.parameters())
    student = list(model.student.backbone.parameters()) + list(model.student.projector.parameters())
    for p_t, old, p_s in zip(model.teacher.parameters(), teacher_before, student):
        assert not torch.equal(p_t, old)
        torch.testing.assert_close(p_t, 0.9 * old + 0.1 * p_s)  # Eq. 4, projector included
    assert model.queue_ptr == 4


@pytest.mark.parametrize("module", [moco, gersp], ids=["moco", "gersp"])
def test_info_nce_is_float32_under_bf16_autocast(module):
    """At 1/T = 14, bf16 logits (8 bits of mantissa) would move the loss; the loss leaves autocast."""
    torch.manual_seed(0)
    q, k = F.normalize(torch.randn(8, 16), dim=1), F.normalize(torch.randn(8, 16), dim=1)
    queue = F.normalize(torch.randn(64, 16), dim=1)
    exact = module.info_nce(q, k, queue, 0.07)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert (q @ queue.T).dtype == torch.bfloat16  # what an unguarded loss would compute with
        loss = module.info_nce(q, k, queue, 0.07)[0]
    assert loss.dtype == torch.float32 and loss.item() == exact.item()


def test_lr_min_above_lr_is_refused(capsys):
    with pytest.raises(SystemExit) as exit_info:
        gersp.main(["--lr", "0.001", "--lr-min", "0.01", "--out", "/nonexistent/never/written"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1 and "anneal upwards" in err[0], err


def test_cosine_annealing_restarts_every_20_epochs():
    args = gersp.get_args([])
    lrs = [gersp.lr_at(args, e) for e in (0, 10, 19, 20, 40, 99)]
    assert lrs[0] == lrs[3] == lrs[4] == pytest.approx(0.007)
    assert lrs[1] == pytest.approx(0.004)  # halfway between lr_max 0.007 and lr_min 0.001
    assert 0.001 < lrs[2] < 0.0011 and lrs[5] == pytest.approx(lrs[2])


def test_natural_batches_cycle_reshuffle_and_resume_at_the_same_batch():
    """Sec. III-A: step s reads natural batch s mod B of pass s // B, each pass reshuffled and augmented afresh."""
    draws = lambda img: torch.randint(1000, ()).item()  # noqa: E731 - the augmentation's random draw, seeded per item
    natural = data.ImageDataset([f"synthetic://{i}" for i in range(10)], list(range(10)), draws, seed=1)
    args = argparse.Namespace(batch_size=4, workers=0)
    proc = gersp.Process(0, 1, torch.device("cpu"), None)
    loader = gersp.make_loader(natural, args, proc, seed=3)  # 2 batches a pass, 2 images left out of each
    batches = gersp.natural_batches(loader, 0, proc.device)
    steps = [next(batches) for _ in range(6)]
    indices = [labels.tolist() for _, labels, _ in steps]  # the label of natural image i is i
    assert len(set(indices[0] + indices[1])) == 8 and indices[0] + indices[1] != indices[2] + indices[3]  # reshuffled
    for step, (images, labels, skipped) in enumerate(steps):
        expected = [natural.load(i, step // 2)[0] for i in labels.tolist()]  # seeded by its pass
        assert images.tolist() == expected and skipped.tolist() == [0] * 4
    assert steps[2][0].tolist() != [natural.load(i, 0)[0] for i in indices[2]]
    resumed = gersp.natural_batches(loader, 4, proc.device)  # a run resumed at step 4
    assert [next(resumed)[1].tolist() for _ in range(2)] == indices[4:]


def test_a_real_data_folder_without_natural_is_refused_unless_alpha_is_0(tmp_path, capsys):
    """Issue 25: a real --data run without --natural used to train NIAL on the built-in textures without a word."""
    rs = make_image_folder(tmp_path / "rs", classes=2, per_class=4)
    with pytest.raises(SystemExit) as exit_info:
        gersp.main(TINY_RESNET + ["--data", rs, "--queue", "16", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1, err
    for fragment in (
        "needs --natural",
        "ImageNet's train/ layout (one folder per class)",
        "--alpha 0 trains without",
        "--natural synthetic uses the built-in textures, for smoke runs only",
    ):
        assert fragment in err[0], err
    assert not (tmp_path / "out").exists()
    gersp.check_args(gersp.get_args(["--data", rs, "--alpha", "0"]), 1)  # NIAL off: --natural is never read
    assert gersp.get_args([]).natural == gersp.get_args(["--data", "synthetic"]).natural == "synthetic"
    assert gersp.get_args(["--data", "synthetic", "--data", rs]).natural is None


def gersp_tiny(rs, natural, out, *extra):
    gersp.main(TINY_RESNET + ["--data", rs, "--natural", natural, "--queue", "16", "--out", str(out), *extra])
    return torch.load(os.path.join(out, "checkpoint.pth"), weights_only=True)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("gersp")
    return make_image_folder(root / "rs", classes=2, per_class=8), make_image_folder(
        root / "nat", classes=3, per_class=4, seed=1
    )


@pytest.mark.smoke
def test_resume_continues_exactly_and_the_backbone_reaches_torchvision_and_eval_linear(tmp_path, folders):
    rs, natural = folders
    straight = gersp_tiny(rs, natural, tmp_path / "a", "--epochs", "2", "--max-steps", "3")
    gersp_tiny(rs, natural, tmp_path / "b", "--epochs", "2", "--max-steps", "1")
    resumed = gersp_tiny(rs, natural, tmp_path / "b", "--epochs", "2", "--max-steps", "3")
    for key, value in straight["model"].items():
        if torch.is_tensor(value):
            assert torch.equal(value, resumed["model"][key]), key
    log = [json.loads(line) for line in open(tmp_path / "b" / "log.jsonl")]
    assert [r["step"] for r in log] == [1, 2, 3]
    assert all(r["loss"] == pytest.approx(r["loss_ct"] + r["loss_ce"], abs=1e-4) for r in log)
    saved = torch.load(tmp_path / "b" / "backbone.pth", weights_only=True)
    result = torchvision.models.resnet18().load_state_dict(saved["state_dict"], strict=False)
    assert sorted(result.missing_keys) == ["fc.bias", "fc.weight"] and not result.unexpected_keys
    for weights in ("backbone.pth", "checkpoint.pth"):
        loaded = eval_linear.load_backbone(str(tmp_path / "b" / weights))
        assert (loaded.width, loaded.arch, loaded.method) == (512, "resnet18", "gersp")
        torch.testing.assert_close(loaded.model.conv1.weight, saved["state_dict"]["conv1.weight"])
    results = eval_linear.evaluate(
        eval_linear.get_args(
            [
                "--data",
                natural,
                "--weights",
                str(tmp_path / "b" / "backbone.pth"),
                "--img-size",
                "32",
                "--runs",
                "1",
                "--epochs",
                "2",
                "--workers",
                "0",
                "--out",
                str(tmp_path / "eval"),
            ]
        )
    )
    assert results[0]["method"] == "gersp" and 0 <= results[0]["nat"]["mean"] <= 100


def test_two_process_torchrun_completes(tmp_path, folders):
    rs, natural = folders
    result = run_torchrun(
        "gersp.py",
        2,
        *TINY_RESNET,
        "--data",
        rs,
        "--natural",
        natural,
        "--queue",
        "16",
        "--max-steps",
        "2",
        "--out",
        tmp_path,
    )
    assert_ran_cleanly(result)
    assert "2 process(es)" in result.stdout and "done at step 2" in result.stdout
    assert torch.load(tmp_path / "checkpoint.pth", weights_only=True)["model"]["_extra_state"]["queue_ptr"] == 0
