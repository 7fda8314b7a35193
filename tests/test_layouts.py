"""--weights FILE in a published checkpoint's layout (issues 18 and 37): each test writes a small file in exactly that
layout from random weights (no download) and checks that the torchvision model it loads into computes what the
original arrangement computes: for ResNets the unrenamed network, for ViTs and Swin a short forward written here from
the layout's own definition (24 blocks of width 64 stand for ViT-L). A file that maps only partly, or not exactly, or
that torchvision cannot express, is one sentence and exit code 2."""

import argparse
import importlib
import json
import os
import re
import shlex
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torchvision.models.vision_transformer import interpolate_embeddings

import backbones
import data
import eval_linear
import finetune_cls
from conftest import make_image_folder, refusal

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


def as_sequential(sd):  # nn.Sequential(*list(resnet.children())[:-1], ...): 0 conv1, 1 bn1, 4-7 layer1-4
    names = {"conv1": 0, "bn1": 1, "layer1": 4, "layer2": 5, "layer3": 6, "layer4": 7}
    return {f"{names[k.split('.')[0]]}.{k.split('.', 1)[1]}": v for k, v in body(sd).items()}


def seco_lightning(sd):  # SeCo's MocoV2 (models/moco2_module.py, Lightning 1.1): Sequential encoders, a head per space
    heads = mlp("heads_q.0", 512, 512, 128)
    return {
        "epoch": 199,
        "global_step": 100000,
        "pytorch-lightning_version": "1.1.8",
        "state_dict": prefixed("encoder_q.", as_sequential(sd))
        | heads
        | prefixed("encoder_k.", other(as_sequential(sd)))
        | {k.replace("_q.", "_k."): v for k, v in other(heads).items()}
        | {"queue": torch.randn(1, 128, 64), "queue_ptr": torch.zeros(1, 1, dtype=torch.long)},
        "optimizer_states": [{"state": {}, "param_groups": []}],
        "lr_schedulers": [],
        "hparams_name": "kwargs",
        "hyper_parameters": {"base_encoder": "resnet18", "emb_dim": 128, "num_negatives": 64, "emb_spaces": 1},
    }


def caco(sd):  # CACo's .pth files: the query encoder's Sequential state dict alone, no prefix
    return as_sequential(sd)


def gassl(sd):  # GASSL's moco_geo.pth.tar (main_moco_geo+tp.py): MoCo's checkpoint and the geo classifier's geo_dict
    geo = {"module.layers.1.weight": torch.randn(100, 128), "module.layers.1.bias": torch.randn(100)}
    return moco_v1_v2(sd) | {"geo_dict": geo}


def ssl4eo_moco_rgb(sd):  # SSL4EO-S12's pretrain_moco_v2_s2c.py: MoCo's checkpoint (epoch, arch, state_dict, optimizer)
    return moco_v1_v2(sd) | {"epoch": 100}


def satlas_resnet(sd):  # sentinel2_resnet50_si_rgb.pth: a flat dict of Satlas's Model (backbone.resnet, FPN, heads)
    fpn = {"intermediates.0.fpn.inner_blocks.0.0.weight": torch.randn(128, 64, 1, 1)}
    return prefixed("backbone.resnet.", sd) | fpn | {"heads.0.layer.weight": torch.randn(2, 128)}


def tov(sd):  # TOV's ResNet-50: a plain torchvision state dict
    return dict(sd)


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
    "seco_lightning": (
        seco_lightning,
        "state_dict.encoder_q.",
        ["heads_q (4 tensors)", "encoder_k (", "heads_k (4 tensors)", "queue (1 tensor)", "queue_ptr (1 tensor)"],
    ),
    "caco": (caco, "''", []),
    "gassl": (gassl, "state_dict.module.encoder_q.", ["fc (4 tensors)", "encoder_k (", "geo_dict (2 tensors)"]),
    "ssl4eo_s12_moco_rgb": (ssl4eo_moco_rgb, "state_dict.module.encoder_q.", ["fc (4 tensors)", "encoder_k ("]),
    "satlas_resnet": (satlas_resnet, "'backbone.resnet.'", ["fc (2 tensors)", "intermediates (1 tensor)", "heads ("]),
    "tov": (tov, "''", ["fc (2 tensors)"]),
}
SEQUENTIAL = ("lightning_sequential", "seco_lightning", "caco")  # read as ResNet nn.Sequential


