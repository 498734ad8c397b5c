"""cfg-parallelism-sd3.py, run as users run it: the tiny SD3 made by 2 CPU processes started by torchrun and by
accelerate launch, checked against diffusers' StableDiffusion3Pipeline called directly; the batch each process's
transformer really ran, seen by a probe inside the processes; every bad input; the plan for SD3.5-medium from its
real configs; a stalled process; the one-page program; and GPU runs where there are GPUs.
"""

import itertools
import json
import textwrap
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

from tests.conftest import (ROOT, accelerator, assert_clear_error, assert_one_report_with_every_process, launched_as,
                            load_script, pixels, probe_env, run, run_main, torchrun)
from tests.test_readme import CFG_ACCELERATE, CFG_TORCHRUN_TINY, run_readme_command
from tests.test_readme_programs import with_tiny_pipeline

# The tests that share the module-scoped runs below go to one pytest-xdist worker, which makes each run once.
SHARED_RUNS = pytest.mark.xdist_group("cfg_parallelism")

CFG_PARALLEL = ROOT / "cfg-parallelism-sd3.py"
EXAMPLE = ROOT / "examples" / "cfg_parallel.py"
SD35_MEDIUM = ROOT / "tests" / "fixtures" / "sd3.5-medium"  # SD3.5-medium's real config.json files, no weights
SIMULATE = ROOT / "tests" / "simulate"  # sitecustomize.py: STALL_RANK
# On the CPU on purpose (--device cpu), alike on a machine with 1 GPU or several: the oracle is float32 on the CPU.
FAST = ["--height", "64", "--width", "64", "--num-inference-steps", "2", "--device", "cpu"]
PROMPT = "a red fox in fresh snow, wildlife photograph"  # the script's (and the example's) default prompt
GiB = 2**30
# A probe inside every worker (Python imports `sitecustomize` from PYTHONPATH at start-up): it records the batch of
# every call of the SD3 transformer's forward, which runs after the script's pre-hook has taken its half.
PROBE = textwrap.dedent("""
    import os
    if os.environ.get("CFG_PROBE"):
        from diffusers import SD3Transformer2DModel
        forward = SD3Transformer2DModel.forward

        def probe(self, hidden_states, *args, **kwargs):
            with open(os.path.join(os.environ["CFG_PROBE"], "rank%s" % os.environ.get("RANK", "0")), "a") as f:
                f.write("%d\\n" % hidden_states.shape[0])
            return forward(self, hidden_states, *args, **kwargs)

        SD3Transformer2DModel.forward = probe
""")


def with_probe(tmp_path):
    """The environment that puts PROBE in every process, and the folder where it writes what it saw."""
    (tmp_path / "probe").mkdir()
    return {**probe_env(tmp_path / "site", PROBE), "CFG_PROBE": str(tmp_path / "probe")}, tmp_path / "probe"


def batches_seen(probes):
    return {p.name: [int(line) for line in p.read_text().split()] for p in sorted(probes.iterdir())}


@pytest.fixture(scope="module")
def diffusers_image(tiny_sd3):
    """The oracle: diffusers' StableDiffusion3Pipeline called directly, one process, no parallelism, the script's
    settings (its prompt, no negative prompt, guidance 4.5, 256 T5 tokens, seed 0), 64x64 in 2 steps."""
    pipeline = StableDiffusion3Pipeline.from_pretrained(tiny_sd3, dtype=torch.float32)
    pipeline.set_progress_bar_config(disable=True)
    image = pipeline(PROMPT, height=64, width=64, num_inference_steps=2, guidance_scale=4.5, max_sequence_length=256,
                     generator=torch.Generator("cpu").manual_seed(0)).images[0]
    return np.asarray(image.convert("RGB"), dtype=np.int16)


@pytest.fixture(scope="module")
def one_process(tiny_sd3, tmp_path_factory):
    """One plain process, no launcher: main() in this process (tests/conftest.py: run_main)."""
    out = tmp_path_factory.mktemp("one")
    result = run_main(CFG_PARALLEL, "--model", tiny_sd3, *FAST, "--output", out / "fox.png", check=True)
    return SimpleNamespace(result=result, out=out, image=out / "fox.png")


