"""context-parallelism-flux.py --shard-weights, run as users run it: the tiny Flux (as the README's command), the
tiny Flux with --staged, and the tiny QwenImage at a prompt and a size that 2 processes do not divide, each split
between 2 CPU processes by torchrun, each image checked against diffusers' pipeline called directly; a probe inside
the processes records, between denoising steps, what each process holds of each component (its parameters' local
shards), what it held while the prompt was encoded, and which weights files each process read. In this process:
the sharded load against from_pretrained (weights, the buffers no state dict carries, plain tensor attributes), the
plans for FLUX.1-dev and Qwen-Image from their published configs against their parameter counts, every bad input;
and GPU runs where there are GPUs.
"""

import json
import re
import sys
import textwrap
from types import SimpleNamespace

import numpy as np
import psutil
import pytest
import torch
from diffusers import (AutoencoderKLQwenImage, DiffusionPipeline, FluxPipeline, FluxTransformer2DModel,
                       QwenImagePipeline, QwenImageTransformer2DModel)
from transformers import AutoConfig, Qwen2_5_VLForConditionalGeneration, T5EncoderModel

from tests.conftest import (ROOT, accelerator, assert_clear_error, load_script, pixels, probe_env, run, run_main,
                            simulated_gpus, torchrun)
from tests.test_readme import SHARD_QWENIMAGE_TINY, SHARD_STAGED, SHARD_TORCHRUN_TINY, run_readme_command

SHARED_RUNS = pytest.mark.xdist_group("sharded_weights")  # the module-scoped runs below, made once

CONTEXT_PARALLEL = ROOT / "context-parallelism-flux.py"
FLUX1_DEV = ROOT / "tests" / "fixtures" / "flux1-dev"  # FLUX.1-dev's published config.json files, no weights
QWEN_IMAGE = ROOT / "tests" / "fixtures" / "qwen-image"  # Qwen-Image's (the folder's README says where from)
PROMPT = "A cat holding a sign that says hello world"  # the script's default prompt
GiB = 2**30
COMPONENTS = ("transformer", "text_encoder", "text_encoder_2")
# Inside every process of a run (tests/conftest.py: probe_env): each weights file it opens (safetensors' safe_open,
# which diffusers' and transformers' loaders both call), and what it holds of each component, between denoising
# steps (the flow-matching scheduler's step, of the pipeline that runs the loop) and once the prompt is encoded; and
# the process groups of the collectives made so far: FSDP's all-gathers (torch.distributed's all_gather_single) and
# Ulysses' all-to-alls (the functional all_to_all_single diffusers calls), each group by name and size.
PROBE = textwrap.dedent("""
    import json, os
    if os.environ.get("SHARD_PROBE") and "RANK" in os.environ:
        import safetensors
        import torch.distributed as dist
        import torch.distributed._functional_collectives as funcol

        groups = {"gathers": {}, "all_to_alls": {}}

        def watched(kind, collective, position):
            def call(*args, **kwargs):
                group = kwargs.get("group", args[position] if len(args) > position else None) or dist.group.WORLD
                groups[kind][getattr(group, "group_name", str(group))] = (
                    dist.get_world_size(group) if isinstance(group, dist.ProcessGroup) else None)
                return collective(*args, **kwargs)
            return call

        dist.all_gather_single = watched("gathers", dist.all_gather_single, 2)
        funcol.all_to_all_single = watched("all_to_alls", funcol.all_to_all_single, 3)

        def record(**what):
            with open(os.path.join(os.environ["SHARD_PROBE"], "rank%s.jsonl" % os.environ["RANK"]), "a") as log:
                log.write(json.dumps(what) + "\\n")

        safe_open = safetensors.safe_open

        def reading(filename, *args, **kwargs):
            record(read=str(filename))
            return safe_open(filename, *args, **kwargs)

        safetensors.safe_open = reading  # before any library imports it
        import diffusers
        from torch.distributed.tensor import DTensor

        def held(pipeline):
            found = {}
            for name in NAMES:
                component = getattr(pipeline, name, None)
                if component is not None:
                    parameters = list(component.parameters())
                    found[name] = {"local": sum(p.to_local().numel() if isinstance(p, DTensor) else p.numel()
                                                for p in parameters),
                                   "full": sum(p.numel() for p in parameters),
                                   "sharded": all(isinstance(p, DTensor) for p in parameters)}
            return found

        looping = []
        progress_bar = diffusers.DiffusionPipeline.progress_bar

        def denoising(self, *args, **kwargs):
            looping.append(self)
            return progress_bar(self, *args, **kwargs)

        diffusers.DiffusionPipeline.progress_bar = denoising
        step = diffusers.FlowMatchEulerDiscreteScheduler.step

        def stepped(self, *args, **kwargs):
            result = step(self, *args, **kwargs)
            record(step=held(looping[-1]), groups=dict(groups, world=dist.group.WORLD.group_name))
            return result

        diffusers.FlowMatchEulerDiscreteScheduler.step = stepped
        for pipeline_class in (diffusers.FluxPipeline, diffusers.QwenImagePipeline):
            def encoded(self, *args, _encode=pipeline_class.encode_prompt, **kwargs):
                result = _encode(self, *args, **kwargs)
                record(encoded=held(self))
                return result

            pipeline_class.encode_prompt = encoded
""").replace("NAMES", repr(COMPONENTS))


