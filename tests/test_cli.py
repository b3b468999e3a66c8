"""The command line: config errors stop early and name the key; help lists every stage."""

import subprocess
import sys

from themis_ray.pipeline import STAGES


def themis(*args):
    return subprocess.run([sys.executable, "-m", "themis_ray.cli", *args], capture_output=True, text=True, timeout=120)


def test_unknown_config_key_is_named_and_nothing_runs(tmp_path):
    result = themis("pipeline", "--config", "configs/quickstart.yaml", f"run_dir={tmp_path}", "label.no_such_knob=3")
    assert result.returncode == 2
    assert "no_such_knob" in result.stderr
    assert not any(tmp_path.iterdir())  # no stage started


def test_wrong_type_is_rejected():
    result = themis("pipeline", "--config", "configs/quickstart.yaml", "train.epochs=many")
    assert result.returncode == 2
    assert "epochs" in result.stderr


def test_missing_config_file():
    result = themis("pipeline", "--config", "configs/nope.yaml")
    assert result.returncode == 2
    assert "configs/nope.yaml" in result.stderr


def test_help_lists_every_stage():
    result = themis("--help")
    assert result.returncode == 0
    for stage in [*STAGES, "pipeline", "serve", "assets"]:
        assert stage in result.stdout
