"""The one-page programs in examples/ run with the commands the pages show, do what they claim, and are what the
README shows.

The README shows each program verbatim in a ```python block directly under a line that links to its file
(`[...](examples/NAME.py)`); the launch commands are the `uv run ...` lines of any page's bash blocks (README.md,
docs/*.md, CONTRIBUTING.md) that name `examples/NAME.py`. Each program is written as it is into a temporary folder
(as examples/NAME.py) and run there with each of its commands, with one substitution: the real model's Hub id
becomes the path of the tiny pipeline of the same family (SD3 or FLUX). The launchers are the real ones, offline, on a
free port; `accelerate launch` gets `--multi_gpu` where the line lacks it and there is no GPU (without it
Accelerate starts one CPU process). Where a command starts more processes than this machine has GPUs (one process
a GPU), it is skipped with the reason.

What a program did is observed, not re-made: a `sitecustomize` probe on the program's PYTHONPATH records every
image saved (`PIL.Image.Image.save`) and the rank of the process that saved it. The images are checked against
independent oracles: diffusers called directly with the same seed (data parallel), the pipeline's real placement
(model parallel), and the contiguous split Accelerate documents (which process makes which prompt).
"""

import ast
import json
import re
import shlex
import subprocess
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import BIN, ROOT, free_port, offline_env, pixels, run

pytestmark = pytest.mark.xdist_group("readme_programs")  # shared module-scoped runs, made once

# The pages a user or a maintainer reads, by their path in the repository: each one's commands are tests.
PAGES = {path.relative_to(ROOT).as_posix(): path.read_text(encoding="utf-8")
         for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "CONTRIBUTING.md"]}
README = PAGES["README.md"]
EXAMPLES = ROOT / "examples"
MAX_LINES = 32  # "at most about 30 lines"
TINY = {"stable-diffusion-3": "tiny_sd3", "flux": "tiny_flux"}  # a Hub id's family -> the tiny pipeline's fixture
FENCE = re.compile(r"^(?P<indent>[ \t]*)```(?P<lang>\w*)[^\n]*\n(?P<body>.*?)^(?P=indent)```[ \t]*$",
                   flags=re.MULTILINE | re.DOTALL)
SHOWN = re.compile(r"\]\((?P<name>examples/[\w.-]+\.py)\)")  # a link to a program
PROBE = '''\
# Written by tests/test_readme_programs.py: records every image a process saves, and the rank of that process.
import json, os
import PIL.Image

_save = PIL.Image.Image.save


def _recorded_save(self, fp, *args, **kwargs):
    result = _save(self, fp, *args, **kwargs)
    line = json.dumps({"rank": int(os.environ.get("RANK", "0")), "file": os.path.basename(str(fp))}) + "\\n"
    with open(os.environ["IMAGE_SAVES_LOG"], "a", encoding="utf-8") as log:
        log.write(line)  # one short append: lines from several processes do not interleave
    return result


PIL.Image.Image.save = _recorded_save
'''


@dataclass
class Program:
    name: str  # examples/NAME.py, as the launch commands name it
    source: str  # the file, as written
    commands: list = field(default_factory=list)  # the pages' `uv run` lines that name it


def blocks(text):
    """The fenced blocks of a page, as (language, body, the text before the fence), indented ones (in a list) too."""
    return [(m["lang"], textwrap.dedent(m["body"]), text[:m.start()]) for m in FENCE.finditer(text)]


def bash_lines(text):
    """Every `uv run ...` line of a page's bash blocks, as written (its comment included)."""
    return [line.strip() for lang, body, _ in blocks(text) if lang == "bash" for line in body.splitlines()
            if line.strip().startswith("uv run ")]


def shown_programs(text):
    """The programs a page shows: {examples/NAME.py: the python block directly under the line linking to it}."""
    shown = {}
    for lang, body, before in blocks(text):
        match = SHOWN.search((before.rstrip().splitlines() or [""])[-1])
        if lang == "python" and match:
            assert match["name"] not in shown, f"{match['name']} is shown twice"
            shown[match["name"]] = body
    return shown


def launch_commands(pages=PAGES):
    """The pages' lines that launch a one-page program (naming examples/NAME.py): run here, not by test_readme.py's
    run of every command."""
    return {line for text in pages.values() for line in bash_lines(text)
            if any(word.startswith("examples/") for word in shlex.split(line, comments=True))}


