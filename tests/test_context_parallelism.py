"""context-parallelism-flux.py, run as users run it: the tiny Flux split between 2 CPU processes by the README's own
torchrun and accelerate launch commands, checked against diffusers' FluxPipeline called directly; the tiny
QwenImage and Flux at prompts and sizes that 2 processes do not divide (ulysses_anything); the tokens each process
really held, seen by a probe inside the processes; a process that stops mid-image; every bad input; plans for
FLUX.1-dev from its real configs; the CPU workarounds for diffusers 0.42, shown to be still needed; and GPU runs
where there are GPUs.
"""

import ast
import json
import re
import textwrap
import time
from types import SimpleNamespace

import numpy as np
import psutil
import pytest
import torch
from diffusers import ContextParallelConfig, FluxPipeline, FluxTransformer2DModel, QwenImagePipeline

from tests.conftest import (ROOT, accelerator, assert_clear_error, assert_one_report_with_every_process, launched_as,
                            load_script, pixels, probe_env, run, run_main, simulated_gpus, torchrun)
from tests.test_readme import (CP_ACCELERATE, CP_QWENIMAGE_TINY, CP_TORCHRUN_STAGED, CP_TORCHRUN_TINY,
                               run_readme_command)

# The tests that share the module-scoped runs below go to one pytest-xdist worker, which makes each run once.
SHARED_RUNS = pytest.mark.xdist_group("context_parallelism")

CONTEXT_PARALLEL = ROOT / "context-parallelism-flux.py"
FLUX1_DEV = ROOT / "tests" / "fixtures" / "flux1-dev"  # FLUX.1-dev's real config.json files, no weights
FAST = ["--height", "64", "--width", "64", "--num-inference-steps", "2", "--seed", "7"]
PROMPT = "A cat holding a sign that says hello world"  # the script's default prompt
# Sizes and prompts that 2 processes do not divide: 48x48 is 3 x 3 = 9 image tokens; "a fox" is 133 tokens after
# QwenImage's template (the tiny tokenizer's bytes), and FLUX.1's T5 pads to --max-sequence-length 511.
UNEVEN_PAGE = ["--height", "48", "--width", "48", "--num-inference-steps", "2"]  # CP_QWENIMAGE_TINY's: seed 0
UNEVEN = [*UNEVEN_PAGE, "--seed", "3"]
FOX = "a fox"
SIMULATE = ROOT / "tests" / "simulate"  # sitecustomize.py: STALL_RANK
GiB = 2**30
# A probe inside every worker (Python imports `sitecustomize` from PYTHONPATH at start-up): it records the
# sequence lengths the first FLUX transformer block of each process is handed, after diffusers' split.
PROBE = textwrap.dedent("""
    import json, os
    if os.environ.get("CP_PROBE") and "RANK" in os.environ:
        from diffusers.models.transformers import transformer_flux
        forward = transformer_flux.FluxTransformerBlock.forward

        def probe(self, hidden_states, encoder_hidden_states, *args, **kwargs):
            path = os.path.join(os.environ["CP_PROBE"], "rank%s.json" % os.environ["RANK"])
            if not os.path.exists(path):
                with open(path, "w") as f:
                    json.dump({"image": hidden_states.shape[1], "text": encoder_hidden_states.shape[1]}, f)
            return forward(self, hidden_states, encoder_hidden_states, *args, **kwargs)

        transformer_flux.FluxTransformerBlock.forward = probe
""")


def with_probe(tmp_path):
    """The environment that puts PROBE in every process, and the folder where it writes what it saw."""
    probes = tmp_path / "probe"
    probes.mkdir()
    return {**probe_env(tmp_path / "site", PROBE), "CP_PROBE": str(probes)}, probes


@pytest.fixture(scope="module")
def one_process(tiny_flux, tmp_path_factory):
    """One plain process, no launcher: main() in this process (tests/conftest.py: run_main), with --seed 7."""
    out = tmp_path_factory.mktemp("one") / "out"
    result = run_main(CONTEXT_PARALLEL, "--model", tiny_flux, *FAST, "--output", out / "cat.png", "--device", "cpu",
                      check=True)
    return SimpleNamespace(result=result, out=out, image=out / "cat.png")


