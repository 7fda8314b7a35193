"""pera.py: each component against its definition, then real training steps on a tiny ViT."""

import json
import math
import os

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

import eval_linear
import pera
from conftest import TINY_VIT, assert_ran_cleanly, make_image_folder, run_torchrun

TINY = TINY_VIT  # conftest.tiny_argv: the tests of every method run it


def tiny_views(args, batch=4):
    """Random crops in the loader's layout: batch x crops x 3 x size x size, student and teacher views."""
    g, l = [torch.randn(batch, n, 3, s, s) for n, s in ((2, args.img_size), (args.local_crops, args.local_size))]
    return [g, g + 0.1, l, l + 0.1]


def test_masks_partition_the_patches_exactly_and_follow_the_ratios():
    assert pera.mask_counts(16, (0.3, 0.2, 0.5)) == (5, 3, 8)
    assert pera.mask_counts(196, (0.3, 0.2, 0.5)) == (59, 39, 98)  # ViT-B/16 at 224
    for n in (16, 196):
        s, l, t = pera.disjoint_masks(64, n, (0.3, 0.2, 0.5), torch.device("cpu"))
        assert (s.shape[1], l.shape[1], t.shape[1]) == pera.mask_counts(n, (0.3, 0.2, 0.5))
        union = torch.cat([s, l, t], dim=1).sort(dim=1).values
        assert torch.equal(union, torch.arange(n).expand(64, n))  # Eq. 3: U = s + l + t, no overlap
        for part, ratio in zip((s, l, t), (0.3, 0.2, 0.5)):
            assert abs(part.shape[1] / n - ratio) <= 0.5 / n
        assert len({tuple(row.sort().values.tolist()) for row in s}) > 32  # a new partition per image


@pytest.mark.parametrize("dense", [False, True])
def test_student_and_teacher_sequences_are_the_short_ones(dense):
    args = pera.get_args(TINY + ["--dense"] * dense)
    torch.manual_seed(0)
    model = pera.PerA(args)
    lengths = {}
    for net in ("student", "teacher"):
        for block in (0, 6):
            ln = model.get_submodule(f"{net}.encoder.encoder.layers.encoder_layer_{block}.ln_1")
            ln.register_forward_hook(lambda m, i, o, key=(net, block): lengths.setdefault(key, []).append(o.shape[1]))
    *views, masks, local_masks = pera.masked_views(tiny_views(args), args)  # crop-major, 8 rows of 16 / 4 patches
    assert [m.shape for m in masks + local_masks] == [(8, 5), (8, 3), (8, 8), (8, 1), (8, 1), (8, 2)]
    s_out, pred = model(views[0], views[2], masks, local_masks)
    t_out = model.teacher_forward(views[1], views[3], masks, local_masks)
    assert s_out.shape == t_out.shape == (8 + 8, 64) and pred.shape == (8, 3, 8 * 8 * 3)
    if dense:  # Table 10's baseline: every patch in both networks from the first block
        assert lengths == {
            ("student", 0): [17, 5],
            ("student", 6): [17, 5],
            ("teacher", 0): [17, 5],
            ("teacher", 6): [17, 5],
        }
    else:  # cls + s (5), mask tokens (3) from block depth // 2; teacher cls + t (8); local crops cls + 1 / cls + 2
        assert lengths == {
            ("student", 0): [6, 2],
            ("student", 6): [9, 2],
            ("teacher", 0): [9, 3],
            ("teacher", 6): [9, 3],
        }


