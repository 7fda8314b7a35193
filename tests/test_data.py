"""data.py: discovery, labeled folders, RGB conversion, skipping unreadable files, deterministic augmentations, the
sampler, the float flags, the kNN."""

import os
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import transforms as T

import data
from conftest import REPO, make_image_folder


def test_list_images_finds_every_extension_at_any_depth_and_ignores_the_rest(tmp_path):
    expected = []
    for i, ext in enumerate(data.IMAGE_EXTENSIONS + (".JPG",)):
        folder = tmp_path / "a" / ("b" * (i % 3)) / str(i)
        folder.mkdir(parents=True)
        (folder / f"x{ext}").write_bytes(b"")
        expected.append(str(folder / f"x{ext}"))
    (tmp_path / "a" / "notes.txt").write_text("not an image")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "y.png").write_bytes(b"")
    found, files = data.list_images([str(tmp_path / "a"), str(tmp_path / "other")])
    assert found == sorted(expected) + [str(tmp_path / "other" / "y.png")] and files["files"] == len(found)
    assert len(data.list_images(["synthetic"])[0]) == data.SYNTHETIC_IMAGES


@pytest.mark.parametrize(
    "make, fragment",
    [
        (lambda p: None, "is not a folder"),
        (lambda p: os.makedirs(p / "empty" / "sub"), "holds no images"),
    ],
)
def test_list_images_rejects_missing_and_empty_folders(tmp_path, make, fragment):
    make(tmp_path)
    with pytest.raises(data.UserError, match=fragment):
        data.list_images([str(tmp_path / "empty")])


def test_labeled_images_descends_into_a_single_wrapper_folder(tmp_path):
    make_image_folder(tmp_path / "EuroSAT" / "2750", classes=3, per_class=4)
    paths, labels, classes, _ = data.labeled_images(str(tmp_path / "EuroSAT"))
    assert classes == ["class0", "class1", "class2"]
    assert labels == [0] * 4 + [1] * 4 + [2] * 4
    assert all(f"2750{os.sep}class{label}{os.sep}" in p for p, label in zip(paths, labels))


def test_labeled_images_rejects_one_class_and_empty_classes(tmp_path):
    make_image_folder(tmp_path / "one", classes=1)
    with pytest.raises(data.UserError, match="at least two classes"):
        data.labeled_images(str(tmp_path / "one"))
    make_image_folder(tmp_path / "two", classes=2)
    (tmp_path / "two" / "class9").mkdir()
    with pytest.raises(data.UserError, match="class9 holds no images"):
        data.labeled_images(str(tmp_path / "two"))


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "I;16", "CMYK"])
def test_open_rgb_converts_every_mode_to_8bit_rgb(tmp_path, mode):
    pixels = (np.arange(24 * 20) % 251).reshape(20, 24)
    if mode == "I;16":
        img = Image.fromarray((pixels * 250).astype(np.uint16))  # 16-bit values above 255
    else:
        img = Image.fromarray(pixels.astype(np.uint8)).convert(mode)
    path = str(tmp_path / ("x.tif" if mode in ("I;16", "CMYK") else "x.png"))
    img.save(path)
    rgb = data.open_rgb(path)
    assert rgb.mode == "RGB" and rgb.size == (24, 20)
    if mode == "I;16":  # stretched, not clipped: the largest value maps to 255 and the smallest to 0
        assert np.asarray(rgb).max() == 255 and np.asarray(rgb).min() == 0


def test_dataset_skips_and_counts_an_unreadable_file(tmp_path, capsys):
    folder = make_image_folder(tmp_path / "imgs", classes=1, per_class=3)
    bad = os.path.join(folder, "class0", "1.png")
    with open(bad, "wb") as f:
        f.write(b"\x89PNG truncated")
    paths, _ = data.list_images([folder])
    dataset = data.ImageDataset(paths, transform=T.Compose([T.Resize((16, 16)), T.ToTensor()]))
    skipped = [dataset[i][2] for i in range(len(dataset))]
    assert skipped == [0, 1, 0]  # the corrupt 1.png is replaced by 2.png and counted once
    assert "skipping unreadable image" in capsys.readouterr().out
    with pytest.raises(data.UserError, match="could not be read"):
        data.check_readable([bad] * 4)