def probed(tmp_path_factory):
    """The environment of a probed run, and the folder where each process writes what the probe saw."""
    folder = tmp_path_factory.mktemp("shard-probe")
    return {**probe_env(folder / "code", PROBE), "SHARD_PROBE": str(folder)}, folder


def seen(folder):
    """{rank: {"read": [files], "step": [what it held], "encoded": [what it held], "groups": [the collectives'
    process groups, at each step]}}, from the probe's lines."""
    found = {}
    for path in sorted(folder.glob("rank*.jsonl")):
        lines = [json.loads(line) for line in path.read_text().splitlines()]
        found[int(path.stem.removeprefix("rank"))] = {kind: [line[kind] for line in lines if kind in line]
                                                      for kind in ("read", "step", "encoded", "groups")}
    return found


def largest_text_encoder(model):
    """The oracle for which text encoder is sharded: the largest by its parameters, counted here."""
    pipeline = DiffusionPipeline.from_pretrained(model, transformer=None, vae=None)
    encoders = {name: getattr(pipeline, name).num_parameters() for name in ("text_encoder", "text_encoder_2")
                if getattr(pipeline, name, None) is not None}
    return max(encoders, key=encoders.get), set(encoders)


def oracle(pipeline_class, model, prompt, size, seed=0, **call):
    """diffusers' pipeline called directly, one process, no parallelism, the script's settings."""
    pipeline = pipeline_class.from_pretrained(model, dtype=torch.float32)
    pipeline.set_progress_bar_config(disable=True)
    image = pipeline(prompt, height=size, width=size, num_inference_steps=2, guidance_scale=3.5,
                     max_sequence_length=512, generator=torch.Generator("cpu").manual_seed(seed), **call).images[0]
    return np.asarray(image.convert("RGB"), dtype=np.int16)


@pytest.fixture(scope="module")
def flux_sharded(tiny, tmp_path_factory):
    """The README's command: the tiny Flux, 2 processes, --shard-weights (seed 0, 64x64, 2 steps)."""
    env, folder = probed(tmp_path_factory)
    tmp = tmp_path_factory.mktemp("flux-sharded")
    return SimpleNamespace(result=run_readme_command(SHARD_TORCHRUN_TINY, tiny, tmp, **env), out=tmp,
                           seen=seen(folder))


@pytest.fixture(scope="module")
def flux_staged(tiny, tmp_path_factory):
    """The docs' command for FLUX.1-dev on two 16 GB cards, --shard-weights --staged, with the tiny Flux."""
    env, folder = probed(tmp_path_factory)
    tmp = tmp_path_factory.mktemp("flux-staged")
    return SimpleNamespace(result=run_readme_command(SHARD_STAGED, tiny, tmp, **env), out=tmp, seen=seen(folder))


@pytest.fixture(scope="module")
def qwenimage_sharded(tiny, tmp_path_factory):
    """The docs' command: the tiny QwenImage, "a fox" (133 tokens after its template) at 48x48 (9 image tokens)."""
    env, folder = probed(tmp_path_factory)
    tmp = tmp_path_factory.mktemp("qwenimage-sharded")
    return SimpleNamespace(result=run_readme_command(SHARD_QWENIMAGE_TINY, tiny, tmp, **env), out=tmp,
                           seen=seen(folder))


@pytest.fixture(scope="module")
def flux_oracle(tiny_flux):
    return oracle(FluxPipeline, tiny_flux, PROMPT, 64)


# --- the tiny Flux, 2 CPU processes, the README's command ---


@SHARED_RUNS
def test_two_sharded_processes_make_the_image_diffusers_makes(flux_sharded, flux_oracle):
    assert np.abs(pixels(flux_sharded.out / "out.png") - flux_oracle).max() <= 1  # within 1/255
    assert [p.name for p in flux_sharded.out.iterdir()] == ["out.png"]  # no temporary file left


@SHARED_RUNS
def test_between_steps_each_process_holds_half_of_the_transformer_and_of_the_largest_text_encoder(flux_sharded,
                                                                                                   tiny_flux):
    largest, encoders = largest_text_encoder(tiny_flux)
    assert set(flux_sharded.seen) == {0, 1}
    for rank, probe in flux_sharded.seen.items():
        assert len(probe["step"]) == 2, rank  # the two denoising steps
        for held in probe["step"]:
            for name in ("transformer", largest):
                assert held[name]["sharded"] and held[name]["local"] <= 0.55 * held[name]["full"], (rank, name)
            for name in encoders - {largest}:  # the other text encoder whole, on every process
                assert not held[name]["sharded"] and held[name]["local"] == held[name]["full"], (rank, name)
    # Together the processes hold every parameter (no shard left out): the two shards add up to the whole.
    held = [probe["step"][-1]["transformer"] for probe in flux_sharded.seen.values()]
    assert sum(h["local"] for h in held) >= held[0]["full"]