def test_student_and_teacher_crops_are_spatially_identical_and_only_colour_differs():
    yy, xx = torch.meshgrid(torch.arange(64), torch.arange(64), indexing="ij")
    pixels = torch.stack([xx * 4, yy * 4, (xx * 7 + yy * 13) % 256], dim=-1).to(torch.uint8).numpy()
    img = Image.fromarray(pixels)  # every pixel unique: equal crops mean equal geometry
    transform = pera.AlignedMultiCrop(32, 16, 3, (0.4, 1.0), (0.05, 0.4))
    torch.manual_seed(0)
    s_glob, t_glob, s_loc, t_loc = transform(img)
    assert s_glob.shape == t_glob.shape == (2, 3, 32, 32) and s_loc.shape == t_loc.shape == (3, 3, 16, 16)
    transform.student_colour = transform.teacher_colour = lambda crop: crop  # geometry only
    differs = 0
    for seed in range(10):
        torch.manual_seed(seed)
        s_glob, t_glob, s_loc, t_loc = transform(img)
        assert torch.equal(s_glob, t_glob) and torch.equal(s_loc, t_loc)
        differs += not torch.equal(s_glob[0], s_glob[1])
    assert differs == 10  # the two global pairs are two different crops


def test_centering_temperatures_and_schedules_follow_their_formulas():
    t = torch.tensor([[1.0, 2.0, 3.0], [0.0, 1.0, 5.0]])
    center = torch.tensor([0.5, 0.0, 1.0])
    expected = torch.softmax((t - center) / 0.04, dim=-1)
    torch.testing.assert_close(pera.teacher_targets(t, center, 0.04), expected)  # Eq. 5-6
    pera.update_center(center, t, 0.9)
    torch.testing.assert_close(center, 0.9 * torch.tensor([0.5, 0.0, 1.0]) + 0.1 * t.mean(0))  # Eq. 7
    args = pera.get_args(["--epochs", "100"])
    assert (args.student_temp, args.mask_ratios, args.out_dim, args.local_size) == (0.1, [0.2, 0.2, 0.6], 131072, 96)
    assert pera.get_args(["--img-size", "448"]).local_size == 96  # the authors' 448 px global, 96 px local crops
    at = [pera.schedules(args, step * 10, 10) for step in (0, 10, 15, 30, 60, 100)]  # 10 steps per epoch
    # warm-ups as the authors' np.linspace(start, peak, W): W = 300 steps for the temperature, 200 for the lr
    assert [s["teacher_temp"] for s in at] == pytest.approx(
        [0.03, 0.03 + 0.02 * 100 / 299, 0.03 + 0.02 * 150 / 299, 0.05, 0.05, 0.05]
    )
    assert [s["lr"] for s in at[:2]] == pytest.approx([0.0, 1e-3 * 100 / 199])
    assert pera.schedules(args, 299, 10)["teacher_temp"] == pytest.approx(0.05)  # the peak at step W - 1
    assert pera.schedules(args, 199, 10)["lr"] == pera.schedules(args, 200, 10)["lr"] == pytest.approx(1e-3)
    assert pera.schedules(pera.get_args(["--epochs", "10", "--warmup-epochs", "2"]), 13, 7)["lr"] == pytest.approx(1e-3)
    one_step = pera.get_args(["--epochs", "10", "--warmup-epochs", "1", "--teacher-temp-epochs", "1"])
    assert pera.schedules(one_step, 0, 1)["lr"] == 0.0 and pera.schedules(one_step, 0, 1)["teacher_temp"] == 0.03
    assert at[-1]["lr"] == pytest.approx(1e-6) and at[4]["lr"] == pytest.approx(1e-6 + 0.5 * (1e-3 - 1e-6))
    assert (at[0]["teacher_momentum"], at[0]["wd"]) == pytest.approx((0.992, 0.04))
    assert (at[-1]["teacher_momentum"], at[-1]["wd"]) == pytest.approx((1.0, 0.2))
    assert at[3]["wd"] == pytest.approx(0.2 + 0.5 * (0.04 - 0.2) * (1 + math.cos(math.pi * 0.3)))


def test_koleo_matches_a_hand_computed_value():
    x = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0]])
    # nearest neighbours: 0 <-> 1 (dot 0.8), 2 -> 1 (0.6); distances sqrt(0.4), sqrt(0.4), sqrt(0.8)
    expected = -(2 * math.log(math.sqrt(0.4)) + math.log(math.sqrt(0.8))) / 3
    assert pera.koleo(x).item() == pytest.approx(expected, abs=1e-6)
    assert pera.koleo(3 * x).item() == pytest.approx(expected, abs=1e-6)  # Eq. 8 acts on unit vectors


