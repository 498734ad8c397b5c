"""Memory modes of data-parallelism-accelerate.py: whole, model CPU offload, sequential CPU offload, and --no-t5.

The plan is checked on SD3.5-medium's real component configs (tests/fixtures/sd3.5-medium, no weights); the
offload itself on the tiny SD3 pipeline, on a GPU where there is one, and by simulation where there is none.
"""

import contextlib
import importlib
import json
import warnings
from types import SimpleNamespace
from unittest import mock

import numpy as np
import pytest
import torch
import transformers
from accelerate import init_empty_weights
from accelerate.utils import compute_module_sizes
from diffusers import DiffusionPipeline
from diffusers.pipelines import pipeline_utils

from tests.conftest import (DATA_PARALLEL, ROOT, accelerator, assert_clear_error, load_script, pixels, python,
                            read_manifest, run, run_main, torchrun)

SD35_MEDIUM = ROOT / "tests" / "fixtures" / "sd3.5-medium"  # the real model's config.json files, no weights
GiB = 2**30
FAST = ["--num-inference-steps", "2", "--height", "64", "--width", "64"]
PROMPTS = ["a red fox", "a lighthouse at night", "a bowl of ramen"]
TOLERANCE = 3  # of 255: rounding, as between one process and two in test_data_parallelism.py


@pytest.fixture(scope="module")
def script():
    return load_script(DATA_PARALLEL)


def plan(script, monkeypatch, capsys, *args):
    """What `--plan --json ARGS` prints, run in this process (the configs are read, no weights loaded)."""
    monkeypatch.setattr("sys.argv", [DATA_PARALLEL.name, "--plan", "--json", *map(str, args)])
    script.main()
    return json.loads(capsys.readouterr().out)


def sd35_sizes(script, monkeypatch, *args):
    monkeypatch.setattr("sys.argv", [DATA_PARALLEL.name, "--model", str(SD35_MEDIUM), *args])
    return script.weigh_pipeline(script.parse_args())


# --- The plan on SD3.5-medium's real configs: what 80, 24, 16, 12 and 4 GiB cards get ---

@pytest.mark.parametrize("gib, mode", [(80, "whole"), (24, "whole"), (16, "model"), (12, "model")])
def test_sd35_medium_plan_picks_the_fastest_mode_that_fits(script, monkeypatch, capsys, gib, mode):
    result = plan(script, monkeypatch, capsys, "--model", SD35_MEDIUM, "--device-memory", f"{gib}GiB")
    assert result["mode"] == mode and result["fits"] is True
    assert result["device_memory"] == gib * GiB
    assert result["weights"] == sum(result["components"].values())
    assert result["largest_component"] == result["components"]["text_encoder_3"]  # T5-XXL
    needs = result["needs"]
    # The mode is the first one, fastest first, whose peak fits this card, and each needs less than the one before.
    assert needs["whole"] > needs["model"] > needs["sequential"]
    assert needs["whole"] == result["weights"] + result["reserved_for_activations"]
    if mode == "whole":
        assert needs["whole"] <= gib * GiB
    else:
        assert needs["model"] <= gib * GiB < needs["whole"]
        # T5-XXL, the largest component, on the GPU while it encodes, with room for a text encoder's activations
        assert needs["model"] == result["components"]["text_encoder_3"] + GiB // 2
    assert result["ram_available"] is None  # a card this machine does not have: its RAM is not this machine's


def test_sd35_medium_on_a_4_gib_card_streams_layers(script, monkeypatch, capsys):
    result = plan(script, monkeypatch, capsys, "--model", SD35_MEDIUM, "--device-memory", "4GiB")
    assert (result["mode"], result["fits"]) == ("sequential", True)
    # T5-XXL alone (4.76 B parameters, 8.9 GiB) does not fit; its largest layer, the 32128 x 4096 token embedding
    # (0.25 GiB), does, with the 3 GiB kept for the activations of a 1024x1024 image.
    assert result["needs"]["sequential"] < 4 * GiB < result["needs"]["model"]
    assert result["needs"]["sequential"] >= 32128 * 4096 * 2 + result["reserved_for_activations"]


