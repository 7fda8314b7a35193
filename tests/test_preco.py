"""preco.py: masking, each loss term against a hand computation, then real steps of a tiny swin_t (32 px)."""

import contextlib
import json
import math
import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from PIL import Image

import data
import eval_linear
import preco
from conftest import TINY_SWIN, assert_ran_cleanly, make_image_folder, run_torchrun

TINY = TINY_SWIN + ["--batch-size", "4"]  # conftest.tiny_argv: the tests of every method run it (16 images: 4 steps)


def tiny_args(*extra):
    return preco.get_args(TINY_SWIN + list(extra))


# ------------------------------------------------------------------------------------------------ masking
def test_mask_covers_the_ratio_in_whole_units_and_upsamples_to_tokens_and_pixels():
    torch.manual_seed(0)
    for grid, ratio in [(6, 0.6), (4, 0.6), (8, 0.75)]:
        mask = preco.random_mask(grid, ratio)
        assert mask.shape == (grid, grid) and mask.sum() == math.ceil(grid * grid * ratio)
    mask = preco.random_mask(6, 0.6)  # SimMIM's 192 px / 32 px: 22 of 36 units
    tokens = preco.upsample_mask(mask, 8)  # 48 x 48 tokens of 4 px
    assert tokens.shape == (48, 48) and tokens.float().mean() == pytest.approx(22 / 36)
    blocks = tokens.view(6, 8, 6, 8)
    assert torch.equal(blocks, mask.view(6, 1, 6, 1).expand(6, 8, 6, 8))  # each unit = one constant 8x8 block
    pixels = preco.upsample_mask(mask, 32)
    assert torch.equal(pixels[::4, ::4], tokens)  # the token grid and the pixel grid agree


def test_masked_view_is_fixed_by_seed_epoch_and_index():
    dataset = data.ImageDataset(["synthetic://0", "synthetic://1"], transform=preco.MaskedView(64, 16, 0.6), seed=3)
    (image, mask), _, _ = dataset.load(1, 2)
    dataset.set_epoch(2)
    (image2, mask2), _, _ = dataset[1]  # what the loader gets in epoch 2
    assert image.shape == (3, 64, 64) and mask.shape == (4, 4) and mask.sum() == 10
    assert torch.equal(image, image2) and torch.equal(mask, mask2)
    masks = {tuple(dataset.load(1, e)[0][1].flatten().tolist()) for e in range(6)}
    assert len(masks) > 1  # another epoch draws another mask


def test_mask_token_replaces_exactly_the_masked_patch_embeddings():
    torch.manual_seed(0)
    model = preco.PReCo("swin_t", mask_unit=8)
    images = torch.randn(2, 3, 32, 32)
    mask = torch.stack([preco.random_mask(4, 0.6) for _ in range(2)])
    embedded = model.embed(images, mask)
    plain = model.encoder.features[0](images)  # conv 4x4 / 4, N H W C, LayerNorm
    tokens = preco.upsample_mask(mask, 2)  # 8-px units = 2 x 2 tokens
    assert embedded.shape == plain.shape == (2, 8, 8, 96)
    assert torch.equal(embedded[tokens], model.mask_token.expand(int(tokens.sum()), 96))
    assert torch.equal(embedded[~tokens], plain[~tokens])
    pixels, pooled = model(images, mask)
    assert pixels.shape == images.shape and pooled.shape == (2, 768)


# ------------------------------------------------------------------------------------------------ losses
def test_reconstruction_loss_counts_only_masked_pixels():
    torch.manual_seed(0)
    pred, target = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)
    mask = preco.upsample_mask(torch.tensor([[[True, False], [False, True]], [[False, False], [True, False]]]), 4)
    loss = preco.masked_distance(pred, target, mask)
    m = mask.unsqueeze(1).expand_as(pred)
    assert loss.item() == pytest.approx((pred - target).abs()[m].mean().item(), rel=1e-5)  # Eq. 2, N masked px
    changed = target.clone()
    changed[0, :, 0, 7] += 100.0  # an unmasked pixel (unit [0, 1] of image 0)
    assert preco.masked_distance(pred, changed, mask).item() == loss.item()
    changed[0, :, 0, 0] += 100.0  # a masked pixel
    assert preco.masked_distance(pred, changed, mask).item() > loss.item() + 1