def test_augmentation_is_a_function_of_seed_epoch_and_index():
    crop = T.Compose([T.RandomResizedCrop(32, scale=(0.2, 1.0)), T.RandomHorizontalFlip(), T.ToTensor()])
    dataset = data.ImageDataset(data.list_images(["synthetic"])[0], transform=crop, seed=7)
    dataset.set_epoch(2)
    torch.manual_seed(123)
    a = dataset[5][0]
    torch.manual_seed(456)  # the global RNG does not matter, and is left untouched
    state = torch.get_rng_state()
    b = dataset[5][0]
    assert torch.equal(a, b) and torch.equal(state, torch.get_rng_state())
    assert torch.equal(a, dataset.load(5, 2)[0])  # what a loader's item is: load(index, the epoch set)
    assert not torch.equal(a, dataset.load(5, 3)[0]) and not torch.equal(a, dataset[6][0])
    dataset.set_epoch(3)
    assert torch.equal(dataset[5][0], dataset.load(5, 3)[0]) and not torch.equal(dataset[5][0], a)
    other_seed = data.ImageDataset(dataset.paths, transform=crop, seed=8)
    assert not torch.equal(a, other_seed.load(5, 2)[0])


def test_epoch_sampler_splits_global_batches_between_ranks_and_resumes_mid_epoch():
    size, batch, world = 50, 8, 2
    per_rank = [list(data.EpochSampler(size, batch, rank, world, seed=1)) for rank in range(world)]
    assert all(len(r) == 24 for r in per_rank)  # 6 full global batches of 8, the last 2 images dropped
    batches = [per_rank[0][b * 4 : (b + 1) * 4] + per_rank[1][b * 4 : (b + 1) * 4] for b in range(6)]
    indices = [i for b in batches for i in b]
    assert len(set(indices)) == 48  # no image twice in an epoch
    sampler = data.EpochSampler(size, batch, 1, world, seed=1)
    sampler.set_epoch(0, start_batch=4)
    assert list(sampler) == per_rank[1][16:] and len(sampler) == 8
    sampler.set_epoch(1)
    again = data.EpochSampler(size, batch, 1, world, seed=1)
    again.set_epoch(1)
    assert list(sampler) != per_rank[1] and list(sampler) == list(again)  # a new order per epoch, fixed by it


def test_list_images_reads_each_folder_once_through_a_link_loop_and_a_second_link(tmp_path):
    make_image_folder(tmp_path / "root" / "real", classes=2, per_class=2)
    os.symlink("..", tmp_path / "root" / "real" / "class0" / "up")  # a mirror's loop: root/real/class0/up -> root/real
    os.symlink("real", tmp_path / "root" / "mirror")  # a second way to the same folder
    found, _ = data.list_images([str(tmp_path / "root")])
    assert found == sorted(str(tmp_path / "root" / "real" / f"class{c}" / f"{j}.png") for c in (0, 1) for j in (0, 1))


def test_labeled_images_refuses_class_folders_that_hold_image_folders_and_ignores_macosx(tmp_path):
    make_image_folder(tmp_path / "nwpu" / "train", classes=2, per_class=2)  # a copy split into train/ and test/
    make_image_folder(tmp_path / "nwpu" / "test", classes=2, per_class=2)
    with pytest.raises(
        data.UserError,
        match=r"class folder .*test holds image folders \(e\.g\. test.class0\).*found "
        r"2: test, train",
    ):
        data.labeled_images(str(tmp_path / "nwpu"))
    make_image_folder(tmp_path / "zip" / "NWPU-RESISC45", classes=3, per_class=2)
    make_image_folder(tmp_path / "zip" / "__MACOSX" / "NWPU-RESISC45", classes=3, per_class=2)
    assert data.labeled_images(str(tmp_path / "zip"))[2] == ["class0", "class1", "class2"]


def test_knn_predict_weights_the_k_nearest_by_exp_cosine_over_temperature():
    train = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    labels = torch.tensor([0, 1, 1])
    query = torch.tensor([[1.0, 0.1]])
    # cosines of the query to the three: 0.995, 0.0995, 0.774. k=2: class 0 gets e^0.995 = 2.70, class 1 e^0.774 = 2.17
    assert data.knn_predict(train, labels, query, 2, k=2, temperature=1.0).tolist() == [0]
    # k=3: class 1 adds e^0.0995 = 1.10, 3.27 > 2.70
    assert data.knn_predict(train, labels, query, 2, k=3, temperature=1.0).tolist() == [1]
    # T=0.07 sharpens: e^(0.995/0.07) = e^14.2 outweighs e^11.1 + e^1.4
    assert data.knn_predict(train, labels, query, 2, k=3, temperature=0.07).tolist() == [0]
    # cosine, not dot product: a short vector at 0.995 is nearer than a long one at 0.961 (dot products 0.1 and 5.2)
    assert data.knn_predict(
        torch.tensor([[0.1, 0.0], [5.0, 2.0]]), torch.tensor([0, 1]), query, 2, k=1, temperature=1.0
    ).tolist() == [0]
    assert data.knn_predict(train, labels, torch.tensor([[0.0, 1.0], [1.0, 0.0]]), 2, k=20).tolist() == [1, 0]