def programs(pages=PAGES, folder=EXAMPLES):
    """Every program in examples/, with the pages' lines that launch it (each line once, in page order)."""
    found = []
    for path in sorted(folder.glob("*.py")):
        name = f"examples/{path.name}"
        lines = [line for text in pages.values() for line in bash_lines(text)
                 if name in shlex.split(line, comments=True)]
        found.append(Program(name, path.read_text(encoding="utf-8"), list(dict.fromkeys(lines))))
    return found


def hub_id(source):
    """The one string literal of the program that is the Hub id (organisation/name) of a model with a tiny twin.

    Read from the text, not the syntax tree: a program that does not parse must still get to run, and fail."""
    ids = [m[2] for m in re.finditer(r"""(["'])([\w.-]+/[\w.-]+)\1""", source)
           if any(family in m[2].lower() for family in TINY)]
    assert len(ids) == 1, f"expected one Hub model id (of {', '.join(TINY)}) in the program, found {ids}"
    return ids[0]


def with_tiny_pipeline(source, tiny_path):
    """The one substitution: the real model's Hub id (as a string literal) becomes the tiny pipeline's path."""
    model = hub_id(source)
    literals = [f'"{model}"', f"'{model}'"]
    assert sum(source.count(literal) for literal in literals) == 1, f"{model} must appear once, as a literal"
    for literal in literals:
        source = source.replace(literal, repr(str(tiny_path)))
    return source


def tiny_fixture(model):
    family = next((family for family in TINY if family in model.lower()), None)
    assert family, f"no tiny pipeline for {model}: add its family to TINY"
    return TINY[family]


def literal(source, name):
    """The value of a module-level `name = <literal>` in the program (its prompts, its seed)."""
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign) and [getattr(t, "id", None) for t in node.targets] == [name]:
            return ast.literal_eval(node.value)
    raise AssertionError(f"the program has no module-level `{name} = ...`")


def number_of_processes(argv):
    argv = [str(arg) for arg in argv]
    for flag in ("--nproc-per-node", "--nproc_per_node", "--num_processes", "--num-processes"):
        for k, arg in enumerate(argv):
            if arg == flag:
                return int(argv[k + 1])
            if arg.startswith(flag + "="):
                return int(arg.split("=", 1)[1])
    return 1


def as_test(line, name):
    """A page's command line, runnable here: the real launcher, a free port (see the module's docstring)."""
    argv = shlex.split(line, comments=True)[2:]  # without `uv run`
    program, args = argv[0], argv[1:]
    if program == name or program == "python":
        return [sys.executable, *([name] if program == name else []), *args]
    if program == "torchrun":
        return [BIN / "torchrun", "--master-port", free_port(), *args]
    if program == "accelerate" and args[:1] == ["launch"]:
        multi = [] if "--multi_gpu" in args or torch.accelerator.is_available() else ["--multi_gpu"]
        return [BIN / "accelerate", "launch", "--main_process_port", free_port(), *multi, *args[1:]]
    raise AssertionError(f"no way to run `{line}` here: add its launcher to as_test")


@dataclass
class Run:
    program: Program
    command: str
    folder: Path  # where it ran, and wrote its files
    processes: int
    result: subprocess.CompletedProcess
    saves: list  # [{"rank": r, "file": name}, ...]: every image saved, by whom

    def succeeded(self):
        if self.result.returncode != 0:
            pytest.fail(f"`{self.command}` ({self.program.name}) exited {self.result.returncode}\n"
                        f"{self.result.stdout}\n{self.result.stderr}")


