"""--weights FILE in a published checkpoint's layout (issue 18): each test writes a small file in exactly that layout
from random weights (no download) and checks that the torchvision model it loads into computes what the original
arrangement computes: for ResNets the unrenamed network, for ViTs and Swin a short forward written here from the
layout's own definition. A file that maps only partly, or not exactly, is one sentence and exit code 2."""

import argparse
import re

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

import backbones
import eval_linear
import finetune_cls
from conftest import make_image_folder

TOLERANCE = {"rtol": 1e-4, "atol": 1e-4}  # another kernel order; a wrong mapping is off by O(1)


def resnet18(seed=0):
    """torchvision's resnet18, every BatchNorm with random statistics and affine terms (1 / 0 would hide a bn1 / bn2
    or running_mean / running_var mix-up)."""
    torch.manual_seed(seed)
    model = torchvision.models.resnet18().eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            for t in (m.weight.data, m.running_var):
                t.uniform_(0.5, 1.5)
            for t in (m.bias.data, m.running_mean):
                t.normal_(0, 0.2)
    return model


def other(state):
    """A network of the same shapes with other values (a key encoder, a student): loading it instead must show."""
    return {k: torch.randn_like(v) if v.is_floating_point() else v for k, v in state.items()}


def prefixed(prefix, state):
    return {prefix + k: v for k, v in state.items()}


def mlp(name, *widths, bn=False):
    """Linear (+ BatchNorm1d) layers as nn.Sequential numbers them (ReLU between): a projector or predictor."""
    out, i = {}, 0
    for a, b in zip(widths, widths[1:]):
        out |= {f"{name}.{i}.weight": torch.randn(b, a), f"{name}.{i}.bias": torch.randn(b)}
        if bn:
            out |= {f"{name}.{i + 1}.{t}": torch.randn(b) for t in ("weight", "bias", "running_mean")}
            out |= {f"{name}.{i + 1}.running_var": torch.rand(b) + 0.5}
        i += 3 if bn else 2
    return out


def body(sd):
    return {k: v for k, v in sd.items() if not k.startswith("fc.")}


# ------------------------------------------------------------------------------------------------ ResNet layouts
def moco_v1_v2(sd):  # main_moco.py: DDP(MoCo), query encoder with v2's MLP head, the key encoder, the queue
    q = body(sd) | mlp("fc", 512, 512, 128)
    return {
        "epoch": 800,
        "arch": "resnet18",
        "state_dict": prefixed("module.encoder_q.", q)
        | prefixed("module.encoder_k.", other(q))
        | {"module.queue": torch.randn(128, 1024), "module.queue_ptr": torch.zeros(1, dtype=torch.long)},
        "optimizer": {"state": {}, "param_groups": [{"lr": 0.03, "params": [0, 1]}]},
    }


def moco_v3(sd):  # MoCo v3 main_moco.py: base encoder whose fc is a BN projector, momentum encoder, predictor
    q = body(sd) | mlp("fc", 512, 64, 32, bn=True)
    return {
        "epoch": 100,
        "arch": "resnet18",
        "state_dict": prefixed("module.base_encoder.", q)
        | prefixed("module.momentum_encoder.", other(q))
        | prefixed("module.", mlp("predictor", 32, 64, 32, bn=True)),
        "optimizer": {"state": {}, "param_groups": []},
        "scaler": {"scale": 65536.0, "_growth_tracker": 0},
    }


def gersp_training(sd):  # GeRSP's mmselfsup 0.x checkpoint: backbone IS encoder_q (saved twice), key encoder, queue
    return {
        "meta": {"epoch": 100, "mmcv_version": "1.6.2", "config": "model = dict(type='MoCoGeRSP')"},
        "state_dict": prefixed("encoder_q.", body(sd))
        | prefixed("backbone.", body(sd))
        | prefixed("encoder_k.", other(body(sd)))
        | mlp("proj_q.projector", 512, 64, 16)
        | mlp("neck.projector", 512, 64, 16)
        | mlp("pred_q", 512, 10)
        | {"queue": torch.randn(16, 64), "queue_ptr": torch.zeros(1, dtype=torch.long)},
    }