def test_a_card_that_cannot_hold_even_one_layer_with_the_activations_is_a_clear_error(script, monkeypatch, capsys,
                                                                                      tiny_sd3):
    monkeypatch.setattr("sys.argv", [DATA_PARALLEL.name, "--model", str(tiny_sd3)])
    args = script.parse_args()
    monkeypatch.setattr(script, "free_memory", lambda device: 2 * GiB)  # less than 3 GiB of activations
    with pytest.raises(SystemExit) as exit:
        script.memory_mode(args, torch.device("cuda", 1), {**SD35, "ram": 64 * GiB, "processes": 2}, True)
    assert exit.value.code == 1
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {tiny_sd3} does not fit on cuda:1 even layer by layer: "
                                               "that needs 3.75 GiB free, it has 2.00 GiB")


def test_sd35_medium_weighs_what_was_published(script, monkeypatch, capsys):
    """Cross-check with the published sizes: transformer ~2.5 B parameters (with its position-embedding buffer),
    T5-XXL encoder 4.76 B, CLIP-G 0.69 B, CLIP-L 0.12 B, VAE 0.08 B: ~16.3 GB in bfloat16."""
    components = plan(script, monkeypatch, capsys, "--model", SD35_MEDIUM, "--device-memory", "80GiB")["components"]
    billions = {name: b / 2 / 1e9 for name, b in components.items()}  # bfloat16: 2 bytes a parameter
    assert billions["transformer"] == pytest.approx(2.47, abs=0.03)
    assert billions["text_encoder_3"] == pytest.approx(4.76, abs=0.01)
    assert billions["text_encoder_2"] == pytest.approx(0.695, abs=0.005)
    assert billions["text_encoder"] == pytest.approx(0.124, abs=0.002)
    assert billions["vae"] == pytest.approx(0.084, abs=0.002)


def test_sd35_medium_without_t5_fits_whole_on_a_12_gib_card(script, monkeypatch, capsys):
    with_t5 = plan(script, monkeypatch, capsys, "--model", SD35_MEDIUM, "--device-memory", "12GiB")
    without = plan(script, monkeypatch, capsys, "--model", SD35_MEDIUM, "--device-memory", "12GiB", "--no-t5")
    assert "text_encoder_3" not in without["components"] and without["t5"] is False
    assert with_t5["weights"] - without["weights"] == with_t5["components"]["text_encoder_3"]
    assert (without["mode"], without["fits"]) == ("whole", True)


def test_float16_keeps_t5s_wo_layers_in_float32(script, monkeypatch, capsys):
    bf16 = plan(script, monkeypatch, capsys, "--model", SD35_MEDIUM, "--device-memory", "80GiB")["components"]
    fp16 = plan(script, monkeypatch, capsys, "--model", SD35_MEDIUM, "--device-memory", "80GiB", "--dtype",
                "float16")["components"]
    wo = 24 * 10240 * 4096  # T5-XXL: 24 blocks, each with a 10240 -> 4096 `wo` projection
    assert fp16["text_encoder_3"] - bf16["text_encoder_3"] == wo * 2  # 4 bytes instead of 2
    assert fp16["transformer"] == bf16["transformer"]


def test_larger_images_and_batches_keep_more_free_for_activations(script, monkeypatch, capsys):
    base = plan(script, monkeypatch, capsys, "--model", SD35_MEDIUM, "--device-memory", "16GiB")
    big = plan(script, monkeypatch, capsys, "--model", SD35_MEDIUM, "--device-memory", "16GiB", "--height", "2048",
               "--width", "2048", "--batch-size", "2")
    assert (base["height"], base["width"]) == (1024, 1024)  # the model's own size: 128 latents x 8
    assert big["reserved_for_activations"] == 8 * base["reserved_for_activations"]
    assert big["needs"]["model"] > base["needs"]["model"]


