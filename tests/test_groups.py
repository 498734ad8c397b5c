"""data-parallelism-accelerate.py with groups (--context-parallel N, --cfg-parallel): many images, each made by a
group of processes together, the groups sharing the prompts along the "data" dimension of one device mesh.

Two commands of docs/data-parallelism.md, run as tests/test_readme.py runs every page command (the tiny pipelines,
2 steps at 64 px, on the CPU), each 4 processes in 2 groups of 2, on the 16 prompts of prompts.txt: the tiny Flux
with --context-parallel 2, in which a process of the second group is killed at its last image and then the same
command is run again (it has 1 image left to make, fewer than the groups: one group has nothing to do), and the tiny
SD3 with --cfg-parallel. A probe inside the processes records each pipeline call of each process, its prompts, and
what the transformer saw: the image and prompt tokens that the first FLUX block got (after diffusers' split), and
the batch of each SD3 transformer call (after the guidance batch's split). The images are checked against
diffusers' pipelines called directly: plain data parallelism makes the same images, so only the probe shows who
made each. Bad layouts and plans run in this process (run_main); GPU runs where there are enough GPUs.
"""

import contextlib
import json
import re
import textwrap
from types import SimpleNamespace

import numpy as np
import psutil
import pytest
import torch
from diffusers import FluxPipeline, StableDiffusion3Pipeline

from tests.conftest import (DATA_PARALLEL, IMAGES, ROOT, SIMULATE, accelerator, assert_clear_error, load_script,
                            pixels, probe_env, read_manifest, run, run_main, torchrun)
from tests.test_long_runs import assert_one_bar_for_the_job
from tests.test_readme import GROUPS_CFG, GROUPS_CONTEXT, run_readme_command

SHARED_RUNS = pytest.mark.xdist_group("groups")  # the module-scoped runs below, made once

PROMPTS = [p for p in (ROOT / "prompts.txt").read_text(encoding="utf-8").splitlines() if p.strip()]
FLUX1_DEV = ROOT / "tests" / "fixtures" / "flux1-dev"  # FLUX.1-dev's real config.json files, no weights
SD35_MEDIUM = ROOT / "tests" / "fixtures" / "sd3.5-medium"
FAST = ["--num-inference-steps", "2", "--height", "64", "--width", "64", "--device", "cpu"]
TOLERANCE = 3  # of 255: processes add their floats in another order (tests/test_data_parallelism.py)
GiB = 2**30
# Inside every worker (Python imports `sitecustomize` at start-up, tests/conftest.py: probe_env): a line per pipeline
# call of this process with its prompts and what the transformer saw, in GROUPS_PROBE/rank<R>.jsonl. With
# KILL_RANK_AT_CALL=R:C:N the process of rank R, at its C-th pipeline call, waits until N images are in KILL_OUT and
# is killed (SIGKILL: as the kernel's out-of-memory killer does), while the other process of its group waits for it in
# the first collective of that image.
PROBE = textwrap.dedent("""
    import json, os
    if os.environ.get("GROUPS_PROBE") and "RANK" in os.environ:
        import functools, glob, logging, signal, time
        # as the script does, before diffusers is imported: no warning about image processors it never uses
        logging.getLogger("transformers.utils.import_utils").addFilter(lambda r: "torchvision" not in r.getMessage())
        import diffusers
        from diffusers.models.transformers import transformer_flux

        rank, now = int(os.environ["RANK"]), {"calls": 0}

        def record(**seen):
            with open(os.path.join(os.environ["GROUPS_PROBE"], "rank%d.jsonl" % rank), "a") as f:
                f.write(json.dumps({"rank": rank, "call": now["calls"], "prompts": now["prompts"], **seen}) + "\\n")

        def watch_calls(cls):
            call = cls.__call__

            @functools.wraps(call)
            def probe(self, *args, **kwargs):
                now.update(prompts=kwargs.get("prompt"), first_block=True, calls=now["calls"] + 1)
                kill = os.environ.get("KILL_RANK_AT_CALL", "").split(":")
                if kill != [""] and (int(kill[0]), int(kill[1])) == (rank, now["calls"]):
                    while len(glob.glob(os.path.join(os.environ["KILL_OUT"], "[0-9]*-*.png"))) < int(kill[2]):
                        time.sleep(0.05)
                    os.kill(os.getpid(), signal.SIGKILL)
                return call(self, *args, **kwargs)

            cls.__call__ = probe

        watch_calls(diffusers.FluxPipeline)
        watch_calls(diffusers.StableDiffusion3Pipeline)
        block = transformer_flux.FluxTransformerBlock.forward

        def first_block(self, hidden_states, encoder_hidden_states, *args, **kwargs):
            if now["first_block"]:
                now["first_block"] = False
                record(image_tokens=hidden_states.shape[1], text_tokens=encoder_hidden_states.shape[1])
            return block(self, hidden_states, encoder_hidden_states, *args, **kwargs)

        transformer_flux.FluxTransformerBlock.forward = first_block
        sd3 = diffusers.SD3Transformer2DModel.forward

        def sd3_transformer(self, hidden_states, *args, **kwargs):
            record(batch=hidden_states.shape[0])
            return sd3(self, hidden_states, *args, **kwargs)

        diffusers.SD3Transformer2DModel.forward = sd3_transformer
""")