def test_koleo_finds_the_nearest_neighbour_in_float32_under_bf16_autocast():
    """Neighbours at dot products 0.9990 and 0.9985 are one value in bf16: an unguarded KoLeo picks the wrong one."""
    angles = [0.0, 0.0548, -0.0447, 2.0]
    x = torch.tensor([[math.cos(a), math.sin(a)] for a in angles])
    nearest = [2, 0, 0, 1]  # by angle: |0 - (-0.0447)|, |0.0548 - 0|, |-0.0447 - 0|, |2.0 - 0.0548|
    expected = -sum(math.log(2 * math.sin(abs(angles[i] - angles[j]) / 2)) for i, j in enumerate(nearest)) / 4
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert (x @ x.T).dtype == torch.bfloat16
        under_autocast = pera.koleo(x).item()
    assert under_autocast == pytest.approx(expected, abs=1e-5) and pera.koleo(x).item() == under_autocast


def test_pixel_loss_is_the_squared_error_at_the_learnable_patches_only_summed_per_patch_as_the_authors_code():
    images = torch.randn(2, 3, 16, 16)  # 4 patches of 8 px each
    learnable = torch.tensor([[1, 3], [0, 2]])
    predicted = torch.zeros(2, 2, 8 * 8 * 3)
    patches = [
        [images[b, :, r * 8 : (r + 1) * 8, c * 8 : (c + 1) * 8] for r in range(2) for c in range(2)] for b in range(2)
    ]
    at_l = torch.stack([patches[b][i] for b in range(2) for i in learnable[b].tolist()])  # 4 patches x 3 x 8 x 8
    per_patch_sums = at_l.pow(2).sum(dim=(1, 2, 3))
    assert pera.pixel_loss(predicted, images, learnable, 8).item() == pytest.approx(per_patch_sums.mean().item())
    mean = pera.pixel_loss(predicted, images, learnable, 8, "mean").item()
    assert mean == pytest.approx(at_l.pow(2).mean().item(), rel=1e-6)  # --mse-reduction mean: Eq. 4 as a plain MSE
    # the default C2 0.01 on the patch sums is the old --mse-weight 1.92 on the mean at patch 8 (8 x 8 x 3 = 192)
    assert 0.01 * per_patch_sums.mean().item() == pytest.approx(1.92 * mean, rel=1e-6)
    args = pera.get_args([])
    assert (args.mse_reduction, args.mse_weight, args.koleo_weight) == ("patch-sum", 0.01, 0.1)  # the code's


def test_cls_loss_matches_a_hand_computed_value():
    s = torch.tensor([[0.2, 0.1, -0.3], [0.0, 0.5, 0.1]])
    targets = torch.tensor([[0.7, 0.2, 0.1], [0.0, 1.0, 0.0]])
    total = 0.0
    for row, target in zip(s.tolist(), targets.tolist()):
        log_z = math.log(sum(math.exp(v / 0.1) for v in row))
        total -= sum(p * (v / 0.1 - log_z) for p, v in zip(target, row))
    assert pera.cls_loss(s, targets, 0.1).item() == pytest.approx(total / 2, rel=1e-6)


def test_train_step_gives_the_teacher_no_gradient_and_moves_it_by_the_ema():
    args = pera.get_args(TINY)
    torch.manual_seed(0)
    model = pera.PerA(args)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    teacher_before = [p.clone() for p in model.teacher.parameters()]
    student_before = [p.clone() for p in model.student.parameters()]
    sched = {"teacher_temp": 0.04, "teacher_momentum": 0.9}
    terms = pera.train_step(model, model, tiny_views(args), args, sched, optimizer, scaler, None)
    loss, l_cls, l_mse, l_koleo = terms.tolist()
    assert math.isfinite(loss) and loss == pytest.approx(l_cls + 0.01 * l_mse + 0.1 * l_koleo, rel=1e-5)  # Eq. 9
    assert all(p.grad is None and not p.requires_grad for p in model.teacher.parameters())
    assert model.mask_token.grad is not None and model.predictor.mlp[0].weight.grad is not None
    for t, old_t, s, _ in zip(model.teacher.parameters(), teacher_before, model.student.parameters(), student_before):
        torch.testing.assert_close(t, 0.9 * old_t + 0.1 * s)  # Eq. 10 towards the updated student
    assert not torch.equal(student_before[0], next(model.student.parameters()))
    assert model.center.abs().sum() > 0  # Eq. 7 moved the centre


