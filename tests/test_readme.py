"""The pages are true (README.md, docs/*.md, CONTRIBUTING.md): their images and links exist, the README's test
command is CI's, and every `uv run` command of their bash blocks works.

A command is run as written, with these substitutions only: the tiny pipelines for the real models (and the
FLUX.1-dev or SD3.5-medium configs for a --plan), a few steps at 64 px, output in a temporary folder, a free port,
and 127.0.0.1 for the example address of machine 0, and a --plan for two 24 GiB GPUs where a command gives GPU
memory budgets (on any machine: its GPUs, if any, are not those of the example); the scripts run on the CPU on
purpose (`--device cpu`), alike on a machine with GPUs, and `accelerate launch` gets `--multi_gpu` where the line
lacks it (and names no config file): N CPU processes, as on the N GPUs the command is for (without it Accelerate
starts one process where it finds fewer than 2 GPUs). Interactive commands (`accelerate config`, `hf auth login`)
are run with --help, and so are the maintainers' tools in dev/, which run the whole suite themselves; a pytest
command with a selection is collected (--collect-only: it must select a test), and the plain `uv run pytest` is CI's
command (test_the_readme_test_command_is_what_ci_runs), not run inside the suite it is. The benchmarks run small (a
tiny model, a few prompts or steps at 64 px, on the CPU) and without their warm-up run, which only makes the first time fair:
the test checks that they run, not their times. The two machines of the several-machines example are run together,
on loopback. A command that appears in several pages is run once. A few commands are run by the tests of their
script, which assert more about the run (RUN_ELSEWHERE), two commands that become the same run here are run once
(runs_alike), and the one-page programs' commands are run by tests/test_readme_programs.py.
"""

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from unittest import mock

import pytest

from tests.conftest import (BIN, IMAGES, ROOT, SIMULATE, free_port, load_script, offline_env, read_manifest, run,
                            run_main)
from tests.test_readme_programs import PAGES, README, bash_lines, launch_commands, programs

FLUX_DEV_CONFIGS = ROOT / "tests" / "fixtures" / "flux1-dev"
SD35_MEDIUM_CONFIGS = ROOT / "tests" / "fixtures" / "sd3.5-medium"
SCRIPTS = {"data-parallelism-accelerate.py": "sd3", "model-parallelism-flux.py": "flux",
           "context-parallelism-flux.py": "flux", "cfg-parallelism-sd3.py": "sd3"}
FAST = ["--num-inference-steps", "2", "--height", "64", "--width", "64"]
# Real models a page names with --model, and the tiny pipeline of the same class that stands in for each here.
REAL_MODELS_RUN_TINY = {"Qwen/Qwen-Image": "qwenimage", "black-forest-labs/FLUX.1-dev": "flux"}


def page_lines():
    """Every `uv run ...` line of the pages' bash blocks, each once (a command in two pages is one), in page order."""
    return list(dict.fromkeys(line for text in PAGES.values() for line in bash_lines(text)))


def page_commands():
    """Every `uv run ...` line of the pages' bash blocks, without its trailing comment; but the launch commands of
    the one-page programs (examples/), which tests/test_readme_programs.py runs, and the commands another test runs
    itself (RUN_ELSEWHERE)."""
    elsewhere = {globals()[name] for name in RUN_ELSEWHERE}
    return [shlex.split(line, comments=True) for line in page_lines()
            if line not in launch_commands() and line not in elsewhere]


# The pages' commands that a test of their script runs itself (run_readme_command), to assert more about the run than
# that it works: the images, who made which, diffusers' own image. Each is run there, once, and not again here.
DP_TORCHRUN = "uv run torchrun --nproc-per-node 2 data-parallelism-accelerate.py --prompts-file prompts.txt"
DP_ACCELERATE_TINY = ("uv run accelerate launch --multi_gpu --num_processes 2 data-parallelism-accelerate.py --model "
                      "tiny/sd3 --num-inference-steps 2 --output-dir outputs/tiny-sd3 --device cpu")