def gersp_release(sd):  # M_Convert_Checkpoints/convert_gersp.py keeps the keys that contain 'backbone'
    return {"state_dict": prefixed("backbone.", body(sd))}


def mmselfsup_1x(sd):  # mmselfsup 1.x / mmpretrain MoCo v2: backbone, neck, EMA of Sequential(backbone, neck), queue
    neck = mlp("mlp", 512, 512, 128)
    return {
        "meta": {"epoch": 200, "mmengine_version": "0.9.0"},
        "state_dict": prefixed("backbone.", body(sd))
        | prefixed("neck.", neck)
        | prefixed("momentum_encoder.module.0.", other(body(sd)))
        | prefixed("momentum_encoder.module.1.", neck)
        | {
            "momentum_encoder.steps": torch.tensor(5),
            "queue": torch.randn(128, 64),
            "queue_ptr": torch.zeros(1, dtype=torch.long),
        },
    }


def lightning_attribute(sd):  # a LightningModule with self.model.encoder = resnet18 without fc
    return {
        "epoch": 9,
        "global_step": 900,
        "pytorch-lightning_version": "2.2.1",
        "state_dict": prefixed("model.encoder.", body(sd)) | prefixed("model.", mlp("projector", 512, 128)),
        "loops": {},
        "callbacks": {},
        "optimizer_states": [{}],
        "lr_schedulers": [],
        "hparams_name": "kwargs",
        "hyper_parameters": {"lr": 0.1},
    }


def lightning_sequential(sd):  # self.backbone = nn.Sequential(*list(resnet.children())[:-1]): 0 conv1 ... 7 layer4
    names = {"conv1": 0, "bn1": 1, "layer1": 4, "layer2": 5, "layer3": 6, "layer4": 7}
    seq = {f"{names[k.split('.')[0]]}.{k.split('.', 1)[1]}": v for k, v in body(sd).items()}
    return lightning_attribute(sd) | {"state_dict": prefixed("backbone.", seq) | mlp("projection_head.layers", 512, 64)}


def timm_torchgeo(sd):  # timm / torchgeo ResNets: torchvision's keys, a classifier of any width
    return body(sd) | {"fc.weight": torch.randn(19, 512), "fc.bias": torch.randn(19)}


def ddp(sd):  # torch.save(DistributedDataParallel(resnet).state_dict())
    return prefixed("module.", sd)


RESNET_LAYOUTS = {  # writer, the prefix the printed line names, what it says it dropped
    "moco_v1_v2": (
        moco_v1_v2,
        "state_dict.module.encoder_q.",
        ["fc (4 tensors)", "encoder_k (", "queue (1 tensor)", "queue_ptr (1 tensor)"],
    ),
    "moco_v3": (moco_v3, "state_dict.module.base_encoder.", ["fc (", "momentum_encoder (", "predictor ("]),
    "gersp_mmselfsup_training": (gersp_training, "state_dict.backbone.", ["encoder_q (", "encoder_k (", "queue ("]),
    "gersp_release": (gersp_release, "state_dict.backbone.", []),
    "mmselfsup_1x": (mmselfsup_1x, "state_dict.backbone.", ["neck (", "momentum_encoder (", "queue ("]),
    "lightning_attribute": (lightning_attribute, "state_dict.model.encoder.", ["projector ("]),
    "lightning_sequential": (lightning_sequential, "state_dict.backbone.", ["projection_head ("]),
    "timm_torchgeo": (timm_torchgeo, "''", ["fc (2 tensors)"]),
    "ddp": (ddp, "'module.'", ["fc (2 tensors)"]),
}