def train_tiny(folder, out, *extra):
    pera.main(TINY + ["--data", folder, "--out", str(out), *extra])
    return torch.load(os.path.join(out, "checkpoint.pth"), weights_only=True)


@pytest.mark.smoke  # real training steps and one exact resume
def test_an_interrupted_run_resumes_exactly_where_it_stopped(tmp_path):
    folder = make_image_folder(tmp_path / "imgs", classes=3, per_class=4)  # 12 images: 3 steps per epoch
    two_epochs = ["--epochs", "2", "--teacher-temp-epochs", "1"]  # the temperature warms up over the first
    straight = train_tiny(folder, tmp_path / "a", *two_epochs, "--max-steps", "5")
    train_tiny(folder, tmp_path / "b", *two_epochs, "--max-steps", "2")  # stopped mid-epoch
    resumed = train_tiny(folder, tmp_path / "b", *two_epochs, "--max-steps", "5")
    assert straight["step"] == resumed["step"] == 5
    for key, value in straight["model"].items():
        assert torch.equal(value, resumed["model"][key]), key  # teacher, student, centre, mask token
    for a, b in zip(straight["optimizer"]["state"].values(), resumed["optimizer"]["state"].values()):
        assert torch.equal(a["exp_avg"], b["exp_avg"]) and torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])
    log = [json.loads(line) for line in open(tmp_path / "b" / "log.jsonl")]
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5] and all(r["images_per_s"] > 0 for r in log)
    assert {"cls", "mse", "koleo", "lr", "wd", "teacher_momentum", "teacher_temp", "peak_mem_gb"} <= set(log[0])
    # the logged schedule is the one its step used (steps 0-4 for lines 1-5): a 3-step warm-up, 0.05 at step 2
    assert [r["teacher_temp"] for r in log] == pytest.approx([0.03, 0.04, 0.05, 0.05, 0.05])
    args = pera.get_args(TINY + two_epochs)
    for r in log:
        assert {k: r[k] for k in ("lr", "wd", "teacher_momentum")} == pytest.approx(
            {k: v for k, v in pera.schedules(args, r["step"] - 1, 3).items() if k != "teacher_temp"}
        )


def test_exported_teacher_loads_into_torchvision_and_eval_linear_and_vis_draws_the_parts(
    tmp_path, image_folder, capsys
):
    ckpt = train_tiny(image_folder, tmp_path / "run", "--max-steps", "2", "--vis", str(tmp_path / "vis" / "parts.png"))
    assert "columns: image | s / l / t (l red, t blue) | student input s | teacher input t" in capsys.readouterr().out
    saved = torch.load(tmp_path / "run" / "backbone.pth", weights_only=True)
    assert (saved["arch"], saved["method"], saved["config"]) == (
        "vit_tiny",
        "pera",
        {"image_size": 32, "patch_size": 8},
    )
    for key, value in saved["state_dict"].items():
        assert torch.equal(value, ckpt["model"]["teacher.encoder." + key])  # Sec. 3.2.3: the teacher
    vit = torchvision.models.VisionTransformer(32, 8, 12, 3, 192, 768)
    result = vit.load_state_dict(saved["state_dict"], strict=False)
    assert sorted(result.missing_keys) == ["heads.head.bias", "heads.head.weight"] and not result.unexpected_keys
    for weights in ("backbone.pth", "checkpoint.pth"):
        model, width, arch, method, _, _ = eval_linear.load_backbone(str(tmp_path / "run" / weights), image_size=48)
        assert (width, arch, method) == (192, "vit_tiny", "pera")
    eval_linear.main(
        [
            "--data",
            image_folder,
            "--weights",
            str(tmp_path / "run" / "backbone.pth"),
            "--img-size",
            "32",
            "--runs",
            "1",
            "--epochs",
            "2",
            "--workers",
            "0",
            "--stages",
            "--out",
            str(tmp_path / "eval"),
        ]
    )
    results = json.load(open(tmp_path / "eval" / "results.json"))["backbones"][0]
    assert results["method"] == "pera" and len(results["images"]["stages"]) == 4
    png = Image.open(tmp_path / "vis" / "parts.png")  # 4 images x 6 panels of 32 px scaled x4, 2 px gaps
    assert png.size == (6 * (128 + 2) + 2, 4 * (128 + 2) + 2) and png.mode == "RGB"
    pixels = np.asarray(png).astype(int)
    parts, student_input = (pixels[2:130, 2 + c * 130 : c * 130 + 130] for c in (1, 2))  # first image, columns 2, 3
    assert (parts[..., 0] - parts[..., 1:].max(-1) > 40).any()  # l: tinted red
    assert (parts[..., 2] - parts[..., :2].max(-1) > 40).any()  # t: tinted blue
    assert ((student_input == 128).all(-1).sum() / 128**2) == pytest.approx(11 / 16)  # only s (5 of 16) shown