@pytest.mark.parametrize("layout", list(RESNET_LAYOUTS))
def test_resnet_layouts_load_exactly_and_compute_the_original_network(layout, tmp_path, capsys):
    writer, prefix, dropped = RESNET_LAYOUTS[layout]
    original = resnet18()
    torch.save(writer(original.state_dict()), tmp_path / "weights.pth")
    model, width, arch, method, _, _ = backbones.load_backbone(str(tmp_path / "weights.pth"), "resnet18", image_size=32)
    line = capsys.readouterr().out.strip().splitlines()
    assert (width, arch) == (512, "resnet18") and len(line) == 1 and prefix in line[0], line
    assert all(d in line[0] for d in dropped) and ("dropped" in line[0]) == bool(dropped), line
    assert method.startswith("ResNet nn.Sequential" if layout in SEQUENTIAL else "torchvision")
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
def timm_vit(patch, grid, width=192, layerscale=False, seed=0, depth=12):
    """A ViT (12 blocks unless `depth`) in timm / DINO / DINOv2 keys, random weights scaled so that attention is far
    from uniform."""
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
    for i in range(depth):
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


def vit_reference(sd, x, heads, patch, pool="token", positions=None):
    """The forward of timm's / DINO's / DINOv2's / MAE's VisionTransformer, from their definition: patch convolution,
    class token, positions (pos_embed, or the `positions` a Scale-MAE forward computes); blocks x = x + ls1 *
    attn(norm1(x)), x = x + ls2 * mlp(norm2(x)) (ls = 1 without LayerScale), attention from the fused qkv of shape
    (3, heads, head_dim) per token; then the final norm and the class token, or with MAE's global_pool (pool="mean")
    the mean of the patch tokens through fc_norm."""

    def ln(t, name):
        return F.layer_norm(t, t.shape[-1:], sd[name + ".weight"], sd[name + ".bias"], eps=1e-6)

    x = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=patch).flatten(2).transpose(1, 2)
    x = torch.cat([sd["cls_token"].expand(len(x), -1, -1), x], 1) + (
        sd["pos_embed"] if positions is None else positions
    )
    n, tokens, c = x.shape
    for i in range(len({k.split(".")[1] for k in sd if k.startswith("blocks.")})):
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
    if pool == "mean":  # MAE's models_vit.py global_pool
        return ln(x[:, 1:].mean(dim=1), "fc_norm")
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


def swin_reference(sd, x, depths=(2, 2, 6, 2), heads=(3, 6, 12, 24), window=7, merge="microsoft"):
    """The forward of Microsoft's SwinTransformer (models/swin_transformer.py), from its definition: patch embedding
    then its norm; per block x + attn(norm1 x) in windows, every second block cyclically shifted by window // 2 with
    the saved attn_mask (no shift where the map is not larger than the window), the bias table read through the
    saved index, then x + mlp(norm2 x); PatchMerging after stages 0-2: cat of (0,0) (1,0) (0,1) (1,1), norm,
    reduction; final norm; mean over tokens. merge="mmcv" is mmcls's: its ShiftWindowMSA computes the same masks
    (get_attn_mask), and mmcv's PatchMerging gathers each 2 x 2 neighbourhood with nn.Unfold (channel-major)."""

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
                mask = sd.get(b + "attn_mask", shifted_window_mask(size, window, shift))
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
            if merge == "mmcv":  # mmcv's PatchMerging: nn.Unfold(2, stride=2) over N C H W, then N L 4C
                x = F.unfold(grid.permute(0, 3, 1, 2), kernel_size=2, stride=2).transpose(1, 2)
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


def rvsa_vit_win():  # ViT_Win_RVSA (vit_win_rvsa.py): pos_embed with a class slot but no cls_token, RVSA attention
    blocks = {
        "blocks.0.attn.sampling_offsets.2.weight": torch.randn(24, 96, 1, 1),
        "blocks.0.attn.rel_pos_h": torch.randn(13, 8),
    }
    return {
        "model": {"pos_embed": torch.randn(1, 5, 96), "patch_embed.proj.weight": torch.randn(96, 3, 16, 16)} | blocks
    }


def vitae():  # ViTAE_NC_Win_RVSA (vitae_nc_win_rvsa.py): a parallel convolution module beside each block's attention
    return {"patch_embed.proj.weight": torch.randn(96, 3, 16, 16), "blocks.0.PCM.0.weight": torch.randn(384, 4, 3, 3)}


def satmae_temporal():  # models_mae_temporal.py: pos_embed 384 channels narrower than the tokens (the time encoding)
    return {"model": vit_with({"cls_token": torch.randn(1, 1, 512), "pos_embed": torch.randn(1, 5, 128)})}


def satmae_group_channels():  # models_vit_group_channels.py: a PatchEmbed per band group, a channel_embed
    groups = {f"patch_embed.{i}.proj.weight": torch.randn(512, n, 8, 8) for i, n in enumerate((4, 4, 2))}
    embeds = {"pos_embed": torch.randn(1, 5, 256), "channel_embed": torch.randn(1, 3, 256)}
    return {"model": {"cls_token": torch.randn(1, 1, 512)} | groups | embeds}


def multispectral():  # SSL4EO-S12's B13_rn50_moco_0099_ckpt.pth: MoCo's checkpoint of a 13-band conv1
    sd = resnet18().state_dict() | {"conv1.weight": torch.randn(64, 13, 7, 7)}
    return moco_v1_v2(sd)


