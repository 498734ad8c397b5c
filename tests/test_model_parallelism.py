"""model-parallelism-flux.py, run as users run it: a tiny Flux end to end on the CPU, and plans for FLUX.1-dev."""

import json

import numpy as np
import pytest

from tests.conftest import ROOT, assert_clear_error, load_script, pixels, python, run

MODEL_PARALLEL = ROOT / "model-parallelism-flux.py"
FLUX1_DEV = ROOT / "tests" / "fixtures" / "flux1-dev"  # FLUX.1-dev's real config.json files, no weights
FAST = ["--height", "64", "--width", "64", "--num-inference-steps", "2", "--seed", "7"]


@pytest.fixture(scope="module")
def resident(tiny_flux, tmp_path_factory):
    """The tiny Flux made in one go, on the CPU: (image, stdout)."""
    out = tmp_path_factory.mktemp("resident") / "cat.png"
    return out, run(python(MODEL_PARALLEL, "--model", tiny_flux, "--output", out, *FAST)).stdout


@pytest.fixture(scope="module")
def script():
    """The script imported once, to run its command line in this process (each run in a subprocess would spend
    most of its time importing the libraries again)."""
    return load_script(MODEL_PARALLEL)


@pytest.fixture
def plan(script, monkeypatch, capsys):
    def plan(num_devices, memory):
        monkeypatch.setattr("sys.argv", ["model-parallelism-flux.py", "--plan", "--json", "--model", str(FLUX1_DEV),
                                         "--num-devices", str(num_devices), "--device-memory", memory])
        script.main()
        return json.loads(capsys.readouterr().out)  # exactly one JSON document: json.loads fails on anything else
    return plan


def test_tiny_flux_makes_an_image_on_the_cpu(resident):
    image, stdout = resident
    assert pixels(image).shape == (64, 64, 3)
    assert "made" in stdout and "s per step" in stdout and "peak memory: cpu" in stdout


def test_placement_of_every_component_is_printed(resident):
    _, stdout = resident
    for component in ("transformer", "text_encoder", "text_encoder_2", "vae"):
        assert f"  {component} " in stdout and "-> cpu" in stdout
    assert "memory in use: cpu" in stdout and "fits: yes" in stdout


def test_staged_run_with_the_same_seed_gives_the_same_image(resident, tiny_flux, tmp_path):
    out = tmp_path / "staged.png"
    stdout = run(python(MODEL_PARALLEL, "--model", tiny_flux, "--output", out, "--staged", *FAST)).stdout
    assert "text encoders loaded" in stdout
    assert np.array_equal(pixels(out), pixels(resident[0]))


@pytest.mark.parametrize("num_devices, memory", [(2, "24GiB"), (4, "12GiB")])
def test_flux1_dev_fits_balanced_on_the_devices_alone(plan, num_devices, memory):
    result = plan(num_devices, memory)
    assert result["fits"] and result["unplaced"] == 0
    assert sorted(result["devices"]) == [str(i) for i in range(num_devices)]  # no "cpu"
    assert set(result["placement"].values()) <= set(result["devices"])
    weights = list(result["devices"].values())
    assert max(weights) <= 1.25 * sum(weights) / len(weights)
    assert any(m.startswith("transformer.") for m in result["placement"])  # split layer by layer


def test_flux1_dev_does_not_fit_on_two_8_gib_devices(plan):
    result = plan(2, "8GiB")
    assert not result["fits"] and result["unplaced"] > 0


# --- bad input: one line saying what to do, a non-zero exit, no traceback ---


def test_an_unknown_model_says_how_to_log_in_and_that_schnell_is_not_gated():
    result = run(python(MODEL_PARALLEL, "--model", "nobody-here/no-such-model", "--plan"), check=False)
    assert_clear_error(result, "nobody-here/no-such-model", "hf auth login", "FLUX.1-schnell is not gated",
                       "--model PATH")


def test_a_size_the_model_cannot_take_names_the_multiple(tiny_flux, tmp_path):
    result = run(python(MODEL_PARALLEL, "--model", tiny_flux, "--height", "72", "--output", tmp_path / "x.png"),
                 check=False)
    assert_clear_error(result, "--height 72", "multiple of 16")
    assert not (tmp_path / "x.png").exists()


# --- the parts worth a unit test ---


def test_max_memory_with_one_size_applies_to_every_device(script):
    assert script.parse_memory("16GiB", [0, 1]) == {0: 16 * 2**30, 1: 16 * 2**30}


def test_max_memory_per_device_names_only_those_devices(script):
    assert script.parse_memory("0=10GiB, 1=16GiB,cpu=1GB", [0, 1, 2]) == {0: 10 * 2**30, 1: 16 * 2**30,
                                                                          "cpu": 10**9}


def test_max_memory_that_is_not_a_size_is_a_clear_error(script, capsys):
    with pytest.raises(SystemExit):
        script.parse_memory("lots", [0])
    assert capsys.readouterr().err.startswith("error: --max-memory lots")


def test_block_ranges_fold_consecutive_blocks_on_one_device(script):
    device_map = {"embed": 0, "blocks.0": 0, "blocks.1": 0, "blocks.2": 1, "norm": 1}
    assert script.block_ranges(device_map) == [("embed", 0), ("blocks.0-1", 0), ("blocks.2", 1), ("norm", 1)]