def run_program(program, command, tiny_path, folder, timeout=600, a_gpu_a_process=True):
    """Write the program as written (but for the model id) into `folder` (as examples/NAME.py) and run the page's
    command there."""
    argv = as_test(command, program.name)
    processes = number_of_processes(argv)
    if a_gpu_a_process and torch.accelerator.is_available() and processes > torch.accelerator.device_count():
        pytest.skip(f"`{command}` starts {processes} processes, one a GPU; this machine has "
                    f"{torch.accelerator.device_count()}")
    (folder / program.name).parent.mkdir(parents=True, exist_ok=True)
    (folder / program.name).write_text(with_tiny_pipeline(program.source, tiny_path), encoding="utf-8")
    probe = folder.parent / f"{folder.name}-probe"
    probe.mkdir(exist_ok=True)
    (probe / "sitecustomize.py").write_text(PROBE, encoding="utf-8")
    log = probe / "saves.jsonl"
    env = offline_env(PYTHONPATH=str(probe), IMAGE_SAVES_LOG=str(log))
    result = run(argv, check=False, timeout=timeout, env=env, cwd=folder)
    saves = [json.loads(line) for line in log.read_text(encoding="utf-8").splitlines()] if log.exists() else []
    return Run(program, command, folder, processes, result, saves)


PROGRAMS = programs()
CHECKED = {"examples/data_parallel.py", "examples/model_parallel.py", "examples/context_parallel.py",
           "examples/cfg_parallel.py", "examples/sharded_context_parallel.py",
           "examples/data_parallel_groups.py"}  # below
RUNS = [(program, command) for program in PROGRAMS for command in program.commands]


@pytest.fixture(scope="module")
def runs(request, tmp_path_factory):
    """Each command of each program, run once for all the tests that check it."""
    done = {}

    def get(program, command):
        if (program.name, command) not in done:
            tiny = request.getfixturevalue(tiny_fixture(hub_id(program.source)))
            done[program.name, command] = run_program(program, command, tiny, tmp_path_factory.mktemp("lesson") / "run")
        return done[program.name, command]
    return get


def runs_of(name):
    selected = [(p, c) for p, c in RUNS if p.name == name]
    return pytest.mark.parametrize("program, command", selected, ids=[c for _, c in selected])


def test_each_technique_has_a_program_with_its_launch_commands_and_its_checks():
    assert {program.name for program in PROGRAMS} == CHECKED, "a program in examples/ without its checks here, or gone"
    for program in PROGRAMS:
        assert program.commands, f"{program.name}: no page has a `uv run` line that launches it"


def test_the_readme_shows_each_program_as_its_file():
    shown = shown_programs(README)
    assert set(shown) == {program.name for program in PROGRAMS}, "each program in examples/ shown once, and no other"
    for program in PROGRAMS:
        assert shown[program.name] == program.source, f"the README's block under the link to {program.name} differs"


def test_every_launch_command_names_a_program_that_is_there():
    for line in launch_commands():
        named = [word for word in shlex.split(line, comments=True) if word.startswith("examples/")]
        assert named and all((ROOT / name).is_file() for name in named), line


@pytest.mark.parametrize("program", PROGRAMS, ids=[p.name for p in PROGRAMS])
def test_each_program_fits_on_one_page(program):
    lines = program.source.rstrip("\n").splitlines()
    assert len(lines) <= MAX_LINES, f"{program.name} has {len(lines)} lines"
    compile(program.source, program.name, "exec")  # a syntax error fails here first, and clearly


@pytest.mark.parametrize("program, command", RUNS, ids=[c for _, c in RUNS])
def test_each_program_runs_with_the_command_above_it(program, command, runs):
    run = runs(program, command)
    run.succeeded()
    assert run.saves, f"{program.name} saved no image"


@runs_of("examples/data_parallel.py")
def test_data_parallel_program_makes_each_prompt_once_in_the_process_whose_share_it_is(program, command, runs):
    run = runs(program, command)
    run.succeeded()
    prompts = literal(program.source, "prompts")
    # Accelerate's split_between_processes: contiguous slices, the extra prompts to the first ranks.
    owner = {int(i): rank for rank, share in enumerate(np.array_split(np.arange(len(prompts)), run.processes))
             for i in share}
    saved = {}
    for save in run.saves:
        index = int(re.match(r"\d+", save["file"])[0])  # the image is named by its prompt's index
        assert index not in saved, f"prompt {index} saved twice: {run.saves}"
        saved[index] = save
        assert save["rank"] == owner[index], f"prompt {index} saved by process {save['rank']}, not {owner[index]}"
        assert f"{save['file']} made by process {save['rank']}" in run.result.stdout
    assert sorted(saved) == list(range(len(prompts)))
    assert sorted(p.name for p in run.folder.rglob("*.png")) == sorted(s["file"] for s in run.saves)