@pytest.mark.parametrize("layout", list(RESNET_LAYOUTS))
def test_resnet_layouts_load_exactly_and_compute_the_original_network(layout, tmp_path, capsys):
    writer, prefix, dropped = RESNET_LAYOUTS[layout]
    original = resnet18()
    torch.save(writer(original.state_dict()), tmp_path / "weights.pth")
    model, width, arch, method, _, _ = backbones.load_backbone(str(tmp_path / "weights.pth"), "resnet18", image_size=32)
    line = capsys.readouterr().out.strip().splitlines()
    assert (width, arch) == (512, "resnet18") and len(line) == 1 and prefix in line[0], line
    assert all(d in line[0] for d in dropped) and ("dropped" in line[0]) == bool(dropped), line
    assert method.startswith("ResNet nn.Sequential" if layout == "lightning_sequential" else "torchvision")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = torch.flatten(nn.Sequential(*list(original.children())[:-1])(x), 1)  # the unrenamed network
        assert torch.equal(model.eval()(x), expected)


def test_a_published_checkpoint_runs_through_the_linear_probe(tmp_path, capsys):
    folder = make_image_folder(tmp_path / "scenes", classes=2, per_class=4)
    torch.save(moco_v1_v2(resnet18().state_dict()), tmp_path / "moco_v2_800ep_pretrain.pth.tar")
    [entry] = eval_linear.evaluate(
        eval_linear.get_args(
            [
                "--data",
                folder,
                "--weights",
                str(tmp_path / "moco_v2_800ep_pretrain.pth.tar"),
                "--img-size",
                "32",
                "--epochs",
                "1",
                "--runs",
                "1",
                "--train-ratio",
                "0.5",
                "--workers",
                "0",
                "--out",
                str(tmp_path / "out"),
            ]
        )
    )
    assert (entry["arch"], entry["method"]) == ("resnet18", "torchvision encoder_q") and entry["backbone_unchanged"]
    assert "torchvision key names under 'state_dict.module.encoder_q.'" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------ ViT layouts