def test_two_process_torchrun_on_gloo_trains(tmp_path, image_folder):
    result = run_torchrun("pera.py", 2, *TINY, "--data", image_folder, "--max-steps", "2", "--out", tmp_path)
    assert_ran_cleanly(result)
    assert "2 process(es)" in result.stdout and "done at step 2" in result.stdout
    ckpt = torch.load(tmp_path / "checkpoint.pth", weights_only=True)
    assert len(ckpt["rng"]) == 2 and not torch.equal(ckpt["rng"][0]["cpu"], ckpt["rng"][1]["cpu"])
    assert [json.loads(line)["step"] for line in open(tmp_path / "log.jsonl")] == [1, 2]


@pytest.mark.parametrize(
    "extra, fragment",
    [
        (["--data", "MISSING"], "is not a folder"),
        (["--mask-ratios", "0.3", "0.3", "0.3"], "sum to 1"),
        (["--mask-ratios", "0.5", "0.0", "0.5"], "three positive fractions"),
        (["--img-size", "36"], "not a multiple of --patch-size"),
        (["--img-size", "8", "--local-crops", "0"], "is too small"),
        (["--batch-size", "100"], "fewer than one batch"),
        (["--out", __file__], "is a file"),
    ],
)
def test_bad_input_is_one_sentence_and_writes_nothing(tmp_path, capsys, image_folder, extra, fragment):
    extra = [str(tmp_path / "missing") if e == "MISSING" else e for e in extra]
    with pytest.raises(SystemExit) as exit_info:
        pera.main(TINY + ["--data", image_folder, "--out", str(tmp_path / "out"), "--max-steps", "1", *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1 and fragment in err[0], err
    assert not os.path.exists(tmp_path / "out")


def test_a_corrupt_image_is_skipped_and_a_non_finite_loss_keeps_the_last_checkpoint(tmp_path, capsys):
    folder = make_image_folder(tmp_path / "imgs", classes=2, per_class=12)
    with open(os.path.join(folder, "class1", "2.png"), "wb") as f:
        f.write(b"not a png at all")
    train_tiny(folder, tmp_path / "out", "--max-steps", "6")  # one epoch of 24 images
    out = capsys.readouterr().out
    assert "skipping unreadable image" in out and "skipped_images 1 |" in out
    assert sum(r["skipped_images"] for r in map(json.loads, open(tmp_path / "out" / "log.jsonl"))) == 1
    before = (tmp_path / "out" / "checkpoint.pth").read_bytes()
    with pytest.raises(SystemExit) as exit_info:
        train_tiny(folder, tmp_path / "out", "--lr", "1e30", "--clip-grad", "0")
    err = capsys.readouterr().err
    assert exit_info.value.code == 1 and "the loss became nan at step 8" in err and "checkpoint.pth (step 6)" in err
    assert (tmp_path / "out" / "checkpoint.pth").read_bytes() == before
