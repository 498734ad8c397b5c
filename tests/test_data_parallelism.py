"""data-parallelism-accelerate.py, run as users run it: plain Python, torchrun, accelerate launch."""

import contextlib
import json
import os
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline

from tests.conftest import (DATA_PARALLEL, IMAGES, ROOT, assert_clear_error, load_script, pixels, python, read_manifest,
                            run, run_main, torchrun)
from tests.test_readme import DP_ACCELERATE_TINY, DP_TORCHRUN, run_readme_command

pytestmark = pytest.mark.xdist_group("data_parallelism")  # shared module-scoped runs, made once

PROMPTS = ["a red fox", "a lighthouse/at night", "un chat noir, été", "a red fox", "the last prompt"]
# CPU tests: on the CPU on purpose, alike on a machine with GPUs (tests/test_gpu_machines.py runs on those).
FAST = ["--num-inference-steps", "2", "--height", "64", "--width", "64", "--device", "cpu"]
# Two processes run with one thread each, one process with two: float sums can round differently, so two runs
# may differ by a unit or two in a pixel value. A different seed or a wrong prompt changes them by ~100.
TOLERANCE = 3


def prompt_args(prompts):
    return [arg for p in prompts for arg in ("--prompt", p)]


def generate(launcher, tmp_path, model, prompts=PROMPTS, *extra, n=2):
    out = tmp_path / "out"
    script_args = ["--model", model, "--output-dir", out, *prompt_args(prompts), *FAST, *extra]
    if launcher is python:  # one plain process: its main() here, as `python SCRIPT ARGS` runs it (conftest.run_main)
        run_main(DATA_PARALLEL, *script_args, check=True)
    else:
        run(launcher(n, DATA_PARALLEL, *script_args))
    return out


def assert_one_image_per_prompt(out, prompts):
    manifest = read_manifest(out)
    assert [r["index"] for r in manifest] == list(range(len(prompts)))
    assert [r["prompt"] for r in manifest] == prompts
    assert sorted(p.name for p in out.glob(IMAGES)) == [r["file_name"] for r in manifest]
    for r in manifest:
        assert r["file_name"].startswith(f"{r['index']:03d}-")
        assert r["seed"] == r["index"]
        assert pixels(out / r["file_name"]).shape == (64, 64, 3)
    return manifest


def assert_same_images(out, reference):
    for r in read_manifest(out):
        difference = np.abs(pixels(out / r["file_name"]) - pixels(reference / r["file_name"])).max()
        assert difference <= TOLERANCE, f"{r['file_name']} differs by {difference}"


@pytest.fixture(scope="module")
def diffusers_image(tiny_sd3):
    """The independent oracle: the image diffusers makes, called directly, for a prompt and a seed, with the
    settings of FAST on the CPU in float32 (the script's dtype there) and the pipeline's own guidance."""
    pipeline = DiffusionPipeline.from_pretrained(tiny_sd3, dtype=torch.float32)
    pipeline.set_progress_bar_config(disable=True)
    made = {}

    def image(prompt, seed):
        if (prompt, seed) not in made:
            made[prompt, seed] = np.asarray(pipeline(
                prompt, num_inference_steps=2, height=64, width=64,
                generator=torch.Generator("cpu").manual_seed(seed)).images[0].convert("RGB"), dtype=np.int16)
        return made[prompt, seed]
    return image


def assert_made_by_diffusers(out, diffusers_image, seed=0, indexes=None):
    """Every image of the run (or those of these indexes) is the one diffusers makes for its prompt with seed
    SEED + its index, and the manifest says so."""
    manifest = read_manifest(out)
    assert manifest
    for r in manifest:
        assert r["seed"] == seed + r["index"]
        if indexes is not None and r["index"] not in indexes:
            continue
        difference = np.abs(pixels(out / r["file_name"]) - diffusers_image(r["prompt"], seed + r["index"])).max()
        assert difference <= TOLERANCE, f"{r['file_name']} differs from diffusers' image by {difference}"


def write_prompts_file(folder, lines):
    path = folder / "prompts.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def one_process(tiny_sd3, tmp_path_factory):
    """The reference: all prompts made by one plain Python process, the first given by --prompt and the others
    read from a --prompts-file with blank lines in it (which the order of the images shows are skipped)."""
    folder = tmp_path_factory.mktemp("one")
    prompts_file = write_prompts_file(folder, [PROMPTS[1], "", "   ", *PROMPTS[2:]])
    return generate(python, folder, tiny_sd3, PROMPTS[:1], "--prompts-file", prompts_file)


