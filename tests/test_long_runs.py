"""Long runs of data-parallelism-accelerate.py: a process killed, Ctrl-C, running again, two machines."""

import re
import shutil
import signal
import subprocess
import sys
import time

import psutil
import pytest

from tests.conftest import (BIN, DATA_PARALLEL, IMAGES, ROOT, accelerate_launch, assert_clear_error, free_port,
                            offline_env, pixels, python, read_manifest, run, run_main, torchrun)

MANY = [f"prompt number {i}" for i in range(40)]
FAST = ["--num-inference-steps", "2", "--height", "64", "--width", "64", "--device", "cpu"]  # CPU on purpose


def script_args(model, out, prompts=MANY):
    return ["--model", model, "--output-dir", out, *[a for p in prompts for a in ("--prompt", p)], *FAST]


def start(command):
    return subprocess.Popen([str(a) for a in command], cwd=ROOT, env=offline_env(), stdout=subprocess.PIPE,
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


def assert_everything_on_disk_is_whole(out):
    manifest = read_manifest(out)  # every line parses
    assert len({r["index"] for r in manifest}) == len(manifest)
    assert {r["file"] for r in manifest} == {p.name for p in out.glob(IMAGES)}
    for path in out.glob(IMAGES):
        assert pixels(path).shape == (64, 64, 3)
    assert not list(out.glob(".*.tmp"))


@pytest.mark.parametrize("launcher", [torchrun, accelerate_launch])
def test_a_killed_worker_ends_the_job_and_the_next_run_completes_the_set(launcher, tiny_sd3, tmp_path):
    out = tmp_path / "out"
    job = start(launcher(2, DATA_PARALLEL, *script_args(tiny_sd3, out)))
    wait_for_images(out, 4, job)
    running = workers(job)
    killed_at = time.monotonic()
    running[-1].send_signal(signal.SIGKILL)
    job.communicate(timeout=60)
    assert job.returncode != 0
    assert time.monotonic() - killed_at < 60
    gone, alive = psutil.wait_procs(running, timeout=10)  # the other worker was stopped too
    assert not alive

    before = {p.name: p.stat().st_mtime_ns for p in out.glob(IMAGES)}
    assert 0 < len(before) < len(MANY)
    assert_everything_on_disk_is_whole(out)

    result = run(launcher(2, DATA_PARALLEL, *script_args(tiny_sd3, out)))
    assert f"{len(before)} of {len(MANY)} images are already in" in result.stdout
    assert_everything_on_disk_is_whole(out)
    assert [r["prompt"] for r in read_manifest(out)] == MANY
    assert all(p.stat().st_mtime_ns == before[p.name] for p in out.glob(IMAGES) if p.name in before)


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
    """One plain run of three prompts; each test below works on a copy of its folder."""
    out = tmp_path_factory.mktemp("three") / "out"
    run([BIN / "python", DATA_PARALLEL, *script_args(tiny_sd3, out, MANY[:3])])
    return out


@pytest.mark.xdist_group("three_images")  # one run of the fixture for the three
def test_a_lost_manifest_line_is_rebuilt_without_making_the_image_again(tiny_sd3, three_images, tmp_path):
    out = shutil.copytree(three_images, tmp_path / "out")
    lines = (out / "manifest.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)
    lost = read_manifest(out)[1]
    made_at = (out / lost["file"]).stat().st_mtime_ns
    (out / "manifest.jsonl").write_text(lines[0] + lines[2] + '{"index": 5, "prom', encoding="utf-8")  # torn line
    result = run([BIN / "python", DATA_PARALLEL, *script_args(tiny_sd3, out, MANY[:3])])
    assert "3 of 3 images are already in" in result.stdout
    manifest = read_manifest(out)
    assert [(r["index"], r["prompt"], r["file"]) for r in manifest] == [
        (i, MANY[i], f"{i:03d}-prompt-number-{i}.png") for i in range(3)]
    assert (out / lost["file"]).stat().st_mtime_ns == made_at


@pytest.mark.xdist_group("three_images")  # one run of the fixture for the three
def test_overwrite_makes_every_image_again(tiny_sd3, three_images, tmp_path):
    out = shutil.copytree(three_images, tmp_path / "out")
    before = {p.name: p.stat().st_mtime_ns for p in out.glob(IMAGES)}
    run([BIN / "python", DATA_PARALLEL, *script_args(tiny_sd3, out, MANY[:3]), "--overwrite"])
    assert all(p.stat().st_mtime_ns > before[p.name] for p in out.glob(IMAGES))
    assert len(read_manifest(out)) == 3


@pytest.mark.xdist_group("three_images")  # one run of the fixture for the three
def test_a_run_with_other_settings_into_the_same_folder_is_refused(tiny_sd3, three_images, tmp_path):
    out = shutil.copytree(three_images, tmp_path / "out")
    before = {p.name: p.stat().st_mtime_ns for p in out.glob(IMAGES)}
    result = run_main(DATA_PARALLEL, *script_args(tiny_sd3, out, MANY[:3]), "--seed", "5")
    assert_clear_error(result, "was made with another seed", "--overwrite")
    assert {p.name: p.stat().st_mtime_ns for p in out.glob(IMAGES)} == before


def test_two_machines_on_loopback_make_each_prompt_once(tiny_sd3, tmp_path):
    out, port = tmp_path / "out", free_port()
    machines = [start([BIN / "accelerate", "launch", "--multi_gpu", "--num_machines", 2, "--machine_rank", rank,
                       "--num_processes", 2, "--main_process_ip", "127.0.0.1", "--main_process_port", port,
                       "--mixed_precision", "no", "--dynamo_backend", "no", DATA_PARALLEL,
                       *script_args(tiny_sd3, out, MANY[:6])]) for rank in (0, 1)]
    outputs = [m.communicate(timeout=180)[0] for m in machines]
    assert [m.returncode for m in machines] == [0, 0], outputs
    manifest = read_manifest(out)
    assert [r["prompt"] for r in manifest] == MANY[:6]
    assert [r["rank"] for r in manifest] == [0, 0, 0, 1, 1, 1]
    assert "with 2 process(es)" in outputs[0]


# --- what the user sees of a long run: one bar for the job, and a full disk said plainly ---

BAR_PROMPTS = [f"prompt number {i}" for i in range(48)]


def job_bar(log):
    """The job's progress bar as the main process wrote it to a log (not a terminal: a line per redraw)."""
    return [(int(done), int(total)) for done, total in re.findall(r"^images:.*?(\d+)/(\d+) \[", log, re.MULTILINE)]


def test_the_job_shows_one_progress_bar_that_ends_at_every_image_and_a_resumed_run_starts_it_at_those_made(
        tiny_sd3, tmp_path):
    out = tmp_path / "out"
    result = run(torchrun(2, DATA_PARALLEL, *script_args(tiny_sd3, out, BAR_PROMPTS[:20])))
    bar = job_bar(result.stderr)
    assert bar[0] == (0, 20) and bar[-1] == (20, 20)
    assert [done for done, _ in bar] == sorted(done for done, _ in bar)
    assert " 2/2 [" not in result.stderr  # no bar for the 2 steps of each of the 10 pipeline calls
    assert "torchvision" not in result.stderr  # nor the libraries' warning about what the sample never uses

    result = run(torchrun(2, DATA_PARALLEL, *script_args(tiny_sd3, out, BAR_PROMPTS)))
    assert "20 of 48 images are already in" in result.stdout
    bar = job_bar(result.stderr)
    assert bar[0] == (20, 48) and bar[-1] == (48, 48)
    assert [done for done, _ in bar] == sorted(done for done, _ in bar)


# Where a private mount namespace can be made (Linux, as root), the output folder is a real 128 KiB tmpfs that
# fills up after about 10 images; elsewhere the disk is "full" after 5 images (PIL's save raises ENOSPC).
MOUNT_SMALL_DISK = 'd="$1"; shift; mount -t tmpfs -o size=128k tmpfs "$d"'  # then runs "$@" there, if any
FAKE_FULL_DISK = """import errno, runpy, sys
from PIL import Image
save, saved = Image.Image.save, []
def full_after_5(self, fp, *args, **kwargs):
    if len(saved) == 5:
        raise OSError(errno.ENOSPC, "No space left on device", str(fp))
    saved.append(fp)
    return save(self, fp, *args, **kwargs)
Image.Image.save = full_after_5
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")"""
FILL = MANY[:20]


def run_on_a_full_disk(tiny_sd3, tmp_path):
    """Run the script until its disk is full; return the result and a folder holding what it left on disk."""
    small, kept = tmp_path / "small", tmp_path / "kept"
    small.mkdir()
    in_namespace = ["unshare", "--mount", "--propagation", "private", "sh", "-c"]
    if shutil.which("unshare") and subprocess.run([*in_namespace, MOUNT_SMALL_DISK, "sh", small]).returncode == 0:
        script = f'{MOUNT_SMALL_DISK} && "$@"; code=$?; cp -a "$d/." "{kept}/"; exit $code'
        command = [*in_namespace, script, "sh", small, sys.executable, DATA_PARALLEL,
                   *script_args(tiny_sd3, small, FILL)]
    else:
        command = [sys.executable, "-c", FAKE_FULL_DISK, DATA_PARALLEL, *script_args(tiny_sd3, kept, FILL)]
    kept.mkdir(exist_ok=True)
    result = subprocess.run(list(map(str, command)), cwd=ROOT, env=offline_env(), capture_output=True, text=True,
                            timeout=300)
    return result, kept


def test_a_full_disk_is_one_line_and_the_same_command_with_room_makes_the_rest(tiny_sd3, tmp_path):
    result, out = run_on_a_full_disk(tiny_sd3, tmp_path)
    result.stderr = re.sub(r"^images:.*\n", "", result.stderr, flags=re.MULTILINE)  # the job's bar, set aside
    assert_clear_error(result, "No space left on device", "images are saved whole in", "run the same command again")
    saved = int(re.search(r"(\d+) images are saved whole", result.stderr).group(1))
    assert 0 < saved < len(FILL) and len(list(out.glob(IMAGES))) == saved
    assert_everything_on_disk_is_whole(out)

    rerun = run(python(DATA_PARALLEL, *script_args(tiny_sd3, out, FILL)))
    assert f"{saved} of {len(FILL)} images are already in" in rerun.stdout
    assert [r["prompt"] for r in read_manifest(out)] == FILL


# --- a process that hangs: the others do not wait a week, and every process leaves its group (issue 15, item 9) ---

SIMULATE = ROOT / "tests" / "simulate"  # sitecustomize.py: HANG_RANK, PROBE_GROUP_AT_EXIT


def run_simulated(command, timeout=240, **env):
    environment = offline_env(PYTHONPATH=str(SIMULATE), PROBE_GROUP_AT_EXIT="1", **env)
    return subprocess.run([str(a) for a in command], cwd=ROOT, env=environment, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.parametrize("hung", [1, 0], ids=["rank-1-hangs", "main-process-hangs"])
def test_a_hung_process_is_named_and_the_job_ends_instead_of_waiting_a_week(hung, tiny_sd3, tmp_path):
    out = tmp_path / "out"
    started = time.monotonic()
    result = run_simulated(torchrun(2, DATA_PARALLEL, *script_args(tiny_sd3, out, MANY[:6]), "--stall-timeout", "3"),
                           HANG_RANK=str(hung))
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith(f"error: rank {hung} saved no image for "), result.stderr
    assert "of 6 images made" in errors[0] and "--stall-timeout" in errors[0]
    assert time.monotonic() - started < 180  # seconds after the last image, not the group's week
    made = {r["rank"] for r in read_manifest(out)}
    assert made == {1 - hung}  # the other process made its share, and it is kept
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


def test_a_normal_run_leaves_the_group_in_every_process(tiny_sd3, tmp_path):
    result = run_simulated(torchrun(2, DATA_PARALLEL, *script_args(tiny_sd3, tmp_path / "out", MANY[:2]),
                                    "--stall-timeout", "3"))
    assert result.returncode == 0, result.stderr
    assert "still in its process group" not in result.stderr and len(read_manifest(tmp_path / "out")) == 2