def test_knn_monitor_halves_each_class_by_seed_leaves_out_unreadable_files_and_measures_without_side_effects(tmp_path):
    folder = make_image_folder(tmp_path / "scenes", classes=2, per_class=5, size=8)
    (tmp_path / "scenes" / "class1" / "4.png").write_bytes(b"not an image")
    monitor = data.KnnMonitor(folder, 8, seed=3)
    assert monitor.images.shape == (9, 3, 8, 8) and monitor.images.dtype == torch.uint8
    assert monitor.labels.tolist() == [0] * 5 + [1] * 4
    assert sorted(monitor.train.tolist() + monitor.test.tolist()) == list(range(9))  # a partition of what was read
    assert [int((monitor.labels[monitor.train] == c).sum()) for c in (0, 1)] == [2, 2]  # half of each class
    assert monitor.description == "5 test images of 2 classes"
    again, other = data.KnnMonitor(folder, 8, seed=3), data.KnnMonitor(folder, 8, seed=5)
    assert torch.equal(again.images, monitor.images) and torch.equal(again.train, monitor.train)
    assert not torch.equal(other.train, monitor.train)  # another seed, another split
    mean_colour = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()).train()
    state = torch.get_rng_state()
    assert monitor.top1(mean_colour, torch.device("cpu")) == 100.0  # the classes differ in mean colour
    assert mean_colour.training and torch.equal(state, torch.get_rng_state())


@pytest.mark.parametrize(
    "argv, shown",
    [
        (["--lr", "nan"], "--lr: must be a finite number (got nan)"),
        (["--lr=-inf"], "--lr: must be a finite number (got -inf)"),
        (["--betas", "0.9", "inf"], "--betas: must be a finite number (got [0.9, inf])"),
    ],
)
def test_the_parser_refuses_nan_and_inf_for_every_float_flag_in_one_line(argv, shown, capsys):
    parser = data.ArgumentParser(prog="script.py")
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--betas", type=float, nargs=2)
    parser.add_argument("--name")
    assert parser.parse_args(["--lr", "1e-3", "--betas", "0.9", "0.99", "--name", "nan"]).lr == 1e-3
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args(argv)
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == f"script.py: error: argument {shown} (see --help).\n"


# ------------------------------------------------------------------------------------------------ identity by content
def test_a_dataset_is_known_by_its_file_list_not_by_the_path_that_names_it(tmp_path):
    """data.file_list_id: the same files typed with a slash, through a link, below a wrapper folder or moved are the
    same dataset; an image added, removed, renamed or grown is another."""
    make_image_folder(tmp_path / "ds" / "inner", classes=2, per_class=3)
    os.symlink(tmp_path / "ds", tmp_path / "link")
    ids = [data.labeled_images(str(path))[3] for path in (tmp_path / "ds", f"{tmp_path / 'ds'}/", tmp_path / "link")]
    ids.append(data.labeled_images(str(tmp_path / "ds" / "inner"))[3])
    assert ids[0]["files"] == 6 and all(i == ids[0] for i in ids)
    assert data.list_images([str(tmp_path / "ds")])[1] == data.list_images([f"{tmp_path / 'ds'}/"])[1]
    os.rename(tmp_path / "ds", tmp_path / "moved")
    assert data.labeled_images(str(tmp_path / "moved"))[3] == ids[0]
    before = data.list_images([str(tmp_path / "moved")])[1]
    image = tmp_path / "moved" / "inner" / "class0" / "0.png"
    image.write_bytes(image.read_bytes() + b"\0")  # one byte more: another file
    assert data.list_images([str(tmp_path / "moved")])[1] != before
    os.rename(image, tmp_path / "moved" / "inner" / "class0" / "9.png")
    renamed = data.list_images([str(tmp_path / "moved")])[1]
    assert renamed["files"] == 6 and renamed != before
    make_image_folder(tmp_path / "moved" / "inner", classes=3, per_class=1)  # 0.png again, and a third class
    assert data.labeled_images(str(tmp_path / "moved"))[3]["files"] == 8


def rgb16_png(path, pixels):
    """A 16-bit RGB PNG written byte by byte (Pillow cannot write one): IHDR bit depth 16, colour type 2."""
    height, width, _ = pixels.shape
    rows = b"".join(b"\0" + pixels[y].astype(">u2").tobytes() for y in range(height))

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")
    )