@pytest.fixture(scope="module")
def with_torchrun(tiny, tmp_path_factory):
    """The README's torchrun command for the tiny Flux (seed 0), with PROBE in each process."""
    tmp = tmp_path_factory.mktemp("torchrun")
    env, probes = with_probe(tmp_path_factory.mktemp("probe"))
    result = run_readme_command(CP_TORCHRUN_TINY, tiny, tmp, **env)
    return SimpleNamespace(result=result, out=tmp, image=tmp / "out.png", probes=probes)


@pytest.fixture(scope="module")
def with_accelerate(tiny, tmp_path_factory):
    """The README's accelerate launch command for 2 processes (seed 0)."""
    tmp = tmp_path_factory.mktemp("accelerate")
    result = run_readme_command(CP_ACCELERATE, tiny, tmp)
    return SimpleNamespace(result=result, out=tmp, image=tmp / "out.png")


@pytest.fixture(scope="module")
def diffusers_image(tiny_flux):
    """The oracle: diffusers' FluxPipeline called directly, one process, no parallelism, the same settings, for a
    seed (the script's default 0, or FAST's 7)."""
    pipeline = FluxPipeline.from_pretrained(tiny_flux, dtype=torch.float32)
    pipeline.set_progress_bar_config(disable=True)
    made = {}

    def image(seed):
        if seed not in made:
            made[seed] = np.asarray(pipeline(
                PROMPT, height=64, width=64, num_inference_steps=2, guidance_scale=3.5, max_sequence_length=512,
                generator=torch.Generator("cpu").manual_seed(seed)).images[0].convert("RGB"), dtype=np.int16)
        return made[seed]
    return image


# --- the tiny Flux, 2 CPU processes ---


@SHARED_RUNS
@pytest.mark.parametrize("launch", ["with_torchrun", "with_accelerate"])
def test_two_processes_write_one_image_and_no_temporary_file(launch, request):
    run_ = request.getfixturevalue(launch)
    assert [p.name for p in run_.out.iterdir()] == [run_.image.name]


@SHARED_RUNS
def test_one_process_makes_the_image_diffusers_makes(one_process, diffusers_image):
    assert np.abs(pixels(one_process.image) - diffusers_image(7)).max() <= 1  # within 1/255


@SHARED_RUNS
def test_two_processes_make_the_image_diffusers_makes(with_torchrun, diffusers_image):
    assert np.abs(pixels(with_torchrun.image) - diffusers_image(0)).max() <= 1


@SHARED_RUNS
def test_two_processes_started_by_accelerate_make_the_image_diffusers_makes(with_accelerate, diffusers_image):
    assert "between 2 process(es)" in with_accelerate.result.stdout
    assert np.abs(pixels(with_accelerate.image) - diffusers_image(0)).max() <= 1


@SHARED_RUNS
def test_each_process_held_half_of_the_tokens_as_it_says(with_torchrun):
    # 64x64: 4 x 4 patches of 16 pixels = 16 image tokens; the prompt padded to 512 T5 tokens.
    seen = {p.name: json.loads(p.read_text()) for p in with_torchrun.probes.iterdir()}
    assert seen == {"rank0.json": {"image": 8, "text": 256}, "rank1.json": {"image": 8, "text": 256}}
    assert ("split: 16 image tokens + 512 prompt tokens between 2 process(es): 264 tokens per process, 1 of 2 heads "
            "each in every attention") in with_torchrun.result.stdout


@SHARED_RUNS
def test_only_the_main_process_reports_with_every_process_peak_memory(with_torchrun):
    assert_one_report_with_every_process(with_torchrun.result.stdout)


@SHARED_RUNS
def test_one_process_is_the_baseline_and_says_how_to_launch_n(one_process):
    err = one_process.result.stderr
    assert "no parallelism (the baseline)" in err
    assert "uv run torchrun --nproc-per-node 2 context-parallelism-flux.py" in err
    assert "between 1 process(es): 528 tokens per process" in one_process.result.stdout


# --- bad input: one line each, a non-zero exit, no traceback, no image (in this process: one import) ---


@pytest.fixture(scope="module")
def script():
    return load_script(CONTEXT_PARALLEL)


