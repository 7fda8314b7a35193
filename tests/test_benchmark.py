"""tests/benchmark.py: one JSON line with the step, its compute floor and the loader-fed step, for every method.
Benchmarks report numbers; these tests check the report, never a timing."""

import json
import os

import pytest

import benchmark
from conftest import TINY_RESNET, TINY_SWIN, TINY_VIT, make_image_folder

RUNS = {
    "moco": ("moco.py", TINY_RESNET + ["--queue", "16"]),
    "gersp": ("gersp.py", TINY_RESNET + ["--queue", "16", "--natural", "synthetic"]),
    "pera": ("pera.py", TINY_VIT),
    "pera (dense baseline)": ("pera.py", TINY_VIT + ["--dense"]),
    "preco": ("preco.py", TINY_SWIN),
}


@pytest.mark.parametrize("name", RUNS)
def test_benchmark_prints_one_json_line_and_writes_nothing(name, tmp_path, capsys, monkeypatch):
    script, argv = RUNS[name]
    folder = make_image_folder(tmp_path / "images", classes=2, per_class=8)
    monkeypatch.chdir(tmp_path)  # the scripts' default --out is runs/<method>: nothing may appear
    benchmark.main([script, *argv, "--data", folder, "--steps", "1"])
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
    assert os.listdir(tmp_path) == ["images"]