CP_TORCHRUN_TINY = ("uv run torchrun --nproc-per-node 2 context-parallelism-flux.py --model tiny/flux --height 64 "
                    "--width 64 --num-inference-steps 2 --output outputs/tiny-flux-context-parallel.png --device cpu")
CP_TORCHRUN_STAGED = "uv run torchrun --nproc-per-node 2 context-parallelism-flux.py --staged"
CP_ACCELERATE = "uv run accelerate launch --num_processes 2 context-parallelism-flux.py"
CP_QWENIMAGE_TINY = ("uv run torchrun --nproc-per-node 2 context-parallelism-flux.py --model tiny/qwenimage --prompt "
                     "\"a fox\" --height 48 --width 48 --num-inference-steps 2 --output outputs/tiny-qwenimage.png "
                     "--device cpu")
CFG_TORCHRUN_TINY = ("uv run torchrun --nproc-per-node 2 cfg-parallelism-sd3.py --model tiny/sd3 --height 64 --width "
                     "64 --num-inference-steps 2 --output outputs/tiny-sd3-cfg-parallel.png --device cpu")
CFG_ACCELERATE = "uv run accelerate launch --num_processes 2 cfg-parallelism-sd3.py"
SHARD_TORCHRUN_TINY = ("uv run torchrun --nproc-per-node 2 context-parallelism-flux.py --shard-weights --model "
                       "tiny/flux --height 64 --width 64 --num-inference-steps 2 --output "
                       "outputs/tiny-flux-sharded.png --device cpu")
SHARD_STAGED = "uv run torchrun --nproc-per-node 2 context-parallelism-flux.py --shard-weights --staged"
SHARD_QWENIMAGE_TINY = ("uv run torchrun --nproc-per-node 2 context-parallelism-flux.py --shard-weights --model "
                        "tiny/qwenimage --prompt \"a fox\" --height 48 --width 48 --num-inference-steps 2 --output "
                        "outputs/tiny-qwenimage-sharded.png --device cpu")
GROUPS_CONTEXT = ("uv run torchrun --nproc-per-node 4 data-parallelism-accelerate.py --context-parallel 2 --model "
                  "black-forest-labs/FLUX.1-dev --prompts-file prompts.txt")
GROUPS_CFG = ("uv run torchrun --nproc-per-node 4 data-parallelism-accelerate.py --cfg-parallel --prompts-file "
              "prompts.txt")
RUN_ELSEWHERE = {"DP_TORCHRUN": "test_data_parallelism.py", "DP_ACCELERATE_TINY": "test_data_parallelism.py",
                 "CP_TORCHRUN_TINY": "test_context_parallelism.py", "CP_TORCHRUN_STAGED": "test_context_parallelism.py",
                 "CP_ACCELERATE": "test_context_parallelism.py", "CP_QWENIMAGE_TINY": "test_context_parallelism.py",
                 "CFG_TORCHRUN_TINY": "test_cfg_parallelism.py",
                 "CFG_ACCELERATE": "test_cfg_parallelism.py", "SHARD_TORCHRUN_TINY": "test_sharded_weights.py",
                 "SHARD_STAGED": "test_sharded_weights.py", "SHARD_QWENIMAGE_TINY": "test_sharded_weights.py",
                 "GROUPS_CONTEXT": "test_groups.py", "GROUPS_CFG": "test_groups.py"}

# Page commands made on a simulated GPU machine (tests/simulate/fake_gpus.py: torch answers as a machine with GPUs
# does, down to what torch.distributed asks its C++ side; the GPUs cannot compute), all of them on the CPU: what
# `--device cpu` does on a user's machine with 1 GPU or 2, NVIDIA's or Intel's, and where a mask gives each process
# a GPU of its own (FAKE_MASK_PER_PROCESS). Every script meets each of these (tests/test_the_tests.py), in runs the
# suite makes anyway; each run checks that its processes saw the simulated GPUs (run_on_the_machine).
MP_TINY = ("uv run model-parallelism-flux.py --model tiny/flux --height 64 --width 64 --num-inference-steps 2 --output "
           "outputs/tiny-flux.png --device cpu")