@pytest.fixture(scope="module")
def with_torchrun(tiny, tmp_path_factory):
    """The README's torchrun command for the tiny SD3 (on a simulated machine: tests/test_readme.py,
    ON_SIMULATED_GPUS), 2 processes, with PROBE in each."""
    out = tmp_path_factory.mktemp("torchrun")
    env, probes = with_probe(tmp_path_factory.mktemp("probe"))
    result = run_readme_command(CFG_TORCHRUN_TINY, tiny, out, **env)
    return SimpleNamespace(result=result, out=out, image=out / "out.png", probes=probes)


@pytest.fixture(scope="module")
def with_accelerate(tiny, tmp_path_factory):
    """The page's accelerate launch command (--multi_gpu added where there is no GPU), 2 processes, with PROBE in
    each."""
    out = tmp_path_factory.mktemp("accelerate")
    env, probes = with_probe(tmp_path_factory.mktemp("probe"))
    result = run_readme_command(CFG_ACCELERATE, tiny, out, **env)
    return SimpleNamespace(result=result, out=out, image=out / "out.png", probes=probes)


# --- the tiny SD3, 1 and 2 CPU processes ---


@SHARED_RUNS
def test_one_process_makes_the_image_diffusers_makes(one_process, diffusers_image):
    assert np.abs(pixels(one_process.image) - diffusers_image).max() <= 1  # within 1/255


@SHARED_RUNS
@pytest.mark.parametrize("launch", ["with_torchrun", "with_accelerate"])
def test_two_processes_make_the_image_diffusers_makes_and_one_process_makes(launch, request, one_process,
                                                                            diffusers_image):
    run_ = request.getfixturevalue(launch)
    assert np.abs(pixels(run_.image) - diffusers_image).max() <= 1
    assert np.abs(pixels(run_.image) - pixels(one_process.image)).max() <= 1
    assert [p.name for p in run_.out.iterdir()] == [run_.image.name]  # one image, no temporary file left


@SHARED_RUNS
@pytest.mark.parametrize("launch", ["with_torchrun", "with_accelerate"])
def test_each_process_ran_the_transformer_on_its_half_of_the_guidance_batch(launch, request):
    """The pipeline calls the transformer once a step on the batch of 2 (negative, prompt): each of the 2 processes
    runs it on a batch of 1, at each of the 2 steps. A script that no longer split would show [2, 2]."""
    run_ = request.getfixturevalue(launch)
    assert batches_seen(run_.probes) == {"rank0": [1, 1], "rank1": [1, 1]}
    assert "[transformers]" not in run_.result.stderr  # no library noise about what the script never uses
    assert ("split: the guidance batch of 2 between 2 process(es): 1 each, rank 0 the negative prompt's half, rank 1 "
            "the prompt's") in run_.result.stdout


@SHARED_RUNS
def test_only_the_main_process_reports_with_every_process_peak_memory(with_torchrun):
    assert_one_report_with_every_process(with_torchrun.result.stdout)


@SHARED_RUNS
def test_one_process_is_the_baseline_and_says_how_to_launch_two(one_process):
    err = one_process.result.stderr
    assert err.count("note: ") == 1 and "no parallelism (the baseline)" in err
    assert "uv run torchrun --nproc-per-node 2 cfg-parallelism-sd3.py --model" in err
    assert "between 1 process(es): both halves in this one" in one_process.result.stdout