def with_probe(folder, **extra):
    """The environment that puts PROBE in every process of a run, and the folder where it writes."""
    seen = folder / "seen"
    seen.mkdir(parents=True)
    return {**probe_env(folder, PROBE), "GROUPS_PROBE": str(seen), **extra}, seen


def calls(seen):
    """Every pipeline call the probe saw, in every process: [{"rank", "call", "prompts", ...}, ...]."""
    return [json.loads(line) for path in sorted(seen.glob("rank*.jsonl"))
            for line in path.read_text(encoding="utf-8").splitlines()]


def who_made(seen):
    """prompt -> the ranks whose pipeline made it (the probe's calls, one prompt a call here: --batch-size 1)."""
    made = {}
    for call in calls(seen):
        [prompt] = call["prompts"]
        made.setdefault(prompt, set()).add(call["rank"])
    return made


def errors(stderr):
    return re.findall(r"^error: .*", stderr, flags=re.MULTILINE)


@pytest.fixture(scope="module")
def context(tiny, tmp_path_factory):
    """The pages' --context-parallel command, 4 processes in 2 groups of 2 (ranks 0-1 make prompts 0-7, ranks 2-3
    prompts 8-15): rank 3, at its eighth image, waits until the 15 others are saved and is killed. Then the same
    command again: 1 image left, fewer than the groups."""
    tmp = tmp_path_factory.mktemp("context")
    out = tmp / "out"
    env, killed_seen = with_probe(tmp / "killed", KILL_RANK_AT_CALL=f"3:8:{len(PROMPTS) - 1}", KILL_OUT=str(out))
    killed = run_readme_command(GROUPS_CONTEXT, tiny, tmp, check=False, timeout=300, **env)
    left = [p for p in psutil.process_iter(["cmdline"]) if str(out) in " ".join(p.info["cmdline"] or [])]
    alive = psutil.wait_procs(left, timeout=10)[1]
    after_the_kill = {p.name: p.stat().st_mtime_ns for p in out.glob(IMAGES)}
    metadata_after_the_kill = read_manifest(out)
    env, resumed_seen = with_probe(tmp / "resumed")
    resumed = run_readme_command(GROUPS_CONTEXT, tiny, tmp, timeout=300, **env)
    return SimpleNamespace(out=out, killed=killed, killed_seen=killed_seen, left_alive=alive,
                           after_the_kill=after_the_kill, metadata_after_the_kill=metadata_after_the_kill,
                           resumed=resumed, resumed_seen=resumed_seen)


@pytest.fixture(scope="module")
def cfg(tiny, tmp_path_factory):
    """The pages' --cfg-parallel command: 4 processes in 2 groups of 2, the tiny SD3 (guidance 7.0, its own)."""
    tmp = tmp_path_factory.mktemp("cfg")
    env, seen = with_probe(tmp / "probe")
    result = run_readme_command(GROUPS_CFG, tiny, tmp, timeout=300, **env)
    return SimpleNamespace(out=tmp / "out", result=result, seen=seen)


def assert_each_prompt_once_in_order(out):
    metadata = read_manifest(out)
    assert [(r["index"], r["prompt"], r["seed"]) for r in metadata] == [(i, p, i) for i, p in enumerate(PROMPTS)]
    assert sorted(p.name for p in out.glob(IMAGES)) == [r["file_name"] for r in metadata]
    return metadata


def group_of(index):
    """The ranks that make prompt INDEX in a first run: the groups' contiguous shares, 8 prompts each."""
    return [0, 1] if index < len(PROMPTS) // 2 else [2, 3]