@SHARED_RUNS
def test_the_gathers_go_through_a_process_group_of_their_own_not_the_all_to_alls_one(flux_sharded):
    """FSDP's all-gathers and Ulysses' all-to-alls, watched as each process makes them: each kind through one
    process group of both processes, and not the same one, nor is the gathers' the default group. On NCCL and XCCL
    a process group is one communicator, whose collectives run in the order they were issued: a block's gather
    prefetched ahead of the all-to-alls would hold them up."""
    for rank, probe in flux_sharded.seen.items():
        groups = probe["groups"][-1]
        assert len(groups["gathers"]) == 1 and len(groups["all_to_alls"]) == 1, (rank, groups)
        [(gathers, gathering)], [(all_to_alls, swapping)] = groups["gathers"].items(), groups["all_to_alls"].items()
        assert gathering == swapping == 2, (rank, groups)
        assert gathers not in (all_to_alls, groups["world"]), (rank, groups)


@SHARED_RUNS
def test_only_the_main_process_reads_the_sharded_components_weights(flux_sharded, tiny_flux):
    """The host-memory claim, observed: process 1 never opens the transformer's weights file (nor the sharded text
    encoder's), so it never has them whole; it reads the components it holds whole, as process 0 does."""
    largest, encoders = largest_text_encoder(tiny_flux)
    read = {rank: {p.split("/")[-2] for p in probe["read"] if str(tiny_flux) in p}
            for rank, probe in flux_sharded.seen.items()}
    assert {"transformer", largest} <= read[0]
    assert not {"transformer", largest} & read[1]
    assert {"vae", *(encoders - {largest})} <= read[0] & read[1]


@SHARED_RUNS
def test_the_report_says_what_each_process_held(flux_sharded):
    held = max(probe["step"][-1]["transformer"]["local"] for probe in flux_sharded.seen.values())
    full = flux_sharded.seen[0]["step"][-1]["transformer"]["full"]
    assert (f"weights sharded: transformer: each process held at most {held} of its {full} parameters "
            f"({held / full:.2f})") in flux_sharded.result.stdout
    assert flux_sharded.result.stdout.count("made ") == 1 and "rank 1 on cpu" in flux_sharded.result.stdout


# --- --staged with it: the text encoders sharded, encode, are freed; then the transformer sharded ---


@SHARED_RUNS
def test_staged_sharded_processes_make_the_same_image_and_free_the_sharded_text_encoder(flux_staged, flux_oracle,
                                                                                        tiny_flux):
    assert np.abs(pixels(flux_staged.out / "out.png") - flux_oracle).max() <= 1
    largest, _ = largest_text_encoder(tiny_flux)
    for rank, probe in flux_staged.seen.items():
        # The text stage's pipeline (the image pipeline's call encodes nothing: it is handed the embeddings)
        [encoded] = [held for held in probe["encoded"] if largest in held]
        assert "transformer" not in encoded
        assert encoded[largest]["sharded"] and encoded[largest]["local"] <= 0.55 * encoded[largest]["full"], rank
        for held in probe["step"]:  # between steps: no text encoder left, the transformer sharded
            assert set(held) == {"transformer"} and held["transformer"]["sharded"], (rank, held)
    assert "transformer" not in {p.split("/")[-2] for p in flux_staged.seen[1]["read"]}


# --- the tiny QwenImage: a prompt and a size that 2 processes do not divide ---


@SHARED_RUNS
def test_sharded_processes_make_qwenimages_image_for_a_prompt_and_size_they_do_not_divide(qwenimage_sharded,
                                                                                        tiny_qwenimage):
    made = pixels(qwenimage_sharded.out / "out.png")
    assert np.abs(made - oracle(QwenImagePipeline, tiny_qwenimage, "a fox", 48)).max() <= 1
    assert "(uneven: ulysses_anything)" in qwenimage_sharded.result.stdout
    for rank, probe in qwenimage_sharded.seen.items():
        for held in probe["step"]:  # its one text encoder, Qwen2.5-VL, sharded as the transformer is
            for name in ("transformer", "text_encoder"):
                assert held[name]["sharded"] and held[name]["local"] <= 0.55 * held[name]["full"], (rank, name)
    read = {p.split("/")[-2] for p in qwenimage_sharded.seen[1]["read"] if str(tiny_qwenimage) in p}
    assert "vae" in read and not {"transformer", "text_encoder"} & read


# --- in this process: the sharded load is from_pretrained's load, sharded ---


@pytest.fixture
def group_of_one(tmp_path):
    """A process group of this one process (gloo), and a 1-D mesh over it: FSDP's whole path, with one shard."""
    torch.distributed.init_process_group("cpu:gloo", store=torch.distributed.FileStore(str(tmp_path / "store"), 1),
                                         rank=0, world_size=1)
    try:
        yield torch.distributed.device_mesh.init_device_mesh("cpu", (1,), mesh_dim_names=("shard",))
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.parametrize("kind, names", [("flux", ("transformer", "text_encoder", "text_encoder_2")),
                                         ("qwenimage", ("transformer", "text_encoder"))])