def test_one_process_makes_one_image_per_prompt_with_a_manifest(one_process, diffusers_image):
    manifest = assert_one_image_per_prompt(one_process, PROMPTS)
    assert_made_by_diffusers(one_process, diffusers_image)
    assert {r["rank"] for r in manifest} == {0}
    assert all(r["num_inference_steps"] == 2 and r["device"] == "cpu" and r["seconds"] > 0 for r in manifest)
    summary = json.loads((one_process / "summary.json").read_text())
    assert summary["images"] == len(PROMPTS) and summary["processes"] == 1


def test_duplicate_prompts_make_two_different_images(one_process):
    first, second = (one_process / r["file_name"] for r in read_manifest(one_process) if r["prompt"] == "a red fox")
    assert np.abs(pixels(first) - pixels(second)).max() > 10 * TOLERANCE  # seeds 0 and 3: different noise


@pytest.mark.parametrize("line", [DP_TORCHRUN, DP_ACCELERATE_TINY], ids=["torchrun", "accelerate_launch"])
def test_the_readmes_two_process_launches_give_each_process_a_contiguous_share_of_diffusers_images(
        line, tiny, tmp_path, diffusers_image):
    """The README's commands for 2 processes, torchrun on its prompts.txt and accelerate launch on the script's
    default prompts, run as tests/test_readme.py runs every README command: each prompt made once, in order, by the
    process whose contiguous share it is, and each image the one diffusers makes for its prompt and seed."""
    run_readme_command(line, tiny, tmp_path)
    out = tmp_path / "out"
    prompts = ([p for p in (ROOT / "prompts.txt").read_text(encoding="utf-8").splitlines() if p.strip()]
               if "--prompts-file" in line else load_script(DATA_PARALLEL).DEFAULT_PROMPTS)
    manifest = assert_one_image_per_prompt(out, prompts)
    # Contiguous shares, the first rank taking one more where the prompts do not divide evenly (both README runs'
    # do; uneven shares: 3 processes for 2 prompts below, and 5 prompts on 2 processes in tests/test_long_runs.py).
    share, extra = divmod(len(prompts), 2)
    shares = [share + (rank < extra) for rank in range(2)]
    assert [r["rank"] for r in manifest] == [0] * shares[0] + [1] * shares[1]
    # Each process's first and last image are diffusers' own (the others: the same code, in the same loop).
    assert_made_by_diffusers(out, diffusers_image, indexes={0, shares[0] - 1, shares[0], len(prompts) - 1})
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["images"], [s["images"] for s in summary["ranks"]]) == (len(prompts), shares)


def test_more_processes_than_prompts_makes_each_image_once(tiny_sd3, one_process, tmp_path, diffusers_image):
    out = generate(torchrun, tmp_path, tiny_sd3, PROMPTS[:2], n=3)
    manifest = assert_one_image_per_prompt(out, PROMPTS[:2])
    assert [r["rank"] for r in manifest] == [0, 1]
    summary = json.loads((out / "summary.json").read_text())
    assert [s["images"] for s in summary["ranks"]] == [1, 1, 0]  # rank 2 had nothing to do, and did nothing
    assert_same_images(out, one_process)
    assert_made_by_diffusers(out, diffusers_image)


def test_another_seed_makes_other_images_the_ones_diffusers_makes_with_it(tiny_sd3, one_process, tmp_path,
                                                                         diffusers_image):
    """--seed 11: prompt i is seeded with 11 + i, the manifest says so, and the images change."""
    out = tmp_path / "out"
    run_main(DATA_PARALLEL, "--model", tiny_sd3, "--output-dir", out, *prompt_args(PROMPTS[:2]), *FAST,
             "--seed", "11", check=True)
    assert_made_by_diffusers(out, diffusers_image, seed=11)
    seed_0 = {r["prompt"]: r["file_name"] for r in read_manifest(one_process)}
    for r in read_manifest(out):
        assert np.abs(pixels(out / r["file_name"]) - pixels(one_process / seed_0[r["prompt"]])).max() > 10 * TOLERANCE


def test_flux_pipeline_works_too(tiny_flux, tmp_path):
    out = generate(python, tmp_path, tiny_flux, PROMPTS[:3])  # the launchers: the SD3 runs above
    manifest = assert_one_image_per_prompt(out, PROMPTS[:3])
    assert {(r["rank"], r["guidance_scale"]) for r in manifest} == {(0, 3.5)}  # FluxPipeline's own guidance


