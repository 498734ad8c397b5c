"""model-parallelism-flux.py, run as users run it: a tiny Flux end to end on the CPU, plans for FLUX.1-dev pinned to
what diffusers and Accelerate decide themselves, the GPU code paths simulated (meta-device models, faked free
memory), and tests on real GPUs where there are some."""

import copy
import importlib
import json
import os
import re
import subprocess
import types
from pathlib import Path

import diffusers
import numpy as np
import pytest
import torch
import transformers
from accelerate import infer_auto_device_map
from accelerate.utils import compute_module_sizes
from diffusers.models.model_loading_utils import _determine_device_map
from diffusers.pipelines.pipeline_loading_utils import ALL_IMPORTABLE_CLASSES, _get_final_device_map, _load_empty_model

from tests.conftest import ROOT, accelerator, assert_clear_error, load_script, pixels, python, run, run_main

MODEL_PARALLEL = ROOT / "model-parallelism-flux.py"
FLUX1_DEV = ROOT / "tests" / "fixtures" / "flux1-dev"  # FLUX.1-dev's real config.json files, no weights
FAST = ["--height", "64", "--width", "64", "--num-inference-steps", "2", "--seed", "7"]
CPU = ["--device", "cpu"]  # the CPU tests run on the CPU on purpose, alike on a machine with GPUs
GiB = 2**30
DEFAULT_PROMPT = "A cat holding a sign that says hello world"
DTYPES = ["bfloat16", "float16", "float32"]
# (devices, memory of each, --max-memory): unequal cards, either way round, small cards, one big card, and equal
# budgets given out of order.
BUDGETS = [(2, "24GiB", "0=23GiB,1=23.6GiB"), (2, "24GiB", "0=23.6GiB,1=23GiB"), (2, "24GiB", "0=16GiB,1=24GiB"),
           (4, "12GiB", None), (1, "80GiB", None), (2, "40GiB", "1=40GiB,0=40GiB")]


@pytest.fixture(scope="module")
def script():
    """The script imported once, to run its command line in this process (each run in a subprocess would spend
    most of its time importing the libraries again)."""
    return load_script(MODEL_PARALLEL)


@pytest.fixture
def main(script, monkeypatch, capsys):
    """Run the script's command line in this process: (stdout, stderr)."""
    def main(*argv):
        monkeypatch.setattr("sys.argv", ["model-parallelism-flux.py", *map(str, argv)])
        script.main()
        return capsys.readouterr()
    return main


@pytest.fixture
def plan(main):
    """The script's --plan --json for FLUX.1-dev on planned devices."""
    def plan(num_devices, memory, *extra):
        out = main("--plan", "--json", "--model", FLUX1_DEV, "--num-devices", num_devices, "--device-memory", memory,
                   *extra).out
        return json.loads(out)  # exactly one JSON document: json.loads fails on anything else
    return plan


def budget_args(max_memory, dtype="bfloat16"):
    return ["--dtype", dtype, *(["--max-memory", max_memory] if max_memory else [])]


@pytest.fixture
def recorded(monkeypatch, script):
    """Every pipeline the script loads, kept to look at its weights after the run."""
    pipelines, load = [], script.DiffusionPipeline.from_pretrained

    def from_pretrained(*args, **kwargs):
        pipelines.append(load(*args, **kwargs))
        return pipelines[-1]
    monkeypatch.setattr(script.DiffusionPipeline, "from_pretrained", from_pretrained)
    return pipelines


def printed_placement(stdout):
    """The placement the script printed after loading: [(module path, device)], one list per stage."""
    stages = stdout.split(" loaded (")[1:]
    return [[(name, device.split(" (")[0]) for name, device in re.findall(r"^  (\S+) +-> (.+)$", s, flags=re.M)]
            for s in stages]


def assert_printout_names_where_the_weights_are(stdout, pipeline):
    """Each printed row names the device of the first weight of that part: the one it is on, or "cpu" for weights
    Accelerate keeps on the CPU (the module shows them as "meta") and streams in."""
    rows = printed_placement(stdout)[-1]
    assert {name.split(".")[0] for name, _ in rows} == {n for n, m in pipeline.components.items()
                                                       if isinstance(m, torch.nn.Module)}
    for name, device in rows:
        component, _, key = name.partition(".")
        part = getattr(pipeline, component).get_submodule(re.sub(r"-\d+$", "", key)) if key else getattr(
            pipeline, component)
        tensor = next(iter(part.state_dict().values()), None) if not list(part.parameters()) else next(
            part.parameters())
        if tensor is None:
            continue
        assert device == ("cpu" if tensor.device.type == "meta" else str(tensor.device)), (name, device)


# --- the tiny Flux, end to end on the CPU ---


@pytest.fixture(scope="module")
def resident(tiny_flux, tmp_path_factory):
    """The tiny Flux made in one go, on the CPU: (image, stdout). One process, no launcher: main() in this process
    (tests/conftest.py: run_main; the README's commands run the script as a program)."""
    out = tmp_path_factory.mktemp("resident") / "cat.png"
    return out, run_main(MODEL_PARALLEL, "--model", tiny_flux, "--output", out, *FAST, *CPU, check=True).stdout


@pytest.mark.xdist_group("resident")  # one run of the fixture for the four
def test_tiny_flux_makes_an_image_on_the_cpu(resident):
    image, stdout = resident
    assert pixels(image).shape == (64, 64, 3)
    assert "made" in stdout and "s per step" in stdout and "peak memory: cpu" in stdout


@pytest.mark.xdist_group("resident")  # one run of the fixture for the four
def test_placement_of_every_component_is_printed(resident):
    _, stdout = resident
    assert sorted(name for name, _ in printed_placement(stdout)[0]) == ["text_encoder", "text_encoder_2",
                                                                       "transformer", "vae"]
    assert "memory in use: cpu" in stdout and "fits: yes" in stdout


@pytest.mark.xdist_group("resident")  # one run of the fixture for the four
def test_the_cpu_image_is_what_diffusers_makes_with_the_same_settings(resident, tiny_flux):
    """The oracle: FluxPipeline.from_pretrained called directly, the script's prompt, size, steps, guidance, T5
    length and seed (FAST's 7, in a CPU generator), in float32 as --dtype auto gives on the CPU."""
    difference = np.abs(pixels(resident[0]) - cpu_image(tiny_flux))
    assert difference.max() <= 2, difference.max()