@pytest.fixture
def refused(tmp_path):
    """Run the script's command line in this process (run_main) as one of `processes` launched processes: one error
    line, a non-zero exit, no image; return the line."""
    def refused(processes, *argv):
        result = run_main(CONTEXT_PARALLEL, *argv, "--device", "cpu", "--output", tmp_path / "x.png",
                          WORLD_SIZE=str(processes), LOCAL_WORLD_SIZE=str(processes), LOCAL_RANK=None)
        assert_clear_error(result)
        assert not (tmp_path / "x.png").exists()
        return result.stderr.strip()
    return refused


def test_a_model_without_a_context_parallel_plan_names_the_scripts_that_serve_it(refused, tiny_sd3):
    line = refused(2, "--model", tiny_sd3, *FAST)
    assert "StableDiffusion3Pipeline" in line and "cannot split" in line
    assert "data-parallelism-accelerate.py" in line


def test_a_video_pipeline_is_refused_before_anything_is_loaded(refused, tmp_path):
    """Wan's transformer has a context-parallel plan, but its pipeline makes frames, not an image: the script would
    run a whole video and then fail to find `.images`. Its configs alone (no weights) are enough to say so."""
    model = tmp_path / "wan"
    for folder, config in (("transformer", {"_class_name": "WanTransformer3DModel"}),
                           ("vae", {"_class_name": "AutoencoderKLWan"})):
        (model / folder).mkdir(parents=True)
        (model / folder / "config.json").write_text(json.dumps(config))
    (model / "model_index.json").write_text(json.dumps({"_class_name": "WanPipeline",
                                                        "transformer": ["diffusers", "WanTransformer3DModel"],
                                                        "vae": ["diffusers", "AutoencoderKLWan"]}))
    line = refused(2, "--model", model, *FAST)
    assert "WanPipeline, which makes videos" in line and "FLUX.1, Flux2, QwenImage" in line


def test_an_image_of_fewer_tokens_than_processes_is_refused(refused, tiny_flux):
    line = refused(2, "--model", tiny_flux, "--height", "16", "--width", "16")
    assert "16x16 image is 1 tokens, fewer than the 2 processes" in line


def test_a_size_that_is_not_a_multiple_of_the_patch_is_refused_with_one_that_is(refused, tiny_qwenimage):
    assert "--height 40 does not suit" in refused(2, "--model", tiny_qwenimage, "--height", "40", "--width", "48")


def test_staged_is_refused_for_a_pipeline_other_than_flux1(refused, tiny_qwenimage):
    assert "--staged is for FLUX.1 pipelines" in refused(2, "--model", tiny_qwenimage, *UNEVEN, "--staged")


def test_heads_that_the_processes_cannot_share_name_the_process_counts_that_work(refused, tiny_flux):
    assert "2 attention heads cannot be shared between 3 processes" in refused(3, "--model", tiny_flux, *FAST)


def test_ring_attention_on_the_cpu_says_why_not_and_what_to_use(refused, tiny_flux):
    line = refused(2, "--model", tiny_flux, *FAST, "--ring-degree", "2")
    assert "log-sum-exp" in line and "the only one on the CPU" in line and "--ulysses-degree" in line


def test_degrees_that_do_not_multiply_to_the_processes_are_refused(refused, tiny_flux):
    assert "must be the number of processes, 2" in refused(2, "--model", tiny_flux, *FAST, "--ulysses-degree", "4")


def test_too_little_ram_for_every_process_copy_is_refused(refused, tiny_flux, monkeypatch):
    monkeypatch.setattr(psutil, "virtual_memory", lambda: SimpleNamespace(available=2**20))
    line = refused(2, "--model", tiny_flux, *FAST)
    assert "2 process(es) on the CPU need" in line and "1.0 MiB is free" in line and "run fewer processes" in line


def test_under_a_launcher_a_bad_input_is_said_once_and_ends_every_process(tiny_flux, tmp_path):
    """The two processes a launcher starts, each run here as that process (its launcher's variables): both stop
    before any process group forms (so neither waits for the other, and the launcher ends the job), and the first
    alone says why. (A real torchrun, both processes failing alike: tests/test_data_parallelism.py, whose `fail`
    is this script's, word for word.)"""
    said = []
    for rank in (0, 1):
        result = run_main(CONTEXT_PARALLEL, "--model", tiny_flux, "--height", "40", "--width", "48", "--output",
                          tmp_path / "x.png", "--device", "cpu", **launched_as(rank))
        assert result.returncode not in (None, 0) and "Traceback" not in result.stderr
        said.append(result.stderr)
    assert said[0].startswith("error: --height 40 does not suit") and said[0].count("\n") == 1 and said[1] == ""
    assert not (tmp_path / "x.png").exists()