def test_a_second_run_makes_only_the_missing_images_and_batches_make_the_images_of_one_at_a_time(
        tiny_sd3, one_process, tmp_path, diffusers_image):
    """Three of the five images gone, the same command again with --batch-size 2: it makes those three only, two in
    one pipeline call and then one, and they are the images made one prompt at a time (and diffusers' own)."""
    out = shutil.copytree(one_process, tmp_path / "out")
    made = {p.name: p.stat().st_mtime_ns for p in out.glob(IMAGES)}
    removed = [read_manifest(out)[i]["file_name"] for i in (1, 2, 4)]
    for name in removed:
        (out / name).unlink()
    result = run_main(DATA_PARALLEL, "--model", tiny_sd3, "--output-dir", out, *prompt_args(PROMPTS), *FAST,
                      "--batch-size", "2", check=True)
    assert "2 of 5 images are already in" in result.stdout
    assert all((out / name).exists() for name in removed)
    assert all(p.stat().st_mtime_ns == made[p.name] for p in out.glob(IMAGES) if p.name not in removed)
    assert_one_image_per_prompt(out, PROMPTS)
    assert_same_images(out, one_process)
    assert_made_by_diffusers(out, diffusers_image)
    assert "made 3 images (2 already there) with 1 process(es)" in result.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["images"], summary["already_there"]) == (3, 2)  # made in this run, and those it found made


def test_a_folder_made_before_it_was_a_dataset_is_resumed_from_its_manifest(tiny_sd3, one_process, tmp_path):
    """A folder an earlier version made: its records in manifest.jsonl, each image's file in "file". They become
    metadata.jsonl's lines, "file_name" and all, and are checked as the script's own: another --seed is refused
    (not mixed in), and the same command makes nothing and keeps each record as it was, not a rebuilt one."""
    out = shutil.copytree(one_process, tmp_path / "out")
    records = read_manifest(out)
    (out / "metadata.jsonl").unlink()
    (out / "manifest.jsonl").write_text("".join(json.dumps({"file" if key == "file_name" else key: value for key, value
                                                            in r.items()}) + "\n" for r in records), encoding="utf-8")
    refused = run_main(DATA_PARALLEL, "--model", tiny_sd3, "--output-dir", out, *prompt_args(PROMPTS), *FAST,
                       "--seed", "5")
    assert_clear_error(refused, "was made with another seed", "--overwrite")
    again = run_main(DATA_PARALLEL, "--model", tiny_sd3, "--output-dir", out, *prompt_args(PROMPTS), *FAST, check=True)
    assert f"{len(PROMPTS)} of {len(PROMPTS)} images are already in" in again.stdout
    assert read_manifest(out) == records and not (out / "manifest.jsonl").exists()


# --- bad input: one line saying what to do, a non-zero exit, no traceback ---


def bad_run(tmp_path, *args):
    """A bad input, in this process (tests/conftest.py: run_main): the same line and exit code as from the shell."""
    return run_main(DATA_PARALLEL, "--output-dir", tmp_path / "out", "--device", "cpu", *args)


def test_an_unreachable_model_says_how_to_log_in_or_use_a_local_copy(tmp_path):
    # From the shell: what the Hub library says of a failed look-up must not add lines to ours.
    result = run(python(DATA_PARALLEL, "--output-dir", tmp_path / "out", "--model", "nobody-here/no-such-model",
                        *FAST), check=False)
    assert_clear_error(result, "nobody-here/no-such-model", "hf auth login", "--model PATH")
    assert not (tmp_path / "out").exists()


def test_a_missing_local_model_folder_is_named(tmp_path):
    assert_clear_error(bad_run(tmp_path, "--model", tmp_path / "missing"), "missing")


def test_a_missing_prompts_file_is_named(tmp_path):
    assert_clear_error(bad_run(tmp_path, "--prompts-file", tmp_path / "nope.txt"), "nope.txt")


def test_a_prompts_file_that_is_not_utf8_is_named(tmp_path):
    (tmp_path / "latin1.txt").write_bytes("café\n".encode("latin-1"))
    assert_clear_error(bad_run(tmp_path, "--prompts-file", tmp_path / "latin1.txt"), "latin1.txt")


def test_an_empty_prompts_file_is_refused(tmp_path):
    (tmp_path / "empty.txt").write_text("\n  \n")
    assert_clear_error(bad_run(tmp_path, "--prompts-file", tmp_path / "empty.txt"), "no prompts")


def test_a_size_the_model_cannot_take_names_the_multiple(tiny_sd3, tmp_path):
    result = bad_run(tmp_path, "--model", tiny_sd3, "--height", "72", "--num-inference-steps", "1")
    assert_clear_error(result, "--height 72", "multiple of 16")
    assert not (tmp_path / "out").exists()


def test_a_launcher_flag_after_the_script_shows_the_right_order(tmp_path):
    result = bad_run(tmp_path, "--num-processes=2")
    assert_clear_error(result, "accelerate launch --num_processes=2 data-parallelism-accelerate.py")