def test_the_plan_weighs_each_component_as_the_libraries_build_it(script, monkeypatch):
    """The plan's sizes are those of the models diffusers and transformers build on the meta device."""
    sizes = sd35_sizes(script, monkeypatch, "--plan", "--device-memory", "16GiB")
    index = DiffusionPipeline.load_config(SD35_MEDIUM)
    for name, size in sizes["components"].items():
        library, class_name = index[name]
        cls = getattr(importlib.import_module(library), class_name)
        with warnings.catch_warnings(action="ignore"):
            if library == "diffusers":  # what diffusers' from_pretrained builds before it loads the weights
                with init_empty_weights():
                    model = cls.from_config(cls.load_config(SD35_MEDIUM, subfolder=name))
            else:  # what transformers' from_pretrained builds (on torch's meta device: accelerate's
                # init_empty_weights would untie T5's embed_tokens from `shared`, and count them twice)
                config = transformers.AutoConfig.from_pretrained(SD35_MEDIUM, subfolder=name)
                with torch.device("meta"):
                    model = cls._from_config(config, dtype=torch.bfloat16)
        assert size == compute_module_sizes(model, dtype=torch.bfloat16)[""], name
    assert set(sizes["components"]) == {"transformer", "text_encoder", "text_encoder_2", "text_encoder_3", "vae"}


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_the_plan_weighs_what_from_pretrained_loads(script, monkeypatch, tiny_sd3, dtype):
    """The plan's bytes per component are the bytes of the weights from_pretrained really loads at each dtype
    (float16 included, where transformers keeps T5's `wo` layers in float32)."""
    monkeypatch.setattr("sys.argv", [DATA_PARALLEL.name, "--model", str(tiny_sd3), "--dtype", dtype])
    planned = script.weigh_pipeline(script.parse_args())["components"]
    pipeline = DiffusionPipeline.from_pretrained(tiny_sd3, dtype=getattr(torch, dtype))
    loaded = {name: sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])
              for name, module in pipeline.components.items() if isinstance(module, torch.nn.Module)}
    assert planned == loaded
    if dtype == "float16":
        assert pipeline.text_encoder_3.encoder.block[0].layer[1].DenseReluDense.wo.weight.dtype == torch.float32


# --- The choice itself ---