# --- prompts and sizes that 2 processes do not divide: ulysses_anything ---


def uneven_runs(model, tmp_path_factory, *extra):
    """The same uneven command as one plain process (in this process) and as 2 torchrun processes."""
    tmp = tmp_path_factory.mktemp("uneven")
    args = ["--model", model, *UNEVEN, *extra, "--device", "cpu"]
    one = run_main(CONTEXT_PARALLEL, *args, "--output", tmp / "one.png", check=True)
    two = run(torchrun(2, CONTEXT_PARALLEL, *args, "--output", tmp / "two.png"))
    return SimpleNamespace(one=one, two=two, images={n: pixels(tmp / f"{n}.png") for n in ("one", "two")}, tmp=tmp)


@pytest.fixture(scope="module")
def qwenimage_uneven(tiny, tmp_path_factory):
    """The page's tiny QwenImage command (2 torchrun processes; 48x48 is 9 image tokens, and "a fox" an odd count of
    prompt tokens: 2 processes divide neither), and its settings as one plain process, in this process."""
    tmp = tmp_path_factory.mktemp("uneven")
    two = run_readme_command(CP_QWENIMAGE_TINY, tiny, tmp)
    one = run_main(CONTEXT_PARALLEL, "--model", tiny["qwenimage"], "--prompt", FOX, *UNEVEN_PAGE, "--device", "cpu",
                   "--output", tmp / "one.png", check=True)
    return SimpleNamespace(one=one, two=two, images={"one": pixels(tmp / "one.png"), "two": pixels(tmp / "out.png")},
                           tmp=tmp)


@pytest.fixture(scope="module")
def flux_uneven(tiny_flux, tmp_path_factory):
    return uneven_runs(tiny_flux, tmp_path_factory, "--max-sequence-length", "511")


@pytest.fixture(scope="module")
def qwenimage_pipeline(tiny_qwenimage):
    pipeline = QwenImagePipeline.from_pretrained(tiny_qwenimage, dtype=torch.float32)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@SHARED_RUNS
def test_two_processes_make_qwenimages_image_for_a_prompt_and_size_they_do_not_divide(qwenimage_uneven,
                                                                                    qwenimage_pipeline):
    made = qwenimage_pipeline(FOX, height=48, width=48, num_inference_steps=2, guidance_scale=3.5,
                              max_sequence_length=512, generator=torch.Generator("cpu").manual_seed(0)).images[0]
    oracle = np.asarray(made.convert("RGB"), dtype=np.int16)
    assert np.abs(qwenimage_uneven.images["one"] - oracle).max() <= 1  # within 1/255
    assert np.abs(qwenimage_uneven.images["two"] - qwenimage_uneven.images["one"]).max() <= 1
    assert "Traceback" not in qwenimage_uneven.two.stderr + qwenimage_uneven.one.stderr
    assert sorted(p.name for p in qwenimage_uneven.tmp.iterdir()) == ["one.png", "out.png"]  # no temporary file


@SHARED_RUNS
def test_the_split_line_counts_qwenimages_real_prompt_tokens(qwenimage_uneven, qwenimage_pipeline, script, capsys,
                                                             monkeypatch, tiny_qwenimage):
    """The oracle: the pipeline's own encode_prompt. The plan (before loading) and the report say that count."""
    tokens = qwenimage_pipeline.encode_prompt(FOX, device="cpu")[0].shape[1]
    assert tokens % 2 == 1  # the point of the prompt: 2 processes do not divide it
    share = (9 + 1) // 2 + (tokens + 1) // 2  # the first process's share, the larger
    assert (f"split: 9 image tokens + {tokens} prompt tokens between 2 process(es): up to {share} tokens per "
            "process, up to 2 of 3 heads each in every attention (uneven: ulysses_anything)"
            ) in qwenimage_uneven.two.stdout
    assert f"9 image tokens + {tokens} prompt tokens between 1 process(es)" in qwenimage_uneven.one.stdout
    monkeypatch.setattr("sys.argv", ["x", "--plan", "--json", "--model", str(tiny_qwenimage), "--prompt", FOX,
                                     *UNEVEN, "--num-devices", "2", "--device", "cpu"])
    script.main()
    planned = json.loads(capsys.readouterr().out)
    assert (planned["text_tokens"], planned["ulysses_anything"], planned["can_stage"]) == (tokens, True, False)
    assert "staged" not in planned["needs"]