MP_STAGED = "uv run model-parallelism-flux.py --staged"
ON_SIMULATED_GPUS = {
    DP_ACCELERATE_TINY: {"FAKE_GPUS": "1", "FAKE_ACCELERATOR": "cuda"},
    DP_TORCHRUN: {"FAKE_GPUS": "2", "FAKE_ACCELERATOR": "xpu"},
    CP_TORCHRUN_TINY: {"FAKE_GPUS": "2", "FAKE_ACCELERATOR": "cuda", "FAKE_MASK_PER_PROCESS": "1"},
    CP_ACCELERATE: {"FAKE_GPUS": "1", "FAKE_ACCELERATOR": "xpu"},
    CFG_TORCHRUN_TINY: {"FAKE_GPUS": "2", "FAKE_ACCELERATOR": "xpu", "FAKE_MASK_PER_PROCESS": "1"},
    CFG_ACCELERATE: {"FAKE_GPUS": "1", "FAKE_ACCELERATOR": "cuda"},
    MP_TINY: {"FAKE_GPUS": "2", "FAKE_ACCELERATOR": "cuda"},
    MP_STAGED: {"FAKE_GPUS": "1", "FAKE_ACCELERATOR": "xpu"},
    GROUPS_CFG: {"FAKE_GPUS": "2", "FAKE_ACCELERATOR": "cuda"},  # 4 processes in 2 groups beside 2 GPUs
}


def run_readme_command(line, tiny, tmp_path, check=True, timeout=600, **env):
    """Run the command LINE, which must be in a page (the README or docs/) as written, as
    test_every_readme_command_runs runs each (as_test: the tiny pipelines, a few steps at 64 px, on the CPU, on its
    simulated GPU machine if it has one), with `env` added (a probe); with `check`, fail the test if it fails. What
    it makes is in tmp_path: out/ (data parallel) or out.png."""
    assert line in page_lines(), f"no page has the command {line!r} any more"
    return run_on_the_machine(shlex.split(line, comments=True), tiny, tmp_path, check=check, timeout=timeout, **env)


def run_on_the_machine(argv, tiny, tmp_path, check=True, timeout=600, **env):
    """Run a page's command (as_test), on the simulated GPU machine ON_SIMULATED_GPUS gives it (or a command alike),
    and check that every process of the script saw those GPUs; with `check`, fail the test if it fails."""
    machine = next((machine for line, machine in ON_SIMULATED_GPUS.items() if runs_alike(
        shlex.split(line, comments=True), tmp_path) == runs_alike(argv, tmp_path)), None)
    with tempfile.TemporaryDirectory(prefix="simulated-") as seen:  # beside what the run makes, not in it
        if machine:
            env = {**machine, "FAKE_GPUS_SEEN": seen, **env,
                   "PYTHONPATH": os.pathsep.join(filter(None, [env.get("PYTHONPATH"), str(SIMULATE)]))}
        result = run(as_test(argv, tiny, tmp_path, free_port()), timeout=timeout, check=check, env=env)
        if machine:
            assert_the_script_saw_the_gpus(Path(seen), argv, machine)
    return result


def assert_the_script_saw_the_gpus(seen, argv, machine):
    """Each process of the script (not the launcher's) saw the simulated GPUs: their kind at torch's C++ side, and
    how many (one each where a mask gives each process its own)."""
    script = next(word for word in argv if word in SCRIPTS)
    processes = int(next((argv[i + 1] for i, word in enumerate(argv) if word in (
        "--nproc-per-node", "--num_processes")), 1))
    records = [json.loads(path.read_text()) for path in seen.glob("seen-*.json")]
    ran = [r for r in records if Path(r["argv0"]).name == script]
    each = 1 if machine.get("FAKE_MASK_PER_PROCESS") else int(machine["FAKE_GPUS"])
    assert len(ran) == processes, records
    assert all((r["accelerator"], r["devices"], r["available"]) == (machine["FAKE_ACCELERATOR"], each, True)
               for r in ran), ran