def rgb16_tiff(path, pixels):
    """A 16-bit RGB TIFF, uncompressed, one strip (Pillow cannot write one either)."""
    height, width, _ = pixels.shape
    body = pixels.astype("<u2").tobytes()
    tags = [(256, 3, 1, width), (257, 3, 1, height), (258, 3, 3, 8 + 2 + 9 * 12 + 4), (259, 3, 1, 1), (262, 3, 1, 2)]
    tags += [(273, 4, 1, 8 + 2 + 9 * 12 + 4 + 6), (277, 3, 1, 3), (278, 3, 1, height), (279, 4, 1, len(body))]
    ifd = struct.pack("<H", len(tags)) + b"".join(
        struct.pack(
            "<HHIHH" if kind == 3 and count == 1 else "<HHII",
            tag,
            kind,
            count,
            value,
            *([0] * (kind == 3 and count == 1)),
        )
        for tag, kind, count, value in tags
    )
    path.write_bytes(
        b"II*\0" + struct.pack("<I", 8) + ifd + struct.pack("<I", 0) + struct.pack("<HHH", 16, 16, 16) + body
    )


def test_16_bit_rgb_is_read_at_full_depth_and_a_16_bit_rgb_tiff_is_refused_never_read_black(tmp_path):
    """Pillow keeps the high byte of each 16-bit RGB value: values under 256 (a dark scene) would be all black, 12-bit
    sensor values a few grey levels."""
    rng = np.random.default_rng(0)
    for high in (255, 3260):  # an 8-bit range stored in 16 bits, and 12-bit sensor values
        pixels = rng.integers(200 if high > 255 else 0, high + 1, (12, 10, 3))
        rgb16_png(tmp_path / "scene.png", pixels)
        with Image.open(tmp_path / "scene.png") as img:  # what Pillow alone makes of it
            assert np.asarray(img.convert("RGB")).max() <= high >> 8
        rgb = np.asarray(data.open_rgb(str(tmp_path / "scene.png"))).astype(np.float64)
        expected = (pixels - pixels.min()) / (pixels.max() - pixels.min()) * 255
        assert rgb.shape == (12, 10, 3) and np.abs(rgb - expected).max() <= 1  # stretched, channels kept apart
    rgb16_tiff(tmp_path / "scene.tif", pixels)
    with pytest.raises(data.UserError, match=r"scene.tif is a 16-bit RGB TIFF.*convert it to a 16-bit PNG"):
        data.open_rgb(str(tmp_path / "scene.tif"))
    with pytest.raises(data.UserError, match="16-bit RGB TIFF"):  # refused at start-up, not skipped as unreadable
        data.check_readable([str(tmp_path / "scene.png"), str(tmp_path / "scene.tif")])


def test_every_seed_the_flag_accepts_seeds_numpy_torch_and_the_dataset(capsys):
    parser = data.ArgumentParser(prog="script.py")
    parser.add_argument("--seed", type=data.seed_value, default=0)
    for bad in ("-1", str(2**32)):
        with pytest.raises(SystemExit):
            parser.parse_args(["--seed", bad])
        assert "argument --seed: must be an integer from 0 to 4294967295" in capsys.readouterr().err
    seed = parser.parse_args(["--seed", str(2**32 - 1)]).seed
    np.random.default_rng(seed + 4)  # the evaluation's split of run 4
    torch.manual_seed(seed + 7)  # seed + rank
    dataset = data.ImageDataset(["synthetic://0"], transform=T.ToTensor(), seed=seed + 1)  # gersp's natural images
    assert dataset.load(0, 10**6)[0].shape == (3, 64, 64)