def test_a_call_that_is_not_the_guidance_batch_runs_whole(tiny_sd3, script, monkeypatch):
    """The hooks, on the tiny transformer in this process, as process 1 of a group (torch.distributed answers for the
    group: its rank in it, and an all-gather in which the other process's half is zeros): the doubled guidance batch
    is cut to the prompt's half, whose prediction lands second in the gathered batch; a batch of 1 (skip-layer
    guidance's extra call) and a batch of 2 different latents run whole, as without the hooks, and gather nothing."""
    transformer = SD3Transformer2DModel.from_pretrained(tiny_sd3, subfolder="transformer")
    torch.manual_seed(0)
    inputs = dict(hidden_states=torch.randn(1, 4, 8, 8), timestep=torch.tensor([500.0]),
                  encoder_hidden_states=torch.randn(1, 5, 32), pooled_projections=torch.randn(1, 64))
    doubled = {name: torch.cat([value] * 2) for name, value in inputs.items()}
    doubled["encoder_hidden_states"] = torch.cat([torch.zeros(1, 5, 32), inputs["encoder_hidden_states"]])
    two_images = {**doubled, "hidden_states": torch.randn(2, 4, 8, 8)}
    group, gathered = object(), []

    def all_gather_into_tensor(output, tensor, group=None):
        gathered.append(group)
        output.zero_()
        output[tensor.shape[0]:] = tensor  # this process's half, in the place of rank 1 of the group

    monkeypatch.setattr(torch.distributed, "get_rank", lambda group=None: 1 if group is not None else 3)
    monkeypatch.setattr(torch.distributed, "all_gather_into_tensor", all_gather_into_tensor)
    with torch.no_grad():
        whole = {name: transformer(**batch, return_dict=False)[0] for name, batch in (
            ("one", inputs), ("guidance", doubled), ("two images", two_images))}
        script.split_the_guidance_batch(transformer, group)
        hooked = {name: transformer(**batch, return_dict=False)[0] for name, batch in (
            ("one", inputs), ("guidance", doubled), ("two images", two_images))}
    assert torch.equal(hooked["one"], whole["one"]) and torch.equal(hooked["two images"], whole["two images"])
    assert gathered == [group]  # within the group it was given, once: for the guidance batch alone
    assert hooked["guidance"].shape == whole["guidance"].shape and not hooked["guidance"][0].any()
    assert torch.allclose(hooked["guidance"][1:], whole["guidance"][1:], atol=1e-5)


# --- bad input: one line each, a non-zero exit, no traceback, no image (in this process: one import) ---


@pytest.fixture(scope="module")
def script():
    return load_script(CFG_PARALLEL)


@pytest.fixture
def refused(tmp_path):
    """Run the script's command line in this process (run_main) as one of `processes` launched processes: one error
    line, a non-zero exit, no image; return the line."""
    def refused(processes, *argv):
        argv = [*argv, "--output", tmp_path / "x.png"] if "--output" not in argv else argv
        result = run_main(CFG_PARALLEL, *argv, "--device", "cpu", WORLD_SIZE=str(processes),
                          LOCAL_WORLD_SIZE=str(processes), LOCAL_RANK=None)
        assert_clear_error(result)
        assert not (tmp_path / "x.png").exists()
        return result.stderr.strip()
    return refused


@pytest.mark.parametrize("scale", ["1", "0"])
def test_a_guidance_scale_without_guidance_is_refused(refused, tiny_sd3, scale):
    line = refused(2, "--model", tiny_sd3, *FAST, "--guidance-scale", scale)
    assert f"--guidance-scale {scale}: at 1 or below" in line and "no classifier-free guidance" in line


def test_flux_is_guidance_distilled_and_points_to_context_parallelism(refused, tiny_flux):
    line = refused(2, "--model", tiny_flux, *FAST)
    assert "guidance-distilled" in line and "context-parallelism-flux.py" in line


def test_another_pipeline_is_refused_with_what_to_use(refused, tiny_sd3, tmp_path):
    model = tmp_path / "sdxl"
    (model / "vae").mkdir(parents=True)
    (model / "vae" / "config.json").write_text((tiny_sd3 / "vae" / "config.json").read_text())
    (model / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline",
                                                        "vae": ["diffusers", "AutoencoderKL"]}))
    line = refused(2, "--model", model, *FAST)
    assert "is a StableDiffusionXLPipeline" in line and "data-parallelism-accelerate.py" in line


@pytest.mark.parametrize("processes", [3, 4])
def test_a_process_count_other_than_two_is_refused(refused, tiny_sd3, processes):
    line = refused(processes, "--model", tiny_sd3, *FAST)
    assert f"{processes} processes: CFG parallelism gives each of exactly 2 processes" in line
    assert "torchrun --nproc-per-node 2" in line