def test_a_sharded_component_is_what_from_pretrained_loads(kind, names, tiny, group_of_one, script):
    """Its weights, its buffers, those no state dict carries too (CLIP's position_ids, Qwen2.5-VL's inv_freq), and
    the tensors its modules keep as plain attributes (QwenImage's rotary pos_freqs), as from_pretrained makes them;
    and in eval mode (dropout off), as from_pretrained leaves it."""
    loaded = DiffusionPipeline.from_pretrained(tiny[kind], dtype=torch.float32)
    for name in names:
        sharded = script.load_sharded(SimpleNamespace(model=str(tiny[kind])), {"dtype": "float32"}, name,
                                      group_of_one, torch.device("cpu"))
        expected = getattr(loaded, name)
        weights = dict(sharded.named_parameters())
        assert weights.keys() == dict(expected.named_parameters()).keys(), name
        assert all(torch.equal(weights[n].full_tensor(), p) for n, p in expected.named_parameters()), name
        buffers = dict(sharded.named_buffers(remove_duplicate=False))  # a buffer two modules share: by each name
        assert all(buffers[n].dtype == b.dtype and torch.equal(buffers[n], b)
                   for n, b in expected.named_buffers(remove_duplicate=False))
        for (module_name, module), (_, expected_module) in zip(sharded.named_modules(), expected.named_modules()):
            for attribute, value in vars(expected_module).items():
                if isinstance(value, torch.Tensor):
                    mine = getattr(module, attribute)
                    assert mine.dtype == value.dtype and torch.equal(mine, value), f"{name}.{module_name}.{attribute}"
        assert not sharded.training


def test_a_float16_t5_is_sharded_with_the_weights_transformers_keeps_in_float32(tiny_flux, group_of_one, script):
    """Under float16 transformers keeps T5's `wo` layers in float32 (its _keep_in_fp32_modules): each sharded weight
    in the dtype from_pretrained gives it, with its values, and some of them float32."""
    expected = T5EncoderModel.from_pretrained(tiny_flux, subfolder="text_encoder_2", dtype=torch.float16)
    sharded = script.load_sharded(SimpleNamespace(model=str(tiny_flux)), {"dtype": "float16"}, "text_encoder_2",
                                  group_of_one, torch.device("cpu"))
    weights = dict(sharded.named_parameters())
    assert weights.keys() == dict(expected.named_parameters()).keys()
    for n, p in expected.named_parameters():
        assert weights[n].dtype == p.dtype and torch.equal(weights[n].full_tensor(), p), n
    assert {p.dtype for p in expected.parameters()} == {torch.float16, torch.float32}


def test_each_block_asks_for_the_next_to_be_gathered_in_the_order_they_run(tiny_flux, group_of_one, script,
                                                                             monkeypatch):
    """The prefetch the script asks FSDP for (observed: the calls load_sharded makes): FLUX's double-stream blocks,
    then its single-stream ones, each block naming the next."""
    from torch.distributed.fsdp import FSDPModule

    asked = []
    prefetch = FSDPModule.set_modules_to_forward_prefetch
    monkeypatch.setattr(FSDPModule, "set_modules_to_forward_prefetch",
                        lambda self, modules: asked.append((self, *modules)) or prefetch(self, modules))
    transformer = script.load_sharded(SimpleNamespace(model=str(tiny_flux)), {"dtype": "float32"}, "transformer",
                                      group_of_one, torch.device("cpu"))
    blocks = [*transformer.transformer_blocks, *transformer.single_transformer_blocks]
    assert len(blocks) == 3 and asked == list(zip(blocks, blocks[1:]))


# --- plans: FLUX.1-dev and Qwen-Image from their published configs, no weights ---


@pytest.fixture(scope="module")
def script():
    return load_script(CONTEXT_PARALLEL)


@pytest.fixture
def plan(script, monkeypatch, capsys):
    def plan(model, devices, memory, *extra):
        monkeypatch.setattr("sys.argv", ["context-parallelism-flux.py", "--plan", "--json", "--shard-weights",
                                         "--model", str(model), "--num-devices", str(devices), "--device-memory",
                                         memory, *extra])
        script.main()
        return json.loads(capsys.readouterr().out)
    return plan


def counts(module):
    """The oracle: a model built from its config on the meta device, its parameters counted; and its blocks'."""
    blocks = [b for name in ("transformer_blocks", "single_transformer_blocks", "layers")
              for b in getattr(module, name, None) or []]
    return sum(p.numel() for p in module.parameters()), [sum(p.numel() for p in b.parameters()) for b in blocks]


def meta(build):
    with torch.device("meta"):
        return build()


@pytest.fixture(scope="module")
def flux1_dev_counts():
    return {"transformer": counts(meta(lambda: FluxTransformer2DModel.from_config(
                FluxTransformer2DModel.load_config(FLUX1_DEV, subfolder="transformer")))),
            "text_encoder_2": counts(meta(lambda: T5EncoderModel(AutoConfig.from_pretrained(
                FLUX1_DEV, subfolder="text_encoder_2"))))}