def as_test(argv, tiny, tmp_path, port):
    """A page's command, runnable here (see the module's docstring)."""
    argv = [str(tiny[REAL_MODELS_RUN_TINY[a]]) if a in REAL_MODELS_RUN_TINY else a for a in argv[2:]]
    argv = [re.sub(r"\btiny/(sd3|flux|qwenimage)\b", lambda m: str(tiny[m[1]]), a) for a in argv]
    program, args = argv[0], argv[1:]
    if program in ("accelerate", "hf") and args[:1] in (["config"], ["auth"]):
        return [BIN / program, *args, "--help"]
    if program.startswith("dev/"):  # the maintainers' tools run the whole suite: a test cannot run it inside it
        return [sys.executable, ROOT / program, "--help"]
    if program == "pytest":  # a selection of the suite: it must select a test (pytest exits 5 if none)
        assert args, "the plain `uv run pytest` is CI's command, not run inside the suite"
        return [BIN / "pytest", *args, "--collect-only", "-q", "-p", "no:cacheprovider"]
    command = [sys.executable, ROOT / program] if program.endswith(".py") else [BIN / program]
    if program == "accelerate":
        command += ["launch", "--main_process_port", str(port)]
        args = args[1:]
        if not {"--multi_gpu", "--config_file"} & set(args):  # N CPU processes (--device cpu, below), as on the N
            command.append("--multi_gpu")  # GPUs the command is for: without it Accelerate starts one on fewer GPUs
        if "--num_machines" in args:
            args[args.index("--main_process_ip") + 1] = "127.0.0.1"
            del args[args.index("--main_process_port"):args.index("--main_process_port") + 2]
    elif program == "torchrun":
        command += ["--master-port", str(port)]
    elif program == "utils/tiny_pipelines.py":
        args = [str(tmp_path / "tiny")]
    elif program == "utils/check_copies.py":  # on a copy of the scripts: --fix must never rewrite the repository's
        for path in ROOT.glob("*.py"):
            shutil.copy(path, tmp_path / path.name)
        args += ["--root", str(tmp_path)]
    elif program == "benchmarks/scaling.py":
        args += ["--model", str(tiny["sd3"]), "--prompts", "4", "--size", "64", "--steps", "1", "--no-warm-up"]
    elif program == "benchmarks/context_parallel.py":  # a small random FLUX: 2 heads of 64
        args += ["--hidden", "128", "--sizes", "64", "--steps", "2", "--repeats", "1", "--no-warm-up"]
    elif program == "benchmarks/sharded_weights.py":  # the sharded run alone, on a small random FLUX
        args += ["--runs", "sharded", "--hidden", "128", "--size", "64", "--steps", "2", "--no-warm-up"]
    elif program == "benchmarks/groups.py":  # a small random FLUX: 2 heads of 64; 2 prompts
        args += ["--hidden", "128", "--size", "64", "--steps", "2", "--prompts", "2", "--repeats", "1", "--no-warm-up"]
    elif program == "benchmarks/cfg_parallel.py":  # a small random SD3: 1 block, hidden size 32
        args += ["--hidden", "32", "--layers", "1", "--size", "64", "--steps", "2", "--repeats", "1", "--no-warm-up"]
    if program.startswith("benchmarks/"):  # on the CPU, as the scripts' commands are, whatever GPUs are here
        args += ["--device", "cpu"]
    script = next((a for a in [program, *args] if a in SCRIPTS), None)
    if "--max-memory" in args:  # budgets for GPUs: planned, alike on a machine without GPUs and on one with 1 or 8
        args += ["--plan", "--num-devices", "2", "--device-memory", "24GiB"]
    if script and not script.startswith("data") and "--help" not in args and "--model" in args and args[
            args.index("--model") + 1] in map(str, tiny.values()):  # a tiny pipeline's command: its own settings
        args += [a for flag, value in zip(FAST[::2], FAST[1::2]) if flag not in args for a in (flag, value)]
        args += ["--output", str(tmp_path / "out.png"), "--device", "cpu"]
    elif script and "--help" not in args:
        # The family of the model the command names (a tiny one by now), or the script's own.
        family = next((name for name, path in tiny.items() if "--model" in args and args[args.index("--model") + 1]
                       == str(path)), SCRIPTS[script])
        if "--plan" in args:
            args += ["--model", str(SD35_MEDIUM_CONFIGS if family == "sd3" else FLUX_DEV_CONFIGS)]
        elif script.startswith("data"):
            args += ["--model", str(tiny[family]), *FAST, "--output-dir", str(tmp_path / "out"), "--device", "cpu"]
        else:
            args += ["--model", str(tiny[SCRIPTS[script]]), *FAST, "--output", str(tmp_path / "out.png"), "--device",
                     "cpu"]
    return command + args