@SHARED_RUNS
def test_two_processes_make_fluxs_image_at_a_size_and_prompt_length_they_do_not_divide(flux_uneven, tiny_flux):
    pipeline = FluxPipeline.from_pretrained(tiny_flux, dtype=torch.float32)
    pipeline.set_progress_bar_config(disable=True)
    oracle = np.asarray(pipeline(PROMPT, height=48, width=48, num_inference_steps=2, guidance_scale=3.5,
                                 max_sequence_length=511, generator=torch.Generator("cpu").manual_seed(3)).images[0]
                        .convert("RGB"), dtype=np.int16)
    assert np.abs(flux_uneven.images["one"] - oracle).max() <= 1
    assert np.abs(flux_uneven.images["two"] - flux_uneven.images["one"]).max() <= 1
    assert ("9 image tokens + 511 prompt tokens between 2 process(es): up to 261 tokens per process"
            in flux_uneven.two.stdout)
    assert "Traceback" not in flux_uneven.two.stderr


def test_a_plan_for_qwenimage_offers_no_staged_load(script, monkeypatch, capsys, tiny_qwenimage):
    monkeypatch.setattr("sys.argv", ["x", "--plan", "--model", str(tiny_qwenimage), "--num-devices", "2",
                                     "--device", "cpu", *UNEVEN])
    script.main()
    out = capsys.readouterr().out
    assert "--staged" not in out and "fits: yes" in out and "uneven, by diffusers' ulysses_anything" in out


@pytest.mark.parametrize("kind, expected", [("cuda", "cpu:gloo,cuda:nccl"), ("xpu", "cpu:gloo,xpu:xccl"),
                                            (None, "cpu:gloo")])
def test_the_group_has_a_cpu_gloo_backend_for_ulysses_anythings_size_exchange(kind, expected, script, monkeypatch):
    """diffusers' gather_size_by_comm exchanges the processes' sizes on the CPU only where the group's backend names
    "cpu"; else on torch.accelerator.current_accelerator(): a copy each way on GPUs, and on this CPU-only machine a
    CUDA device that is not there. Observed: the backend the script forms its group with, on a simulated machine
    with 2 GPUs of each kind (and none)."""
    formed = []
    if kind:
        simulated_gpus(monkeypatch, 2, kind)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(torch.distributed, "rendezvous", lambda url, **kwargs: iter([(
        torch.distributed.HashStore(), 0, 1)]))
    monkeypatch.setattr(torch.distributed, "init_process_group",
                        lambda backend, **kwargs: formed.append(backend) or (_ for _ in ()).throw(SystemExit(9)))
    with pytest.raises(SystemExit):
        script.form_the_group(SimpleNamespace(device="auto"))
    assert formed == [expected]


@pytest.mark.skipif(torch.accelerator.is_available(), reason="the workaround is for gloo, on a CPU-only machine")
def test_gloo_still_refuses_pieces_of_unequal_size_and_the_workaround_gathers_them(script, tmp_path):
    """ulysses_anything gathers the transformer's output in uneven pieces with dist.all_gather, which gloo refuses:
    the script pads them on the CPU. When the first assertion fails, gloo gathers them: remove the workaround."""
    torch.distributed.init_process_group("cpu:gloo", store=torch.distributed.FileStore(str(tmp_path / "store"), 1),
                                         rank=0, world_size=1)
    try:
        pieces = [torch.empty(1, 5, 2)]
        with pytest.raises(RuntimeError, match="invalid tensor size"):
            torch.distributed.all_gather(pieces, torch.ones(1, 4, 2))
        mine = torch.arange(10.0).reshape(1, 5, 2)
        script.all_gather_of_any_sizes(torch.distributed.all_gather)(pieces, mine)
        assert torch.equal(pieces[0], mine)
    finally:
        torch.distributed.destroy_process_group()


# --- a GPU without FP64 (Intel Arc A-series), simulated ---