def assert_like_diffusers(out, pipeline_class, model, guidance_scale, indexes):
    """Each of these images is the one diffusers' pipeline makes, called directly in this process, for its prompt
    and seed (the script's settings: 2 steps, 64x64, float32 on the CPU, the pipeline's own guidance)."""
    pipeline = pipeline_class.from_pretrained(model, dtype=torch.float32)
    pipeline.set_progress_bar_config(disable=True)
    metadata = read_manifest(out)
    assert {r["index"] for r in metadata} >= set(indexes)
    for r in metadata:
        if r["index"] in indexes:
            expected = pipeline(r["prompt"], num_inference_steps=2, height=64, width=64, guidance_scale=guidance_scale,
                                generator=torch.Generator("cpu").manual_seed(r["index"])).images[0]
            difference = np.abs(pixels(out / r["file_name"]) - np.asarray(expected.convert("RGB"), dtype=np.int16))
            assert difference.max() <= TOLERANCE, f"{r['file_name']} differs from diffusers' by {difference.max()}"


# --- context parallel groups: a process killed, then the same command again ---


@SHARED_RUNS
def test_a_process_killed_in_a_group_ends_the_job_with_one_line_and_whole_images(context):
    assert context.killed.returncode != 0
    assert errors(context.killed.stderr) == [
        "error: rank 3 of the group of ranks 2, 3 was killed (SIGKILL) while the group was making an image: ending "
        "the job; the images saved are whole: run the same command again to make the rest"], context.killed.stderr
    assert "]: Traceback" not in context.killed.stderr  # no process's traceback (the launcher's report may follow)
    assert not context.left_alive  # the launcher stopped the others
    # Rank 3 was killed at its last image, once every other was saved: whole, each with its line.
    assert sorted(context.after_the_kill) == sorted(r["file_name"] for r in context.metadata_after_the_kill)
    assert sorted(r["index"] for r in context.metadata_after_the_kill) == list(range(len(PROMPTS) - 1))
    assert not list(context.out.glob(".*.tmp"))


@SHARED_RUNS
def test_the_same_command_again_makes_only_the_image_left_though_a_group_has_nothing_to_do(context):
    """1 image left and 2 groups: the first group makes it; the second has nothing to make, loads nothing, and still
    takes part in the collectives of every process (the mesh, diffusers' context-parallel groups), so the job ends."""
    result = context.resumed
    assert f"{len(PROMPTS) - 1} of {len(PROMPTS)} images are already in" in result.stdout
    assert f"made 1 images ({len(PROMPTS) - 1} already there) with 4 process(es) in 2 groups of 2" in result.stdout
    metadata = assert_each_prompt_once_in_order(context.out)
    assert all((context.out / name).stat().st_mtime_ns == made for name, made in context.after_the_kill.items())
    assert metadata[-1]["ranks"] == [0, 1] and metadata[-1]["rank"] == 0  # the first group, its first process saved
    assert who_made(context.resumed_seen) == {PROMPTS[-1]: {0, 1}}  # ranks 2 and 3 made no pipeline call
    assert "rank 2 on cpu: 0 images with ranks 2, 3" in result.stdout
    summary = json.loads((context.out / "summary.json").read_text())
    assert (summary["images"], summary["already_there"], summary["group_size"]) == (1, len(PROMPTS) - 1, 2)
    assert_one_bar_for_the_job(result.stderr, len(PROMPTS) - 1, len(PROMPTS), finished=True)
    assert (context.out / "contact-sheet.png").exists()


@SHARED_RUNS
def test_each_image_was_made_by_both_processes_of_its_group_each_on_half_of_its_tokens(context):
    """64x64 is 4 x 4 patches of 16 pixels, 16 image tokens; the prompt is padded to 512 T5 tokens: each process of
    a group held 8 and 256. Every image by both processes of its group, the group whose share its prompt is."""
    first_run = calls(context.killed_seen)
    made = {prompt: ranks for prompt, ranks in who_made(context.killed_seen).items() if prompt != PROMPTS[-1]}
    assert made == {p: set(group_of(i)) for i, p in enumerate(PROMPTS[:-1])}
    assert {(c["image_tokens"], c["text_tokens"]) for c in first_run + calls(context.resumed_seen)} == {(8, 256)}
    for r in read_manifest(context.out)[:-1]:  # the metadata says so
        assert (r["ranks"], r["rank"]) == (group_of(r["index"]), group_of(r["index"])[0])