def test_prompt_and_consistency_terms_match_hand_computations():
    pred = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]]).expand(1, 3, 2, 2)
    target = torch.zeros(1, 3, 2, 2)
    everywhere = torch.ones(1, 2, 2, dtype=torch.bool)
    assert preco.masked_distance(pred, target, everywhere).item() == pytest.approx(2.5, rel=1e-5)  # L_Pr
    corner = torch.tensor([[[True, False], [False, True]]])
    assert preco.masked_distance(pred, target, corner).item() == pytest.approx(2.5, rel=1e-5)  # (1 + 4) / 2
    assert preco.masked_distance(pred, target, corner, "l2").item() == pytest.approx(8.5, rel=1e-5)  # (1 + 16) / 2


class StubModel(nn.Module):
    """Stands for PReCo: records its input and returns fixed pixels and features."""

    def __init__(self, pixels, pooled):
        super().__init__()
        self.pixels, self.pooled, self.calls = nn.Parameter(pixels), nn.Parameter(pooled), []

    def forward(self, images, mask):
        self.calls.append((images, mask))
        return self.pixels[: len(images)], self.pooled[: len(images)]


def test_losses_run_both_branches_in_one_pass_and_match_eq_2_3_and_infonce():
    torch.manual_seed(0)
    images, mask = torch.randn(2, 3, 32, 32), torch.stack([preco.random_mask(4, 0.6) for _ in range(2)])
    model = StubModel(torch.randn(4, 3, 32, 32), torch.randn(4, 5))
    l_re, l_pr, l_sc, l_con = preco.preco_losses(model, images, mask, 8, temperature=0.5)
    ((seen, seen_mask),) = model.calls  # ONE call: [masked; unmasked] through the same modules
    assert torch.equal(seen, torch.cat([images, images]))
    assert torch.equal(seen_mask[:2], mask) and not seen_mask[2:].any()
    y_re, y_pr = model.pixels[:2].detach(), model.pixels[2:].detach()
    m = preco.upsample_mask(mask, 8).unsqueeze(1).expand_as(images)
    assert l_re.item() == pytest.approx((y_re - images).abs()[m].mean().item(), rel=1e-5)
    assert l_pr.item() == pytest.approx((y_pr - images).abs().mean().item(), rel=1e-5)
    assert l_sc.item() == pytest.approx((y_re - y_pr).abs()[m].mean().item(), rel=1e-5)
    a, b = F.normalize(model.pooled[:2].detach(), dim=1), F.normalize(model.pooled[2:].detach(), dim=1)
    expected = 0.0
    for i in range(2):
        for q, keys in ((a[i], b), (b[i], a)):
            logits = [float(q @ k) / 0.5 for k in keys]
            expected += 0.25 * (math.log(sum(math.exp(v) for v in logits)) - logits[i])
    assert l_con.item() == pytest.approx(expected, rel=1e-5)
    masked_only = preco.preco_losses(model, images, mask, 8, pr_pixels="masked", temperature=0.5)[1]
    assert masked_only.item() == pytest.approx((y_pr - images).abs()[m].mean().item(), rel=1e-5)  # Eq. 2's N
    assert preco.preco_losses(model, images, mask, 8, prompt=False)[0].item() == pytest.approx(l_re.item())
    assert len(model.calls[-1][0]) == 2  # - P-E: the masked images only