def test_without_fp64_qwenimage_keeps_its_rotary_embedding_and_runs(script, monkeypatch, capsys, tiny_qwenimage):
    """The FP64 remedy computes on the CPU a rotary embedding called as `pos_embed(ids)` that asks for float64
    (FLUX.1's). QwenImage calls its own as `pos_embed(img_shapes, max_txt_seq_len=..., device=...)`, in complex64:
    on a simulated Arc A770 (no FP64), the remedy leaves it as it is and says nothing, and the pipeline runs its
    transformer (wrapped, it stopped with a TypeError). The image is the one made before the simulation."""
    pipeline = QwenImagePipeline.from_pretrained(tiny_qwenimage, dtype=torch.float32)
    pipeline.set_progress_bar_config(disable=True)

    def image():
        return pixels_of(pipeline(FOX, height=32, width=32, num_inference_steps=1,
                                  generator=torch.Generator("cpu").manual_seed(3)).images[0])

    before, original = image(), pipeline.transformer.pos_embed
    simulated_gpus(monkeypatch, 1, "xpu", fp64=False)
    assert not torch.get_device_module("xpu").get_device_properties(0).has_fp64  # the simulation holds
    capsys.readouterr()
    assert script.no_fp64_remedy(pipeline, [torch.device("xpu", 0)]) == []
    assert pipeline.transformer.pos_embed is original and capsys.readouterr().err == ""
    assert np.array_equal(image(), before)


def pixels_of(image):
    return np.asarray(image.convert("RGB"), dtype=np.int16)


# --- a process that stops mid-image: the job ends, in one line ---


@pytest.mark.parametrize("stalled", [1, 0], ids=["rank-1-stops", "main-process-stops"])
def test_a_process_that_stops_mid_image_ends_the_job_in_one_line(stalled, tiny_flux, tmp_path):
    """STALL_RANK (tests/simulate/sitecustomize.py): that process sleeps an hour in its second denoising step, the
    other waits for it in a collective."""
    started = time.monotonic()
    result = run(torchrun(2, CONTEXT_PARALLEL, "--model", tiny_flux, *FAST, "--device", "cpu", "--output",
                          tmp_path / "x.png", "--stall-timeout", "3"), check=False, timeout=240,
                 env={"PYTHONPATH": str(SIMULATE), "STALL_RANK": str(stalled)})
    assert result.returncode != 0
    # The line may follow the main process's progress bar, which has no line end of its own while a step is on.
    errors = re.findall(r"error: .*", result.stderr)
    assert len(errors) == 1 and errors[0].startswith("error: no denoising step for "), result.stderr
    assert f"({2 - (stalled == 0)} of 2 made" in errors[0] and "a process of the group has stopped" in errors[0]
    assert "--stall-timeout" in errors[0]
    assert time.monotonic() - started < 120  # seconds, not the group's week
    assert list(tmp_path.iterdir()) == []


# --- --plan: FLUX.1-dev from its real configs, no weights ---


@pytest.fixture
def plan(script, monkeypatch, capsys):
    def plan(devices, memory, *extra):
        monkeypatch.setattr("sys.argv", ["context-parallelism-flux.py", "--plan", "--json", "--model", str(FLUX1_DEV),
                                         "--num-devices", str(devices), "--device-memory", memory, *extra])
        script.main()
        return json.loads(capsys.readouterr().out)
    return plan


def test_flux1_dev_on_two_80_gib_gpus_fits_and_splits_its_tokens_in_two(plan):
    result = plan(2, "80GiB")
    assert result["fits"] and not result["problems"]
    # 1024x1024: 64 x 64 patches of 16 pixels; 512 T5 tokens; 24 heads (FLUX.1-dev's config), 12 per process.
    assert (result["image_tokens"], result["text_tokens"], result["tokens_per_process"]) == (4096, 512, 2304)
    assert (result["heads"], result["ulysses_degree"]) == (24, 2)
    # 31.4 GiB in bfloat16 as loaded: the figure the sharding script and the README give (transformer 22.2 GiB).
    assert round(result["weights"] / GiB, 1) == 31.4 and round(result["components"]["transformer"] / GiB, 1) == 22.2


def test_flux1_dev_on_two_24_gib_gpus_does_not_fit_even_staged_and_names_the_sharding_script(plan):
    for extra in ([], ["--staged"]):
        result = plan(2, "24GiB", *extra)
        assert not result["fits"]
        assert "model-parallelism-flux.py" in result["problems"][-1]