@pytest.fixture(scope="module")
def qwen_image_counts():
    return {"transformer": counts(meta(lambda: QwenImageTransformer2DModel.from_config(
                QwenImageTransformer2DModel.load_config(QWEN_IMAGE, subfolder="transformer")))),
            "text_encoder": counts(meta(lambda: Qwen2_5_VLForConditionalGeneration(AutoConfig.from_pretrained(
                QWEN_IMAGE, subfolder="text_encoder")))),
            "vae": counts(meta(lambda: AutoencoderKLQwenImage.from_config(
                AutoencoderKLQwenImage.load_config(QWEN_IMAGE, subfolder="vae"))))}


def test_the_qwen_image_configs_are_the_published_models(qwen_image_counts):
    """The fixture's configs give the parameter counts published for the models: Qwen-Image's transformer
    20,430,401,088 and its Qwen2.5-VL-7B text encoder 8.29 B (tests/fixtures/qwen-image/README.md)."""
    assert qwen_image_counts["transformer"][0] == 20_430_401_088
    assert round(qwen_image_counts["text_encoder"][0] / 1e9, 2) == 8.29


def test_flux1_dev_on_two_16_gib_gpus_holds_half_of_each_sharded_component_and_fits_only_staged(
        plan, flux1_dev_counts):
    result = plan(FLUX1_DEV, 2, "16GiB")
    assert set(result["sharded"]) == {"transformer", "text_encoder_2"}  # T5, the largest text encoder
    for name, (parameters, blocks) in flux1_dev_counts.items():
        assert result["sharded"][name]["share"] == pytest.approx(parameters * 2 / 2, rel=0.01)  # bfloat16, 1/2
    # The answer the counts give: each GPU holds its halves, CLIP and the VAE whole, the transformer's largest block
    # and the next (prefetched) and its own layers outside the blocks, and 3 GiB for activations at 1024x1024.
    parameters, blocks = flux1_dev_counts["transformer"]
    gathered = 2 * (2 * max(blocks) + (parameters - sum(blocks)))
    whole = result["components"]["text_encoder"] + result["components"]["vae"]
    need = (parameters + flux1_dev_counts["text_encoder_2"][0]) * 2 / 2 + whole + gathered + 3 * GiB
    assert result["needs"]["sharded"] == pytest.approx(need, rel=0.01)
    assert need > 16 * GiB and not result["fits"]
    assert "add --staged" in result["problems"][-1]
    staged = plan(FLUX1_DEV, 2, "16GiB", "--staged")
    assert staged["fits"] and staged["needs"]["sharded_staged"] <= 16 * GiB
    # On 12 GiB cards even the staged halves do not fit (the transformer's half alone is 11.1 GiB): thirds do.
    assert "run 3 processes or more" in plan(FLUX1_DEV, 2, "12GiB", "--staged")["problems"][-1]
    # 16 GiB free is more than a 16 GB card has once its driver's context is up: with a little less, two no longer
    # hold it, and three do (with room to spare).
    assert staged["needs"]["sharded_staged"] > 15.5 * GiB
    assert "run 3 processes or more" in plan(FLUX1_DEV, 2, "15.5GiB", "--staged")["problems"][-1]
    assert plan(FLUX1_DEV, 3, "15.5GiB", "--staged")["fits"]


def test_qwen_image_on_four_24_gib_gpus_holds_a_quarter_of_each_sharded_component_and_fits(plan, qwen_image_counts):
    result = plan(QWEN_IMAGE, 4, "24GiB")
    assert set(result["sharded"]) == {"transformer", "text_encoder"}
    assert result["sharded"]["transformer"]["share"] == pytest.approx(
        qwen_image_counts["transformer"][0] * 2 / 4, rel=0.01)
    assert result["sharded"]["text_encoder"]["share"] == pytest.approx(
        qwen_image_counts["text_encoder"][0] * 2 / 4, rel=0.01)
    parameters, blocks = qwen_image_counts["transformer"]
    need = (parameters + qwen_image_counts["text_encoder"][0]) * 2 / 4 + qwen_image_counts["vae"][0] * 2 + 2 * (
        2 * max(blocks) + parameters - sum(blocks)) + 3 * GiB
    assert need < 24 * GiB and result["fits"] and result["needs"]["sharded"] == pytest.approx(need, rel=0.01)
    assert result["needs"]["whole"] > 50 * GiB  # a whole copy on each GPU: no 24 GB card holds it


def test_the_plan_prints_the_shards_and_the_fewest_gpus(script, monkeypatch, capsys):
    monkeypatch.setattr("sys.argv", ["x", "--plan", "--shard-weights", "--model", str(FLUX1_DEV), "--num-devices",
                                     "2", "--device-memory", "16GiB"])
    script.main()
    out = capsys.readouterr().out
    assert "transformer     11.08 GiB of 22.17 GiB" in out and "text_encoder_2   4.44 GiB of 8.87 GiB" in out
    assert "the fewest GPUs of 16.00 GiB that hold it sharded: 3" in out
    assert "the fewest GPUs of 16.00 GiB that hold it sharded and --staged: 2" in out
    assert "process 0 reads each sharded component whole" in out and "fits: NO" in out


