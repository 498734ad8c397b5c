"""Long runs of data-parallelism-accelerate.py: a process killed, Ctrl-C, running again, two machines."""

import signal
import subprocess
import time

import psutil
import pytest

from tests.conftest import (BIN, DATA_PARALLEL, ROOT, accelerate_launch, assert_clear_error, free_port,
                            offline_env, pixels, read_manifest, run, torchrun)

MANY = [f"prompt number {i}" for i in range(40)]
FAST = ["--num-inference-steps", "2", "--height", "64", "--width", "64", "--device", "cpu"]  # CPU on purpose


def script_args(model, out, prompts=MANY):
    return ["--model", model, "--output-dir", out, *[a for p in prompts for a in ("--prompt", p)], *FAST]


def start(command):
    return subprocess.Popen([str(a) for a in command], cwd=ROOT, env=offline_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def wait_for_images(out, count, job, timeout=120):
    deadline = time.monotonic() + timeout
    while len(list(out.glob("*.png"))) < count:
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
    assert {r["file"] for r in manifest} == {p.name for p in out.glob("*.png")}
    for path in out.glob("*.png"):
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

    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.png")}
    assert 0 < len(before) < len(MANY)
    assert_everything_on_disk_is_whole(out)

    result = run(launcher(2, DATA_PARALLEL, *script_args(tiny_sd3, out)))
    assert f"{len(before)} of {len(MANY)} images are already in" in result.stdout
    assert_everything_on_disk_is_whole(out)
    assert [r["prompt"] for r in read_manifest(out)] == MANY
    assert all(p.stat().st_mtime_ns == before[p.name] for p in out.glob("*.png") if p.name in before)


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


def test_a_lost_manifest_line_is_rebuilt_without_making_the_image_again(tiny_sd3, tmp_path):
    out = tmp_path / "out"
    run([BIN / "python", DATA_PARALLEL, *script_args(tiny_sd3, out, MANY[:3])])
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


def test_overwrite_makes_every_image_again(tiny_sd3, tmp_path):
    out = tmp_path / "out"
    run([BIN / "python", DATA_PARALLEL, *script_args(tiny_sd3, out, MANY[:2])])
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.png")}
    run([BIN / "python", DATA_PARALLEL, *script_args(tiny_sd3, out, MANY[:2]), "--overwrite"])
    assert all(p.stat().st_mtime_ns > before[p.name] for p in out.glob("*.png"))
    assert len(read_manifest(out)) == 2


def test_a_run_with_other_settings_into_the_same_folder_is_refused(tiny_sd3, tmp_path):
    out = tmp_path / "out"
    run([BIN / "python", DATA_PARALLEL, *script_args(tiny_sd3, out, MANY[:2])])
    result = run([BIN / "python", DATA_PARALLEL, *script_args(tiny_sd3, out, MANY[:2]), "--seed", "5"], check=False)
    assert_clear_error(result, "was made with another seed", "--overwrite")


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