def test_an_output_that_cannot_be_written_is_refused_before_loading(refused, tiny_sd3, tmp_path):
    (tmp_path / "a-file").write_text("")  # its "folder" cannot be created (this test may run as root)
    line = refused(2, "--model", tiny_sd3, *FAST, "--output", tmp_path / "a-file" / "fox.png")
    assert "cannot create its folder" in line


def test_a_launcher_option_after_the_script_name_says_where_it_goes(refused, tiny_sd3):
    line = refused(2, "--model", tiny_sd3, "--nproc-per-node", "2")
    assert "option of the launcher" in line and "before the script's name" in line


def test_a_size_the_model_cannot_make_names_one_it_can(refused, tiny_sd3):
    assert "use a multiple of 16, e.g. 48" in refused(2, "--model", tiny_sd3, "--height", "56", "--width", "64")


def test_under_a_launcher_a_bad_input_is_said_once_and_ends_every_process(tiny_sd3, tmp_path):
    """Both processes a launcher starts, each run here as that process: both stop before any process group forms
    (so neither waits for the other), and the first alone says why."""
    said = []
    for rank in (0, 1):
        result = run_main(CFG_PARALLEL, "--model", tiny_sd3, *FAST, "--guidance-scale", "1", "--output",
                          tmp_path / "x.png", "--device", "cpu", **launched_as(rank))
        assert result.returncode not in (None, 0) and "Traceback" not in result.stderr
        said.append(result.stderr)
    assert said[0].startswith("error: --guidance-scale 1") and said[0].count("\n") == 1 and said[1] == ""


# --- --plan: SD3.5-medium from its real configs, no weights ---


@pytest.fixture
def plan(script, monkeypatch, capsys):
    def plan(*extra):
        monkeypatch.setattr("sys.argv", [CFG_PARALLEL.name, "--plan", "--model", str(SD35_MEDIUM), *extra])
        script.main()
        out = capsys.readouterr().out
        return json.loads(out) if "--json" in extra else out
    return plan


def weighed_here(dtype_bytes):
    """Independently of the script: each SD3.5-medium component built from its config on the meta device, its
    parameters and floating-point buffers counted at `dtype_bytes` a number (integer buffers stay as they are)."""
    import diffusers
    import transformers

    index = json.loads((SD35_MEDIUM / "model_index.json").read_text())
    sizes = {}
    for name, (library, class_name) in ((k, v) for k, v in index.items() if isinstance(v, list)):
        cls = getattr(diffusers if library == "diffusers" else transformers, class_name)
        if not issubclass(cls, (diffusers.ModelMixin, transformers.PreTrainedModel)):
            continue
        with torch.device("meta"):
            model = (cls.from_config(cls.load_config(SD35_MEDIUM / name)) if library == "diffusers"
                     else cls(transformers.AutoConfig.from_pretrained(SD35_MEDIUM / name)))
        sizes[name] = sum(t.numel() * (dtype_bytes if t.is_floating_point() else t.element_size())  # CLIP's ids
                          for t in itertools.chain(model.parameters(), model.buffers()))
    return sizes


def test_the_plan_for_sd35_medium_weighs_what_its_configs_say(plan):
    result = plan("--json", "--device-memory", "24GiB")
    assert result["components"] == weighed_here(2)  # bfloat16 on GPUs
    assert round(result["weights"] / GiB, 1) == 15.2  # the figure the data parallel script and the README give
    assert result["needs"] == result["weights"] + 3 * GiB and result["fits"]
    # One half's prediction each way a step: 16 latent channels x 128 x 128 latents (1024 / 8) in bfloat16.
    assert result["exchanged_per_step"] == 16 * 128 * 128 * 2
    assert (result["processes"], result["batch_per_process"]) == (2, 1)


def test_sd35_medium_on_16_gib_gpus_does_not_fit_and_the_plan_says_what_to_do(plan):
    out = plan("--device-memory", "16GiB")
    assert "1 per process; the processes exchange 0.5 MiB of predictions per step" in out
    assert "needs 18.15 GiB" in out and "fits: NO" in out and "data-parallelism-accelerate.py offloads" in out
    result = plan("--json", "--device-memory", "16GiB", "--height", "512", "--width", "512")
    assert result["fits"] and result["reserved_for_activations"] == 3 * GiB // 4  # a quarter of the pixels