@runs_of("examples/data_parallel.py")
def test_data_parallel_program_images_are_what_diffusers_makes_from_the_same_seed(program, command, runs, tiny_sd3):
    from diffusers import DiffusionPipeline

    run = runs(program, command)
    run.succeeded()
    prompts, seed = literal(program.source, "prompts"), literal(program.source, "seed")
    on_gpu = torch.accelerator.is_available()
    pipeline = DiffusionPipeline.from_pretrained(tiny_sd3, dtype=torch.bfloat16 if on_gpu else torch.float32)
    pipeline.set_progress_bar_config(disable=True)
    for save in run.saves:
        index = int(re.match(r"\d+", save["file"])[0])
        # the device of the process that made it: on GPUs, rank r's own; on the CPU, the CPU
        device = torch.device(torch.accelerator.current_accelerator().type, save["rank"]) if on_gpu else "cpu"
        expected = pipeline.to(device)(prompts[index],
                                       generator=torch.Generator("cpu").manual_seed(seed + index)).images[0]
        made, expected = pixels(saved_file(run, save)), np.asarray(expected.convert("RGB"), dtype=np.int16)
        assert made.shape == expected.shape, save["file"]
        difference = int(np.abs(made - expected).max())
        assert difference <= 1, f"{save['file']} differs from diffusers' own image by up to {difference}/255"


def printed_placement(stdout):
    return dict(re.findall(r"^(\w+) -> (\S+)$", stdout, flags=re.MULTILINE))


@runs_of("examples/model_parallel.py")
def test_model_parallel_program_prints_where_each_component_really_is_and_saves_one_image(program, command, runs,
                                                                                        tiny_flux):
    from diffusers import DiffusionPipeline

    run = runs(program, command)
    run.succeeded()
    printed = printed_placement(run.result.stdout)
    # The oracle: the same pipeline placed by diffusers here, and where its components really are.
    pipeline = DiffusionPipeline.from_pretrained(tiny_flux, device_map="balanced")
    modules = {name: module for name, module in pipeline.components.items() if isinstance(module, torch.nn.Module)}
    assert set(printed) == set(modules), run.result.stdout
    if torch.accelerator.is_available():  # free memory decides the order; the cycle over the GPUs does not
        assert set(printed) == set(pipeline.hf_device_map)
        used = {device for device in printed.values() if device != "cpu"}
        assert used <= {str(d) for d in range(torch.accelerator.device_count())}, printed
        assert len(used) == min(len(modules), torch.accelerator.device_count()), printed
    else:
        assert pipeline.hf_device_map is None  # diffusers places nothing without an accelerator...
        assert printed == {name: str(module.device) for name, module in modules.items()} == {
            name: "cpu" for name in modules}  # ...and everything is on the CPU, as printed
    assert len(run.saves) == 1, run.saves
    assert f"saved {run.saves[0]['file']}" in run.result.stdout
    assert [p.name for p in run.folder.rglob("*.png")] == [run.saves[0]["file"]]
    assert pixels(saved_file(run, run.saves[0])).std() > 0  # a picture (noise, from random weights), not blank


@runs_of("examples/context_parallel.py")
def test_context_parallel_program_saves_one_image_from_the_main_process(program, command, runs):
    run = runs(program, command)
    run.succeeded()
    check_one_image_by_the_main_process(run)


@runs_of("examples/cfg_parallel.py")
def test_cfg_parallel_program_saves_one_image_from_the_main_process(program, command, runs):
    """One image, by process 0 (tests/test_cfg_parallelism.py checks it against diffusers' and each process's
    half of the batch)."""
    run = runs(program, command)
    run.succeeded()
    check_one_image_by_the_main_process(run)