def test_the_printed_placement_is_where_the_weights_are(script, recorded, monkeypatch, capsys, plan_tiny, tiny_flux,
                                                       tmp_path):
    """T5 split by the plan between two places this CPU-only machine has, the CPU and the disk (Accelerate keeps
    the disk's blocks in files, as it keeps a GPU's on the GPU): each printed row names the place its blocks were
    given, and each whole component the device its weights are on. The run stops once the placement is printed
    (the disk is no device to compute on, nor one a plan ever gives: it means "no room")."""
    given = {key: "cpu" if i < 3 else "disk"
             for i, key in enumerate(plan_tiny["stages"][0]["device_maps"]["text_encoder_2"])}
    assert set(given.values()) == {"cpu", "disk"}
    make_plan, load = script.make_plan, script.AutoModel.from_pretrained

    def split_t5(*args, **kwargs):
        plan = make_plan(*args, **kwargs)
        plan["stages"][0]["split"], plan["stages"][0]["device_maps"]["text_encoder_2"] = ["text_encoder_2"], given
        return plan
    monkeypatch.setattr(script, "make_plan", split_t5)
    monkeypatch.setattr(script.AutoModel, "from_pretrained", lambda *a, **kw: load(*a, **kw, offload_folder=tmp_path))

    def placed(*args, **kwargs):
        raise Placed
    monkeypatch.setattr(script, "no_fp64_remedy", placed)  # the first thing main() does after printing
    monkeypatch.setattr("sys.argv", ["model-parallelism-flux.py", "--model", str(tiny_flux), "--output",
                                     str(tmp_path / "x.png"), *FAST, *CPU])
    with pytest.raises(Placed):
        script.main()
    rows = printed_placement(capsys.readouterr().out)[-1]
    t5 = {name.removeprefix("text_encoder_2."): d for name, d in rows if name.startswith("text_encoder_2.")}
    assert {key: d for row, d in t5.items() for key in block_range_keys(row)} == given
    pipeline = recorded[-1]
    for name, device in rows:
        if "." not in name:  # a whole component
            assert device == next(getattr(pipeline, name).parameters()).device.type, name
    assert {name for name, _ in rows if "." not in name} == {"text_encoder", "transformer", "vae"}


class Placed(Exception):
    """Raised to stop a run once the pipeline is placed and the placement printed."""


def block_range_keys(row):
    """"encoder.block.0-1" -> ["encoder.block.0", "encoder.block.1"]; "shared" -> ["shared"]."""
    found = re.fullmatch(r"(.+)\.(\d+)-(\d+)", row)
    return [f"{found[1]}.{i}" for i in range(int(found[2]), int(found[3]) + 1)] if found else [row]


@pytest.mark.xdist_group("resident")  # one run of the fixture for the four
def test_staged_run_with_the_same_seed_gives_the_same_image(resident, tiny_flux, tmp_path):
    out = tmp_path / "staged.png"
    stdout = run_main(MODEL_PARALLEL, "--model", tiny_flux, "--output", out, "--staged", *FAST, *CPU, check=True).stdout
    assert "text encoders loaded" in stdout
    assert np.array_equal(pixels(out), pixels(resident[0]))


# --- FLUX.1-dev planned: balanced, fits as the libraries will load it ---


@pytest.mark.parametrize("num_devices, memory, max_memory", [
    (2, "24GiB", "0=23GiB,1=23.6GiB"), (2, "24GiB", "0=23.6GiB,1=23GiB"), (4, "12GiB", None)])
def test_flux1_dev_is_balanced_within_10_percent_on_the_devices_alone(plan, num_devices, memory, max_memory):
    result = plan(num_devices, memory, *budget_args(max_memory))
    assert result["fits"] and result["unplaced"] == 0
    assert sorted(result["devices"]) == [str(i) for i in range(num_devices)]  # no "cpu"
    weights = list(result["devices"].values())
    assert max(weights) <= 1.10 * sum(weights) / len(weights)
    for device, held in result["devices"].items():  # every device keeps its activation reserve
        assert held <= result["budgets"][device] - result["reserved_per_device"]
    assert any(m.startswith("transformer.") for m in result["placement"])  # split between its blocks


@pytest.mark.parametrize("max_memory", ["0=23GiB,1=23.6GiB", "0=23.6GiB,1=23GiB"])
def test_the_plan_command_with_two_unequal_budgets_fits_flux1_dev_balanced(max_memory):
    result = run_main(MODEL_PARALLEL, "--plan", "--json", "--model", FLUX1_DEV, "--num-devices", "2",
                      "--device-memory", "24GiB", "--max-memory", max_memory, check=True)
    plan = json.loads(result.stdout)
    weights = list(plan["devices"].values())
    assert plan["fits"] and "cpu" not in plan["devices"] and max(weights) <= 1.10 * sum(weights) / len(weights)


def test_flux1_dev_does_not_fit_on_two_8_gib_devices(plan):
    result = plan(2, "8GiB")
    assert not result["fits"] and result["unplaced"] > 0


def test_a_plan_that_fits_only_staged_says_so(main):
    stdout = main("--plan", "--model", FLUX1_DEV, "--num-devices", 2, "--device-memory", "16GiB").out
    assert "fits: NO; it fits with --staged" in stdout


# --- the plan is the libraries' own decision, for the same arguments ---


def diffusers_balanced(max_memory, dtype, passed=None, names=None):
    """What DiffusionPipeline.from_pretrained(FLUX.1-dev, device_map="balanced", max_memory=...) decides; with
    `names`, for a pipeline of those components alone (the others passed as None, which from_pretrained leaves out)."""
    config = diffusers.DiffusionPipeline.load_config(FLUX1_DEV)
    init_dict = {k: tuple(v) for k, v in diffusers.FluxPipeline.extract_init_dict(config)[0].items() if v[0]
                 and (names is None or k in names or not k.startswith(("text_encoder", "transformer", "vae")))}
    return _get_final_device_map(device_map="balanced", pipeline_class=diffusers.FluxPipeline,
                                 passed_class_obj=passed or {}, init_dict=init_dict,
                                 library=importlib.import_module("diffusers"), max_memory=max_memory,
                                 dtype=getattr(torch, dtype), cached_folder=str(FLUX1_DEV))


def diffusers_empty_model(name, dtype):
    """The component as diffusers builds it on the meta device to place it."""
    library, class_name = diffusers.DiffusionPipeline.load_config(FLUX1_DEV)[name]
    return _load_empty_model(library_name=library, class_name=class_name, importable_classes=ALL_IMPORTABLE_CLASSES,
                             pipelines=diffusers.pipelines, is_pipeline_module=False, name=name,
                             dtype=getattr(torch, dtype), cached_folder=str(FLUX1_DEV))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_devices, memory, max_memory", BUDGETS)
def test_whole_components_go_where_diffusers_balanced_puts_them(script, plan, models_built_once, num_devices, memory,
                                                                max_memory, dtype):
    result = plan(num_devices, memory, *budget_args(max_memory, dtype))
    usable = {int(d): b - result["reserved_per_device"] for d, b in result["budgets"].items()}
    max_memory_given = {d: b for d, b in usable.items() if b > 0}
    decided = diffusers_balanced(max_memory_given, dtype)
    components = {"transformer", "text_encoder", "text_encoder_2", "vae"}
    # Left to the CPU (or left out: diffusers' map keeps one "cpu" component only): the script splits them instead
    split = {name for name in components if decided.get(name, "cpu") == "cpu"}
    for name in split:
        assert name not in result["placement"] and any(k.startswith(name + ".") for k in result["placement"])
    # ...and hands them over as loaded, which diffusers sizes by their real size when it places the rest.
    decided = diffusers_balanced(max_memory_given, dtype, passed={n: models_built_once(n, dtype) for n in split})
    for name in components - split:
        assert result["placement"][name] == str(decided.get(name, "cpu")), (name, decided)