def test_freeing_the_text_encoders_fits_flux1_dev_on_32_gib_gpus_and_the_plan_offers_it(plan):
    whole, staged = plan(2, "32GiB"), plan(2, "32GiB", "--staged")
    assert not whole["fits"] and "add --staged" in whole["problems"][-1] and "9.10 GiB less per GPU" in whole[
        "problems"][-1]
    assert staged["fits"]
    assert whole["needs"]["whole"] - staged["needs"]["staged"] == whole["text_encoders"]  # T5 + CLIP-L


def test_the_plan_prints_the_split_and_both_memory_figures(script, monkeypatch, capsys):
    monkeypatch.setattr("sys.argv", ["x", "--plan", "--model", str(FLUX1_DEV), "--num-devices", "4",
                                     "--device-memory", "80GiB"])
    script.main()
    out = capsys.readouterr().out
    assert "4608, 1152 per process; 24 heads, 6 per process" in out
    assert "needs 34.42 GiB" in out and "needs 25.32 GiB, 9.10 GiB less" in out and "fits: yes" in out


def test_a_plan_for_five_gpus_pads_the_24_heads_to_5_each(plan):
    result = plan(5, "80GiB")  # diffusers pads 24 heads to 25: 5 a process, the last with 4 real ones
    assert result["fits"] and result["ulysses_anything"] and result["heads_per_process"] == 5
    assert result["tokens_per_process"] == 820 + 103  # 4096 / 5 and 512 / 5, rounded up: the first processes' share


def test_a_plan_for_sixteen_gpus_says_the_24_heads_cannot_be_padded(plan):
    result = plan(16, "80GiB")  # 24 heads: 2 a process would need 8 padding heads, more than the 2 real ones
    assert not result["fits"] and any("24 attention heads cannot be shared between 16" in p and
                                      "run 2, 3, 4, 5, 6, 8, 12, 24 process(es)" in p for p in result["problems"])


# --- the CPU workaround: still needed? ---


@pytest.mark.skipif(torch.accelerator.is_available(), reason="the workaround is for machines with no accelerator")
def test_diffusers_still_divides_by_the_accelerator_count_on_the_cpu(tmp_path):
    """The script counts the CPU as one device while enable_parallelism runs. When this test fails, diffusers no
    longer divides by torch.accelerator.device_count() (0 here): remove the workaround from the script."""
    transformer = FluxTransformer2DModel(num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
                                         joint_attention_dim=8, pooled_projection_dim=8, in_channels=4,
                                         axes_dims_rope=[2, 2, 4])
    torch.distributed.init_process_group("gloo", store=torch.distributed.FileStore(str(tmp_path / "store"), 1),
                                         rank=0, world_size=1)
    try:
        with pytest.raises(ZeroDivisionError):
            transformer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=2))
    finally:
        torch.distributed.destroy_process_group()


# --- GPUs: skipped where there are none ---


@accelerator
@pytest.mark.skipif(torch.accelerator.device_count() < 2, reason="needs 2 GPUs or more")
def test_two_gpus_make_the_image_of_one_faster_per_step(tmp_path):
    """A random-weight FLUX transformer big enough that compute outweighs the all-to-all (benchmarks/), in bfloat16.
    Tolerance: bfloat16 keeps 8 bits of mantissa, and 2 GPUs add the attention's terms in another order (each GPU
    attends over half the heads with a kernel chosen for that shape), so the latents differ by about 2**-8 of their
    size, a few of 255 in some pixel values after the VAE: the mean difference stays below 2 of 255."""
    benchmark = load_script(ROOT / "benchmarks" / "context_parallel.py")
    model = benchmark.build_pipeline(tmp_path / "model", hidden=3072, heads=24, blocks=(2, 4))
    times, images = {}, {}
    for n in (1, 2):
        out = tmp_path / f"{n}.png"
        launch = torchrun(n, CONTEXT_PARALLEL, "--model", model, "--height", "1024", "--width", "1024",
                          "--num-inference-steps", "20", "--output", out)
        times[n] = benchmark.per_step_seconds(run(launch, timeout=900).stdout)
        images[n] = pixels(out)
    assert np.abs(images[2] - images[1]).mean() < 2
    assert times[2] < times[1]