@runs_of("examples/sharded_context_parallel.py")
def test_sharded_program_holds_half_of_the_transformer_and_of_t5_in_each_process_and_saves_one_image(
        program, command, runs, tiny_flux):
    """Each process says what it holds of the transformer and of T5 (their parameters' local shards): at most 0.55
    of the parameters each has (counted here, each loaded whole), and all of them together; one image, by process
    0. (The image against diffusers' own, for the same calls in the full script: tests/test_sharded_weights.py;
    here it would cost a 28-step 1024x1024 run in the test's process.)"""
    from diffusers import FluxTransformer2DModel
    from transformers import T5EncoderModel

    run = runs(program, command)
    run.succeeded()
    check_one_image_by_the_main_process(run)
    said = re.findall(r"^process (\d+) holds (\d+) of (\d+) parameters of the transformer, (\d+) of (\d+) of T5$",
                      run.result.stdout, flags=re.MULTILINE)
    assert sorted(int(rank) for rank, *_ in said) == list(range(run.processes)), run.result.stdout
    counted = {"transformer": FluxTransformer2DModel.from_pretrained(tiny_flux, subfolder="transformer"),
               "T5": T5EncoderModel.from_pretrained(tiny_flux, subfolder="text_encoder_2")}
    for i, (name, model) in enumerate(counted.items()):
        held = [(int(numbers[1 + 2 * i]), int(numbers[2 + 2 * i])) for numbers in said]
        full = model.num_parameters()
        assert {f for _, f in held} == {full}, name
        assert all(mine <= 0.55 * full for mine, _ in held) and sum(m for m, _ in held) >= full, (name, held)