# ------------------------------------------------------------------------------------------------ run pieces
def test_one_run_holds_an_out_folder_a_dead_runs_lock_is_taken_over_and_a_release_frees_it(tmp_path, capsys):
    out = tmp_path / "run"
    data.hold_out(str(out), "moco.py")
    holder = subprocess.run(
        [sys.executable, "-c", f"import data; data.hold_out({str(out)!r}, 'moco.py')"],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert holder.returncode == 1 and f"--out {out} is in use by process {os.getpid()} on" in holder.stderr
    data.release_out()
    assert (out / ".lock").read_text() == ""  # released: the next run has nothing to say
    killed = subprocess.run(
        [sys.executable, "-c", f"import data, os; data.hold_out({str(out)!r}, 'moco.py'); os._exit(9)"], cwd=REPO
    )
    assert killed.returncode == 9  # died holding it: the kernel released the lock, its name stays
    data.hold_out(str(out), "moco.py")
    note = capsys.readouterr().out
    assert f"note: --out {out} was held by process" in note and "ended without releasing it" in note
    data.release_out()


def test_a_write_that_fails_removes_its_partial_file_and_names_what_is_left(tmp_path):
    path = tmp_path / "checkpoint.pth"
    data.save_atomic({"step": 1}, str(path))
    os.symlink("/dev/full", tmp_path / "checkpoint.pth.tmp")  # every write to it fails with ENOSPC, as on a full disk
    with pytest.raises(data.UserError) as error:
        data.save_atomic({"step": 2, "weights": torch.zeros(1000)}, str(path))
    assert str(error.value) == (
        f"writing {path} failed (No space left on device): the partial file is removed and {path} is left as it was."
    )
    assert not os.path.lexists(tmp_path / "checkpoint.pth.tmp") and torch.load(path, weights_only=True) == {"step": 1}


def test_the_finiteness_check_names_the_first_bad_tensor():
    state = {
        "a": torch.ones(3),
        "steps": torch.tensor(3),
        "b": torch.tensor([1.0, float("inf")]),
        "c": torch.ones(1) * float("nan"),
    }
    assert data.first_non_finite(state) == "b" and data.first_non_finite({"a": torch.ones(2)}) is None


def test_non_finite_pixels_are_no_data_filled_and_counted_and_an_image_without_one_is_unreadable(tmp_path, capsys):
    """A float32 GeoTIFF's NaN no-data: read as all black before (its min and max were NaN)."""
    pixels = np.random.default_rng(0).uniform(200, 3000, (16, 16)).astype(np.float32)
    pixels[3, 5] = np.nan
    pixels[0, 0] = np.inf
    Image.fromarray(pixels, mode="F").save(tmp_path / "scene.tif")
    img = data.open_rgb(str(tmp_path / "scene.tif"))
    finite = np.isfinite(pixels)
    expected = (pixels - pixels[finite].min()) / (pixels[finite].max() - pixels[finite].min()) * 255
    got = np.asarray(img)[..., 0].astype(np.float64)
    assert img.info["no_data"] == 2 and got[3, 5] == got[0, 0] == 0  # filled with the minimum
    assert np.abs(got[finite] - expected[finite]).max() <= 1 and got.max() == 255  # stretched over finite pixels
    Image.fromarray(np.full((8, 8), np.nan, dtype=np.float32), mode="F").save(tmp_path / "void.tif")
    with pytest.raises(ValueError, match="no finite pixel"):
        data.open_rgb(str(tmp_path / "void.tif"))
    dataset = data.ImageDataset([str(tmp_path / "void.tif"), str(tmp_path / "scene.tif")], transform=T.ToTensor())
    assert dataset[0][2] == 1  # skipped as unreadable, the next file read
    printed = capsys.readouterr().out
    assert "skipping unreadable image" in printed and "void.tif" in printed
    assert f"{tmp_path / 'scene.tif'} has 2 non-finite (no-data) pixel(s), filled" in printed


def test_the_weighted_knn_votes_as_in_float64_at_any_temperature():
    """exp(similarity / 0.001) overflows float32: every vote was inf, and argmax gave class 0 to every test image."""
    torch.manual_seed(0)
    train, test, labels = torch.randn(200, 16), torch.randn(50, 16), torch.randint(0, 4, (200,))
    for temperature in (0.07, 0.01, 0.001):
        train64, test64 = F.normalize(train.double(), dim=1), F.normalize(test.double(), dim=1)
        similarity, nearest = (test64 @ train64.T).topk(20, dim=1)
        votes = torch.zeros(50, 4, dtype=torch.float64).scatter_add_(
            1, labels[nearest], (similarity / temperature).exp()
        )
        predicted = data.knn_predict(train, labels, test, 4, temperature=temperature)
        assert torch.equal(predicted, votes.argmax(1)), temperature
        assert len(set(predicted.tolist())) > 1, temperature


def test_hidden_files_and_macos_twins_are_no_images_of_any_dataset(tmp_path):
    make_image_folder(tmp_path / "ds", classes=2, per_class=2)
    for folder in (tmp_path / "ds" / "class0", tmp_path / "ds" / "__MACOSX" / "class0", tmp_path / "ds" / ".cache"):
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "._0.png").write_bytes(b"AppleDouble")
        (folder / ".hidden.jpg").write_bytes(b"not shown by ls")
    paths, _ = data.list_images([str(tmp_path / "ds")])
    assert sorted(os.path.relpath(p, tmp_path / "ds") for p in paths) == [
        os.path.join(f"class{c}", f"{i}.png") for c in range(2) for i in range(2)
    ]
    assert data.labeled_images(str(tmp_path / "ds"))[0] == paths  # the same for labeled datasets