def test_info_nce_is_float32_under_bf16_autocast():
    torch.manual_seed(0)
    z_a, z_b = torch.randn(6, 16), torch.randn(6, 16)
    exact = preco.info_nce(z_a, z_b, 0.2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = preco.info_nce(z_a, z_b, 0.2)
    assert under_autocast.dtype == torch.float32 and under_autocast.item() == exact.item()


def _contrastive_gradient(rank, world, init_file, result_file):
    """The gradient of the contrastive term on this process's share of one global batch, averaged as DDP does."""
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.manual_seed(0)
    layer = nn.Linear(6, 5)
    x_a, x_b = torch.randn(4, 6), torch.randn(4, 6)  # the same global batch of 4 everywhere
    share = slice(rank * 4 // world, (rank + 1) * 4 // world)
    preco.info_nce(layer(x_a[share]), layer(x_b[share]), 0.2).backward()
    grad = layer.weight.grad
    if world > 1:
        dist.all_reduce(grad)
        grad /= world
        dist.destroy_process_group()
    torch.save(grad, f"{result_file}.{world}.{rank}")


def test_two_processes_on_half_batches_get_the_contrastive_gradient_of_one_process_on_the_whole_batch(tmp_path):
    """The negatives from the other process must send their gradient back to it: with a detached gather, about
    half of the signal (7/8 on 8 GPUs) would be lost and the gradients below would differ."""
    _contrastive_gradient(0, 1, None, tmp_path / "grad")
    mp.spawn(_contrastive_gradient, args=(2, str(tmp_path / "init"), str(tmp_path / "grad")), nprocs=2)
    whole = torch.load(tmp_path / "grad.1.0", weights_only=True)
    for rank in range(2):
        torch.testing.assert_close(torch.load(tmp_path / f"grad.2.{rank}", weights_only=True), whole)


@pytest.mark.parametrize("stop_grad", [True, False])
def test_consistency_gradient_reaches_y_pr_only_without_stop_grad(stop_grad):
    model = StubModel(torch.randn(4, 3, 32, 32), torch.randn(4, 5))
    mask = torch.stack([preco.random_mask(4, 0.6) for _ in range(2)])
    l_sc = preco.preco_losses(model, torch.randn(2, 3, 32, 32), mask, 8, sc_stop_grad=stop_grad)[2]
    l_sc.backward()
    assert model.pixels.grad[:2].abs().sum() > 0  # Y_Re is always pulled
    assert (model.pixels.grad[2:].abs().sum() > 0) == (not stop_grad)


# ------------------------------------------------------------------------------------------------ model, optimiser
def test_both_branches_train_one_shared_encoder_and_decoder():
    torch.manual_seed(0)
    model = preco.PReCo("swin_t", mask_unit=8)
    plain = torchvision.models.swin_t()
    n_swin = sum(p.numel() for name, p in plain.named_parameters() if not name.startswith("head."))
    assert sum(p.numel() for p in model.parameters()) == n_swin + (768 * 32 * 32 * 3 + 32 * 32 * 3) + 96
    batches = []
    model.encoder.features[0].register_forward_hook(lambda mod, inp, out: batches.append(len(inp[0])))
    images, mask = torch.randn(2, 3, 32, 32), torch.stack([preco.random_mask(4, 0.6) for _ in range(2)])
    optimizer = preco.build_optimizer(model, tiny_args())
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    only_prompt = tiny_args("--lambda-re", "0", "--lambda-sc", "0", "--lambda-con", "0")  # L_Pr alone
    logged = preco.train_step(model, images, mask, optimizer, scaler, None, only_prompt)
    assert batches == [4]  # masked and unmasked images in one pass
    assert logged.shape == (5,) and not logged.requires_grad and logged[0] == logged[2]  # loss, then the terms
    for name in ("encoder.features.0.0.weight", "encoder.features.7.1.mlp.0.weight", "decoder.0.weight"):
        assert dict(model.named_parameters())[name].grad.abs().sum() > 0, name  # the prompt branch trains them
    assert not model.mask_token.grad.any()  # ... but not the mask token, which it never sees


def test_weight_decay_skips_norms_biases_mask_token_and_position_bias_tables():
    model = preco.PReCo("swin_t", mask_unit=8)
    decay, no_decay = preco.build_optimizer(model, tiny_args()).param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    skipped = {names[id(p)] for p in no_decay["params"]}
    assert no_decay["weight_decay"] == 0 and decay["weight_decay"] == 0.05
    assert "mask_token" in skipped and "encoder.norm.weight" in skipped and "decoder.0.bias" in skipped
    assert "encoder.features.1.0.attn.relative_position_bias_table" in skipped
    assert {names[id(p)] for p in decay["params"]} >= {"decoder.0.weight", "encoder.features.1.0.attn.qkv.weight"}
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_lr_warms_up_from_lr_over_200_then_follows_simmims_cosine():
    args = preco.get_args(["--epochs", "100", "--warmup-epochs", "10"])
    assert (args.lr, args.wd, args.img_size, args.mask_unit, args.mask_ratio) == (1e-5, 0.05, 192, 32, 0.6)
    assert args.min_lr == pytest.approx(5e-7)
    assert preco.lr_at(args, 0, 10) == pytest.approx(5e-8)
    assert preco.lr_at(args, 50, 10) == pytest.approx(5e-8 + (1e-5 - 5e-8) / 2)
    assert preco.lr_at(args, 100, 10) == pytest.approx(5e-7 + (1e-5 - 5e-7) * 0.5 * (1 + math.cos(math.pi / 10)))
    assert preco.lr_at(args, 1000, 10) == pytest.approx(5e-7)


# ------------------------------------------------------------------------------------------------ real runs
def run(folder, out, *extra):
    preco.main(TINY_SWIN + ["--data", folder, "--epochs", "3", "--out", str(out), *map(str, extra)])
    return torch.load(os.path.join(out, "checkpoint.pth"), weights_only=True)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """3 steps over 4 images (2 steps an epoch) with --vis: shared by the export, log and resume tests. What it
    prints is in root / "stdout.txt"."""
    root = tmp_path_factory.mktemp("preco")
    folder = make_image_folder(root / "images", classes=2, per_class=2)
    with open(root / "stdout.txt", "w") as stdout, contextlib.redirect_stdout(stdout):
        ckpt = run(folder, root / "run", "--max-steps", "3", "--vis", root / "vis.png")
    return folder, root, ckpt


def test_an_interrupted_run_resumes_exactly_where_it_stopped(tmp_path, trained):
    folder, root, straight = trained
    run(folder, tmp_path, "--max-steps", "1")  # stopped mid-epoch
    resumed = run(folder, tmp_path, "--max-steps", "3")
    assert straight["step"] == resumed["step"] == 3
    for key, value in straight["model"].items():
        assert torch.equal(value, resumed["model"][key]), key
    for a, b in zip(straight["optimizer"]["state"].values(), resumed["optimizer"]["state"].values()):
        assert torch.equal(a["exp_avg"], b["exp_avg"]) and torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])
    log = [json.loads(line) for line in open(tmp_path / "log.jsonl")]
    assert [r["step"] for r in log] == [1, 2, 3]