@runs_of("examples/data_parallel_groups.py")
def test_groups_program_makes_each_prompt_once_in_the_group_whose_share_it_is(program, command, runs, tiny_flux):
    """Each prompt saved once, by the first process of the group whose contiguous share it is (groups of 2 in a row
    of ranks; numpy's array_split over the groups, Accelerate's rule), which says so; and the last group's last
    image is FluxPipeline's own (each image, who made it together and how each group split it: tests/test_groups.py,
    on the full script)."""
    run = runs(program, command)
    run.succeeded()
    prompts = literal(program.source, "prompts")
    first_of_its_group = {int(i): 2 * group for group, share in enumerate(
        np.array_split(np.arange(len(prompts)), run.processes // 2)) for i in share}
    saved = {}
    for save in run.saves:
        index = int(re.match(r"\d+", save["file"])[0])
        assert index not in saved, f"prompt {index} saved twice: {run.saves}"
        saved[index] = save["rank"]
        assert f"{save['file']} made by processes [{save['rank']}, {save['rank'] + 1}]" in run.result.stdout
    assert saved == first_of_its_group
    if not torch.accelerator.is_available():  # on GPUs in bfloat16: not the float32 CPU oracle's image
        from diffusers import FluxPipeline

        pipeline = FluxPipeline.from_pretrained(tiny_flux, dtype=torch.float32)
        pipeline.set_progress_bar_config(disable=True)
        index = len(prompts) - 1  # the last group's last image (the script's images: tests/test_groups.py, each)
        expected = pipeline(prompts[index], guidance_scale=3.5,
                            generator=torch.Generator("cpu").manual_seed(index)).images[0]
        difference = np.abs(pixels(run.folder / f"{index:03d}.png") - np.asarray(expected, dtype=np.int16))
        assert difference.max() <= 1, f"{index:03d}.png differs from diffusers' own by {difference.max()}/255"


def check_one_image_by_the_main_process(run):
    assert [save["rank"] for save in run.saves] == [0], f"expected one image, saved by process 0: {run.saves}"
    assert [p.name for p in run.folder.rglob("*.png")] == [run.saves[0]["file"]]


def saved_file(run, save):
    """Where the program saved the image the probe saw (the probe records the name; the program chooses the folder)."""
    [path] = [p for p in run.folder.rglob("*.png") if p.name == save["file"]]
    return path


# The extractor and the runner, on small pages written here: the convention's every case, a program that does not
# run, and the context parallel check on a program that makes no real image.

SYNTHETIC = {"README.md": '''\
## Context parallelism
The whole technique, [`examples/context_parallel.py`](examples/context_parallel.py):

```python
print("the program")
```

```bash
uv run torchrun --nproc-per-node 2 examples/context_parallel.py   # two processes, one image
uv run context-parallelism-flux.py --help
```

```python
# a plain example, not a program: no link above it
```
''', "docs/page.md": '''\
1. Run it:
   ```bash
   uv run accelerate launch --num_processes 2 examples/context_parallel.py
   uv run torchrun --nproc-per-node 2 examples/context_parallel.py   # two processes, one image
   ```
'''}

CONTEXT_PARALLEL = '''\
import os
from PIL import Image

model_id = "black-forest-labs/FLUX.1-dev"
if os.environ.get("RANK", "0") == "0":  # the main process
    Image.new("RGB", (8, 8)).save("one.png")
'''


def test_the_extractor_finds_each_program_shown_and_the_commands_of_every_page_that_launch_it(tmp_path):
    (tmp_path / "context_parallel.py").write_text(CONTEXT_PARALLEL, encoding="utf-8")
    [program] = programs(SYNTHETIC, tmp_path)
    assert program.name == "examples/context_parallel.py" and program.source == CONTEXT_PARALLEL
    # Every page's lines, each once (the same line in two pages is one run), in the pages' order.
    assert program.commands == ["uv run torchrun --nproc-per-node 2 examples/context_parallel.py   # two processes, "
                                "one image", "uv run accelerate launch --num_processes 2 examples/context_parallel.py"]
    assert launch_commands(SYNTHETIC) == set(program.commands)
    shown = shown_programs(SYNTHETIC["README.md"])
    assert shown == {"examples/context_parallel.py": 'print("the program")\n'}  # not the plain example
    assert shown[program.name] != program.source  # a block that is not its file: the README test fails on it
    assert shown_programs(SYNTHETIC["docs/page.md"]) == {}
    assert bash_lines(SYNTHETIC["docs/page.md"])[0].startswith("uv run accelerate launch")  # in a list, indented
    assert tiny_fixture(hub_id(program.source)) == "tiny_flux"
    assert tiny_fixture("stabilityai/stable-diffusion-3.5-medium") == "tiny_sd3"
    assert "FLUX.1-dev" not in with_tiny_pipeline(program.source, Path("/tmp/tiny/flux"))
    assert "model_id = '/tmp/tiny/flux'" in with_tiny_pipeline(program.source, Path("/tmp/tiny/flux"))


def test_the_launch_commands_get_only_a_port_and_where_there_is_no_gpu_multi_gpu():
    torchrun = as_test("uv run torchrun --nproc-per-node 2 examples/a.py", "examples/a.py")
    assert torchrun[0] == BIN / "torchrun" and torchrun[1] == "--master-port" and torchrun[3:] == [
        "--nproc-per-node", "2", "examples/a.py"]
    accelerate = as_test("uv run accelerate launch --num_processes 2 examples/a.py", "examples/a.py")
    assert accelerate[:3] == [BIN / "accelerate", "launch", "--main_process_port"]
    assert accelerate[4:] == ([] if torch.accelerator.is_available() else ["--multi_gpu"]) + [
        "--num_processes", "2", "examples/a.py"]
    assert as_test("uv run examples/a.py --x 1", "examples/a.py") == [sys.executable, "examples/a.py", "--x", "1"]
    assert [number_of_processes(c) for c in (torchrun, accelerate, ["examples/a.py"])] == [2, 2, 1]


def test_the_context_parallel_check_on_a_synthetic_program(tmp_path):
    program = Program("examples/context_parallel.py", CONTEXT_PARALLEL)
    command = "uv run torchrun --nproc-per-node 2 examples/context_parallel.py"
    run = run_program(program, command, Path("/nowhere/tiny/flux"), tmp_path / "run",
                      a_gpu_a_process=False)  # it uses no GPU: 2 processes run on any machine
    run.succeeded()
    check_one_image_by_the_main_process(run)
    # One image saved by every process, or by another than the main one, is caught.
    for saves in ([{"rank": 0, "file": "one.png"}, {"rank": 1, "file": "one.png"}], [{"rank": 1, "file": "one.png"}]):
        with pytest.raises(AssertionError, match="saved by process 0"):
            check_one_image_by_the_main_process(Run(program, "", run.folder, 2, run.result, saves))


def test_a_program_that_does_not_run_fails_the_suite(tmp_path):
    broken = Program("examples/model_parallel.py", 'model = "black-forest-labs/FLUX.1-dev"\nprint(model\n')
    run = run_program(broken, "uv run examples/model_parallel.py", Path("/nowhere"), tmp_path / "run")
    with pytest.raises(pytest.fail.Exception, match="SyntaxError"):
        run.succeeded()