@pytest.mark.parametrize("flag", ["--num-inference-steps", "--height", "--width", "--batch-size", "--stall-timeout"])
@pytest.mark.parametrize("value", ["0", "-2"])
def test_a_count_or_size_below_one_is_refused(tmp_path, flag, value):
    assert_clear_error(bad_run(tmp_path, flag, value), f"{flag} must be a positive number, not {value}")
    assert not (tmp_path / "out").exists()


def test_an_output_folder_that_cannot_be_made_is_named(tiny_sd3, tmp_path):
    (tmp_path / "a-file").write_text("not a folder")
    result = run_main(DATA_PARALLEL, "--model", tiny_sd3, "--output-dir", tmp_path / "a-file" / "out", *FAST)
    assert_clear_error(result, f"--output-dir {tmp_path / 'a-file' / 'out'}: cannot create it")


def test_an_output_folder_that_is_not_writable_is_refused_before_anything_is_made(tiny_sd3, tmp_path, monkeypatch):
    out, access = tmp_path / "out", os.access
    out.mkdir()
    # As root (CI, containers) a folder's mode does not stop a write: the script's own question is answered no.
    monkeypatch.setattr(os, "access", lambda path, mode, **kw: Path(path) != out and access(path, mode, **kw))
    result = run_main(DATA_PARALLEL, "--model", tiny_sd3, "--output-dir", out, *FAST)
    assert_clear_error(result, f"--output-dir {out} is not writable")
    assert not list(out.iterdir())


def test_processes_that_formed_no_group_stop_instead_of_each_making_every_image(tiny_sd3, tmp_path, monkeypatch,
                                                                                capsys):
    """2 processes started by a launcher, each alone (a torch without torch.distributed): each would make every
    image. main() stops first, in one line."""
    script = load_script(DATA_PARALLEL)
    for name, value in {"WORLD_SIZE": 2, "LOCAL_WORLD_SIZE": 2, "RANK": 0, "LOCAL_RANK": 0}.items():
        monkeypatch.setenv(name, str(value))
    alone = SimpleNamespace(num_processes=1, process_index=0, is_main_process=True, device=torch.device("cpu"),
                            split_between_processes=contextlib.nullcontext)  # alone: every prompt its share
    monkeypatch.setattr(torch.distributed, "is_available", lambda: False)
    monkeypatch.setattr(script, "PartialState", lambda **kwargs: alone)  # what such a process's state says
    monkeypatch.setattr(script, "broadcast_object_list", lambda objects: objects)  # alone, the collectives are no-ops
    monkeypatch.setattr(script, "gather_object", lambda objects: objects)
    monkeypatch.setattr(sys, "argv", [DATA_PARALLEL.name, "--model", str(tiny_sd3), "--output-dir",
                                      str(tmp_path / "out"), *FAST])
    with pytest.raises(SystemExit) as exit:
        script.main()
    assert exit.value.code != 0
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("error: the launcher started 2 processes but they formed no group")
    assert not (tmp_path / "out").exists()


def test_under_a_launcher_a_bad_input_ends_every_process_and_is_said_once(tmp_path):
    """A real launcher, each process failing alike before any group forms: the first says it, the other waits a
    moment in silence (so that the launcher, which ends the job when one process ends, does not cut the line
    short), and the job ends. (The other scripts' `fail` is the same function: their tests run each process here.)"""
    result = run(torchrun(2, DATA_PARALLEL, "--prompts-file", tmp_path / "nope.txt", "--device", "cpu"), check=False,
                 timeout=60)
    assert result.returncode != 0
    assert result.stderr.count("error: cannot read --prompts-file") == 1


# --- the parts worth a unit test ---


def test_file_names_are_safe_for_any_prompt():
    image_name = load_script(DATA_PARALLEL).image_name
    assert image_name(3, "A red fox!", 3) == "003-a-red-fox.png"
    assert image_name(12, "../../etc/passwd", 3) == "012-etc-passwd.png"
    assert image_name(0, "猫と犬", 4) == "0000-猫と犬.png"
    assert image_name(7, "?!*", 3) == "007-prompt.png"
    assert len(image_name(1, "word " * 200, 3)) <= 3 + 1 + 60 + 4


def test_a_contact_sheet_shows_every_image_in_prompt_order(one_process):
    summary = json.loads((one_process / "summary.json").read_text())
    sheet = pixels(one_process / summary["contact_sheet"])
    assert sheet.shape == (2 * 64, 3 * 64, 3)  # 5 images: 3 columns, 2 rows, the sixth tile blank
    for r in read_manifest(one_process):
        row, col = divmod(r["index"], 3)
        tile = sheet[row * 64:(row + 1) * 64, col * 64:(col + 1) * 64]
        assert np.array_equal(tile, pixels(one_process / r["file_name"]))
    assert (sheet[64:, 128:] == 255).all()