@accelerator
@pytest.mark.skipif(torch.accelerator.device_count() < 2, reason="needs 2 GPUs or more")
def test_two_gpus_split_a_size_and_a_prompt_they_do_not_divide(tmp_path):
    """ulysses_anything on the GPUs' own backend (nccl, xccl: uneven all-to-alls and an uneven all-gather, with the
    sizes exchanged on the group's gloo), which the CPU tests run on gloo alone: 496x496 (961 image tokens) and 511
    prompt tokens on 2 GPUs, against 1 GPU, in bfloat16. Tolerance: the even test's (above)."""
    benchmark = load_script(ROOT / "benchmarks" / "context_parallel.py")
    model = benchmark.build_pipeline(tmp_path / "model", hidden=768, heads=12, blocks=(2, 4))
    images, said = {}, {}
    for n in (1, 2):
        out = tmp_path / f"{n}.png"
        said[n] = run(torchrun(n, CONTEXT_PARALLEL, "--model", model, "--height", "496", "--width", "496",
                               "--max-sequence-length", "511", "--num-inference-steps", "8", "--output", out),
                      timeout=900).stdout
        images[n] = pixels(out)
    assert "961 image tokens + 511 prompt tokens between 2 process(es): up to 737 tokens per process" in said[2]
    assert "(uneven: ulysses_anything)" in said[2]
    assert np.abs(images[2] - images[1]).mean() < 2


@SHARED_RUNS
def test_staged_two_processes_make_the_same_image(tiny, diffusers_image, tmp_path):
    """The README's staged command (text encoders first, freed, then the transformer and the VAE) makes the same
    image, diffusers' own for the default seed, 0."""
    run_readme_command(CP_TORCHRUN_STAGED, tiny, tmp_path)
    assert np.abs(pixels(tmp_path / "out.png") - diffusers_image(0)).max() <= 1


def test_the_readme_table_of_flux1_dev_plans_is_what_the_script_plans(plan):
    readme = (ROOT / "docs" / "context-parallelism.md").read_text(encoding="utf-8")
    rows = re.findall(r"^\| 2 x (\d+) GiB \| (yes|\*\*no\*\*)(; yes with `--staged`)?", readme, flags=re.MULTILINE)
    assert len(rows) == 3
    for memory, fits, staged_fits in rows:
        assert plan(2, f"{memory}GiB")["fits"] == (fits == "yes"), memory
        assert plan(2, f"{memory}GiB", "--staged")["fits"] == (fits == "yes" or bool(staged_fits)), memory


# --- the guards: the same code as in the other scripts ---


@pytest.mark.parametrize("helper", ["fail", "end_process_group", "check_torch_can_use_the_gpus", "gpus_on_the_pci_bus",
                                    "why_hidden", "no_fp64_remedy", "OnTheCPU", "default_dtype", "gpu_memory",
                                    "free_memory"])
def test_the_gpu_machine_guards_are_the_data_parallel_scripts_own(helper):
    """Copied, not rewritten: a fix to one script's guard (tests/test_gpu_machines.py tests them there) must reach
    this one too. When this fails, port the change."""
    def source(path):  # the text of the top-level function or class, as written
        text = path.read_text(encoding="utf-8")
        node = next(n for n in ast.parse(text).body if getattr(n, "name", None) == helper)
        return ast.get_source_segment(text, node)

    assert source(CONTEXT_PARALLEL) == source(ROOT / "data-parallelism-accelerate.py")


def test_more_processes_than_gpus_is_refused_with_the_launch_that_fits(script, monkeypatch, capsys):
    monkeypatch.setattr(torch.accelerator, "is_available", lambda: True)
    monkeypatch.setattr(torch.accelerator, "device_count", lambda: 2)
    monkeypatch.setattr(torch.accelerator, "current_accelerator", lambda: torch.device("xpu"))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    for mask in ("CUDA_VISIBLE_DEVICES", "ZE_AFFINITY_MASK"):  # a GPU of its own for each process is accepted
        monkeypatch.delenv(mask, raising=False)
    monkeypatch.setattr("sys.argv", ["context-parallelism-flux.py"])
    with pytest.raises(SystemExit):
        script.check_launch(SimpleNamespace(device="auto"))
    err = capsys.readouterr().err
    assert "4 processes on this machine, but it has 2 xpu device(s)" in err
    assert "accelerate launch --multi_gpu --num_processes 2 context-parallelism-flux.py" in err
    assert "(torchrun: --nproc-per-node 2)" in err