def test_the_pages_have_commands_to_check():
    words = {word for argv in page_commands() for word in argv[2:]}
    assert {"accelerate", "torchrun", "pytest", "data-parallelism-accelerate.py", "model-parallelism-flux.py",
            "utils/tiny_pipelines.py", "benchmarks/scaling.py", "--machine_rank", "--plan", "--staged",
            "context-parallelism-flux.py", "benchmarks/context_parallel.py"} <= words


def test_the_commands_left_to_test_readme_programs_are_the_one_page_programs_launch_commands():
    """Not one page command is skipped: those not run here launch a program in examples/, which
    tests/test_readme_programs.py runs with them."""
    names = {program.name for program in programs()}
    left = [line for line in page_lines() if line in launch_commands()]
    assert left, "the one-page programs have no launch commands"
    assert all(set(shlex.split(line, comments=True)) & names for line in left)
    assert not names & {word for argv in page_commands() for word in argv}  # nor run here


def test_each_command_run_elsewhere_is_in_a_page_and_run_by_its_test_module():
    for name, module in RUN_ELSEWHERE.items():
        assert globals()[name] in page_lines(), name
        source = (ROOT / "tests" / module).read_text(encoding="utf-8")
        assert "run_readme_command(" in source and len(re.findall(rf"\b{name}\b", source)) >= 2, name  # imported, used


def headings(text):
    """The anchors GitHub gives a page's headings: lower case, punctuation dropped, spaces to hyphens, -1, -2... for
    a repeat. Headings in code blocks are not headings."""
    anchors = []
    for title in re.findall(r"^#{1,6} (.+?)\s*$", re.sub(r"^```.*?^```", "", text, flags=re.M | re.S), flags=re.M):
        anchor = re.sub(r"[^\w\- ]", "", title.lower()).replace(" ", "-")
        anchors.append(anchor if anchor not in anchors else f"{anchor}-{anchors.count(anchor)}")
    return anchors


def test_headings_get_the_anchors_github_gives_them():
    assert headings("# Set-up\n## Intel GPUs (XPU)\n```\n# not a heading\n```\n## Memory: 12 and 16 GB cards\n"
                    "## Run it\n## Run it\n") == ["set-up", "intel-gpus-xpu", "memory-12-and-16-gb-cards", "run-it",
                                                  "run-it-1"]