def test_log_has_every_term_and_the_visualisation_has_four_columns(trained):
    folder, root, _ = trained
    log = [json.loads(line) for line in open(root / "run" / "log.jsonl")]
    assert [r["step"] for r in log] == [1, 2, 3] and [r["epoch"] for r in log] == [0, 0, 1]
    for record in log:
        assert {"loss", "l_re", "l_pr", "l_sc", "l_con", "lr", "images_per_s", "peak_mem_gb"} <= set(record)
        assert record["loss"] == pytest.approx(
            record["l_re"] + record["l_pr"] + record["l_sc"] + record["l_con"], abs=1e-4
        )
    (segment,) = json.load(open(root / "run" / "args.json"))["segments"]  # one run, no resume: one segment
    assert segment["step"] == 0 and segment["args"]["mask_unit"] == 8
    png = np.asarray(Image.open(root / "vis.png").convert("RGB"))  # 4 images x 4 columns of 32 px zoomed 4x, 2 px gaps
    assert png.shape == (4 * (128 + 2) + 2, 4 * (128 + 2) + 2, 3)
    captions = "columns: masked input (x_hat) | Y_Re in the masked units (Eq. 1) | Y_Pr, the prompt branch | input (x)"
    assert f"reconstructions of 4 images in {root / 'vis.png'}; {captions}" in open(root / "stdout.txt").read()
    dataset = data.ImageDataset(data.list_images([folder])[0], transform=preco.MaskedView(32, 8, 0.6))
    (image, mask), _, _ = dataset.load(1, 0)  # row 1: epoch 0's crop and mask of image 1
    pixels = image * torch.tensor(data.IMAGENET_STD).view(3, 1, 1) + torch.tensor(data.IMAGENET_MEAN).view(3, 1, 1)
    expected = (pixels.clamp(0, 1) * 255).round().permute(1, 2, 0).numpy()
    row, last_column = 2 + 130, 2 + 3 * 130
    input_tile = png[row : row + 128 : 4, last_column : last_column + 128 : 4].astype(float)
    assert np.abs(input_tile - expected).max() <= 1  # the last column is the input x
    masked_tile = png[row : row + 128 : 4, 2 : 2 + 128 : 4].astype(float)
    unmasked = ~preco.upsample_mask(mask, 8).numpy()
    assert np.abs(masked_tile - expected)[unmasked].max() <= 1 and np.abs(masked_tile - expected).max() > 10


@pytest.mark.smoke
def test_backbone_and_checkpoint_load_into_torchvision_swin_t_and_eval_linears_loader(trained):
    _, root, ckpt = trained
    saved = torch.load(root / "run" / "backbone.pth", weights_only=True)
    assert (saved["arch"], saved["method"], saved["config"]) == ("swin_t", "preco", {})
    result = torchvision.models.swin_t().load_state_dict(saved["state_dict"], strict=False)
    assert sorted(result.missing_keys) == ["head.bias", "head.weight"] and not result.unexpected_keys
    for weights in ("backbone.pth", "checkpoint.pth"):
        model, width, arch, method, _, _ = eval_linear.load_backbone(str(root / "run" / weights), image_size=32)
        assert (width, arch, method) == (768, "swin_t", "preco")
        torch.testing.assert_close(model.features[0][0].weight, ckpt["model"]["encoder.features.0.0.weight"])