def handed_over(name, dtype):
    """A component as the script hands it to the pipeline: loaded, so T5's `shared` and `encoder.embed_tokens` are
    one tensor (transformers ties them at load), not diffusers' untied empty model."""
    model = diffusers_empty_model(name, dtype)
    if isinstance(model, transformers.PreTrainedModel):
        model.tie_weights()
    return model


@pytest.fixture(scope="module")
def built_once():
    """What the tests of FLUX.1-dev's plans build and measure, kept for the whole module: diffusers' empty models,
    the script's empty models, the components as handed over, and every module size computed (each costs 0.1-0.3 s
    on FLUX.1-dev's 12 billion parameters, and none depends on the budget)."""
    return {"diffusers": {}, "script": {}, "handed": {}, "sizes": {}}


@pytest.fixture
def models_built_once(script, monkeypatch, built_once):
    """The script, diffusers and Accelerate given the models and sizes of built_once instead of building and
    measuring them again: the plans and the libraries' decisions are still made, each time, from them. Returns
    handed(name, dtype): the component as the script hands it to diffusers, built once."""
    from diffusers.pipelines import pipeline_loading_utils
    load_empty_model = pipeline_loading_utils._load_empty_model

    def cached(**kwargs):  # diffusers' own empty models (it never changes them: passed ones are handed_over's)
        key = (kwargs["name"], kwargs["dtype"])
        if key not in built_once["diffusers"]:
            built_once["diffusers"][key] = load_empty_model(**kwargs)
        return built_once["diffusers"][key]
    monkeypatch.setattr(pipeline_loading_utils, "_load_empty_model", cached)
    monkeypatch.setattr(script, "compute_module_sizes", memoize_module_sizes(monkeypatch, built_once["sizes"]))
    empty_model = script.empty_model

    def reused(model, name, *rest):  # built once; T5, which the plan ties in place, given back untied each time
        key = (model, name, *rest)
        if key not in built_once["script"]:
            module = empty_model(model, name, *rest)
            built_once["script"][key] = module, [(m, n, p) for m in module.modules() for n, p in m._parameters.items()]
        module, parameters = built_once["script"][key]
        for submodule, parameter_name, parameter in parameters:  # as built: every parameter its own again
            submodule._parameters[parameter_name] = parameter
        return module
    monkeypatch.setattr(script, "empty_model", reused)

    def handed(name, dtype):
        if (name, dtype) not in built_once["handed"]:
            built_once["handed"][name, dtype] = handed_over(name, dtype)
        return built_once["handed"][name, dtype]
    return handed


def memoize_module_sizes(monkeypatch, memo):
    """compute_module_sizes as the script, diffusers and Accelerate call it, each answer computed once: by model,
    the arguments and, for a transformers model (T5, whose embedding the plan ties in place), its tensors: tied,
    it counts one fewer. No model is cast in place here. The models are kept in `memo`, so no id is reused."""
    from accelerate.utils import modeling
    from diffusers.models import model_loading_utils
    from diffusers.pipelines import pipeline_loading_utils

    compute = modeling.compute_module_sizes

    def memoized(model, dtype=None, special_dtypes=None, buffers_only=False):
        tensors = tuple(map(id, model.parameters())) if isinstance(model, transformers.PreTrainedModel) else ()
        key = (id(model), tensors, str(dtype), tuple(sorted((special_dtypes or {}).items())), buffers_only)
        if key not in memo:
            memo[key] = (model, compute(model, dtype=dtype, special_dtypes=special_dtypes, buffers_only=buffers_only))
        return copy.copy(memo[key][1])
    for module in (modeling, pipeline_loading_utils, model_loading_utils):
        if hasattr(module, "compute_module_sizes"):
            monkeypatch.setattr(module, "compute_module_sizes", memoized)
    return memoized