def sizes(**components_gib):
    """A pipeline of these components (GiB), 3 GiB of activations, 0.5 GiB of buffers, a 0.25 GiB largest layer."""
    return {"components": {name: int(g * GiB) for name, g in components_gib.items()}, "reserve": 3 * GiB,
            "buffers": GiB // 2, "largest_layer": GiB // 4}


SD35 = sizes(transformer=4.6, text_encoder_3=8.9, text_encoder_2=1.3, text_encoder=0.2, vae=0.2)  # 15.2 GiB


@pytest.mark.parametrize("gib, mode", [(24, "whole"), (18.5, "whole"), (18, "model"), (9.5, "model"), (9, "sequential"),
                                       (4, "sequential")])
def test_auto_picks_the_first_of_whole_model_sequential_that_fits(script, gib, mode):
    chosen = script.choose_memory_mode(SD35, int(gib * GiB))
    assert (chosen["mode"], chosen["fits"]) == (mode, True)


def test_nothing_fits_a_card_smaller_than_the_activations(script):
    chosen = script.choose_memory_mode(SD35, 3 * GiB)
    assert (chosen["mode"], chosen["fits"]) == ("sequential", False)


def test_a_text_encoder_needs_little_room_for_activations_besides_its_weights(script):
    needs = script.choose_memory_mode(SD35, 16 * GiB)["needs"]
    assert needs["model"] == int(8.9 * GiB) + script.TEXT_ENCODER_RESERVE  # T5 while it runs, not T5 + 3 GiB
    no_t5 = script.choose_memory_mode(sizes(transformer=4.6, text_encoder=0.2, vae=0.2), 16 * GiB)["needs"]
    assert no_t5["model"] == int(4.6 * GiB) + 3 * GiB  # the transformer while it denoises


def test_offloading_processes_each_hold_the_weights_in_system_ram(script):
    one = script.choose_memory_mode(SD35, 12 * GiB, ram=20 * GiB, processes=1)
    two = script.choose_memory_mode(SD35, 12 * GiB, ram=20 * GiB, processes=2)
    assert (one["mode"], one["fits"], one["ram_needed"]) == ("model", True, one["weights"])
    assert two["ram_needed"] == 2 * two["weights"] and two["fits"] is False  # 30.4 GiB of RAM, 20 free


def test_whole_on_the_gpu_needs_no_room_in_system_ram(script):
    chosen = script.choose_memory_mode(SD35, 24 * GiB, ram=8 * GiB, processes=4)
    assert (chosen["mode"], chosen["fits"]) == ("whole", True)


@pytest.mark.parametrize("offload, mode", [("none", "whole"), ("model", "model"), ("sequential", "sequential")])
def test_a_mode_asked_for_is_used_even_where_another_would_be_chosen(script, offload, mode):
    chosen = script.choose_memory_mode(SD35, 80 * GiB, offload)
    assert (chosen["mode"], chosen["fits"]) == (mode, True)
    assert script.choose_memory_mode(SD35, 12 * GiB, offload)["fits"] is (mode != "whole")


# --- Running, on the CPU ---

def test_plan_prints_the_modes_and_sizes_without_a_process_group(tmp_path):
    result = run_main(DATA_PARALLEL, "--plan", "--model", SD35_MEDIUM, "--device-memory", "12GiB", "--output-dir",
                      tmp_path / "out")
    assert result.returncode == 0 and not torch.distributed.is_initialized()
    lines = result.stdout.splitlines()
    assert lines[0].startswith(f"plan for {SD35_MEDIUM} in bfloat16, 1024x1024, batch 1, on a GPU with 12.00 GiB")
    assert any(line.split() == ["text_encoder_3", "8.87", "GiB"] for line in lines)
    assert lines[-1] == "  mode: model, fits: yes"
    assert not (tmp_path / "out").exists() and "Traceback" not in result.stderr  # nothing made, no folder


def test_plan_on_a_machine_without_a_gpu_uses_the_pipeline_whole_on_the_cpu(script, monkeypatch, capsys):
    if torch.accelerator.is_available():
        pytest.skip("this machine has a GPU")
    result = plan(script, monkeypatch, capsys, "--model", SD35_MEDIUM)
    assert (result["mode"], result["device"], result["dtype"]) == ("whole", "cpu", "float32")
    assert result["fits"] == (result["needs"]["whole"] <= result["device_memory"])


def test_no_t5_makes_images_without_t5_and_the_manifest_says_so(tiny_sd3, tmp_path):
    prompts = [arg for p in PROMPTS for arg in ("--prompt", p)]
    for folder, extra in ("t5", []), ("no-t5", ["--no-t5"]):  # in this process (tests/conftest.py: run_main)
        run_main(DATA_PARALLEL, "--model", tiny_sd3, "--output-dir", tmp_path / folder, *prompts, *FAST,
                 *extra, check=True)
    for with_t5, without in zip(read_manifest(tmp_path / "t5"), read_manifest(tmp_path / "no-t5")):
        assert (with_t5["t5"], without["t5"]) == (True, False)
        assert with_t5["memory"] == without["memory"] == "whole"  # the CPU holds the pipeline whole
        # Same seed and prompt; only T5's embeddings (zeros without it) differ: so do the pictures.
        difference = np.abs(pixels(tmp_path / "t5" / with_t5["file_name"])
                            - pixels(tmp_path / "no-t5" / without["file_name"]))
        assert difference.max() > 10 * TOLERANCE


def test_images_made_without_t5_are_not_mixed_with_images_made_with_it(tiny_sd3, tmp_path):
    out = tmp_path / "out"
    assert run_main(DATA_PARALLEL, "--model", tiny_sd3, "--output-dir", out, "--prompt", PROMPTS[0], *FAST,
                    "--no-t5").returncode == 0
    result = run_main(DATA_PARALLEL, "--model", tiny_sd3, "--output-dir", out, "--prompt", PROMPTS[0],
                      "--prompt", PROMPTS[1], *FAST)
    assert_clear_error(result, "was made with another t5", "--overwrite")


@pytest.mark.parametrize("args, message", [
    (["--no-t5"], "--no-t5 is for SD3 pipelines"),
    (["--json"], "add --plan"),
    (["--plan", "--device-memory", "lots"], "--device-memory lots: write a size like 12GiB"),
])
def test_bad_memory_options_get_one_clear_line(tiny_flux, args, message):
    assert_clear_error(run_main(DATA_PARALLEL, "--model", tiny_flux, *args), message)


def test_offload_without_a_gpu_says_it_needs_one(tiny_sd3):
    if torch.accelerator.is_available():
        pytest.skip("this machine has a GPU")
    result = run_main(DATA_PARALLEL, "--model", tiny_sd3, "--offload", "model")
    assert_clear_error(result, "--offload model needs a GPU")


class Stop(Exception):
    """Raised by a spy to end main() where the test has seen what it came for."""


class RankOfTwo:
    """Accelerate's PartialState as rank `rank` of 2 processes sees it, one GPU each (cuda:<rank>)."""

    def __init__(self, rank):
        self.device, self.process_index, self.num_processes = torch.device("cuda", rank), rank, 2
        self.is_main_process = rank == 0

    @contextlib.contextmanager
    def split_between_processes(self, items):
        yield items  # this rank's share: here, every prompt


@pytest.mark.parametrize("rank", [0, 1])
def test_model_offload_goes_to_this_processs_own_device_not_device_0(script, monkeypatch, capsys, tiny_sd3, tmp_path,
                                                                     rank):
    """main() as rank 0 and as rank 1 of two, each on a simulated 12 GiB GPU of its own, for a pipeline the size of
    SD3.5-medium: model offload it must be, and the offload call main() makes hooks every component to this
    process's own GPU. A spy on diffusers' enable_model_cpu_offload lets the call happen, records where the hooks
    put each component, and stops main() there (nothing touches a GPU before the pipeline runs, so none is needed)."""
    for name, value in {"WORLD_SIZE": 2, "LOCAL_WORLD_SIZE": 2, "RANK": rank, "LOCAL_RANK": rank}.items():
        monkeypatch.setenv(name, str(value))  # as the launcher sets them
    monkeypatch.setattr(torch.accelerator, "is_available", lambda: True)
    monkeypatch.setattr(pipeline_utils, "get_device", lambda: "cuda")  # diffusers' own look at the machine
    monkeypatch.setattr(script, "check_torch_can_use_the_gpus", lambda device: None)  # tests/test_gpu_machines.py
    monkeypatch.setattr(script, "check_launch", lambda args: None)
    monkeypatch.setattr(script, "form_the_group", lambda args: (RankOfTwo(rank), RankOfTwo(rank).device))
    # What the main process sends every rank: the images to make, (index, prompt); it is sent to itself as is.
    monkeypatch.setattr(script, "broadcast_object_list", lambda objects: [[(0, "a red fox")]] if rank else objects)
    monkeypatch.setattr(script, "gather_object", lambda objects: objects)
    monkeypatch.setattr(script, "free_memory", lambda device: 12 * GiB)
    monkeypatch.setattr(script, "JobProgress", mock.MagicMock())  # its thread would outlive main(), stopped early
    weigh = script.weigh_pipeline
    monkeypatch.setattr(script, "weigh_pipeline", lambda args: {**weigh(args), **SD35, "ram": 64 * GiB})
    hooked = {}
    offload = DiffusionPipeline.enable_model_cpu_offload

    def spy(pipeline, *args, **kwargs):
        offload(pipeline, *args, **kwargs)
        hooked.update({name: torch.device(module._hf_hook.execution_device) for name, module in
                       pipeline.components.items() if isinstance(module, torch.nn.Module)})
        hooked["pipeline"] = pipeline._execution_device
        raise Stop

    monkeypatch.setattr(DiffusionPipeline, "enable_model_cpu_offload", spy)
    monkeypatch.setattr("sys.argv", [DATA_PARALLEL.name, "--model", str(tiny_sd3), "--output-dir", str(tmp_path),
                                     "--prompt", "a red fox", "--dtype", "float32"])
    with pytest.raises(Stop):
        script.main()
    assert set(hooked) == {"transformer", "text_encoder", "text_encoder_2", "text_encoder_3", "vae", "pipeline"}
    assert set(hooked.values()) == {torch.device("cuda", rank)}
    out = capsys.readouterr().out.strip()
    if rank == 0:  # the main process says it, once for all
        assert out.startswith("memory: model CPU offload on cuda:0") and "--offload none turns it off" in out
    else:
        assert "memory:" not in out


def test_too_little_ram_for_every_process_to_offload_is_a_clear_error(tiny_sd3, script, monkeypatch, capsys):
    monkeypatch.setattr("sys.argv", [DATA_PARALLEL.name, "--model", str(tiny_sd3)])
    args = script.parse_args()
    monkeypatch.setattr(script, "free_memory", lambda device: 12 * GiB)
    with pytest.raises(SystemExit) as exit:
        script.memory_mode(args, torch.device("cuda", 1), {**SD35, "ram": 20 * GiB, "processes": 2}, True)
    assert exit.value.code == 1
    assert "2 processes offloading to their GPUs each keep a copy" in capsys.readouterr().err


# --- On a GPU (Intel XPU or NVIDIA): each mode makes the pictures the whole pipeline makes ---

def generate_on_gpu(tiny_sd3, out, *extra, launcher=python, n=1):
    prompts = [arg for p in PROMPTS for arg in ("--prompt", p)]
    args = ["--model", tiny_sd3, "--output-dir", out, *prompts, *FAST, *extra]
    result = run(launcher(DATA_PARALLEL, *args) if launcher is python else launcher(n, DATA_PARALLEL, *args))
    return read_manifest(out), result.stdout


@pytest.fixture(scope="module")
def whole_on_gpu(tiny_sd3, tmp_path_factory):
    out = tmp_path_factory.mktemp("whole")
    manifest, _ = generate_on_gpu(tiny_sd3, out, "--offload", "none")
    return out, manifest


@accelerator
def test_the_tiny_pipeline_fits_whole_on_a_gpu_by_itself(tiny_sd3, tmp_path, whole_on_gpu):
    manifest, stdout = generate_on_gpu(tiny_sd3, tmp_path)
    assert {r["memory"] for r in manifest} == {"whole"} and "memory:" not in stdout  # nothing to say
    assert {r["device"].split(":")[0] for r in manifest} == {torch.accelerator.current_accelerator().type}


@accelerator
@pytest.mark.parametrize("offload", ["model", "sequential"])
def test_offloaded_images_are_the_images_of_the_whole_pipeline(tiny_sd3, tmp_path, whole_on_gpu, offload):
    reference, reference_manifest = whole_on_gpu
    manifest, stdout = generate_on_gpu(tiny_sd3, tmp_path, "--offload", offload)
    assert {r["memory"] for r in manifest} == {offload}
    assert f"memory: {offload} CPU offload on" in stdout
    for r in manifest:
        difference = np.abs(pixels(tmp_path / r["file_name"]) - pixels(reference / r["file_name"])).max()
        assert difference <= TOLERANCE, f"{r['file_name']} differs by {difference} with --offload {offload}"


@accelerator
def test_no_t5_under_model_offload_on_a_gpu(tiny_sd3, tmp_path):
    manifest, _ = generate_on_gpu(tiny_sd3, tmp_path, "--offload", "model", "--no-t5")
    assert {(r["memory"], r["t5"]) for r in manifest} == {("model", False)}


@accelerator
def test_two_processes_offload_each_to_its_own_gpu(tiny_sd3, tmp_path, whole_on_gpu):
    if torch.accelerator.device_count() < 2:
        pytest.skip("needs two GPUs")
    reference, _ = whole_on_gpu
    manifest, _ = generate_on_gpu(tiny_sd3, tmp_path, "--offload", "model", launcher=torchrun, n=2)
    kind = torch.accelerator.current_accelerator().type
    assert [r["device"] for r in manifest] == [f"{kind}:0", f"{kind}:0", f"{kind}:1"]
    for r in manifest:
        assert np.abs(pixels(tmp_path / r["file_name"]) - pixels(reference / r["file_name"])).max() <= TOLERANCE


def test_a_free_memory_query_that_fails_counts_on_the_total_memory_in_one_line(script, monkeypatch, capsys):
    """Some Intel GPUs cannot say how much of their memory is free (torch raises): count on the total, and say so."""
    def cannot_tell(device):
        raise RuntimeError("The device (Intel(R) Arc(TM) A770 Graphics) doesn't support querying the available "
                           "free memory")
    monkeypatch.setattr(torch.accelerator, "get_memory_info", cannot_tell, raising=False)
    properties = SimpleNamespace(get_device_properties=lambda device: SimpleNamespace(total_memory=16 * GiB))
    monkeypatch.setattr(torch, "get_device_module", lambda device: properties)
    assert script.free_memory(torch.device("xpu", 1)) == 16 * GiB
    lines = capsys.readouterr().err.splitlines()
    assert lines == ["note: the free memory of xpu:1 cannot be read: counting on the total memory instead"]