@SHARED_RUNS
def test_context_parallel_groups_make_the_images_diffusers_makes(context, tiny_flux):
    """Every image, those of the run that was killed and the one made after it: FluxPipeline's own, called
    directly (one process, no parallelism)."""
    assert_like_diffusers(context.out, FluxPipeline, tiny_flux, 3.5, range(len(PROMPTS)))


def test_a_process_of_a_group_that_stops_mid_image_ends_the_job_in_one_line(tiny_flux, tmp_path):
    """STALL_RANK (tests/simulate/sitecustomize.py): rank 1 sleeps an hour in its second denoising step (of 3), and
    rank 0, the other process of its group, waits for it in the third step's all-to-all. The group's collectives
    would wait their timeout (30 minutes), and end in a traceback: --stall-timeout ends the job in one line."""
    result = run(torchrun(2, DATA_PARALLEL, "--context-parallel", "2", "--model", tiny_flux, "--prompt", "a red fox",
                          *FAST, "--num-inference-steps", "3", "--output-dir", tmp_path / "out", "--stall-timeout", "3"),
                 check=False, timeout=120, env={"PYTHONPATH": str(SIMULATE), "STALL_RANK": "1"})
    assert result.returncode != 0
    said = errors(result.stderr)
    assert len(said) == 1 and said[0].startswith("error: no denoising step for "), result.stderr
    assert "(2 of 3 made" in said[0] and "a process of the group has stopped" in said[0] and "--stall-timeout" in said[0]
    assert f'File "{DATA_PARALLEL}"' not in result.stderr  # no traceback from the script (torchrun's own may follow)
    assert not list((tmp_path / "out").glob(IMAGES))


# --- CFG parallel groups ---


@SHARED_RUNS
def test_cfg_groups_split_each_guidance_batch_within_the_group(cfg):
    """The SD3 pipeline calls its transformer once a step on the guidance batch of 2: each of the 2 processes of a
    group ran it on a batch of 1, at each of the 2 steps, for every image of its group's share, and nothing else."""
    assert who_made(cfg.seen) == {p: set(group_of(i)) for i, p in enumerate(PROMPTS)}
    assert [c["batch"] for c in calls(cfg.seen)] == [1] * 2 * len(PROMPTS) * 2
    metadata = assert_each_prompt_once_in_order(cfg.out)
    assert [(r["ranks"], r["rank"]) for r in metadata] == [(group_of(i), group_of(i)[0]) for i in range(16)]
    assert f"made {len(PROMPTS)} images (0 already there) with 4 process(es) in 2 groups of 2" in cfg.result.stdout
    assert not errors(cfg.result.stderr) and "[transformers]" not in cfg.result.stderr
    assert_one_bar_for_the_job(cfg.result.stderr, 0, len(PROMPTS), finished=True)


@SHARED_RUNS
def test_cfg_groups_make_the_images_diffusers_makes(cfg, tiny_sd3):
    """The halves chosen by the rank within the group: the second group's ranks are 2 and 3 in the job, 0 and 1 in
    their group; chosen by the job's rank, their images would not be SD3's (or they would not run at all)."""
    assert_like_diffusers(cfg.out, StableDiffusion3Pipeline, tiny_sd3, 7.0, range(len(PROMPTS)))


# --- the output folder is a dataset ---


@SHARED_RUNS
@pytest.mark.parametrize("run_", ["context", "cfg"], ids=["resumed", "finished"])
def test_the_output_folder_loads_as_an_image_dataset_with_a_row_per_prompt(run_, request, tmp_path):
    """datasets' "imagefolder" reads metadata.jsonl: a row per image, with its prompt, seed and settings; the contact
    sheet, which has no line there, is left out."""
    import datasets

    out = request.getfixturevalue(run_).out
    assert len(list(out.glob("*.png"))) == len(PROMPTS) + 1  # the contact sheet too
    rows = datasets.load_dataset("imagefolder", data_dir=str(out), cache_dir=str(tmp_path / "cache"))["train"]
    assert sorted(zip(rows["index"], rows["prompt"], rows["seed"])) == [(i, p, i) for i, p in enumerate(PROMPTS)]
    assert all(image.size == (64, 64) for image in rows["image"])
    assert {tuple(ranks) for ranks in rows["ranks"]} == {(0, 1), (2, 3)}


# --- bad layouts: one line each, before anything is loaded (in this process) ---