def timm_vit(patch, grid, width=192, layerscale=False, seed=0):
    """A 12-block ViT in timm / DINO / DINOv2 keys, random weights scaled so that attention is far from uniform."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape, std=1.0, mean=0.0):
        return torch.randn(*shape, generator=g) * std + mean

    sd = {
        "cls_token": r(1, 1, width),
        "pos_embed": r(1, 1 + grid * grid, width),
        "patch_embed.proj.weight": r(width, 3, patch, patch, std=0.1),
        "patch_embed.proj.bias": r(width, std=0.1),
        "norm.weight": r(width, std=0.2, mean=1),
        "norm.bias": r(width, std=0.2),
    }
    for i in range(12):
        b = f"blocks.{i}."
        sd |= {
            b + "norm1.weight": r(width, std=0.2, mean=1),
            b + "norm1.bias": r(width, std=0.2),
            b + "attn.qkv.weight": r(3 * width, width, std=width**-0.5),
            b + "attn.qkv.bias": r(3 * width),
            b + "attn.proj.weight": r(width, width, std=width**-0.5),
            b + "attn.proj.bias": r(width, std=0.1),
            b + "norm2.weight": r(width, std=0.2, mean=1),
            b + "norm2.bias": r(width, std=0.2),
            b + "mlp.fc1.weight": r(4 * width, width, std=width**-0.5),
            b + "mlp.fc1.bias": r(4 * width),
            b + "mlp.fc2.weight": r(width, 4 * width, std=(4 * width) ** -0.5),
            b + "mlp.fc2.bias": r(width),
        }
        if layerscale:  # trained gammas spread around small values; far from 1, so an unfolded one shows
            sd |= {b + "ls1.gamma": r(width, std=0.5, mean=0.5), b + "ls2.gamma": r(width, std=0.5, mean=0.5)}
    return sd


def vit_reference(sd, x, heads, patch):
    """The forward of timm's / DINO's / DINOv2's VisionTransformer, from their definition: patch convolution, class
    token, positions; blocks x = x + ls1 * attn(norm1(x)), x = x + ls2 * mlp(norm2(x)) (ls = 1 without LayerScale),
    attention from the fused qkv of shape (3, heads, head_dim) per token; final norm; the class token."""

    def ln(t, name):
        return F.layer_norm(t, t.shape[-1:], sd[name + ".weight"], sd[name + ".bias"], eps=1e-6)

    x = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=patch).flatten(2).transpose(1, 2)
    x = torch.cat([sd["cls_token"].expand(len(x), -1, -1), x], 1) + sd["pos_embed"]
    n, tokens, c = x.shape
    for i in range(12):
        b = f"blocks.{i}."
        qkv = F.linear(ln(x, b + "norm1"), sd[b + "attn.qkv.weight"], sd[b + "attn.qkv.bias"])
        q, k, v = qkv.reshape(n, tokens, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
        attention = ((q @ k.transpose(-2, -1)) * (c // heads) ** -0.5).softmax(-1) @ v
        h = F.linear(
            attention.transpose(1, 2).reshape(n, tokens, c), sd[b + "attn.proj.weight"], sd[b + "attn.proj.bias"]
        )
        x = x + sd.get(b + "ls1.gamma", 1) * h
        h = F.gelu(F.linear(ln(x, b + "norm2"), sd[b + "mlp.fc1.weight"], sd[b + "mlp.fc1.bias"]))
        x = x + sd.get(b + "ls2.gamma", 1) * F.linear(h, sd[b + "mlp.fc2.weight"], sd[b + "mlp.fc2.bias"])
    return ln(x, "norm")[:, 0]


def test_dinov2_layerscale_is_folded_exactly_and_its_mask_token_dropped(tmp_path, capsys):
    sd = timm_vit(patch=14, grid=2, layerscale=True) | {"mask_token": torch.randn(1, 192)}  # dinov2_vit*14_pretrain
    torch.save(sd, tmp_path / "dinov2_vitt14_pretrain.pth")
    model, width, arch, method, _, _ = backbones.load_backbone(
        str(tmp_path / "dinov2_vitt14_pretrain.pth"), image_size=28
    )
    line = capsys.readouterr().out
    assert (width, arch, method, model.patch_size) == (192, "vit_tiny", "timm ViT", 14)
    assert "LayerScale folded" in line and "dropped mask_token (1 tensor)" in line
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), vit_reference(sd, x, heads=3, patch=14), **TOLERANCE)


def dino_full_checkpoint(teacher):  # main_dino.py's checkpoint.pth: ViTs are not DDP-wrapped in the teacher
    head = mlp("head.mlp", 192, 64, 32) | {
        "head.last_layer.weight_g": torch.ones(256, 1),
        "head.last_layer.weight_v": torch.randn(256, 32),
    }
    return {
        "student": prefixed("module.backbone.", other(teacher)) | prefixed("module.", head),
        "teacher": prefixed("backbone.", teacher) | head,
        "optimizer": {"state": {}, "param_groups": []},
        "epoch": 100,
        "args": argparse.Namespace(arch="vit_tiny", patch_size=8, out_dim=256, lr=0.0005),
        "dino_loss": {"center": torch.randn(1, 256)},
    }


def timm_with_classifier(sd):  # timm's vit_*: the classifier is `head`
    return sd | {"head.weight": torch.randn(10, 192), "head.bias": torch.randn(10)}


@pytest.mark.parametrize(
    "layout, patch, grid, prefix, dropped",
    [
        ("dino_full_checkpoint", 8, 4, "'teacher.backbone.'", ["head (", "student (", "dino_loss (1 tensor)"]),
        ("timm_with_classifier", 16, 2, "''", ["head (2 tensors)"]),
    ],
)
def test_dino_teacher_and_timm_vits_load_exactly(layout, patch, grid, prefix, dropped, tmp_path, capsys):
    sd = timm_vit(patch, grid)
    torch.save(
        {"dino_full_checkpoint": dino_full_checkpoint, "timm_with_classifier": timm_with_classifier}[layout](sd),
        tmp_path / "weights.pth",
    )
    model, _, arch, _, _, _ = backbones.load_backbone(str(tmp_path / "weights.pth"), image_size=patch * grid)
    line = capsys.readouterr().out
    assert arch == "vit_tiny" and model.patch_size == patch and prefix in line and all(d in line for d in dropped)
    x = torch.randn(2, 3, patch * grid, patch * grid)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), vit_reference(sd, x, heads=3, patch=patch), **TOLERANCE)


def test_dinov2_37_by_37_positions_are_interpolated_to_the_evaluation_grid(tmp_path):
    sd = timm_vit(patch=14, grid=37, layerscale=True)  # dinov2 at 518 px; evaluated at 224 px: 16 x 16
    torch.save(sd, tmp_path / "dinov2.pth")
    model, _, _, _, _, _ = backbones.load_backbone(str(tmp_path / "dinov2.pth"), image_size=224)
    positions = model.encoder.pos_embedding.detach()
    assert positions.shape == (1, 1 + 16 * 16, 192)
    torch.testing.assert_close(positions[0, 0], sd["pos_embed"][0, 0])  # the class token's is kept
    for ours, theirs in ((1, 1), (16, 37), (-16, -37), (-1, -1)):  # bicubic, align_corners: corners are kept
        torch.testing.assert_close(positions[0, ours], sd["pos_embed"][0, theirs], rtol=1e-5, atol=1e-5)


def moco_v3_lincls(sd):  # main_lincls.py's checkpoint: its arch, the DDP-wrapped ViT with its trained classifier
    head = {"head.weight": torch.randn(1000, 384), "head.bias": torch.randn(1000)}
    return {"epoch": 90, "arch": "vit_small", "state_dict": prefixed("module.", sd | head), "best_acc1": 73.2}


def moco_v3_vit_pretrain(sd):  # main_moco.py's checkpoint: base encoder (head: the projector), momentum encoder
    base = sd | mlp("head", 384, 64, 32, bn=True)
    encoders = prefixed("module.base_encoder.", base) | prefixed("module.momentum_encoder.", other(base))
    return {"epoch": 300, "arch": "vit_small", "state_dict": encoders | prefixed("module.", mlp("predictor", 32, 32))}


@pytest.mark.parametrize("layout", ["moco_v3_lincls", "moco_v3_vit_pretrain"])
def test_moco_v3_vit_small_is_built_with_its_12_heads_which_its_file_names(layout, tmp_path, capsys):
    """MoCo v3's vits.py: vit_small is 384 wide with 12 heads, where DINO's and timm's have 6; the file's arch says
    which."""
    sd = timm_vit(patch=16, grid=2, width=384)
    torch.save(
        {"moco_v3_lincls": moco_v3_lincls, "moco_v3_vit_pretrain": moco_v3_vit_pretrain}[layout](sd), tmp_path / "w.pth"
    )
    loaded = backbones.load_backbone(str(tmp_path / "w.pth"), image_size=32)
    line = capsys.readouterr().out
    assert loaded.arch == "vit_small" and " heads 12" in line and "assumed" not in line, line
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ours = loaded.model.eval()(x)
        torch.testing.assert_close(ours, vit_reference(sd, x, heads=12, patch=16), **TOLERANCE)
        assert (ours - vit_reference(sd, x, heads=6, patch=16)).abs().max() > 0.1  # what 6 heads computed


def test_a_vit_whose_file_does_not_say_its_heads_is_built_as_printed_and_heads_overrides_it(tmp_path, capsys):
    """MoCo v3's convert_to_deit.py writes {'model': ...}: no arch. The line says what was assumed and the flag."""
    sd = timm_vit(patch=16, grid=2, width=384)
    torch.save({"model": sd}, tmp_path / "deit.pth")
    assumed = backbones.load_backbone(str(tmp_path / "deit.pth"), image_size=32)
    assert "6 heads assumed (width / 64; --heads N if not)" in capsys.readouterr().out
    given = backbones.load_backbone(str(tmp_path / "deit.pth"), image_size=32, heads=12)
    assert "12 heads (--heads)" in capsys.readouterr().out
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(assumed.model.eval()(x), vit_reference(sd, x, heads=6, patch=16), **TOLERANCE)
        torch.testing.assert_close(given.model.eval()(x), vit_reference(sd, x, heads=12, patch=16), **TOLERANCE)


