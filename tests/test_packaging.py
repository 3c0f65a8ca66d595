"""A non-editable install carries what the docs point at: the example configs and the GPU recipe; a
config is found by name from any directory."""

import os
import shutil
import subprocess
import sys
import zipfile

import pytest

from nosa.train.config import make_config, packaged_configs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("name", ["tiny_cpu", "tiny_cpu.yaml", "configs/tiny_cpu.yaml", "nosa/configs/tiny_cpu.yaml"])
def test_packaged_config_names_resolve_from_anywhere(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert make_config(name).out_dir == "runs/tiny_cpu"


def test_every_documented_config_is_packaged():
    assert {"tiny_cpu", "gpu_small", "llama_continue"} <= set(packaged_configs())
    for name in packaged_configs():
        make_config(name, init_path="/models/llama")  # each is valid (llama_continue needs its --init-path)


def test_the_wheel_holds_configs_and_recipes(tmp_path):
    source = tmp_path / "src"
    shutil.copytree(os.path.join(ROOT, "nosa"), source / "nosa", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(os.path.join(ROOT, name), source / name)
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                           str(tmp_path / "dist"), str(source)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    (wheel,) = (tmp_path / "dist").glob("nosa-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for name in ("tiny_cpu", "gpu_small", "llama_continue"):
        assert f"nosa/configs/{name}.yaml" in names
    assert "nosa/train/recipes/gpu_small.sh" in names
    assert "nosa/study/recipes/quality_h200.sh" in names  # the study recipe the docs point at