@pytest.mark.parametrize("processes, args, expected", [
    (3, ["--context-parallel", "2", "--model", "flux"], "3 process(es) cannot form groups of 2: launch a multiple of "
                                                         "2"),
    (3, ["--context-parallel", "3", "--model", "flux"], "2 attention heads cannot be shared between the 3 processes"),
    (2, ["--context-parallel", "2", "--model", "flux", "--height", "16", "--width", "16"],
     "a 16x16 image is 1 tokens, fewer than the 2 processes of a group"),
    (2, ["--context-parallel", "2", "--model", "sd3"], "cannot split its transformer (SD3Transformer2DModel) by "
                                                        "context parallelism (it has no context-parallel plan): "
                                                        "--cfg-parallel splits its guidance batch instead"),
    (4, ["--cfg-parallel", "--model", "flux"], "is a FLUX.1 pipeline, which does no classifier-free guidance"),
    (4, ["--cfg-parallel", "--model", "qwenimage"], "is a QwenImagePipeline: leave out --cfg-parallel"),
    (2, ["--cfg-parallel", "--model", "sd3", "--guidance-scale", "1"], "--cfg-parallel with --guidance-scale 1: at 1 "
                                                                        "or below"),
    (2, ["--cfg-parallel", "--context-parallel", "2", "--model", "sd3"], "choose one"),
    (2, ["--context-parallel", "2", "--model", "flux", "--offload", "model"], "--offload model with groups"),
    (2, ["--context-parallel", "0", "--model", "flux"], "--context-parallel must be a positive number, not 0"),
], ids=["processes", "heads", "tokens", "no-plan", "flux-cfg", "qwenimage-cfg", "no-guidance", "both", "offload",
        "zero"])
def test_a_layout_the_processes_cannot_make_is_one_line_before_loading(processes, args, expected, tiny, tmp_path):
    args = [tiny[a] if a in tiny else a for a in args]
    result = run_main(DATA_PARALLEL, *FAST, *args, "--output-dir", tmp_path / "out", WORLD_SIZE=str(processes),
                      LOCAL_WORLD_SIZE=str(processes), LOCAL_RANK=None)
    assert_clear_error(result, expected)
    assert not (tmp_path / "out").exists()


def test_groups_never_span_machines(tiny_flux, tmp_path):
    """2 machines of 3 processes: groups of 2 in a row of ranks (0-1, 2-3, 4-5) would put ranks 2 and 3 on two
    machines, whose link is no GPU's. Refused on each machine, before any process group forms."""
    result = run_main(DATA_PARALLEL, "--context-parallel", "2", "--model", tiny_flux, *FAST, "--output-dir",
                      tmp_path / "out", WORLD_SIZE="6", LOCAL_WORLD_SIZE="3", LOCAL_RANK=None)
    assert_clear_error(result, "groups of 2 would span machines: this one runs 3 processes",
                       "start a multiple of 2 processes on each machine")


# --- the plan: the layout, and each GPU's memory (the real models' configs, no weights) ---


@pytest.fixture(scope="module")
def script():
    return load_script(DATA_PARALLEL)


@pytest.fixture
def plan(script, monkeypatch, capsys):
    def plan(*args):
        monkeypatch.setattr("sys.argv", [DATA_PARALLEL.name, "--plan", "--json", *map(str, args)])
        script.main()
        return json.loads(capsys.readouterr().out)
    return plan


def test_the_plan_for_flux1_dev_on_8_gpus_in_groups_of_2(plan):
    result = plan("--model", FLUX1_DEV, "--context-parallel", "2", "--num-devices", "8", "--device-memory", "80GiB",
                  *[a for i in range(10) for a in ("--prompt", f"prompt {i}")])
    layout = result["layout"]
    assert (layout["groups"], layout["mesh_dims"], layout["mesh_shape"]) == (4, ["data", "ring", "ulysses"], [4, 1, 2])
    # 10 prompts over 4 groups, as Accelerate splits them over 4 processes: 3, 3, 2, 2, in a row.
    assert [s["prompts"] for s in layout["shares"]] == [list(a) for a in np.array_split(np.arange(10), 4)]
    assert [s["ranks"] for s in layout["shares"]] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    # 1024x1024: 64 x 64 patches of 16 pixels; 512 T5 tokens; 24 heads (FLUX.1-dev's config), 12 per process.
    assert (layout["image_tokens"], layout["text_tokens"], layout["tokens_per_process"]) == (4096, 512, 2304)
    assert (layout["heads"], layout["heads_per_process"], layout["ulysses_anything"]) == (24, 12, False)
    assert result["fits"] and result["mode"] == "whole" and not layout["problems"]