def test_dinov2_block_chunks_are_counted_as_blocks_and_load_exactly(tmp_path, capsys):
    """DINOv2's ViT-L/g train configs chunk the blocks: blocks.<chunk>.<i>, i the block's own index (BlockChunk pads
    each chunk with Identity). 12 blocks in 4 chunks are 12 blocks, not 4."""
    sd = timm_vit(patch=14, grid=2, layerscale=True)
    chunked = {re.sub(r"^blocks\.(\d+)\.", lambda m: f"blocks.{int(m[1]) // 3}.{m[1]}.", k): v for k, v in sd.items()}
    assert "blocks.3.11.mlp.fc2.bias" in chunked
    torch.save({"teacher": prefixed("backbone.", chunked)}, tmp_path / "teacher_checkpoint.pth")
    loaded = backbones.load_backbone(str(tmp_path / "teacher_checkpoint.pth"), image_size=28)
    assert loaded.arch == "vit_tiny" and len(loaded.model.encoder.layers) == 12
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model.eval()(x), vit_reference(sd, x, heads=3, patch=14), **TOLERANCE)


# ------------------------------------------------------------------------------------------------ Swin layouts
def shifted_window_mask(size, window, shift):
    """Microsoft's attn_mask of a shifted block: -100 between tokens of a window that come from different regions."""
    regions, count = torch.zeros(size, size), 0
    for h in (slice(0, -window), slice(-window, -shift), slice(-shift, None)):
        for w in (slice(0, -window), slice(-window, -shift), slice(-shift, None)):
            regions[h, w], count = count, count + 1
    windows = (
        regions.view(size // window, window, size // window, window).permute(0, 2, 1, 3).reshape(-1, window * window)
    )
    mask = windows[:, None, :] - windows[:, :, None]
    return mask.masked_fill(mask != 0, -100.0)


def ms_swin(window=7, depths=(2, 2, 6, 2), heads=(3, 6, 12, 24), size=224, seed=0):
    """swin_tiny_patch4_window7_224 in Microsoft's keys, random weights; each relative_position_index is a random
    index (the converter must carry the file's own, not recompute it); the attn_mask buffers are the real ones."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape, std=1.0, mean=0.0):
        return torch.randn(*shape, generator=g) * std + mean

    def norm(name, c):
        return {name + ".weight": r(c, std=0.2, mean=1), name + ".bias": r(c, std=0.2)}

    sd = {"patch_embed.proj.weight": r(96, 3, 4, 4, std=0.3), "patch_embed.proj.bias": r(96, std=0.1)}
    sd |= norm("patch_embed.norm", 96)
    resolution, c = size // 4, 96
    for i, (depth, nh) in enumerate(zip(depths, heads)):
        for m in range(depth):
            b = f"layers.{i}.blocks.{m}."
            sd |= (
                norm(b + "norm1", c)
                | norm(b + "norm2", c)
                | {
                    b + "attn.qkv.weight": r(3 * c, c, std=c**-0.5),
                    b + "attn.qkv.bias": r(3 * c),
                    b + "attn.proj.weight": r(c, c, std=c**-0.5),
                    b + "attn.proj.bias": r(c, std=0.1),
                    b + "attn.relative_position_bias_table": r((2 * window - 1) ** 2, nh),
                    b + "attn.relative_position_index": torch.randint(
                        (2 * window - 1) ** 2, (window**2, window**2), generator=g
                    ),
                    b + "mlp.fc1.weight": r(4 * c, c, std=c**-0.5),
                    b + "mlp.fc1.bias": r(4 * c),
                    b + "mlp.fc2.weight": r(c, 4 * c, std=(4 * c) ** -0.5),
                    b + "mlp.fc2.bias": r(c),
                }
            )
            if m % 2 and resolution > window and resolution % window == 0:
                sd[b + "attn_mask"] = shifted_window_mask(resolution, window, window // 2)
        if i < len(depths) - 1:
            sd |= norm(f"layers.{i}.downsample.norm", 4 * c)
            sd[f"layers.{i}.downsample.reduction.weight"] = r(2 * c, 4 * c, std=(4 * c) ** -0.5)
            resolution, c = resolution // 2, 2 * c
    return sd | norm("norm", c) | {"head.weight": r(1000, c), "head.bias": r(1000)}


def swin_reference(sd, x, depths=(2, 2, 6, 2), heads=(3, 6, 12, 24), window=7):
    """The forward of Microsoft's SwinTransformer (models/swin_transformer.py), from its definition: patch embedding
    then its norm; per block x + attn(norm1 x) in windows, every second block cyclically shifted by window // 2 with
    the saved attn_mask (no shift where the map is not larger than the window), the bias table read through the
    saved index, then x + mlp(norm2 x); PatchMerging after stages 0-2: cat of (0,0) (1,0) (0,1) (1,1), norm,
    reduction; final norm; mean over tokens."""

    def ln(t, name):
        return F.layer_norm(t, t.shape[-1:], sd[name + ".weight"], sd[name + ".bias"])

    x = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=4)
    n, c, size, _ = x.shape
    x = ln(x.flatten(2).transpose(1, 2), "patch_embed.norm")
    for i, (depth, nh) in enumerate(zip(depths, heads)):
        w, tokens = min(window, size), min(window, size) ** 2
        for m in range(depth):
            b, shift = f"layers.{i}.blocks.{m}.", window // 2 if m % 2 and size > window else 0
            h = torch.roll(ln(x, b + "norm1").view(n, size, size, c), (-shift, -shift), (1, 2))
            h = h.view(n, size // w, w, size // w, w, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, tokens, c)
            qkv = F.linear(h, sd[b + "attn.qkv.weight"], sd[b + "attn.qkv.bias"])
            q, k, v = qkv.reshape(len(h), tokens, 3, nh, c // nh).permute(2, 0, 3, 1, 4)
            table = sd[b + "attn.relative_position_bias_table"]
            bias = table[sd[b + "attn.relative_position_index"].view(-1)].view(tokens, tokens, -1).permute(2, 0, 1)
            attention = (q * (c // nh) ** -0.5) @ k.transpose(-2, -1) + bias
            if shift:
                mask = sd[b + "attn_mask"]
                attention = (attention.view(-1, len(mask), nh, tokens, tokens) + mask[None, :, None]).view(
                    -1, nh, tokens, tokens
                )
            h = (attention.softmax(-1) @ v).transpose(1, 2).reshape(-1, tokens, c)
            h = F.linear(h, sd[b + "attn.proj.weight"], sd[b + "attn.proj.bias"])
            h = h.view(n, size // w, size // w, w, w, c).permute(0, 1, 3, 2, 4, 5).reshape(n, size, size, c)
            x = x + torch.roll(h, (shift, shift), (1, 2)).reshape(n, size * size, c)
            h = F.gelu(F.linear(ln(x, b + "norm2"), sd[b + "mlp.fc1.weight"], sd[b + "mlp.fc1.bias"]))
            x = x + F.linear(h, sd[b + "mlp.fc2.weight"], sd[b + "mlp.fc2.bias"])
        if i < len(depths) - 1:
            b, grid = f"layers.{i}.downsample.", x.view(n, size, size, c)
            x = torch.cat([grid[:, 0::2, 0::2], grid[:, 1::2, 0::2], grid[:, 0::2, 1::2], grid[:, 1::2, 1::2]], -1)
            x = F.linear(ln(x.view(n, -1, 4 * c), b + "norm"), sd[b + "reduction.weight"])
            size, c = size // 2, 2 * c
    return ln(x, "norm").mean(1)


def simmim(sd):  # SimMIM's checkpoint: model = SimMIM(encoder=SwinTransformerForSimMIM, decoder); no classifier
    encoder = {k: v for k, v in sd.items() if not k.startswith("head.")} | {"mask_token": torch.randn(1, 1, 96)}
    return {
        "model": prefixed("encoder.", encoder)
        | {"decoder.0.weight": torch.randn(3072, 768, 1, 1), "decoder.0.bias": torch.randn(3072)},
        "optimizer": {"state": {}, "param_groups": []},
        "max_accuracy": 0.0,
        "epoch": 99,
    }


@pytest.mark.parametrize("layout", ["swin_official", "simmim"])
def test_microsoft_swin_and_simmim_load_exactly_into_torchvision_swin_t(layout, tmp_path, capsys):
    sd = ms_swin()
    torch.save({"model": sd} if layout == "swin_official" else simmim(sd), tmp_path / "swin.pth")
    model, width, arch, method, _, _ = backbones.load_backbone(str(tmp_path / "swin.pth"))
    line = capsys.readouterr().out
    assert (width, arch) == (768, "swin_t") and "attn_mask (5 tensors)" in line, line  # shifted: 1 + 1 + 3
    assert ("head (2 tensors)" if layout == "swin_official" else "mask_token (1 tensor), decoder (2") in line, line
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), swin_reference(sd, x), **TOLERANCE)


# ------------------------------------------------------------------------------------------------ refusals
def moco_missing_a_block():
    sd = moco_v1_v2(resnet18().state_dict())
    sd["state_dict"] = {k: v for k, v in sd["state_dict"].items() if ".encoder_q.layer4.1." not in k}
    return sd


def vit_with(extra, drop=()):
    sd = timm_vit(patch=16, grid=2) | extra
    return {k: v for k, v in sd.items() if not any(d in k for d in drop)}


def swiglu():  # DINOv2 ViT-g's feed-forward: w12 (gate and value), w3
    return vit_with(
        {
            f"blocks.{i}.mlp.{n}.weight": torch.randn(*s)
            for i in range(12)
            for n, s in (("w12", (1024, 192)), ("w3", (192, 512)))
        },
        drop=(".mlp.fc",),
    )


def swin_window6():  # simmim_pretrain__swin_base__img192_window6__800ep's shape of tables, on swin_t's widths
    return simmim(ms_swin(window=6))


REFUSALS = {  # file, what the one sentence says
    "moco_encoder_q_missing_a_block": (
        moco_missing_a_block,
        [
            "(read as torchvision encoder_q) matches only 108 of the 120 tensors of resnet18",
            "layer4.1.conv1.weight is missing",
        ],
    ),
    "swin_window_6": (swin_window6, ["is a Swin with window 6 (121-row relative-position tables)", "window 7"]),
    "dinov2_register_tokens": (
        lambda: vit_with({"register_tokens": torch.randn(1, 4, 192)}),
        ["ViT with register tokens (register_tokens)"],
    ),
    "dinov2_swiglu": (swiglu, ["ViT with a SwiGLU feed-forward (encoder.layers.encoder_layer_0.mlp.w12.weight)"]),
    "dinov2_vitl14": (
        lambda: (
            {"cls_token": torch.zeros(1, 1, 1024)} | {f"blocks.{i}.norm1.weight": torch.ones(1024) for i in range(24)}
        ),
        ["a ViT of width 1024 with 24 blocks"],
    ),
    "timm_no_embed_class": (
        lambda: vit_with({"pos_embed": torch.randn(1, 4, 192)}),  # positions without the class's
        ["has 4 position embeddings, not a class token's and a square grid's"],
    ),
    "two_backbones": (
        lambda: {
            "state_dict": prefixed("net_a.", resnet18().state_dict()) | prefixed("net_b.", resnet18().state_dict())
        },
        ["holds several backbones (state_dict.net_a., state_dict.net_b.)"],
    ),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_files_that_do_not_map_completely_are_one_sentence_and_exit_2(case, tmp_path, capsys):
    writer, fragments = REFUSALS[case]
    torch.save(writer(), tmp_path / "weights.pth")
    folder = make_image_folder(tmp_path / "scenes", classes=2, per_class=2)
    for module in (eval_linear, finetune_cls):
        with pytest.raises(SystemExit) as exit_info:
            module.main(
                [
                    "--data",
                    folder,
                    "--weights",
                    str(tmp_path / "weights.pth"),
                    "--arch",
                    "resnet18",
                    "--workers",
                    "0",
                    "--out",
                    str(tmp_path / "out"),
                ]
            )
        err = capsys.readouterr().err.strip().splitlines()
        assert exit_info.value.code == 2 and len(err) == 1 and all(f in err[0] for f in fragments), err
        assert not (tmp_path / "out").exists()
