"""--benchmark N in every pre-training script: one JSON line with the step, its compute floor and the loader-fed step.
Benchmarks report numbers; these tests check the report, never a timing."""
import json

import pytest

import gersp
import moco
import pera
import preco
from conftest import TINY_RESNET, TINY_SWIN, TINY_VIT, make_image_folder

RUNS = {"moco": (moco, TINY_RESNET + ["--queue", "16"]),
        "gersp": (gersp, TINY_RESNET + ["--queue", "16", "--natural", "synthetic"]),
        "pera": (pera, TINY_VIT),
        "pera (dense baseline)": (pera, TINY_VIT + ["--dense"]),
        "preco": (preco, TINY_SWIN)}


@pytest.mark.parametrize("name", RUNS)
def test_benchmark_prints_one_json_line_and_writes_nothing(name, tmp_path, capsys):
    module, argv = RUNS[name]
    folder = make_image_folder(tmp_path / "images", classes=2, per_class=8)
    module.main(argv + ["--data", folder, "--benchmark", "1", "--out", str(tmp_path / "out")])
    lines = capsys.readouterr().out.strip().splitlines()
    report = json.loads(lines[-1])
    assert report["method"].startswith(name.split()[0]) and report["processes"] == 1 and report["device"] == "cpu"
    assert ("dense" in report["method"]) == ("dense" in name)
    for key in ("images_per_s", "step_s", "floor_s", "step_over_floor", "peak_mem_gb", "loader_images_per_s"):
        assert report[key] > 0, key
    images = report["batch_size"] * (2 if name == "gersp" else 1)  # GeRSP: as many natural images as RS ones
    # the report rounds images/s to 0.1: a tiny batch on a loaded machine gives about 1 image/s
    assert report["images_per_s"] == pytest.approx(images / report["step_s"], rel=0.01, abs=0.051)
    assert report["step_over_floor"] == pytest.approx(report["step_s"] / report["floor_s"], rel=0.01)
    assert not (tmp_path / "out").exists()