REFUSALS = {  # file, what the one sentence says
    "moco_encoder_q_missing_a_block": (
        moco_missing_a_block,
        [
            "(read as torchvision encoder_q) matches only 108 of the 120 tensors of resnet18",
            "layer4.1.conv1.weight is missing",
        ],
    ),
    "dinov2_register_tokens": (
        lambda: vit_with({"register_tokens": torch.randn(1, 4, 192)}),
        ["ViT with register tokens (register_tokens)"],
    ),
    "dinov2_swiglu": (swiglu, ["ViT with a SwiGLU feed-forward (encoder.layers.encoder_layer_0.mlp.w12.weight)"]),
    "rvsa_vit_win": (
        rvsa_vit_win,
        ["is a ViT with RVSA's rotated varied-size window attention (model.blocks.0.attn.sampling_offsets.2.weight)"],
    ),
    "vitae": (vitae, ["is a ViT whose blocks add ViTAE's parallel convolution (PCM) to attention (blocks.0.PCM.0."]),
    "satmae_temporal": (
        satmae_temporal,
        ["is a temporal ViT (SatMAE's): its positions are 128 wide and its tokens 512, the other 384 channels"],
    ),
    "satmae_group_channels": (
        satmae_group_channels,
        ["is a ViT with SatMAE's band groups, a patch embedding each and a channel embedding (channel_embed)"],
    ),
    "multispectral_13_bands": (
        multispectral,
        ["reads 13 bands in its first layer (conv1.weight is (64, 13, 7, 7)), a multispectral backbone; this project"],
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


# --------------------------------------------------------------- issue 37: the baselines of the RS papers' tables
LARGE = {"width": 64, "depth": 24}  # ViT-L's 24 blocks at a small width; its training saves name 16 heads (of 4)
BASE = {"width": 96, "depth": 12}  # ViT-B's 12 blocks; RVSA's save names 12 heads (of 8)


def mae_positions(width, grid):
    """MAE's util/pos_embed.py get_2d_sincos_pos_embed(width, grid, cls_token=True), which fills its fixed pos_embed:
    np.meshgrid(w, h) (w first), half the channels for each coordinate, each the sin then the cos of pos * omega."""

    def one(half, pos):
        omega = 1.0 / 10000 ** (np.arange(half // 2, dtype=np.float64) / (half / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    grid_2d = np.stack(np.meshgrid(np.arange(grid, dtype=np.float32), np.arange(grid, dtype=np.float32)))
    table = np.concatenate([one(width // 2, grid_2d[0]), one(width // 2, grid_2d[1])], axis=1)
    return torch.from_numpy(np.concatenate([np.zeros([1, width]), table])).float()[None]


def scalemae_positions(width, grid, res):
    """Scale-MAE's get_2d_sincos_pos_embed_with_resolution (util/pos_embed.py), which its forward calls for every
    batch: torch.meshgrid(w, h, indexing="xy"), the grid times the ground resolution res, then MAE's sin-cos."""
    coordinates = torch.arange(grid, dtype=torch.float32)
    grid_2d = torch.stack(torch.meshgrid(coordinates, coordinates, indexing="xy")) * res
    omega = 1.0 / 10000 ** (torch.arange(width // 4, dtype=torch.float32) / (width / 4.0))
    parts = []
    for coordinate in grid_2d:
        out = torch.einsum("m,d->md", coordinate.reshape(-1), omega)
        parts.append(torch.cat([out.sin(), out.cos()], dim=1))
    return torch.cat([torch.zeros(1, width), torch.cat(parts, dim=1)])[None]


def mae_encoder(width, depth, patch=16, grid=2, seed=0):
    """MAE's MaskedAutoencoderViT encoder (models_mae.py): a timm ViT whose pos_embed is the fixed sin-cos table."""
    return timm_vit(patch, grid, width=width, depth=depth, seed=seed) | {"pos_embed": mae_positions(width, grid)}


def mae_decoder(width, grid, dim=32):
    """models_mae.py's decoder, beside the encoder in every training save: decoder_embed, mask_token,
    decoder_pos_embed, decoder_blocks (one here, 8 in MAE), decoder_norm, decoder_pred (16 x 16 x 3 pixels)."""
    block = {k: v for k, v in timm_vit(16, 1, width=dim, depth=1, seed=9).items() if k.startswith("blocks.")}
    return (
        {"decoder_embed.weight": torch.randn(dim, width), "decoder_embed.bias": torch.randn(dim)}
        | {"mask_token": torch.randn(1, 1, dim), "decoder_pos_embed": mae_positions(dim, grid)}
        | prefixed("decoder_", block)
        | {"decoder_norm.weight": torch.ones(dim), "decoder_norm.bias": torch.zeros(dim)}
        | {"decoder_pred.weight": torch.randn(768, dim), "decoder_pred.bias": torch.randn(768)}
    )


def scalemae_decoder(width, grid):  # Scale-MAE's models_mae.py: MAE's, and mask_token_decoder, an FPN, an FCN head
    conv = {"fpn.fpn1.0.weight": torch.randn(32, 32, 2, 2), "fcn.convs.0.weight": torch.randn(16, 32, 3, 3)}
    return mae_decoder(width, grid) | {"mask_token_decoder": torch.randn(1, 1, 32)} | conv


def mae_training_save(model, name):
    """main_pretrain.py's misc.save_model (MAE, SatMAE, Scale-MAE, RVSA): model, optimizer, epoch, scaler, and the
    argparse Namespace whose `model` names the architecture."""
    args = argparse.Namespace(model=name, input_size=224, mask_ratio=0.75, norm_pix_loss=True)
    optimizer = {"state": {}, "param_groups": [{"lr": 1.5e-4, "params": [0, 1]}]}
    return {"model": model, "optimizer": optimizer, "epoch": 799, "scaler": {"scale": 65536.0}, "args": args}


def mae_finetuned(encoder):  # main_finetune.py --global_pool: fc_norm and the classifier, the final norm deleted
    width = encoder["cls_token"].shape[-1]
    fc_norm = {"fc_norm.weight": torch.rand(width) + 0.5, "fc_norm.bias": torch.randn(width) * 0.2}
    head = {"head.weight": torch.randn(62, width), "head.bias": torch.randn(62)}
    return {k: v for k, v in encoder.items() if not k.startswith("norm.")} | fc_norm | head


def vit_case(case):
    """(the file, the weights its reference forward reads, image size, --heads, fragments of the line, reference
    keywords) of each ViT of the RS papers' tables."""
    large = mae_encoder(**LARGE)
    if case == "mae_pretrain_vit_large":  # facebookresearch/mae's release: {'model': the encoder}, no args
        return {"model": large}, large, 32, 4, ["vit depth 24 width 64 mlp_dim 256 patch_size 16", "4 heads (--"], {}
    if case == "satmae_fmow_pretrain":  # SatMAE's training save of MAE's ViT-L/16
        file = mae_training_save(large | mae_decoder(64, 2), "mae_vit_large_patch16")
        decoder = "decoder_embed (2 tensors), mask_token (1 tensor), decoder_pos_embed (1 tensor), decoder_blocks ("
        return file, large, 32, None, [" heads 16", decoder, "decoder_pred (2 tensors)"], {"heads": 16}
    if case == "rvsa_mae_checkpoint_1599":  # RVSA's MAE ViT-B pre-training (MAEPretrain_SceneClassification)
        base = mae_encoder(**BASE, seed=1)
        file = mae_training_save(base | mae_decoder(96, 2), "mae_vit_base_patch16")
        fragments = ["vit depth 12 width 96 mlp_dim 384 patch_size 16 heads 12", "decoder_norm ("]
        return file, base, 32, None, fragments, {"heads": 12}
    if case == "mae_finetuned_global_pool":  # MAE's / SatMAE's fine-tuned ViT: the authors probe the mean token
        file = {"model": mae_finetuned(large), "args": argparse.Namespace(model="vit_large_patch16")}
        fragments = [" heads 16", "dropped head (2 tensors)", "probed on the mean of the patch tokens through fc_norm"]
        return file, file["model"], 32, None, fragments, {"heads": 16, "pool": "mean"}
    if case == "scalemae_vitlarge_800":  # at 64 px (4 x 4 patches) Scale-MAE computes its positions for that grid
        file = mae_training_save(large | scalemae_decoder(64, 2), "mae_vit_large_patch16")
        positions = "pos_embed replaced by the sin-cos positions Scale-MAE computes at res 1"
        dropped = ["mask_token_decoder (1 tensor)", "fpn (1 tensor)", "fcn (1 tensor)"]
        reference = {"heads": 16, "positions": scalemae_positions(64, 4, 1.0)}
        return file, large, 64, None, [positions] + dropped, reference
    if case == "dinov2_vitl14_pretrain":  # DINOv2's hub file: LayerScale, mask_token, patch 14
        sd = timm_vit(14, 2, layerscale=True, seed=3, **LARGE) | {"mask_token": torch.randn(1, 64)}
        return sd, sd, 28, 4, ["vit depth 24 width 64 mlp_dim 256 patch_size 14, LayerScale folded", "mask_token ("], {}
    if case == "ibot_vitl16_checkpoint_teacher":  # extract_backbone_weights.py: the backbone's keys, plain
        sd = timm_vit(16, 2, seed=4, **LARGE)
        fragments = ["timm ViT layout under '', vit depth 24", "probed on the class token after the final norm"]
        return sd, sd, 32, 4, fragments, {}
    sd = timm_vit(16, 2, seed=5, **LARGE)  # iBOT's student backbone also holds its masked_embed
    return sd | {"masked_embed": torch.randn(1, 64)}, sd, 32, 4, ["dropped masked_embed (1 tensor)"], {}


VIT_CASES = [
    "mae_pretrain_vit_large",
    "satmae_fmow_pretrain",
    "rvsa_mae_checkpoint_1599",
    "mae_finetuned_global_pool",
    "scalemae_vitlarge_800",
    "dinov2_vitl14_pretrain",
    "ibot_vitl16_checkpoint_teacher",
    "ibot_vitl16_checkpoint_student",
]


@pytest.mark.parametrize("case", VIT_CASES)
def test_the_rs_tables_vits_load_at_any_size_exactly_with_their_authors_feature(case, tmp_path, capsys):
    file, sd, size, heads, fragments, reference = vit_case(case)
    torch.save(file, tmp_path / f"{case}.pth")
    loaded = backbones.load_backbone(str(tmp_path / f"{case}.pth"), image_size=size, heads=heads)
    line = capsys.readouterr().out.strip().splitlines()
    assert len(line) == 1 and all(f in line[0] for f in fragments), line
    x = torch.randn(2, 3, size, size)
    patch = sd["patch_embed.proj.weight"].shape[-1]
    with torch.no_grad():
        expected = vit_reference(sd, x, **{"heads": heads, "patch": patch} | reference)
        torch.testing.assert_close(loaded.model.eval()(x), expected, **TOLERANCE)


def test_scale_maes_positions_are_its_formula_for_the_evaluation_grid_not_the_stored_table_resized(tmp_path):
    """Scale-MAE's forward computes its positions for each input grid (models_vit.py forward_features); its stored
    pos_embed is the 2 x 2 table. Resized to 4 x 4 it is something else, which a probe would silently read."""
    file, large, _, _, _, _ = vit_case("scalemae_vitlarge_800")
    torch.save(file, tmp_path / "scalemae.pth")
    loaded = backbones.load_backbone(str(tmp_path / "scalemae.pth"), image_size=64)
    positions = loaded.model.encoder.pos_embedding.detach()
    torch.testing.assert_close(positions, scalemae_positions(64, 4, 1.0), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(scalemae_positions(64, 2, 1.0), large["pos_embed"], rtol=1e-5, atol=1e-5)  # res 1
    resized = interpolate_embeddings(64, 16, {"encoder.pos_embedding": large["pos_embed"]})["encoder.pos_embedding"]
    assert (resized - positions).abs().max() > 0.1


def gfm_model(encoder, teacher):  # GFM's SimMIM (models/teacher.py): encoder, frozen ImageNet Swin teacher, decoder
    head_out = {k: v for k, v in teacher.items() if not k.startswith("head.")}  # SwinTeacher: head = None
    projector = {"projector.weight": torch.randn(768, 768), "projector.bias": torch.randn(768)}
    decoder = {"decoder.0.weight": torch.randn(3072, 768, 1, 1), "decoder.0.bias": torch.randn(3072)}
    return prefixed("encoder.", encoder) | prefixed("teacher.", head_out) | decoder | projector


MMCLS_NAMES = [  # Microsoft's names -> mmcls's SwinTransformer's (CMID's models/swin_transformer.py, mmcv's bricks)
    (r"^patch_embed\.proj\.", "patch_embed.projection."),
    (r"^layers\.", "stages."),
    (r"\.attn\.", ".attn.w_msa."),
    (r"\.mlp\.fc1\.", ".ffn.layers.0.0."),
    (r"\.mlp\.fc2\.", ".ffn.layers.1."),
    (r"^norm\.", "norm3."),
]


def mmcls_swin(sd):
    """The same weights under mmcls's names: no attn_mask buffers (ShiftWindowMSA computes them), no classifier; its
    merges' columns are read in mmcv's nn.Unfold order by the reference (swin_reference(merge="mmcv"))."""
    out = {}
    for key, value in sd.items():
        if not key.endswith("attn_mask") and not key.startswith("head."):
            for pattern, replacement in MMCLS_NAMES:
                key = re.sub(pattern, replacement, key)
            out[key] = value
    return out


def swin_case(case):
    """(the file, the Microsoft-named weights its reference reads, image size, window, merge, fragments of the line)
    of each Swin of the RS papers' tables."""
    if case == "simmim_pretrain_swin_window6_192":
        sd = ms_swin(window=6, size=192)
        return simmim(sd), sd, 192, 6, "microsoft", ["Microsoft Swin layout under 'model.encoder.', swin_t window 6"]
    if case == "gfm":  # GFM's gfm.pth, its yacs config stripped: window 6 encoder, window 7 teacher
        encoder = {k: v for k, v in ms_swin(window=6, size=192).items() if not k.startswith("head.")}
        file = {"model": gfm_model(encoder | {"mask_token": torch.randn(1, 1, 96)}, ms_swin(seed=1))}
        dropped = ["mask_token (1 tensor)", "teacher (", "decoder (2 tensors), projector (2 tensors)"]
        return file, encoder, 192, 6, "microsoft", ["under 'model.encoder.', swin_t window 6"] + dropped
    if case == "swin_window12_384":  # microsoft/Swin-Transformer's swin_*_patch4_window12_384
        sd = ms_swin(window=12, size=384)
        return {"model": sd}, sd, 384, 12, "microsoft", ["swin_t window 12", "head (2 tensors)"]
    sd = {k: v for k, v in ms_swin(seed=2).items() if not k.endswith("attn_mask")}
    reordered = "PatchMerging reordered from mmcv's nn.Unfold order"
    if case == "cmid_swin_backbone_only":  # CMID's "Backbone Only" file: mmcls keys at the top level
        return mmcls_swin(sd), sd, 224, 7, "mmcv", ["mmcls Swin layout under '', swin_t, " + reordered]
    online = prefixed("online_encoder.model.", mmcls_swin(sd)) | {"online_encoder.mask_token": torch.randn(1, 1, 96)}
    rest = prefixed("branch_encoder.", other(mmcls_swin(sd))) | mlp("online_projector.mlp", 768, 64, 32)
    file = {"epoch": 199, "num_gpus": 8, "model": online | rest | {"queue": torch.randn(32, 64)}}  # CMID's trainer
    dropped = ["mask_token (1 tensor)", "branch_encoder (", "online_projector (4 tensors)", "queue (1 tensor)"]
    return file, sd, 224, 7, "mmcv", ["mmcls Swin layout under 'model.online_encoder.model.'"] + dropped


SWIN_CASES = [
    "simmim_pretrain_swin_window6_192",
    "gfm",
    "swin_window12_384",
    "cmid_swin_backbone_only",
    "cmid_swin_pretrained",
]


@pytest.mark.parametrize("case", SWIN_CASES)
def test_the_rs_tables_swins_of_any_window_and_mmcls_swin_load_exactly(case, tmp_path, capsys):
    file, sd, size, window, merge, fragments = swin_case(case)
    torch.save(file, tmp_path / f"{case}.pth")
    loaded = backbones.load_backbone(str(tmp_path / f"{case}.pth"))
    line = capsys.readouterr().out.strip().splitlines()
    assert len(line) == 1 and all(f in line[0] for f in fragments), line
    assert "probed on the mean of the last stage's tokens after the final norm" in line[0], line
    assert (loaded.arch, loaded.model.features[1][0].attn.window_size) == ("swin_t", [window, window])
    x = torch.randn(1, 3, size, size)
    with torch.no_grad():
        expected = swin_reference(sd, x, window=window, merge=merge)
        torch.testing.assert_close(loaded.model.eval()(x), expected, **TOLERANCE)


def test_mmcv_patch_merging_reordered_computes_the_unfold_merge():
    """mmcv's PatchMerging (cnn/bricks/transformer.py): nn.Unfold(2, stride 2) over N C H W, LayerNorm(4C), a linear
    reduction without bias; torchvision's PatchMerging with the reordered weights must compute the same."""
    torch.manual_seed(0)
    channels = 8
    x = torch.randn(2, 6, 6, channels)
    reduction, gamma, beta = torch.randn(2 * channels, 4 * channels), torch.rand(4 * channels) + 0.5, torch.randn(32)
    gathered = F.unfold(x.permute(0, 3, 1, 2), kernel_size=2, stride=2).transpose(1, 2)  # mmcv: N, H/2 * W/2, 4C
    mmcv = F.linear(F.layer_norm(gathered, (4 * channels,), gamma, beta), reduction).view(2, 3, 3, 2 * channels)
    state = {"features.2.reduction.weight": reduction, "features.2.norm.weight": gamma, "features.2.norm.bias": beta}
    merge = torchvision.models.swin_transformer.PatchMerging(channels)
    merge.load_state_dict({k.removeprefix("features.2."): v for k, v in state.items()})
    with torch.no_grad():
        assert (merge(x) - mmcv).abs().max() > 0.1  # in mmcv's order the columns are read for other positions
        backbones._mmcls_swin(state, backbones.Source("w.pth", "", {}, "", {}))
        merge.load_state_dict({k.removeprefix("features.2."): v for k, v in state.items()})
        torch.testing.assert_close(merge(x), mmcv, **TOLERANCE)


def swin_v2_t(seed=0):
    """torchvision's swin_v2_t, which Satlas's SwinBackbone wraps (and torchgeo's swin_v2_t builds), its norms random
    so that a final norm read or left out shows."""
    torch.manual_seed(seed)
    model = torchvision.models.swin_v2_t().eval()
    for m in model.modules():
        if isinstance(m, nn.LayerNorm):
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_(0, 0.2)
    return model


def satlas_reference(model, x):
    """Satlas's SwinBackbone.forward (satlaspretrain_models/models/backbones.py): every module of backbone.features,
    the last output as N C H W; its classification head averages it (ClassifyHead's avgpool). No final norm."""
    for layer in model.features:
        x = layer(x)
    return x.permute(0, 3, 1, 2).mean(dim=(2, 3))


def satlas_model(prefix):  # a flat dict of Satlas's Model: the backbone under `prefix`, the FPN, the task heads
    def write(sd):
        fpn = {"intermediates.0.fpn.inner_blocks.0.0.weight": torch.randn(128, 96, 1, 1)}
        return prefixed(prefix, sd) | fpn | {"heads.0.layer.weight": torch.randn(2, 128)}

    return write


SATLAS = {  # the file's writer, the prefix the line names
    "sentinel2_swint_si_rgb": (satlas_model("backbone.backbone."), "under 'backbone.backbone.'"),
    "sentinel2_swint_mi_rgb": (satlas_model("backbone.backbone.backbone."), "under 'backbone.backbone.backbone.'"),
    "torchgeo_sentinel2_swint_si_rgb": (dict, "under ''"),  # torchgeo's re-hosted file: torchvision's keys
}


@pytest.mark.parametrize("case", list(SATLAS))
def test_satlas_swin_v2_is_read_as_its_forward_reads_it_without_the_untrained_final_norm(
    case, tmp_path, capsys, monkeypatch
):
    model = swin_v2_t()
    writer, prefix = SATLAS[case]
    torch.save(writer(model.state_dict()), tmp_path / f"{case}.pth")
    if case.startswith("torchgeo"):  # known by content: the sha256 prefix its published name carries
        monkeypatch.setattr(backbones, "TORCHGEO_SATLAS", (data.sha256(tmp_path / f"{case}.pth")[:8],))
    loaded = backbones.load_backbone(str(tmp_path / f"{case}.pth"), image_size=64)
    line = capsys.readouterr().out.strip()
    assert loaded.arch == "swin_v2_t" and prefix in line and "norm left out: Satlas's forward" in line, line
    assert "probed on the mean of the last stage's tokens without the final norm" in line, line
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model.eval()(x), satlas_reference(model, x), **TOLERANCE)


def test_another_swin_v2_in_torchvisions_keys_keeps_its_final_norm(tmp_path, capsys):
    """torchvision's own swin_v2 weights (or one fine-tuned from them) trained their norm: only Satlas's is left out."""
    model = swin_v2_t(seed=1)
    torch.save(model.state_dict(), tmp_path / "swin_v2_t.pth")
    loaded = backbones.load_backbone(str(tmp_path / "swin_v2_t.pth"), image_size=64)
    assert "after the final norm" in capsys.readouterr().out
    model.head = nn.Identity()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model.eval()(x), model(x), **TOLERANCE)


def seco_with_pickled_callbacks(sd, package):
    """SeCo's Lightning 1.1 checkpoint as written: `callbacks` keyed by the callback's class (a stand-in module named
    like Lightning's, importable only while the file is written, as on a machine without it)."""
    return seco_lightning(sd) | {"callbacks": {package.ModelCheckpoint: {"best_model_score": torch.tensor(0.9)}}}


def test_seco_lightning_callbacks_get_the_tensors_only_advice_whose_output_loads(tmp_path, capsys):
    stub = tmp_path / "stub" / "pytorch_lightning" / "callbacks"
    stub.mkdir(parents=True)
    (stub.parent / "__init__.py").write_text("")
    (stub / "__init__.py").write_text("")
    (stub / "model_checkpoint.py").write_text("class ModelCheckpoint:\n    pass\n")
    original = resnet18()
    sys.path.insert(0, str(tmp_path / "stub"))
    try:
        package = importlib.import_module("pytorch_lightning.callbacks.model_checkpoint")
        torch.save(seco_with_pickled_callbacks(original.state_dict(), package), tmp_path / "seco_resnet18_1m.ckpt")
    finally:
        sys.path.remove(str(tmp_path / "stub"))
        for name in [m for m in sys.modules if m.startswith("pytorch_lightning")]:
            sys.modules.pop(name)
    folder = make_image_folder(tmp_path / "scenes", classes=2, per_class=2)
    argv = ["--data", folder, "--weights", str(tmp_path / "seco_resnet18_1m.ckpt"), "--arch", "resnet18"]
    err = refusal(eval_linear, argv + ["--workers", "0", "--out", str(tmp_path / "out")], capsys)
    assert (
        "it pickles pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint, which could run code: if you trust "
        "the file, install the Python package pytorch_lightning (pip install pytorch_lightning), then keep only its "
        "tensors with python -c" in err
    ), err
    command, out = re.search(r" with (python -c '.*') and give --weights (\S+)\.$", err).groups()
    sys.path.insert(0, str(tmp_path / "stub"))  # the package installed: the user runs the command
    try:
        exec(shlex.split(command)[2], {"__name__": "__main__"})
    finally:
        sys.path.remove(str(tmp_path / "stub"))
        for name in [m for m in sys.modules if m.startswith("pytorch_lightning")]:
            sys.modules.pop(name)
    loaded = backbones.load_backbone(out, "resnet18", image_size=32)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = torch.flatten(nn.Sequential(*list(original.children())[:-1])(x), 1)
        assert torch.equal(loaded.model.eval()(x), expected)


def rs_baselines():
    """A file of each layout above (the others differ in sizes and prefixes, which load_backbone's tests check), by
    its authors' name: what a user gives eval_linear.py."""
    vits = (
        "satmae_fmow_pretrain",
        "mae_finetuned_global_pool",
        "scalemae_vitlarge_800",
        "ibot_vitl16_checkpoint_teacher",
    )
    files = {case: vit_case(case)[0] for case in vits}
    files |= {case: swin_case(case)[0] for case in ("gfm", "cmid_swin_backbone_only")}  # Microsoft's, mmcls's
    files["sentinel2_swint_si_rgb"] = SATLAS["sentinel2_swint_si_rgb"][0](swin_v2_t().state_dict())
    resnets = ("seco_lightning", "caco", "gassl", "ssl4eo_s12_moco_rgb", "satlas_resnet", "tov")
    return files | {case: RESNET_LAYOUTS[case][0](resnet18().state_dict()) for case in resnets}


def test_the_rs_baselines_run_through_the_linear_probe_and_its_stages_on_the_command_line(tmp_path, capsys):
    folder = make_image_folder(tmp_path / "scenes", classes=2, per_class=4)
    weights = []
    for case, file in rs_baselines().items():
        torch.save(file, tmp_path / f"{case}.pth")
        weights += ["--weights", str(tmp_path / f"{case}.pth")]
    flags = ["--arch", "resnet18", "--heads", "4", "--img-size", "32", "--epochs", "1", "--runs", "1", "--stages"]
    flags += ["--train-ratio", "0.5", "--workers", "0", "--out", str(tmp_path / "out")]
    eval_linear.main(["--data", folder] + weights + flags)
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("--weights ")]
    assert len(printed) == len(weights) // 2 and all("; probed on the " in line for line in printed), printed
    entries = json.loads((tmp_path / "out" / "results.json").read_text())["backbones"]
    archs = {os.path.basename(e["weights"]).removesuffix(".pth"): e["arch"] for e in entries}
    assert archs["mae_finetuned_global_pool"] == "vit" and archs["cmid_swin_backbone_only"] == "swin_t", archs
    assert archs["sentinel2_swint_si_rgb"] == "swin_v2_t" and archs["seco_lightning"] == "resnet18", archs
    assert all(len(e["scenes"]["stages"]) == 4 for e in entries), entries[0]


@pytest.mark.parametrize("case", ["mae_finetuned_global_pool", "sentinel2_swint_si_rgb"])
def test_a_backbone_read_with_its_authors_feature_is_fine_tuned_saved_and_loads_again_as_that_model(
    case, tmp_path, capsys
):
    """finetune_cls.py --save-backbone writes the config that builds the model again: MAE's mean-pooled ViT, and
    Satlas's Swin V2 without its final norm; a config without them would not load exactly."""
    folder = make_image_folder(tmp_path / "scenes", classes=2, per_class=4)
    file = vit_case(case)[0] if case.startswith("mae") else SATLAS[case][0](swin_v2_t().state_dict())
    torch.save(file, tmp_path / f"{case}.pth")
    saved = tmp_path / "fine_tuned.pth"
    flags = ["--img-size", "32", "--epochs", "1", "--batch-size", "2", "--runs", "1", "--train-ratio", "0.5"]
    flags += ["--workers", "0", "--save-backbone", str(saved), "--out", str(tmp_path / "ft")]
    finetune_cls.main(["--data", folder, "--weights", str(tmp_path / f"{case}.pth")] + flags)
    capsys.readouterr()
    obj = torch.load(saved, weights_only=True)
    loaded = backbones.load_backbone(str(saved), image_size=32)
    if case.startswith("mae"):
        assert obj["config"]["pool"] == "mean" and isinstance(loaded.model, backbones.MeanPooledViT)
        assert (obj["config"]["depth"], obj["config"]["width"], obj["config"]["heads"]) == (24, 64, 16)
        names, pool = eval_linear.stage_modules(loaded.model)  # --stages: each quarter's patch tokens, averaged
        tokens = torch.randn(2, 5, 64)
        assert names[-1] == "encoder.layers.encoder_layer_23" and torch.equal(pool(tokens), tokens[:, 1:].mean(dim=1))
    else:
        assert obj["config"] == {"final_norm": False} and isinstance(loaded.model.norm, nn.Identity)
    assert loaded.arch == obj["arch"] and capsys.readouterr().out == ""  # our own file: no layout line
    for key, value in loaded.model.state_dict().items():
        torch.testing.assert_close(value, obj["state_dict"][key], rtol=0, atol=0)