def test_two_processes_log_the_same_first_step_as_one_process_with_the_whole_batch(tmp_path, trained):
    """Same weights, images and masks as the one-process run: every term of step 1 must match, and with one image
    per process the contrastive term exists only through the gathered batch (a local InfoNCE would be 0)."""
    folder, root, _ = trained
    result = run_torchrun(
        "preco.py", 2, *TINY_SWIN, "--data", folder, "--epochs", "3", "--max-steps", "1", "--out", tmp_path
    )
    assert_ran_cleanly(result)
    assert "2 process(es)" in result.stdout and "done at step 1" in result.stdout
    one = json.loads(open(root / "run" / "log.jsonl").readline())
    two = [json.loads(line) for line in open(tmp_path / "log.jsonl")]
    assert [r["step"] for r in two] == [1] and two[0]["l_con"] > 0.1
    for key in ("loss", "l_re", "l_pr", "l_sc", "l_con"):
        assert two[0][key] == pytest.approx(one[key], abs=2e-4), key


def test_every_gradient_has_its_parameters_layout_at_32_px_so_ddp_does_not_warn():
    """At 32 px Swin's last stage is 1 x 1: a 1x1 conv decoder's weight gradient then comes in another memory layout
    than its parameter, and DDP warns on every run ("Grad strides do not match bucket view strides"); a Linear does
    not. The layout is what DDP checks, so one process shows it."""
    torch.manual_seed(0)
    model = preco.PReCo("swin_t", 8)
    mask = torch.zeros(8, 4, 4)
    mask[:, :2] = 1
    predicted, features = model(torch.randn(8, 3, 32, 32), mask)
    (predicted.square().mean() + features.square().mean()).backward()
    assert [n for n, p in model.named_parameters() if p.grad is not None and p.grad.stride() != p.stride()] == []


def test_a_non_finite_loss_stops_the_run_with_exit_1(tmp_path, capsys):
    folder = make_image_folder(tmp_path / "images", classes=2, per_class=2)
    with pytest.raises(SystemExit) as exit_info:
        run(folder, tmp_path / "run", "--lr", "1e30", "--clip-grad", "0", "--no-prompt")
    err = capsys.readouterr().err
    assert exit_info.value.code == 1 and "the loss became nan at step 2" in err and "checkpoint is none" in err


@pytest.mark.parametrize(
    "extra, fragment",
    [
        (["--data", "/nonexistent/images"], "is not a folder"),
        (["--batch-size", "8"], "fewer than one batch"),
        (["--img-size", "48"], "not a multiple of 32"),
        (["--mask-unit", "6"], "not a multiple of Swin's 4-px patch"),
        (["--mask-unit", "24"], "not a multiple of --mask-unit 24"),
        (["--mask-ratio", "1"], "--mask-ratio must be between 0 and 1"),
        (["--mask-unit", "16", "--mask-ratio", "0.9"], "masks the whole image"),
        (["--epochs", "0"], "--epochs must be positive"),
        (["--lambda-sc", "-1"], "--lambda-sc must not be negative"),
        (["--warmup-epochs", "3"], "--warmup-epochs 3.0 does not fit in --epochs 3"),
        (["--batch-size", "1"], "at least 2 images per batch"),
        (["--out", __file__], "is a file"),
        (["--vis", os.path.dirname(__file__)], "is a folder"),
    ],
)
def test_bad_input_is_one_sentence_and_writes_nothing(tmp_path, capsys, extra, fragment):
    folder = make_image_folder(tmp_path / "images", classes=2, per_class=2)
    with pytest.raises(SystemExit) as exit_info:
        preco.main(TINY_SWIN + ["--data", folder, "--epochs", "3", "--out", str(tmp_path / "out"), *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1 and fragment in err[0], err
    assert not os.path.exists(tmp_path / "out")


def test_resuming_with_other_settings_or_processes_is_refused_and_keeps_the_run(trained, capsys, monkeypatch):
    folder, root, _ = trained
    before = (root / "run" / "checkpoint.pth").stat().st_mtime_ns
    with pytest.raises(SystemExit) as exit_info:
        run(folder, root / "run", "--max-steps", "5", "--mask-ratio", "0.5")
    assert exit_info.value.code == 2 and "other --mask-ratio" in capsys.readouterr().err
    for key, value in (("RANK", "0"), ("WORLD_SIZE", "2"), ("LOCAL_RANK", "0")):  # rank 0 of 2, as torchrun sets it
        monkeypatch.setenv(key, value)
    with pytest.raises(SystemExit):
        run(folder, root / "run", "--batch-size", "3")
    assert "not divisible by the 2 processes" in capsys.readouterr().err
    assert (root / "run" / "checkpoint.pth").stat().st_mtime_ns == before