def test_a_plan_in_groups_keeps_the_pipeline_whole_and_says_when_it_does_not_fit(plan):
    """SD3.5-medium on 16 GiB cards: offloaded alone (the model mode), but a group needs it whole on each GPU."""
    alone = plan("--model", SD35_MEDIUM, "--num-devices", "4", "--device-memory", "16GiB")
    grouped = plan("--model", SD35_MEDIUM, "--cfg-parallel", "--num-devices", "4", "--device-memory", "16GiB")
    assert (alone["mode"], alone["fits"]) == ("model", True)
    assert (grouped["mode"], grouped["fits"]) == ("whole", False)
    assert grouped["layout"]["mesh_dims"] == ["data", "cfg"] and grouped["layout"]["mesh_shape"] == [2, 2]
    assert plan("--model", SD35_MEDIUM, "--cfg-parallel", "--num-devices", "4", "--device-memory", "24GiB")["fits"]


def test_a_plan_names_what_a_layout_cannot_do(plan):
    result = plan("--model", FLUX1_DEV, "--context-parallel", "16", "--num-devices", "16", "--device-memory", "80GiB")
    assert not result["fits"]
    assert any("24 attention heads cannot be shared between the 16 processes of a group" in p and
               "use --context-parallel 2, 3, 4, 5, 6, 8, 12, 24" in p for p in result["layout"]["problems"])
    assert "3 process(es) cannot form groups of 2" in plan(
        "--model", FLUX1_DEV, "--context-parallel", "2", "--num-devices", "3", "--device-memory", "80GiB")[
            "layout"]["problems"][0]


@pytest.mark.parametrize("todo, workers", [(n, w) for n in (0, 1, 2, 5, 10) for w in (1, 2, 3, 4)])
def test_the_groups_share_the_prompts_as_accelerate_shares_them_between_processes(script, todo, workers):
    """The oracle: numpy's array_split, which is Accelerate's rule (contiguous, the first ones one longer)."""
    items = list(range(todo))
    alone = SimpleNamespace(split_between_processes=contextlib.nullcontext)  # Accelerate's split would give it all
    shares = [script.share_of_the_prompts(alone, SimpleNamespace(ranks=[0, 1], worker=w, workers=workers), items)
              for w in range(workers)]
    assert shares == [list(a) for a in np.array_split(np.arange(todo), workers)]


# --- GPUs: skipped where there are not enough ---

GPU_TOLERANCE = 8  # of 255: float32 on a GPU rounds differently from the CPU (tests/test_gpu_machines.py)


@accelerator
@pytest.mark.skipif(torch.accelerator.device_count() < 2, reason="needs 2 GPUs or more: a group of 2")
@pytest.mark.parametrize("model, flag", [("tiny_flux", ["--context-parallel", "2"]), ("tiny_sd3", ["--cfg-parallel"])],
                         ids=["context", "cfg"])
def test_groups_of_gpus_make_the_images_of_one_cpu_process(model, flag, request, tmp_path):
    """Every GPU in groups of 2 (xccl or nccl within a group, gloo beside it), in float32: the images of one CPU
    process, each saved by its group's first process, and the metadata names the group; with 4 GPUs or more, the
    groups share the prompts."""
    n = torch.accelerator.device_count() // 2 * 2
    common = ["--model", request.getfixturevalue(model), *[a for p in PROMPTS[:n + 1] for a in ("--prompt", p)],
              "--num-inference-steps", "2", "--height", "64", "--width", "64", "--dtype", "float32"]
    run_main(DATA_PARALLEL, *common, "--device", "cpu", "--output-dir", tmp_path / "cpu", check=True)
    run(torchrun(n, DATA_PARALLEL, *common, *flag, "--output-dir", tmp_path / "gpu"), timeout=900)
    on_gpus = read_manifest(tmp_path / "gpu")
    assert [r["file_name"] for r in on_gpus] == [r["file_name"] for r in read_manifest(tmp_path / "cpu")]
    assert {tuple(r["ranks"]) for r in on_gpus} <= {(g, g + 1) for g in range(0, n, 2)}
    assert all(r["rank"] == r["ranks"][0] and r["device"] != "cpu" for r in on_gpus)
    for r in on_gpus:
        difference = np.abs(pixels(tmp_path / "gpu" / r["file_name"]) - pixels(tmp_path / "cpu" / r["file_name"]))
        assert difference.max() <= GPU_TOLERANCE, r["file_name"]