def test_a_float16_plan_counts_the_weights_transformers_keeps_in_float32(plan, tiny_flux):
    """Under float16 T5 keeps its `wo` layers in float32. The plan weighs T5 as transformers loads it (the oracle:
    the tiny Flux's T5 loaded by from_pretrained, its weights' bytes counted), and FLUX.1-dev's sharded T5 weighs
    what its component weighs (11.54 GB, not 9.52 GB all in float16), each process holding half of it."""
    loaded = T5EncoderModel.from_pretrained(tiny_flux, subfolder="text_encoder_2", dtype=torch.float16)
    weighs = sum(p.numel() * p.element_size() for p in loaded.parameters())
    assert weighs > sum(p.numel() for p in loaded.parameters()) * 2  # some of it in float32
    assert plan(tiny_flux, 2, "24GiB", "--dtype", "float16")["components"]["text_encoder_2"] == weighs
    result = plan(FLUX1_DEV, 2, "24GiB", "--dtype", "float16")
    t5 = result["sharded"]["text_encoder_2"]
    assert t5["bytes"] == result["components"]["text_encoder_2"] > 11.5e9
    assert t5["share"] == pytest.approx(t5["bytes"] / 2, rel=0.01)


def test_a_plan_with_nothing_to_shard_says_so_in_one_line(tiny_flux, monkeypatch):
    """Neither the transformer nor T5 names blocks: the plan says so, one line each, and does not fit."""
    from transformers.models.t5.modeling_t5 import T5PreTrainedModel

    monkeypatch.setattr(FluxTransformer2DModel, "_no_split_modules", None)
    monkeypatch.setattr(T5PreTrainedModel, "_no_split_modules", None)
    result = run_main(CONTEXT_PARALLEL, "--plan", "--shard-weights", "--model", FLUX1_DEV, "--num-devices", "2",
                      "--device-memory", "24GiB")
    assert "Traceback" not in result.stdout + result.stderr
    problems = [line for line in result.stdout.splitlines() if line.startswith("  NO: ")]
    assert [p.split(" names no blocks")[0] for p in problems] == [
        "  NO: --shard-weights: transformer (FluxTransformer2DModel)",
        "  NO: --shard-weights: text_encoder_2 (T5EncoderModel)"], result.stdout
    assert result.stdout.rstrip().endswith("fits: NO")


# The sharding table of docs/context-parallelism.md: each row the plan for its model, GPUs and free memory.
SHARDED_ROWS = re.compile(r"^\| (FLUX\.1-dev|Qwen-Image) \| (\d) x ([\d.]+) GiB( `--staged`)? \| (.*?) \| "
                          r"([\d.]+) GiB \| ([\d.]+) GiB \| (.*?) \|$", flags=re.MULTILINE)
SHORT = {"text_encoder_2": "T5", "vae": "the VAE", "text_encoder": "CLIP"}


def test_the_docs_table_of_sharded_plans_is_what_the_script_plans(plan):
    """Each row, word for word and figure for figure, as the script's --plan --json gives it: what each GPU holds,
    what it gathers at most, what it needs, and whether it fits (or what to do)."""
    rows = SHARDED_ROWS.findall((ROOT / "docs" / "context-parallelism.md").read_text(encoding="utf-8"))
    assert len(rows) >= 5
    for model, n, memory, staged, holds, gathers, needs, fits in rows:
        result = plan({"FLUX.1-dev": FLUX1_DEV, "Qwen-Image": QWEN_IMAGE}[model], n, f"{memory}GiB",
                      *(["--staged"] if staged else []))
        sharded, short = result["sharded"], {**SHORT, "text_encoder": "Qwen2.5-VL"} if model == "Qwen-Image" else SHORT
        [encoder] = set(sharded) - {"transformer"}
        whole = " and ".join(short[name] for name in result["components"] if name not in sharded)
        assert holds == (f"{sharded['transformer']['share'] / GiB:.2f} GiB of the transformer, "
                         f"{sharded[encoder]['share'] / GiB:.2f} of {short[encoder]}; {whole} whole"), (model, n)
        assert gathers == f"{sharded['transformer']['gathered'] / GiB:.2f}", (model, n, memory)
        assert needs == f"{result['needs']['sharded_staged' if staged else 'sharded'] / GiB:.2f}", (model, n, memory)
        said = result["problems"][-1] if result["problems"] else ""
        assert fits == ("yes" if result["fits"] else "**no**: add `--staged`" if "add --staged" in said else
                        f"**no**: {said.rsplit(': ', 1)[-1]}"), (model, n, memory, staged)