@pytest.mark.parametrize("page", PAGES)
def test_every_image_and_link_of_the_page_is_there(page):
    """Images (`src="..."`) and links (`[...](target)`) to files of the repository, and to headings of a page,
    from where the page is, but in comments and code; links to the web are left to the reader (no network here)."""
    shown = re.sub(r"<!--.*?-->|^[ \t]*```.*?^[ \t]*```|`[^`]*`", "", PAGES[page], flags=re.S | re.M)  # not code
    text, folder = shown, (ROOT / page).parent
    images = re.findall(r'src="([^"]+)"', text)
    for image in images:
        assert (folder / image).resolve().is_file(), f"{page}: no image {image}"
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"\w+://|mailto:", target):
            continue
        path, _, anchor = target.partition("#")
        linked = (folder / path).resolve() if path else ROOT / page
        assert linked.exists(), f"{page}: the link to {target} leads nowhere"
        if anchor:
            assert linked.suffix == ".md" and anchor in headings(linked.read_text(encoding="utf-8")), (
                f"{page}: {path or page} has no heading #{anchor}")


def test_the_pages_show_the_images_in_assets():
    shown = {(ROOT / page).parent.joinpath(image).resolve() for page, text in PAGES.items()
             for image in re.findall(r'src="([^"]+)"', text)}
    assert {path.resolve() for path in (ROOT / "assets").glob("*.png")} <= shown, "an image in assets/ no page shows"


def test_the_readme_test_command_is_what_ci_runs():
    tests_section = README.split("## Tests", 1)[1]
    command = re.search(r"```bash\n(.*?)\n```", tests_section, flags=re.DOTALL).group(1).strip()
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert ci_lines[-1] == command
    quick_start = README.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    assert command in [" ".join(shlex.split(line, comments=True)) for line in bash_lines(quick_start)]  # its too


def test_the_readme_table_of_flux1_dev_plans_is_what_the_script_plans(monkeypatch, capsys):
    """Each row of the sharding page's table of FLUX.1-dev plans, word for word and figure for figure, as the
    script's --plan --json gives it: whether it fits, where each component goes, and each device's weights."""
    script = load_script(ROOT / "model-parallelism-flux.py")
    rows = re.findall(r"^\| (\d) x (\d+) GiB( `--staged`)? \| (yes|\*\*no\*\*) \| (.*?) \| (.*?) \|$",
                      PAGES["docs/model-parallelism.md"], flags=re.MULTILINE)
    assert len(rows) >= 4
    short = {"transformer": "transformer", "text_encoder_2": "T5", "text_encoder": "CLIP", "vae": "VAE"}
    for num_devices, memory, staged, fits, where, weights in rows:
        monkeypatch.setattr("sys.argv", ["model-parallelism-flux.py", "--plan", "--json", "--model",
                                         str(FLUX_DEV_CONFIGS), "--num-devices", num_devices, "--device-memory",
                                         f"{memory}GiB", *(["--staged"] if staged else [])])
        script.main()
        plan = json.loads(capsys.readouterr().out)
        assert plan["fits"] == (fits == "yes"), (num_devices, memory, staged)
        said = []
        for name, word in short.items():
            devices = sorted({d for m, d in plan["placement"].items() if m.split(".")[0] == name and d.isdigit()})
            split = len(devices) > 1 or any(m.startswith(name + ".") for m in plan["placement"])
            said.append(f"{word} {'split over' if split else 'on'} {', '.join(devices)}"
                        + (" (+ no room)" if any(m.split(".")[0] == name and not d.isdigit()
                                                  for m, d in plan["placement"].items()) else ""))
        assert where == "; ".join(said), (num_devices, memory, staged)
        expected = ", ".join(f"{d}: {b / 2**30:.1f}" for d, b in plan["devices"].items()) + " GiB" + (
            f"; {plan['unplaced'] / 2**30:.1f} GiB find no room" if plan["unplaced"] else "")
        assert weights == expected, (num_devices, memory, staged)


