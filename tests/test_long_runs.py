"""Long runs of data-parallelism-accelerate.py: a process killed, Ctrl-C, running again, a full disk, a process that
hangs. (Two machines on loopback: the README's example, in tests/test_readme.py.)"""

import re
import shutil
import signal
import subprocess
import sys
import time

import psutil
import pytest

from tests.conftest import (DATA_PARALLEL, IMAGES, ROOT, accelerate_launch, assert_clear_error, offline_env, pixels,
                            read_manifest, run, run_main, torchrun)

MANY = [f"prompt number {i}" for i in range(40)]
KILLED = MANY[:8]  # rank 1 (prompts 4-7) is killed writing its third image: a few made, a few left
FAST = ["--num-inference-steps", "2", "--height", "64", "--width", "64", "--device", "cpu"]  # CPU on purpose
SIMULATE = ROOT / "tests" / "simulate"  # sitecustomize.py: KILL_RANK_WRITING, HANG_RANK, PROBE_GROUP_AT_EXIT


def script_args(model, out, prompts=MANY):
    return ["--model", model, "--output-dir", out, *[a for p in prompts for a in ("--prompt", p)], *FAST]


def start(command, **env):
    return subprocess.Popen([str(a) for a in command], cwd=ROOT, env=offline_env(**env), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def wait_for_images(out, count, job, timeout=120):
    deadline = time.monotonic() + timeout
    while len(list(out.glob(IMAGES))) < count:
        assert job.poll() is None, job.communicate()[0]
        assert time.monotonic() < deadline, "the job made no images"
        time.sleep(0.05)


def workers(job):
    """The launcher's worker processes: the ones running the script itself."""
    return [p for p in psutil.Process(job.pid).children(recursive=True)
            if str(DATA_PARALLEL.name) in " ".join(p.cmdline()[1:3])]


def job_bar(log):
    """The job's progress bar as the main process wrote it to a log (not a terminal: a line per redraw)."""
    return [(int(done), int(total)) for done, total in re.findall(r"^images:.*?(\d+)/(\d+) \[", log, re.MULTILINE)]


def assert_one_bar_for_the_job(log, made_before, total, finished):
    """What the user saw: one bar for the job, from the images already made (0 on a first run) of all of them, only
    going up, to all of them if the run FINISHED; no bar for the steps of each pipeline call, nor the libraries'
    warning about what the sample never uses."""
    bar = job_bar(log)
    assert bar[0] == (made_before, total) and [done for done, _ in bar] == sorted(done for done, _ in bar)
    assert bar[-1] == (total, total) if finished else bar[-1][0] < total
    assert " 2/2 [" not in log and "torchvision" not in log


def assert_everything_on_disk_is_whole(out, killed=False):
    """Every image on disk opens whole and has its manifest line, and every line parses. After a kill, a process
    may have been stopped between saving an image and writing its line (the next run writes it), and the killed
    one leaves the temporary file it was writing (never an image's name; the next run removes it)."""
    manifest = read_manifest(out)  # every line parses
    assert len({r["index"] for r in manifest}) == len(manifest)
    images = {p.name for p in out.glob(IMAGES)}
    assert {r["file_name"] for r in manifest} <= images if killed else {r["file_name"] for r in manifest} == images
    for path in out.glob(IMAGES):
        assert pixels(path).shape == (64, 64, 3)
    assert len(list(out.glob(".*.tmp"))) == (1 if killed else 0)


def kill_a_worker_while_writing(launcher, tiny_sd3, out):
    """Start the job with rank 1 to be killed (SIGKILL) half-way through writing its third image
    (tests/simulate/sitecustomize.py, KILL_RANK_WRITING), and check that the launcher ended the job, that no
    process of it is left, and that what is on disk is whole (the half written PNG is a temporary file, not an
    image the next run would take as made). Return the images on disk (name: time)."""
    job = start(launcher(2, DATA_PARALLEL, *script_args(tiny_sd3, out, KILLED)), PYTHONPATH=str(SIMULATE),
                KILL_RANK_WRITING="1")
    try:
        log = job.communicate(timeout=120)[0]
    finally:
        job.kill()  # on a timeout: not left running
    assert job.returncode != 0
    left = [p for p in psutil.process_iter(["cmdline"]) if str(out) in " ".join(p.info["cmdline"] or [])]
    gone, alive = psutil.wait_procs(left, timeout=10)
    assert not alive, log  # the other worker was stopped too

    before = {p.name: p.stat().st_mtime_ns for p in out.glob(IMAGES)}
    assert 2 <= len(before) < len(KILLED)  # rank 1's first two at least
    assert_everything_on_disk_is_whole(out, killed=True)
    assert_one_bar_for_the_job(log, 0, len(KILLED), finished=False)
    return before


def test_a_worker_killed_while_writing_ends_the_job_and_the_next_run_completes_the_set(tiny_sd3, tmp_path):
    """torchrun: the kill (kill_a_worker_while_writing), then the same command again makes the rest, and only the
    rest."""
    out = tmp_path / "out"
    before = kill_a_worker_while_writing(torchrun, tiny_sd3, out)

    # The same command again, with a probe that says so should a process exit still in its process group.
    result = run_simulated(torchrun(2, DATA_PARALLEL, *script_args(tiny_sd3, out, KILLED)))
    assert result.returncode == 0, result.stderr
    assert "still in its process group" not in result.stderr
    assert f"{len(before)} of {len(KILLED)} images are already in" in result.stdout
    assert_everything_on_disk_is_whole(out)
    assert [r["prompt"] for r in read_manifest(out)] == KILLED
    assert all(p.stat().st_mtime_ns == before[p.name] for p in out.glob(IMAGES) if p.name in before)
    assert_one_bar_for_the_job(result.stderr, len(before), len(KILLED), finished=True)


def test_a_worker_killed_while_writing_ends_the_job_under_accelerate_launch_too(tiny_sd3, tmp_path):
    """accelerate launch (which starts the workers through torchrun's own agent): the same kill, the same end. The
    next run is the script's own work, whatever started it: the torchrun test above runs it."""
    kill_a_worker_while_writing(accelerate_launch, tiny_sd3, tmp_path / "out")


def test_ctrl_c_to_the_launcher_ends_every_process_cleanly(tiny_sd3, tmp_path):
    out = tmp_path / "out"
    job = start(torchrun(2, DATA_PARALLEL, *script_args(tiny_sd3, out)))
    wait_for_images(out, 2, job)
    running = workers(job)
    job.send_signal(signal.SIGINT)
    job.communicate(timeout=60)
    assert job.returncode != 0
    gone, alive = psutil.wait_procs(running, timeout=10)
    assert not alive
    assert_everything_on_disk_is_whole(out)


@pytest.fixture(scope="module")
def three_images(tiny_sd3, tmp_path_factory):
    """One plain run of three prompts; each test below works on a copy of its folder. These runs are one process,
    no launcher: main() in this process (tests/conftest.py: run_main) writes the same files and lines."""
    out = tmp_path_factory.mktemp("three") / "out"
    run_main(DATA_PARALLEL, *script_args(tiny_sd3, out, MANY[:3]), check=True)
    return out


@pytest.mark.xdist_group("three_images")  # one run of the fixture for the three
def test_a_lost_manifest_line_is_rebuilt_without_making_the_image_again(tiny_sd3, three_images, tmp_path):
    out = shutil.copytree(three_images, tmp_path / "out")
    lines = (out / "metadata.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)
    lost = read_manifest(out)[1]
    made_at = (out / lost["file_name"]).stat().st_mtime_ns
    (out / "metadata.jsonl").write_text(lines[0] + lines[2] + '{"index": 5, "prom', encoding="utf-8")  # torn line
    result = run_main(DATA_PARALLEL, *script_args(tiny_sd3, out, MANY[:3]), check=True)
    assert "3 of 3 images are already in" in result.stdout
    manifest = read_manifest(out)
    assert [(r["index"], r["prompt"], r["file_name"]) for r in manifest] == [
        (i, MANY[i], f"{i:03d}-prompt-number-{i}.png") for i in range(3)]
    assert (out / lost["file_name"]).stat().st_mtime_ns == made_at


@pytest.mark.xdist_group("three_images")  # one run of the fixture for the three
def test_overwrite_makes_every_image_again(tiny_sd3, three_images, tmp_path):
    out = shutil.copytree(three_images, tmp_path / "out")
    before = {p.name: p.stat().st_mtime_ns for p in out.glob(IMAGES)}
    run_main(DATA_PARALLEL, *script_args(tiny_sd3, out, MANY[:3]), "--overwrite", check=True)
    assert all(p.stat().st_mtime_ns > before[p.name] for p in out.glob(IMAGES))
    assert len(read_manifest(out)) == 3


@pytest.mark.xdist_group("three_images")  # one run of the fixture for the three
def test_a_run_with_other_settings_into_the_same_folder_is_refused(tiny_sd3, three_images, tmp_path):
    out = shutil.copytree(three_images, tmp_path / "out")
    before = {p.name: p.stat().st_mtime_ns for p in out.glob(IMAGES)}
    result = run_main(DATA_PARALLEL, *script_args(tiny_sd3, out, MANY[:3]), "--seed", "5")
    assert_clear_error(result, "was made with another seed", "--overwrite")
    assert {p.name: p.stat().st_mtime_ns for p in out.glob(IMAGES)} == before
    assert (out / "summary.json").exists()  # a refused run removes nothing of the run before it


# --- a full disk said plainly ---

# Where a private mount namespace can be made (Linux, as root), the output folder is a real 128 KiB tmpfs that
# fills up after about 10 images; elsewhere the disk is "full" after 5 images (tests/simulate/sitecustomize.py,
# FULL_DISK_AFTER): as on a real one, the sixth image's first half is written, then the write fails (ENOSPC).
MOUNT_SMALL_DISK = 'd="$1"; shift; mount -t tmpfs -o size=128k tmpfs "$d"'  # then runs "$@" there, if any
FILL = MANY[:20]


def run_on_a_full_disk(tiny_sd3, tmp_path):
    """Run the script until its disk is full; return the result and a folder holding what it left on disk."""
    small, kept = tmp_path / "small", tmp_path / "kept"
    small.mkdir()
    in_namespace, env = ["unshare", "--mount", "--propagation", "private", "sh", "-c"], offline_env()
    if shutil.which("unshare") and subprocess.run([*in_namespace, MOUNT_SMALL_DISK, "sh", small]).returncode == 0:
        script = f'{MOUNT_SMALL_DISK} && "$@"; code=$?; cp -a "$d/." "{kept}/"; exit $code'
        command = [*in_namespace, script, "sh", small, sys.executable, DATA_PARALLEL,
                   *script_args(tiny_sd3, small, FILL)]
    else:
        command = [sys.executable, DATA_PARALLEL, *script_args(tiny_sd3, kept, FILL)]
        env = offline_env(PYTHONPATH=str(SIMULATE), FULL_DISK_AFTER="5")
    kept.mkdir(exist_ok=True)
    return run(command, check=False, timeout=300, env=env), kept


def test_a_full_disk_is_one_line_and_the_same_command_with_room_makes_the_rest(tiny_sd3, tmp_path):
    result, out = run_on_a_full_disk(tiny_sd3, tmp_path)
    result.stderr = re.sub(r"^images:.*\n", "", result.stderr, flags=re.MULTILINE)  # the job's bar, set aside
    assert_clear_error(result, "No space left on device", "images are saved whole in", "run the same command again")
    saved = int(re.search(r"(\d+) images are saved whole", result.stderr).group(1))
    assert 0 < saved < len(FILL) and len(list(out.glob(IMAGES))) == saved
    assert_everything_on_disk_is_whole(out)

    rerun = run_main(DATA_PARALLEL, *script_args(tiny_sd3, out, FILL), check=True)
    assert f"{saved} of {len(FILL)} images are already in" in rerun.stdout
    assert [r["prompt"] for r in read_manifest(out)] == FILL


# --- a process that hangs: the others stop the job after --stall-timeout, and every process leaves its group ---


def run_simulated(command, timeout=240, **env):
    return run(command, check=False, timeout=timeout, env={"PYTHONPATH": str(SIMULATE), "PROBE_GROUP_AT_EXIT": "1",
                                                           **env})


@pytest.mark.parametrize("hung", [1, 0], ids=["rank-1-hangs", "main-process-hangs"])
def test_a_hung_process_is_named_and_the_job_ends_instead_of_waiting_a_week(hung, tiny_sd3, tmp_path):
    out = tmp_path / "out"
    started = time.monotonic()
    result = run_simulated(torchrun(2, DATA_PARALLEL, *script_args(tiny_sd3, out, MANY[:5]), "--stall-timeout", "3"),
                           HANG_RANK=str(hung))
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith(f"error: rank {hung} saved no image for "), result.stderr
    assert "of 5 images made" in errors[0] and "--stall-timeout" in errors[0]
    assert time.monotonic() - started < 180  # seconds after the last image, not the group's week
    # The other process made its share, and it is kept: of 5 prompts, rank 0's contiguous share is the first 3
    # (the first ranks take one more where the prompts do not divide evenly), rank 1's the last 2.
    manifest = read_manifest(out)
    assert {r["rank"] for r in manifest} == {1 - hung}
    assert sorted(r["index"] for r in manifest) == ([0, 1, 2] if hung == 1 else [3, 4])
    assert "still in its process group" not in result.stderr


def test_a_failure_after_the_group_formed_leaves_the_group(tiny_sd3, tmp_path):
    """The main process fails after the group has formed (its --output-dir is a file): one line, and no process
    exits still in the group."""
    (tmp_path / "out").write_text("a file")
    result = run_simulated(torchrun(2, DATA_PARALLEL, *script_args(tiny_sd3, tmp_path / "out", MANY[:2])))
    assert result.returncode != 0
    assert [line for line in result.stderr.splitlines() if line.startswith("error: ")] == [
        f"error: --output-dir {tmp_path / 'out'} is a file, not a folder"]
    assert "still in its process group" not in result.stderr