def test_the_benchmark_on_a_gpu_gives_the_gathers_bytes_not_a_host_clocks_time(capsys):
    """On a GPU a gather returns to the host once it is queued: the benchmark's table says "n/a" for the gathers'
    time there, and names its memory column for what the script reports on a GPU (the peak allocated during the
    call); on the CPU it gives both as measured."""
    benchmark = load_script(ROOT / "benchmarks" / "sharded_weights.py")
    image = np.zeros((8, 8, 3), dtype=np.int16)
    rows = [{"label": "1 process", "processes": 1, "wall": 10.0, "call": 8.0, "step": 2.0, "load": "1.00",
             "held": 1.0, "peaks": ["3.00"], "gathers": None, "pixels": image},
            {"label": "context parallel, weights sharded", "processes": 2, "wall": 8.0, "call": 6.0, "step": 1.5,
             "load": "1.00", "held": 0.5, "peaks": ["2.00", "2.00"], "pixels": image,
             "gathers": {"bytes": 2**30, "received": 2**29, "seconds": 0.01, "t": 1.5}}]
    for on_gpu in (True, False):
        benchmark.print_table(SimpleNamespace(on_gpu=on_gpu, model="m", size=64, steps=2, repeats=1), rows)
        out = capsys.readouterr().out
        [sharded] = [line for line in out.splitlines() if line.startswith("| context parallel, weights sharded |")]
        assert sharded.split(" | ")[8:10] == ["1024 MiB", "n/a" if on_gpu else "0.01"], sharded
        assert ("peak GPU memory allocated in the call (GiB)" in out) == on_gpu
        assert ("peak resident memory (GiB)" in out) != on_gpu
        assert ("of which the gathers 0.01 s" in out) != on_gpu


# --- bad input: one line each, before anything is loaded ---


@pytest.fixture
def refused(tmp_path):
    def refused(processes, *argv, **env):
        result = run_main(CONTEXT_PARALLEL, "--shard-weights", *argv, "--output", tmp_path / "x.png",
                          WORLD_SIZE=str(processes), LOCAL_WORLD_SIZE=str(processes), LOCAL_RANK=None, **env)
        assert_clear_error(result)
        assert not (tmp_path / "x.png").exists()
        return result.stderr.strip()
    return refused


FAST = ["--height", "64", "--width", "64", "--num-inference-steps", "2"]


def test_one_process_is_refused_it_would_shard_nothing(refused, tiny_flux):
    line = refused(1, "--model", tiny_flux, *FAST, "--device", "cpu")
    assert "one process holds them all" in line and "torchrun --nproc-per-node 2" in line


def test_a_component_without_blocks_to_shard_is_refused(refused, tiny_flux, monkeypatch):
    monkeypatch.setattr(FluxTransformer2DModel, "_no_split_modules", None)
    line = refused(2, "--model", tiny_flux, *FAST, "--device", "cpu")
    assert "transformer (FluxTransformer2DModel) names no blocks" in line and "leave --shard-weights out" in line


def test_too_little_ram_for_the_shards_is_refused(refused, tiny_flux, monkeypatch):
    monkeypatch.setattr(psutil, "virtual_memory", lambda: SimpleNamespace(available=2**20))
    line = refused(2, "--model", tiny_flux, *FAST, "--device", "cpu")
    assert "2 process(es) on the CPU need" in line and "its shards and the rest" in line


def test_on_gpus_too_little_ram_for_process_0s_whole_read_is_refused(refused, tiny_flux, monkeypatch):
    """On GPUs, process 0 reads each sharded component whole into the machine's RAM before sending the shards."""
    simulated_gpus(monkeypatch, 2)
    monkeypatch.setattr(psutil, "virtual_memory", lambda: SimpleNamespace(available=2**10))
    line = refused(2, "--model", tiny_flux, *FAST, RANK="0")
    assert "process 0 reads the transformer whole into RAM" in line and "free some memory" in line


def test_on_gpus_the_ram_check_counts_the_components_each_process_reads_whole(refused, tiny_flux, monkeypatch):
    """Room for process 0's whole read of the largest sharded component, but not for it and the components each of
    the machine's 2 processes reads whole through RAM too (the smaller text encoder and the VAE): refused. The
    oracle: the components' weights as from_pretrained loads them, counted here."""
    largest, encoders = largest_text_encoder(tiny_flux)
    pipeline = FluxPipeline.from_pretrained(tiny_flux, dtype=torch.bfloat16)
    weighs = {name: sum(p.numel() * p.element_size() for p in getattr(pipeline, name).parameters())
              for name in ("transformer", "vae", *encoders)}
    [other] = encoders - {largest}
    room = max(weighs["transformer"], weighs[largest]) + 2 * (weighs[other] + weighs["vae"]) - 1
    simulated_gpus(monkeypatch, 2)
    monkeypatch.setattr(psutil, "virtual_memory", lambda: SimpleNamespace(available=room))
    line = refused(2, "--model", tiny_flux, *FAST, "--dtype", "bfloat16", RANK="0")
    assert f"each of its 2 process(es) reads {other}, vae whole" in line and "free some memory" in line


# --- GPUs: skipped where there are none ---