# --- a process that stops: the job ends, with one line ---


def test_a_process_that_stops_mid_image_ends_the_job_with_one_line(tiny_sd3, tmp_path):
    """Rank 1 stops in its second step (tests/simulate: STALL_RANK), and rank 0 waits for it in the next
    collective: with --stall-timeout 3 the job ends within seconds, not the group's week, with one line, and no
    image."""
    started = time.monotonic()
    result = run(torchrun(2, CFG_PARALLEL, "--model", tiny_sd3, *FAST, "--output", tmp_path / "fox.png",
                          "--stall-timeout", "3"), check=False, timeout=180,
                 env={"PYTHONPATH": str(SIMULATE), "STALL_RANK": "1"})
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith("error: no denoising step for "), result.stderr
    assert "--stall-timeout" in errors[0]
    assert time.monotonic() - started < 120
    assert list(tmp_path.iterdir()) == []


# --- the one-page program ---


@SHARED_RUNS
@pytest.mark.skipif(torch.accelerator.is_available(), reason="the program runs on the GPUs where there are any: "
                    "its image is then bfloat16's, not the float32 CPU oracle's")
def test_the_one_page_program_on_two_processes_makes_the_image_diffusers_makes(tiny_sd3, tmp_path):
    """examples/cfg_parallel.py as its comment says to run it (torchrun, 2 processes), written out with the tiny SD3
    in place of SD3.5-medium as the pages' tests write it (tests/test_readme_programs.py): its settings (64x64 for
    the tiny model, 40 steps, guidance 4.5, seed 0) against diffusers' own, and each process on a batch of 1."""
    program = tmp_path / "examples" / "cfg_parallel.py"
    program.parent.mkdir()
    program.write_text(with_tiny_pipeline(EXAMPLE.read_text(encoding="utf-8"), tiny_sd3), encoding="utf-8")
    env, probes = with_probe(tmp_path)
    made = run(torchrun(2, program), check=False, timeout=300, env=env, cwd=tmp_path)  # saves in its folder
    assert made.returncode == 0, made.stderr
    pipeline = StableDiffusion3Pipeline.from_pretrained(tiny_sd3, dtype=torch.float32)
    pipeline.set_progress_bar_config(disable=True)
    expected = pipeline(PROMPT, num_inference_steps=40, guidance_scale=4.5,
                        generator=torch.Generator("cpu").manual_seed(0)).images[0]
    assert np.abs(pixels(tmp_path / "sd3.5-cfg-parallel.png") - np.asarray(expected, dtype=np.int16)).max() <= 1
    assert batches_seen(probes) == {"rank0": [1] * 40, "rank1": [1] * 40}


# --- GPUs: skipped where there are none ---


@accelerator
@pytest.mark.skipif(torch.accelerator.device_count() < 2, reason="needs 2 GPUs or more")
def test_two_gpus_make_the_image_of_one(tmp_path):
    """A random-weight SD3 transformer big enough that compute outweighs the all-gather (benchmarks/), in bfloat16.
    Tolerance: bfloat16 keeps 8 bits of mantissa; one GPU runs the transformer on the batch of 2 and each of 2 GPUs
    on a batch of 1, for which the matrix kernels may add their terms in another order, so the predictions differ
    by rounding, about 2**-8 of their size, and the 20 steps carry it on: a few of 255 in some pixels after the
    VAE, the mean difference below 2 of 255."""
    benchmark = load_script(ROOT / "benchmarks" / "cfg_parallel.py")
    model = benchmark.build_pipeline(tmp_path / "model")
    images = {}
    for n in (1, 2):  # how much faster is the benchmark's question (benchmarks/cfg_parallel.py), not a test's
        out = tmp_path / f"{n}.png"
        run(torchrun(n, CFG_PARALLEL, "--model", model, "--height", "1024", "--width", "1024",
                     "--num-inference-steps", "20", "--output", out), timeout=900)
        images[n] = pixels(out)
    assert np.abs(images[2] - images[1]).mean() < 2