def test_the_readme_table_of_sd35_medium_memory_modes_is_what_the_script_plans(monkeypatch, capsys):
    script = load_script(ROOT / "data-parallelism-accelerate.py")
    rows = re.findall(r"^\| (\d+) GiB \| (whole|model|sequential) \| (yes|\*\*no\*\*) \| ([\d.]+) GiB \| ([\d.]+) GiB "
                      r"\| ([\d.]+) GiB \|", PAGES["docs/data-parallelism.md"], flags=re.MULTILINE)
    assert len(rows) == 5
    for memory, mode, fits, weights, largest, needs in rows:
        monkeypatch.setattr("sys.argv", ["data-parallelism-accelerate.py", "--plan", "--json", "--model",
                                         str(SD35_MEDIUM_CONFIGS), "--device-memory", f"{memory}GiB"])
        script.main()
        plan = json.loads(capsys.readouterr().out)
        assert (plan["mode"], plan["fits"]) == (mode, fits == "yes"), memory
        assert [f"{plan[k] / 2**30:.2f}" for k in ("weights", "largest_component")] == [weights, largest]
        assert f"{plan['needs'][plan['mode']] / 2**30:.2f}" == needs


def runs_alike(argv, folder):
    """What a page's command becomes here (as_test, with stand-ins for the tiny pipelines and the port, and FOLDER,
    an empty temporary folder, for the test's own): the launcher's words and the options the script parses from its
    own (argparse keeps a flag's last value). Two commands alike make the same run here, e.g. the quick start's
    tiny Flux command and its section's command for FLUX.1-dev, once the tiny Flux, 64 px and 2 steps replace the
    real model's settings. A command its script refuses to parse is a run of its own."""
    stand_ins = {"sd3": "TINY-SD3", "flux": "TINY-FLUX", "qwenimage": "TINY-QWENIMAGE"}
    command = [str(a) for a in as_test(argv, stand_ins, folder, 0)]
    at = next((i for i, word in enumerate(command) if Path(word).name in SCRIPTS), None)
    if at is None:
        return tuple(command)
    try:
        with mock.patch.object(sys, "argv", command[at:]):
            options = vars(load_script(ROOT / Path(command[at]).name).parse_args())
    except SystemExit:
        return tuple(argv)
    return (*command[:at], Path(command[at]).name, *sorted((name, repr(value)) for name, value in options.items()))


def commands_run_here():
    """The pages' commands this module runs (the one-page programs are run by tests/test_readme_programs.py; the
    several machines, together, below; the plain `uv run pytest` is CI's): one of each alike, and none alike to one
    another test runs."""
    with tempfile.TemporaryDirectory(prefix="readme-commands-") as folder:
        kept = {runs_alike(shlex.split(globals()[name], comments=True), Path(folder)): None for name in RUN_ELSEWHERE}
        for argv in page_commands():
            if argv[2:] != ["pytest"] and "--machine_rank" not in argv:
                kept.setdefault(runs_alike(argv, Path(folder)), argv)
    return [argv for argv in kept.values() if argv]


SINGLE = commands_run_here()


def test_every_page_command_is_run_by_a_test():
    """None is skipped silently: each is run here (or one that makes the same run), by its script's tests
    (RUN_ELSEWHERE), by tests/test_readme_programs.py (a one-page program), together with the other machine's, or it
    is CI's own command."""
    with tempfile.TemporaryDirectory(prefix="readme-commands-") as folder:
        run = {runs_alike(argv, Path(folder)) for argv in SINGLE} | {
            runs_alike(shlex.split(globals()[name], comments=True), Path(folder)) for name in RUN_ELSEWHERE}
        for line in page_lines():
            argv = shlex.split(line, comments=True)
            if line in launch_commands() or "--machine_rank" in argv or argv[2:] == ["pytest"]:
                continue
            assert runs_alike(argv, Path(folder)) in run, f"no test runs `{line}`"