@pytest.fixture(scope="module")
def gpu_model(tmp_path_factory):
    """A random-weight FLUX (benchmarks/) with FLUX.1-dev's 19 + 38 blocks at hidden size 1024 (1.3 B parameters,
    2.6 GB in bfloat16): as in FLUX.1-dev, the two blocks a process gathers at once are 6% of the transformer, far
    less than the half of it a process no longer holds."""
    benchmark = load_script(ROOT / "benchmarks" / "context_parallel.py")
    return benchmark.build_pipeline(tmp_path_factory.mktemp("gpu-flux") / "model", hidden=1024, heads=16,
                                    blocks=(19, 38))


def gpu_run(model, folder, *flags):
    """2 processes, one per GPU, at 1024x1024, 10 steps: their stdout, the image, and each process's peak memory
    allocated on its GPU during the pipeline call (the report's, in rank order)."""
    out = folder / "out.png"
    result = run(torchrun(2, CONTEXT_PARALLEL, "--model", model, "--height", "1024", "--width", "1024",
                          "--num-inference-steps", "10", "--output", out, *flags), timeout=900)
    return SimpleNamespace(stdout=result.stdout, image=pixels(out), peaks=[
        float(a) for a in re.findall(r"([\d.]+) GiB allocated", result.stdout)])


@pytest.fixture(scope="module")
def gpu_unsharded(gpu_model, tmp_path_factory):
    """The baseline of both GPU tests: the same 2 processes with context parallelism alone, each GPU holding the
    whole transformer. The tokens each works on, and so the activations, are those of the sharded runs: only the
    weights differ."""
    return gpu_run(gpu_model, tmp_path_factory.mktemp("gpu-unsharded"))


def transformer_bytes(model):
    """The oracle: the transformer's parameters, counted from its config on the meta device, at 2 bytes each
    (bfloat16 on GPUs, or float16 where a GPU has no fast bfloat16)."""
    with torch.device("meta"):
        transformer = FluxTransformer2DModel.from_config(FluxTransformer2DModel.load_config(model,
                                                                                           subfolder="transformer"))
    return 2 * sum(p.numel() for p in transformer.parameters())


@accelerator
@pytest.mark.skipif(torch.accelerator.device_count() < 2, reason="needs 2 GPUs or more")
def test_two_gpus_sharded_make_the_same_image_each_holding_half_of_the_transformer(gpu_model, gpu_unsharded,
                                                                                   tmp_path):
    """The image of the unsharded run (bfloat16: the mean difference below 2 of 255, as in the context parallel GPU
    test), each process holding at most 0.55 of the transformer's parameters, and each GPU's peak allocation lower
    than the unsharded run's on the same GPU by at least 0.35 of the transformer's bytes: half of it is gone, less
    what is gathered at once (two double-stream blocks, 2.9% each, and the 0.3% outside the blocks: 0.44 of it is
    gone by these counts, and a little less while a gather's buffer and the block it fills are both held)."""
    sharded = gpu_run(gpu_model, tmp_path, "--shard-weights")
    assert np.abs(sharded.image - gpu_unsharded.image).mean() < 2
    held = float(re.search(r"weights sharded: transformer: .*\(([\d.]+)\)", sharded.stdout).group(1))
    assert held <= 0.55
    drop = 0.35 * transformer_bytes(gpu_model) / GiB
    assert len(sharded.peaks) == len(gpu_unsharded.peaks) == 2
    assert all(mine <= whole - drop for mine, whole in zip(sharded.peaks, gpu_unsharded.peaks)), (
        sharded.peaks, gpu_unsharded.peaks, drop)


# cuDNN's attention with its log-sum-exp, called as diffusers' _native_cudnn backend calls it (attention_dispatch.py:
# _cudnn_attention_forward_op); ring attention needs it.
CUDNN_ATTENTION = """
import torch
q = torch.randn(1, 2, 256, 64, device="cuda", dtype=torch.bfloat16)
torch.ops.aten._scaled_dot_product_cudnn_attention(q, q, q, None, True)
torch.cuda.synchronize()
"""


@accelerator
@pytest.mark.skipif(torch.accelerator.device_count() < 2 or not torch.cuda.is_available(),
                    reason="ring attention's backends run on 2 NVIDIA GPUs or more")
def test_ring_attention_with_sharded_weights_makes_the_image_of_the_unsharded_run(gpu_model, gpu_unsharded, tmp_path):
    """--ring-degree 2 with --shard-weights: FSDP's 1-D mesh and diffusers' ring x ulysses mesh over the same two
    processes, both public APIs. Skipped where this machine's GPUs or cuDNN lack that attention (asked of a process
    of its own: this one keeps no GPU context)."""
    if run([sys.executable, "-c", CUDNN_ATTENTION], check=False).returncode != 0:
        pytest.skip("cuDNN's attention (diffusers' _native_cudnn backend) does not run on these GPUs")
    made = gpu_run(gpu_model, tmp_path, "--ring-degree", "2", "--attention-backend", "_native_cudnn",
                   "--shard-weights")
    assert np.abs(made.image - gpu_unsharded.image).mean() < 2