@pytest.mark.parametrize("staged", [False, True], ids=["resident", "staged"])
@pytest.mark.parametrize("num_devices", [2, 3, 4])
def test_diffusers_places_the_rest_as_planned_when_split_components_are_handed_to_it(
        script, models_built_once, num_devices, staged):
    """Over budgets of 6-26 GiB in steps of 0.25 GiB, each device 0.1 GiB more than the one before (3 devices of
    11.75, 11.85 and 11.95 GiB among them, where T5 fits on a device as loaded but not as diffusers' empty model):
    where the plan splits a component, diffusers' own "balanced" decision, given the split components as loaded,
    puts every other component of the stage where the plan put it. The models are built and sized once for all
    the cases (models_built_once): the plan and diffusers' decision are still made at every budget."""
    components = diffusers.DiffusionPipeline.load_config(FLUX1_DEV)
    args = types.SimpleNamespace(model=str(FLUX1_DEV), height=1024, width=1024, staged=staged)
    checked = 0
    for hundredths in range(600, 2601, 25):
        budgets = {d: (hundredths + 10 * d) * GiB // 100 for d in range(num_devices)}
        result = script.make_plan(args, components, budgets, torch.bfloat16)
        for stage in result["stages"]:
            if not stage["split"]:
                continue
            passed = {n: models_built_once(n, "bfloat16") for n in stage["split"]}
            decided = diffusers_balanced(stage["max_memory"], "bfloat16", passed=passed, names=stage["names"])
            for name in set(stage["names"]) - set(stage["split"]):
                assert stage["device_maps"][name] == {"": decided.get(name, "cpu")}, (budgets, name, decided)
            checked += 1
    assert checked >= 20


# Budgets of several devices where the transformer fits on none whole, in every dtype (2 x 40 GiB holds it whole in
# 16 bits): BUDGETS' equal budgets out of order, on 24 GiB cards instead.
SPLIT_BUDGETS = [b for b in BUDGETS if b[0] > 1 and b[1] != "40GiB"] + [(2, "24GiB", "1=22GiB,0=22GiB")]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_devices, memory, max_memory", SPLIT_BUDGETS)
def test_a_split_component_goes_where_the_libraries_would_split_it(script, monkeypatch, models_built_once, num_devices,
                                                                  memory, max_memory, dtype):
    """Each block where the libraries would put it, given the per-device memory the script hands over: for the
    transformer, diffusers' own from_pretrained(device_map="sequential", max_memory=...); for T5, Accelerate's
    infer_auto_device_map with its `wo` weights in float32 under float16, as transformers loads them.
    (transformers' own device_map="sequential" would place T5 differently: its own copy of the algorithm leaves no
    room for the largest layer on device 0; the script hands T5 the device map itself, so it loads as planned.)"""
    stages, plan_stage = [], script.plan_stage
    monkeypatch.setattr(script, "plan_stage", lambda *a: stages.append(plan_stage(*a)) or stages[-1])
    monkeypatch.setattr("sys.argv", ["x", "--plan", "--json", "--model", str(FLUX1_DEV), "--num-devices",
                                     str(num_devices), "--device-memory", memory, *budget_args(max_memory, dtype)])
    script.main()
    checked = 0
    for stage in stages:
        for name in stage["split"]:
            # diffusers' empty model; T5 tied as transformers loads it (`shared` and `encoder.embed_tokens` one tensor)
            model, room = models_built_once(name, dtype), dict(stage["room"][name])
            if name == "transformer":
                decided = _determine_device_map(model, "sequential", room, getattr(torch, dtype), [])
            else:
                kept = {n: torch.float32 for n, _ in model.named_parameters() if ".wo." in n and dtype == "float16"}
                decided = infer_auto_device_map(model, max_memory=room, no_split_module_classes=model._no_split_modules,
                                                dtype=getattr(torch, dtype), special_dtypes=kept)
            assert stage["device_maps"][name] == decided, name
            assert len(set(decided.values())) > 1, (name, decided)  # a real split, over several devices
            checked += 1
    assert "transformer" in stages[0]["split"] and checked >= 1


@pytest.mark.parametrize("dtype", DTYPES)
def test_component_sizes_are_diffusers_empty_model_sizes_as_loaded(plan, dtype):
    components = plan(1, "200GiB", "--dtype", dtype)["components"]
    for name, planned in components.items():
        model = diffusers_empty_model(name, dtype)
        expected = compute_module_sizes(model, dtype=getattr(torch, dtype))[""]
        if name == "text_encoder_2":  # as loaded: its embedding is one tensor, `wo` stays float32 under float16
            expected -= compute_module_sizes(model, dtype=getattr(torch, dtype))["encoder.embed_tokens"]
            if dtype == "float16":
                expected += 2 * sum(p.numel() for n, p in model.named_parameters() if ".wo." in n)
        assert planned == expected, name


def test_float32_t5_is_twice_bfloat16(plan):
    bfloat16 = plan(1, "200GiB", "--dtype", "bfloat16")["components"]["text_encoder_2"]
    float32 = plan(1, "200GiB", "--dtype", "float32")["components"]["text_encoder_2"]
    assert float32 == 2 * bfloat16 and bfloat16 > 8 * GiB


@pytest.mark.parametrize("dtype", DTYPES)
def test_the_meta_t5_has_the_dtypes_of_a_real_load(script, tiny_flux, dtype):
    real = diffusers.AutoModel.from_pretrained(str(tiny_flux), subfolder="text_encoder_2", dtype=getattr(torch, dtype))
    meta = script.empty_model(tiny_flux, "text_encoder_2", "transformers", "T5EncoderModel", getattr(torch, dtype))
    meta.tie_weights()  # as the plan does before it splits or sizes it
    assert {n: p.dtype for n, p in meta.named_parameters()} == {n: p.dtype for n, p in real.named_parameters()}


@pytest.mark.parametrize("component", ["transformer", "text_encoder_2"])
def test_a_planned_split_is_a_device_map_from_pretrained_takes(script, plan_tiny, component, tiny_flux, tmp_path):
    """The keys accelerate gives the meta model are the real model's: from_pretrained loads each part where the map
    says, here its first half on the CPU and the rest offloaded to disk (two places a CPU-only machine has, where a
    GPU machine has several GPUs): a key that named no part, or left one out, would not load as mapped."""
    device_map = plan_tiny["stages"][0]["device_maps"][component]
    assert len(device_map) > 1
    given = {key: "cpu" if i < len(device_map) // 2 else "disk" for i, key in enumerate(device_map)}
    model = diffusers.AutoModel.from_pretrained(str(tiny_flux), subfolder=component, device_map=given,
                                                offload_folder=tmp_path)
    assert model.hf_device_map == given
    for name, parameter in model.named_parameters():
        where = [d for key, d in given.items() if name == key or name.startswith(key + ".")]
        assert where and parameter.device.type == {"cpu": "cpu", "disk": "meta"}[where[0]], (name, where)


@pytest.fixture
def plan_tiny(script, tiny_flux):
    """The tiny Flux planned on 8 devices so small that the transformer and T5 are split."""
    args = types.SimpleNamespace(model=str(tiny_flux), height=64, width=64, staged=False)
    components = diffusers.DiffusionPipeline.load_config(tiny_flux)
    return script.make_plan(args, components, dict.fromkeys(range(8), 12 * 2**20 + 80 * 2**10), torch.float32)


# --- the GPU code paths, simulated on the CPU ---


@pytest.fixture
def two_gpus(monkeypatch):
    """Two Intel GPUs of 24 GiB with 22 and 23 GiB free, as torch reports them (torch.xpu.mem_get_info, which
    Accelerate's get_max_memory reads), on this CPU-only machine: the script's own reading of them is under test."""
    import accelerate.utils.modeling

    free = {0: 22 * GiB, 1: 23 * GiB}
    monkeypatch.setattr(accelerate.utils.modeling, "is_xpu_available", lambda *a, **k: True)
    monkeypatch.setattr(torch.xpu, "device_count", lambda: 2)
    monkeypatch.setattr(torch.xpu, "mem_get_info", lambda i=None: (free[torch.device("xpu", i).index], 24 * GiB))
    monkeypatch.setattr(torch.xpu, "get_device_properties", lambda i=None: types.SimpleNamespace(total_memory=24 * GiB))
    tensor = torch.tensor  # Accelerate's "is it usable" probe, torch.tensor(0, device=xpu:i), made on the CPU
    monkeypatch.setattr(torch, "tensor", lambda data, *a, device=None, **k: tensor(
        data, *a, device=None if device is not None and torch.device(device).type == "xpu" else device, **k))
    monkeypatch.setattr(torch.accelerator, "is_available", lambda: True)
    monkeypatch.setattr(torch.accelerator, "device_count", lambda: 2)
    monkeypatch.setattr(torch.accelerator, "current_accelerator", lambda *a: torch.device("xpu"))
    monkeypatch.setattr(torch.xpu, "is_bf16_supported", lambda including_emulation=True: True)


def test_free_memory_of_the_devices_present_is_the_budget(two_gpus, main):
    result = json.loads(main("--plan", "--json", "--model", FLUX1_DEV).out)
    assert result["budgets"] == {"0": 22 * GiB, "1": 23 * GiB} and result["fits"]


def test_cpu_in_max_memory_adds_the_cpu_to_the_gpus(two_gpus, main):
    result = json.loads(main("--plan", "--json", "--model", FLUX1_DEV, "--max-memory", "cpu=32GiB").out)
    assert result["budgets"] == {"0": 22 * GiB, "1": 23 * GiB, "cpu": 32 * GiB}
    assert {"0", "1"} <= set(result["devices"])  # the GPUs still hold the weights


def test_weights_on_the_cpu_are_announced(main):
    stdout = main("--plan", "--model", FLUX1_DEV, "--num-devices", 2, "--device-memory", "16GiB", "--max-memory",
                  "cpu=32GiB").out
    assert "fits: yes" in stdout and re.search(r"NOTE: \d+\.\d+ GiB of weights on the CPU", stdout)
    assert re.search(r"transformer\.single_transformer_blocks\.\S+ +-> cpu", stdout)


def test_a_failing_free_memory_query_falls_back_to_total_memory_in_one_line(monkeypatch, script, main):
    """Intel GPUs whose torch.xpu.mem_get_info raises: accelerate's get_max_memory() finds no device at all."""
    import accelerate.utils.modeling

    def mem_get_info(device):
        raise RuntimeError("The device (Intel(R) Graphics) doesn't support querying the available free memory")
    monkeypatch.setattr(accelerate.utils.modeling, "is_xpu_available", lambda *a, **k: True)
    monkeypatch.setattr(torch.xpu, "device_count", lambda: 2)
    monkeypatch.setattr(torch.xpu, "mem_get_info", mem_get_info)
    monkeypatch.setattr(torch.xpu, "get_device_properties", lambda i=None: types.SimpleNamespace(
        total_memory=24 * GiB, has_bfloat16_conversions=True))
    monkeypatch.setattr(torch.accelerator, "is_available", lambda: True)
    monkeypatch.setattr(torch.accelerator, "device_count", lambda: 2)
    monkeypatch.setattr(torch.accelerator, "current_accelerator", lambda *a: torch.device("xpu"))
    simulate_usable_devices(monkeypatch, "xpu", usable={0, 1})
    assert not [d for d in accelerate.utils.get_max_memory() if d != "cpu"]  # the library finds no device
    captured = main("--plan", "--json", "--model", FLUX1_DEV)
    assert json.loads(captured.out)["budgets"] == {"0": 24 * GiB, "1": 24 * GiB}
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("note: the free memory of xpu:0, xpu:1 cannot be read")


# --- the script itself ---


@pytest.mark.parametrize("staged", [False, True], ids=["resident", "staged"])
def test_main_places_the_pipeline_with_the_libraries_balanced_load(monkeypatch, loads, tiny_flux, tmp_path, staged):
    """The calls main() makes, observed as it runs: the pipeline (with --staged, each stage, the other's components
    left out) loaded by diffusers with device_map="balanced" and the memory the user gave less the activations'
    reserve; with --staged, the prompt encoded by the first stage with the T5 length asked."""
    encoded, encode_prompt = [], diffusers.FluxPipeline.encode_prompt
    monkeypatch.setattr(diffusers.FluxPipeline, "encode_prompt",
                        lambda self, **kwargs: encoded.append((set(self.components), kwargs)) or encode_prompt(
                            self, **kwargs))
    run_main(MODEL_PARALLEL, "--model", tiny_flux, "--output", tmp_path / "x.png", *FAST, *CPU,
             "--max-memory", "cpu=1GiB", "--max-sequence-length", "64", *(["--staged"] if staged else []),
             check=True)
    stages = [{}] if not staged else [{"transformer": None, "vae": None}, {
        "text_encoder": None, "text_encoder_2": None, "tokenizer": None, "tokenizer_2": None}]
    assert [args for args, _, _ in loads] == [(str(tiny_flux),)] * len(stages)
    for (_, kwargs, _), left_out in zip(loads, stages, strict=True):
        assert kwargs == {"device_map": "balanced", "max_memory": {"cpu": GiB - 3 * GiB * 64 * 64 // 1024**2},
                          "dtype": torch.float32, **left_out}
    if staged:  # the text encoders' stage encodes; the pipeline of the second stage is given the embeddings
        assert len(encoded) == 2 and encoded[0][1]["max_sequence_length"] == 64
        assert encoded[0][1]["prompt"] == DEFAULT_PROMPT and encoded[1][1]["prompt_embeds"] is not None
        assert loads[0][2].text_encoder_2 is not None and loads[1][2].text_encoder_2 is None
    assert pixels(tmp_path / "x.png").shape == (64, 64, 3)


def test_the_script_calls_no_private_library_function():
    found = subprocess.run(["grep", "-n", r"import _\|\._[a-z][a-z0-9_]*(", MODEL_PARALLEL], capture_output=True,
                           text=True)  # `_name(`, not a dunder such as super().__init__()
    assert found.stdout == ""


# --- bad input: one line saying what to do, a non-zero exit, no traceback ---


def test_an_unknown_model_says_how_to_log_in_and_that_schnell_is_not_gated():
    result = run(python(MODEL_PARALLEL, "--model", "nobody-here/no-such-model", "--plan"), check=False)
    assert_clear_error(result, "nobody-here/no-such-model", "hf auth login", "FLUX.1-schnell is not gated",
                       "--model PATH")


def test_a_size_the_model_cannot_take_names_the_multiple(tiny_flux, tmp_path):
    result = run_main(MODEL_PARALLEL, "--model", tiny_flux, "--height", "72", "--output", tmp_path / "x.png")
    assert_clear_error(result, "--height 72", "multiple of 16")
    assert not (tmp_path / "x.png").exists()


def test_max_memory_naming_a_device_that_is_not_there_is_a_clear_error():
    result = run_main(MODEL_PARALLEL, "--plan", "--model", FLUX1_DEV, "--num-devices", "2", "--device-memory",
                      "24GiB", "--max-memory", "2=10GiB")
    assert_clear_error(result, "--max-memory names device 2")


@pytest.fixture
def loads(monkeypatch):
    """Every weight load the script asks the libraries for (pipelines and single components): (args, kwargs, what
    was loaded)."""
    calls = []
    for cls in (diffusers.DiffusionPipeline, diffusers.AutoModel):
        load = cls.from_pretrained

        def from_pretrained(*args, _load=load, **kwargs):
            calls.append((args, kwargs, _load(*args, **kwargs)))
            return calls[-1][2]
        monkeypatch.setattr(cls, "from_pretrained", from_pretrained)
    return calls


def test_a_run_that_does_not_fit_stops_before_loading_anything(monkeypatch, loads, tiny_flux, tmp_path):
    """A CPU with 32 KiB free beyond the activations' reserve (the tiny Flux's weights are hundreds of KiB): the
    plan says it does not fit, and the run stops there, with no weight loaded and no image written."""
    import psutil

    reserve = 3 * GiB * 64 * 64 // 1024**2
    monkeypatch.setattr(psutil, "virtual_memory", lambda: types.SimpleNamespace(available=reserve + 32 * 2**10))
    result = run_main(MODEL_PARALLEL, "--model", tiny_flux, "--output", tmp_path / "x.png", *FAST, *CPU)
    assert_clear_error(result, f"{tiny_flux} does not fit", "cpu=SIZE")
    assert result.returncode == 1 and "fits: NO" in result.stdout
    assert loads == [] and list(tmp_path.iterdir()) == []


def test_a_model_that_is_not_flux_is_refused_before_anything_loads(loads, tiny_sd3, tmp_path):
    result = run_main(MODEL_PARALLEL, "--model", tiny_sd3, "--output", tmp_path / "x.png", *FAST, *CPU)
    assert_clear_error(result, "is a StableDiffusion3Pipeline", "for FLUX.1 pipelines")
    assert loads == [] and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("flag, value, expected", [
    ("--max-sequence-length", "513", "FLUX.1's T5 takes at most 512 tokens"),
    ("--num-inference-steps", "0", "--num-inference-steps must be a positive number, not 0"),
    ("--num-inference-steps", "-2", "--num-inference-steps must be a positive number, not -2"),
    ("--height", "0", "--height must be a positive number, not 0"),
    ("--width", "-64", "--width must be a positive number, not -64"),
    ("--max-sequence-length", "0", "--max-sequence-length must be a positive number, not 0"),
])
def test_an_impossible_number_is_a_clear_error_before_anything_loads(loads, tiny_flux, tmp_path, flag, value,
                                                                     expected):
    result = run_main(MODEL_PARALLEL, "--model", tiny_flux, "--output", tmp_path / "x.png", *FAST, *CPU, flag, value)
    assert_clear_error(result, expected)
    assert loads == [] and list(tmp_path.iterdir()) == []


def test_an_output_inside_a_file_is_refused_before_anything_loads(loads, tiny_flux, tmp_path):
    (tmp_path / "file").write_text("not a folder")
    result = run_main(MODEL_PARALLEL, "--model", tiny_flux, "--output", tmp_path / "file" / "x.png", *FAST, *CPU)
    assert_clear_error(result, f"--output {tmp_path / 'file' / 'x.png'}: cannot create its folder")
    assert loads == [] and (tmp_path / "file").read_text() == "not a folder"


def test_an_output_in_a_folder_that_is_not_writable_is_refused_before_anything_loads(monkeypatch, loads, tiny_flux,
                                                                                      tmp_path):
    """A read-only folder, as os.access reports it (this process may be root, which writes anywhere)."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode, **kw: False if Path(path) == folder and mode & os.W_OK
                        else access(path, mode, **kw))
    result = run_main(MODEL_PARALLEL, "--model", tiny_flux, "--output", folder / "x.png", *FAST, *CPU)
    assert_clear_error(result, f"--output {folder / 'x.png'}: its folder is not writable")
    assert loads == [] and list(folder.iterdir()) == []


# --- the parts worth a unit test ---


def test_max_memory_with_one_size_applies_to_every_device(script):
    assert script.parse_memory("16GiB", [0, 1]) == {0: 16 * GiB, 1: 16 * GiB}


def test_max_memory_per_device_names_only_those_devices(script):
    assert script.parse_memory("0=10GiB, 1=16GiB,cpu=1GB", [0, 1, 2]) == {0: 10 * GiB, 1: 16 * GiB, "cpu": 10**9}


def test_max_memory_that_is_not_a_size_is_a_clear_error(script, capsys):
    with pytest.raises(SystemExit):
        script.parse_memory("lots", [0])
    assert capsys.readouterr().err.startswith("error: --max-memory lots")


def test_block_ranges_fold_consecutive_blocks_on_one_device(script):
    device_map = {"embed": 0, "blocks.0": 0, "blocks.1": 0, "blocks.2": 1, "norm": 1}
    assert script.block_ranges(device_map) == [("embed", 0), ("blocks.0-1", 0), ("blocks.2", 1), ("norm", 1)]


# --- on real GPUs (Intel XPU or NVIDIA CUDA): skipped where there are none ---


def tiny_budget(tiny_flux, devices, fraction):
    """--max-memory for the tiny Flux at 64x64 in float32: each of `devices` may hold `fraction` of its weights
    beyond the activations' reserve; every other device present holds nothing."""
    plan = json.loads(run(python(MODEL_PARALLEL, "--plan", "--json", "--model", tiny_flux, "--dtype", "float32",
                                 "--height", "64", "--width", "64")).stdout)
    each = plan["reserved_per_device"] + int(sum(plan["components"].values()) * fraction)
    return ",".join(f"{d}={each // 1024 if d in devices else 0}KiB" for d in range(torch.accelerator.device_count()))


def cpu_image(tiny_flux):
    """The tiny Flux's image made on the CPU with the script's settings, as the script makes it on a CPU."""
    pipeline = diffusers.FluxPipeline.from_pretrained(tiny_flux, dtype=torch.float32)
    return np.asarray(pipeline(prompt=DEFAULT_PROMPT, height=64, width=64,
                               num_inference_steps=2, guidance_scale=3.5, max_sequence_length=512,
                               generator=torch.Generator("cpu").manual_seed(7)).images[0], dtype=np.int16)


@accelerator
@pytest.mark.parametrize("staged", [False, True], ids=["resident", "staged"])
def test_gpus_tiny_flux_split_over_every_device_matches_the_cpu_image(main, recorded, tiny_flux, tmp_path, staged):
    count = torch.accelerator.device_count()
    if count < 2:
        pytest.skip("needs 2 GPUs or more")
    flags = ["--model", tiny_flux, "--dtype", "float32", *(["--staged"] if staged else [])]
    for fraction in (1.15 / count, 1.3 / count, 1.5 / count, 2 / count):  # the smallest share the blocks allow
        max_memory = tiny_budget(tiny_flux, range(count), fraction)
        planned = json.loads(main("--plan", "--json", *flags, "--height", 64, "--width", 64, "--max-memory",
                                  max_memory).out)
        if planned["fits"] and set(planned["devices"]) == {str(d) for d in range(count)}:
            break
    else:
        pytest.fail("no budget splits the tiny Flux over every device")
    stdout = main(*flags, "--max-memory", max_memory, "--output", tmp_path / "x.png", *FAST).out
    assert_printout_names_where_the_weights_are(stdout, recorded[-1])
    assert {d for _, d in printed_placement(stdout)[-1]} | {d for _, d in printed_placement(stdout)[0]} == {
        f"{torch.accelerator.current_accelerator().type}:{d}" for d in range(count)}
    difference = np.abs(pixels(tmp_path / "x.png") - cpu_image(tiny_flux))
    assert difference.mean() <= 1 and difference.max() <= 12


@accelerator
@pytest.mark.parametrize("staged", [False, True], ids=["resident", "staged"])
def test_gpus_tiny_flux_on_one_device_and_the_cpu_matches_the_cpu_image(main, recorded, tiny_flux, tmp_path, staged):
    flags = ["--model", tiny_flux, "--dtype", "float32", *(["--staged"] if staged else [])]
    max_memory = tiny_budget(tiny_flux, [0], 0.5) + ",cpu=1GiB"
    stdout = main(*flags, "--max-memory", max_memory, "--output", tmp_path / "x.png", *FAST).out
    assert "NOTE:" in stdout and ("streamed to the device at every step" in stdout or "runs on the CPU" in stdout)
    assert_printout_names_where_the_weights_are(stdout, recorded[-1])
    devices = {d for rows in printed_placement(stdout) for _, d in rows}
    assert devices == {f"{torch.accelerator.current_accelerator().type}:0", "cpu"}
    difference = np.abs(pixels(tmp_path / "x.png") - cpu_image(tiny_flux))
    assert difference.mean() <= 1 and difference.max() <= 12


@accelerator
def test_gpus_free_memory_is_read_and_the_flux1_dev_plan_fits_a_device_present(main):
    result = json.loads(main("--plan", "--json", "--model", FLUX1_DEV).out)
    assert set(result["budgets"]) == {str(d) for d in range(torch.accelerator.device_count())}
    assert all(b > 0 for b in result["budgets"].values())


def test_devices_with_no_room_beyond_the_activations_reserve_are_a_clear_error():
    result = run_main(MODEL_PARALLEL, "--plan", "--model", FLUX1_DEV, "--num-devices", "2", "--device-memory",
                      "2GiB")
    assert_clear_error(result, "no device has room for weights beyond the 3.00 GiB", "--max-memory")


def test_an_output_that_is_a_folder_is_refused_before_anything_loads(tiny_flux, tmp_path):
    result = run_main(MODEL_PARALLEL, "--model", tiny_flux, "--output", tmp_path, *FAST, *CPU)
    assert_clear_error(result, f"--output {tmp_path} is a folder")


# --- --staged frees the text encoders before the transformer loads, split ones too ---


def test_a_staged_run_keeps_nothing_of_a_split_t5_into_the_second_stage(script, main, monkeypatch, tiny_flux, tmp_path):
    """Stage 1 splits T5 between its blocks (here every block "on" the CPU, the one device there is: the load takes
    the same path, AutoModel.from_pretrained with a device map, then dispatch_model). When stage 2 loads, no T5
    may be alive: a reference kept to it would hold its blocks on the GPUs through the transformer's stage."""
    import gc
    import weakref

    blocks = list(script.make_plan(types.SimpleNamespace(model=str(tiny_flux), height=64, width=64, staged=True),
                                   diffusers.DiffusionPipeline.load_config(tiny_flux),
                                   dict.fromkeys(range(8), 12 * 2**20 + 80 * 2**10), torch.float32)
                  ["stages"][0]["device_maps"]["text_encoder_2"])
    assert len(blocks) > 1  # a real split: one key per block range
    make_plan, models, live = script.make_plan, [], []

    def split_t5(*args, **kwargs):
        plan = make_plan(*args, **kwargs)
        if plan["staged"]:
            plan["stages"][0]["split"] = ["text_encoder_2"]
            plan["stages"][0]["device_maps"]["text_encoder_2"] = dict.fromkeys(blocks, "cpu")
        return plan
    monkeypatch.setattr(script, "make_plan", split_t5)
    load_model, load_pipeline = script.AutoModel.from_pretrained, script.DiffusionPipeline.from_pretrained

    asked, handed = [], []  # the split component's load (arguments), and whether each stage is handed it

    def from_pretrained(*args, **kwargs):
        model = load_model(*args, **kwargs)
        models.append(weakref.ref(model))
        asked.append((args, kwargs))
        return model

    def pipeline_from_pretrained(*args, **kwargs):
        gc.collect()
        live.append(sum(m() is not None for m in models))
        handed.append(kwargs.get("text_encoder_2") is not None and kwargs["text_encoder_2"] is models[-1]())
        return load_pipeline(*args, **kwargs)
    monkeypatch.setattr(script.AutoModel, "from_pretrained", from_pretrained)
    monkeypatch.setattr(script.DiffusionPipeline, "from_pretrained", pipeline_from_pretrained)
    stdout = main("--model", tiny_flux, "--output", tmp_path / "x.png", "--staged", *FAST, *CPU).out
    assert "text_encoder_2.encoder.final_layer_norm " in stdout.split("pipeline loaded")[0]  # loaded split
    assert live == [1, 0]  # stage 1: the split T5 handed over; stage 2: gone
    # The split T5 loaded by its own from_pretrained with the plan's device map, and handed to the first stage
    assert asked == [((str(tiny_flux),), {"subfolder": "text_encoder_2", "device_map": dict.fromkeys(blocks, "cpu"),
                                          "dtype": torch.float32})]
    assert handed == [True, False]


# --- FLUX on GPUs without FP64 (Intel Arc A-series), simulated: the rotary embedding on the CPU ---


def simulate_device_properties(monkeypatch, **properties):
    """torch's answer about every XPU device: an Arc A770 (has_fp64=False), or a GPU with FP64."""
    answer = types.SimpleNamespace(name="Intel(R) Arc(TM) A770 Graphics", total_memory=16 * GiB, **properties)
    module, real = types.SimpleNamespace(get_device_properties=lambda device=None: answer), torch.get_device_module
    monkeypatch.setattr(torch, "get_device_module",
                        lambda device=None: module if torch.device(device).type in ("xpu", "cuda") else real(device))


def flux_image(pipeline):
    return np.asarray(pipeline(prompt="a red fox", height=64, width=64, num_inference_steps=2, guidance_scale=3.5,
                               max_sequence_length=32, generator=torch.Generator("cpu").manual_seed(7)).images[0],
                      dtype=np.int16)


@pytest.mark.parametrize("script_path", [MODEL_PARALLEL, ROOT / "data-parallelism-accelerate.py"],
                         ids=lambda p: p.name)
def test_without_fp64_the_rotary_embedding_is_computed_on_the_cpu_and_the_image_is_the_same(
        script_path, monkeypatch, capsys, tiny_flux):
    script = load_script(script_path)
    pipeline = diffusers.FluxPipeline.from_pretrained(tiny_flux, dtype=torch.float32)
    reference = flux_image(pipeline)
    original = pipeline.transformer.pos_embed
    seen = []  # what the diffusers module computes from: the device and dtype of its input
    original.register_forward_pre_hook(lambda module, args: seen.append(args[0].device.type))
    simulate_device_properties(monkeypatch, has_fp64=False)
    capsys.readouterr()  # the loading bars
    assert script.no_fp64_remedy(pipeline, ["xpu:0", "xpu:1"]) == [torch.device("xpu", 0), torch.device("xpu", 1)]
    assert capsys.readouterr().err.splitlines() == [
        "note: xpu:0, xpu:1 has no FP64 (Intel Arc A-series): FLUX's rotary position embedding, built in float64, is "
        "computed on the CPU"]
    assert pipeline.transformer.pos_embed.module is original  # wrapped, not rebuilt: the same embedding
    ids = torch.randint(0, 64, (10, 3)).float()
    for got, expected in zip(pipeline.transformer.pos_embed(ids), original(ids)):
        assert got.device == ids.device and got.dtype == expected.dtype and torch.equal(got, expected)
    assert np.array_equal(flux_image(pipeline), reference)
    assert seen and set(seen) == {"cpu"}


@pytest.mark.parametrize("properties", [{"has_fp64": True}, {}], ids=["xpu-with-fp64", "cuda-no-such-field"])
def test_devices_with_fp64_and_the_cpu_keep_the_embedding_where_diffusers_puts_it(
        script, monkeypatch, capsys, tiny_flux, properties):
    pipeline = diffusers.FluxPipeline.from_pretrained(tiny_flux, dtype=torch.float32)
    original = pipeline.transformer.pos_embed
    simulate_device_properties(monkeypatch, **properties)
    capsys.readouterr()  # the loading bars
    assert script.no_fp64_remedy(pipeline, ["xpu:0", "cuda:1", "cpu"]) == []
    assert pipeline.transformer.pos_embed is original and capsys.readouterr().err == ""


def test_the_script_checks_fp64_on_the_devices_of_the_pipeline_it_runs(main, script, monkeypatch, tiny_flux,
                                                                        tmp_path):
    calls, remedy = [], script.no_fp64_remedy
    monkeypatch.setattr(script, "no_fp64_remedy", lambda pipeline, devices, **kw: calls.append(
        (set(pipeline.components), devices)) or remedy(pipeline, devices, **kw))
    main("--model", tiny_flux, "--output", tmp_path / "x.png", "--staged", *FAST, *CPU)
    assert [devices for _, devices in calls] == [["cpu"], ["cpu"]]  # each stage, after it is placed
    assert calls[-1][0] >= {"transformer", "vae"}


@accelerator
def test_gpus_without_fp64_as_simulated_the_image_is_the_one_with_fp64(main, script, monkeypatch, tiny_flux,
                                                                       tmp_path):
    """On a real GPU: the remedy forced (the GPU said to lack FP64) makes the image the GPU makes without it."""
    flags = ["--model", tiny_flux, "--dtype", "float32", *FAST]
    main(*flags, "--output", tmp_path / "fp64.png")
    real = torch.get_device_module
    answer = types.SimpleNamespace(has_fp64=False)
    monkeypatch.setattr(torch, "get_device_module", lambda device=None: types.SimpleNamespace(
        get_device_properties=lambda d=None: answer) if device is not None and torch.device(device).type != "cpu"
        else real(device))
    captured = main(*flags, "--output", tmp_path / "cpu-rope.png")
    assert "has no FP64" in captured.err
    assert np.abs(pixels(tmp_path / "fp64.png") - pixels(tmp_path / "cpu-rope.png")).max() <= 2


# --- a split component that ends up wholly on the CPU runs there: said as such ---


def test_a_split_component_wholly_on_the_cpu_is_said_to_run_there(script, monkeypatch, capsys):
    monkeypatch.setattr(torch.accelerator, "current_accelerator", lambda *a: torch.device("cuda"))
    monkeypatch.setattr(torch.accelerator, "memory_allocated", lambda device=None: 0)
    monkeypatch.setattr(torch.accelerator, "memory_reserved", lambda device=None: 0)
    class Component(torch.nn.Linear):  # a model's `device` attribute, as diffusers' and transformers' models have
        device = torch.device("cpu")
    layer = Component(1, 1)
    pipeline = types.SimpleNamespace(hf_device_map={"text_encoder": 0, "vae": 1}, components={
        "text_encoder": layer, "vae": layer, "transformer": layer, "text_encoder_2": layer, "tokenizer": None})
    split = {"text_encoder_2": types.SimpleNamespace(hf_device_map={"shared": "cpu", "encoder.block.0": "cpu",
                                                                     "encoder.block.1": "cpu"}),
             "transformer": types.SimpleNamespace(hf_device_map={"x_embedder": 0, "transformer_blocks.0": 1,
                                                                  "single_transformer_blocks.0": "cpu"})}
    script.print_placement(pipeline, split)
    rows = dict(re.findall(r"^  (\S+) +-> (.+)$", capsys.readouterr().out, flags=re.M))
    assert rows["text_encoder_2.shared"] == rows["text_encoder_2.encoder.block.0-1"] == "cpu (runs on the CPU: slow)"
    assert rows["transformer.single_transformer_blocks.0"] == "cpu (streamed to the device at every step: slow)"
    assert rows["text_encoder"] == "cuda:0"


def test_the_plan_says_a_component_wholly_on_the_cpu_runs_there(script, capsys):
    plan = {"stages": [], "devices": {"0": 9 * GiB, "cpu": 9 * GiB}, "budgets": {"0": 12 * GiB, "cpu": 32 * GiB},
            "reserved_per_device": 3 * GiB, "unplaced": 0, "fits": True, "hint": "", "staged": False,
            "dtype": "bfloat16", "components": {},
            "placement": {"transformer": "0", "text_encoder_2.shared": "cpu", "text_encoder_2.encoder.block": "cpu"},
            "bytes": {"transformer": 9 * GiB, "text_encoder_2.shared": GiB, "text_encoder_2.encoder.block": 8 * GiB}}
    script.print_plan(types.SimpleNamespace(planned=True, json=False, model="m", height=1024, width=1024), plan)
    notes = [line for line in capsys.readouterr().out.splitlines() if "NOTE" in line]
    assert len(notes) == 1 and notes[0].startswith("  NOTE: text_encoder_2 wholly on the CPU: Accelerate runs it there")
    assert "streamed" not in notes[0]


# --- a GPU that cannot be used (busy in exclusive-process mode): left out of the plan, not counted as free ---


def simulate_usable_devices(monkeypatch, kind, usable):
    """torch.zeros(..., device=<kind>:i) works on the devices in `usable` and raises as CUDA does on a GPU that is
    busy in exclusive-process mode on the others; on the CPU and the meta device, torch's own."""
    zeros = torch.zeros

    def fake_zeros(*args, device=None, **kwargs):
        device = torch.device(device) if device is not None else None
        if device is None or device.type not in (kind,):
            return zeros(*args, device=device, **kwargs)
        if device.index not in usable:
            raise torch.AcceleratorError("CUDA error: CUDA-capable device(s) is/are busy or unavailable")
        return zeros(*args, **kwargs)
    monkeypatch.setattr(torch, "zeros", fake_zeros)


def test_a_gpu_that_cannot_be_used_is_left_out_not_counted_as_free(monkeypatch, script, main):
    """Two NVIDIA GPUs; the second busy in exclusive-process mode: Accelerate measures only the first."""
    import accelerate.utils.modeling

    monkeypatch.setattr(torch.accelerator, "is_available", lambda: True)
    monkeypatch.setattr(torch.accelerator, "device_count", lambda: 2)
    monkeypatch.setattr(torch.accelerator, "current_accelerator", lambda *a: torch.device("cuda"))
    # As Accelerate's get_max_memory asks CUDA: the devices, a probe tensor on each, then its free memory.
    monkeypatch.setattr(accelerate.utils.modeling, "is_xpu_available", lambda *a, **k: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda i=None: (20 * GiB, 24 * GiB))
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: types.SimpleNamespace(total_memory=24 * GiB))
    tensor = torch.tensor

    def probe(data, *args, device=None, **kwargs):
        if isinstance(device, int) and device != 0:  # Accelerate's probe on cuda:1
            raise torch.AcceleratorError("CUDA error: CUDA-capable device(s) is/are busy or unavailable")
        return tensor(data, *args, device=None if isinstance(device, int) else device, **kwargs)
    monkeypatch.setattr(torch, "tensor", probe)
    simulate_usable_devices(monkeypatch, "cuda", usable={0})
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    captured = main("--plan", "--json", "--model", FLUX1_DEV)
    assert json.loads(captured.out)["budgets"] == {"0": 20 * GiB}
    assert captured.err.strip().splitlines() == [
        "note: cuda:1 cannot be used (CUDA error: CUDA-capable device(s) is/are busy or unavailable): leaving it out"]