@pytest.mark.parametrize("argv", SINGLE, ids=[" ".join(argv[2:5]) for argv in SINGLE])
def test_every_readme_command_runs(argv, tiny, tmp_path):
    command = as_test(argv, tiny, tmp_path, free_port())
    if command[0] != sys.executable or "--plan" not in command:
        run_on_the_machine(argv, tiny, tmp_path)
        return
    # A plan loads nothing and starts no process: its main() in this process prints what the command prints. It
    # exits 0 whether the plan fits or not: the verdict is what tells. It must fit, but where a page shows
    # the command's printout (test_each_plan_the_readme_shows_is_what_the_command_prints), as shown there.
    result = run_main(*command[1:], check=True)
    # A page's capture of this command: the same words, or these and a --model (the capture's own configs).
    shown = [printed for shown_argv, printed in captures() if shown_argv == argv or (
        shown_argv[:len(argv)] == argv and shown_argv[len(argv)] == "--model")]
    expected = re.findall(r"fits: (yes|NO)", "\n".join(shown[0]))[-1] if shown else "yes"
    if "--json" in command:
        verdict = {True: "yes", False: "NO"}[json.loads(result.stdout)["fits"]]
    else:
        verdict = re.findall(r"fits: (yes|NO)", result.stdout)[-1]
    assert verdict == expected, result.stdout


def test_the_several_machines_example_runs_on_loopback(tiny, tmp_path):
    machines = [argv for argv in page_commands() if "--machine_rank" in argv]
    assert [argv[argv.index("--machine_rank") + 1] for argv in machines] == ["0", "1"]
    port = free_port()
    jobs = [subprocess.Popen([str(a) for a in as_test(argv, tiny, tmp_path, port)],
                             cwd=ROOT, env=offline_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for argv in machines]
    outputs = [job.communicate(timeout=300)[0] for job in jobs]
    assert [job.returncode for job in jobs] == [0, 0], outputs
    prompts = [line for line in (ROOT / "prompts.txt").read_text().splitlines() if line.strip()]
    assert f"made {len(prompts)} images (0 already there) with 4 process(es)" in outputs[0]
    assert len(list((tmp_path / "out").glob(IMAGES))) == len(prompts)
    # Each prompt made once, in its order, by the rank whose contiguous share it is: ranks 0-1 on machine 0, 2-3 on
    # machine 1, the first ranks taking one more where the prompts do not divide evenly.
    manifest = read_manifest(tmp_path / "out")
    assert [r["prompt"] for r in manifest] == prompts
    share, extra = divmod(len(prompts), 4)
    assert [r["rank"] for r in manifest] == [rank for rank in range(4) for _ in range(share + (rank < extra))]


def captures(text="\n".join(PAGES.values())):
    """The pages' captures of a plan: a ```text block whose first line is `$ uv run SCRIPT --plan ...`, and the
    lines printed under it."""
    blocks = re.findall(r"```text\n\$ (uv run [^\n]*--plan[^\n]*)\n(.*?)```", text, flags=re.DOTALL)
    return [(shlex.split(command), printed.rstrip("\n").splitlines()) for command, printed in blocks]


@pytest.mark.parametrize("argv, shown", captures(), ids=[" ".join(argv[2:4]) for argv, _ in captures()])
def test_each_plan_the_readme_shows_is_what_the_command_prints(argv, shown):
    """A plan a page shows is the command's printout, line for line, its verdict ("fits: yes" or "fits: NO")
    included: a plan command exits 0 either way, so its exit code alone would not show a page gone stale. Where
    the page leaves out --model (the Hub id, which is not reachable here), the same configs come from
    tests/fixtures."""
    script, args = argv[2], argv[3:]
    hub_id = None
    if "--model" not in args:
        hub_id = load_script(ROOT / script).DEFAULT_MODEL
        args += ["--model", str(FLUX_DEV_CONFIGS if "flux" in script else SD35_MEDIUM_CONFIGS)]
    model = args[args.index("--model") + 1]
    args[args.index("--model") + 1] = str(ROOT / model)  # as from the repository root, wherever pytest runs
    result = run_main(ROOT / script, *args, check=True)
    printed = result.stdout.replace(str(ROOT / model), hub_id or model).rstrip("\n").splitlines()
    assert printed == shown
    assert re.search(r"fits: (yes|NO)", "\n".join(shown))
