"""Mutation check: do the tests catch the small bugs a hurried edit makes in the scripts?

Each mutation below is one realistic change to one line of a script: a seed ignored, an offload to the default
device, the split's order reversed, the atomic rename skipped, a check removed... For each, this copies the
repository (its files as git sees them, without outputs/) to a temporary folder, makes the change in the copy, and
runs the tests there: first the tests the mutation names as the likeliest to catch it, then, if they all pass, the
whole suite. A mutation that makes a test fail is "killed", and the table names the first test that failed; one
the whole suite misses "survived": a behaviour no test guards. The check exits 1 if any survives, and 2 if a
mutation no longer applies (its line changed: update the list).

    uv run dev/mutations.py                      # every mutation: about 27 minutes on 2 cores
    uv run dev/mutations.py --list               # what each one changes
    uv run dev/mutations.py seed-ignored offload-to-the-default-device
    uv run dev/mutations.py --suite              # the whole suite for each, not the likeliest tests first
"""

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DP, MP, CP = "data-parallelism-accelerate.py", "model-parallelism-flux.py", "context-parallelism-flux.py"
CFG = "cfg-parallelism-sd3.py"


@dataclass
class Mutation:
    name: str
    file: str
    old: str  # must occur exactly once in the file
    new: str
    tests: tuple  # pytest arguments: the tests likeliest to catch it, tried first


MUTATIONS = [
    # --- data-parallelism-accelerate.py ---
    Mutation("seed-ignored", DP, "manual_seed(args.seed + i)", "manual_seed(i + 1)",
             ("tests/test_data_parallelism.py", "-k", "one_process_makes or another_seed")),
    Mutation("offload-to-the-default-device", DP, "pipeline.enable_model_cpu_offload(device=device)",
             "pipeline.enable_model_cpu_offload()", ("tests/test_memory_modes.py", "-k", "own_device")),
    Mutation("generation-skipped", DP, "    if my_share:\n        # 4. Each worker",
             "    if False:\n        # 4. Each worker",
             ("tests/test_gpu_machines.py", "-k", "device_cpu_makes_the_images or bridges_alone")),
    Mutation("summary-counts-the-images-already-there", DP, 'made = sum(s["images"] for s in stats if s["rank"] == '
             's["ranks"][0])', 'made = sum(s["images"] for s in stats if s["rank"] == s["ranks"][0]) + already',
             ("tests/test_data_parallelism.py", "-k", "second_run")),
    Mutation("split-order-reversed", DP, "split_between_processes(todo) as my_share",
             "split_between_processes(todo[::-1]) as my_share",
             ("tests/test_data_parallelism.py", "-k", "contiguous_share and torchrun")),
    Mutation("atomic-rename-skipped", DP, 'write_atomically(folder / name, lambda tmp: image.save(tmp, format="PNG"))',
             'image.save(folder / name, format="PNG")', ("tests/test_long_runs.py", "-k", "killed_while_writing")),
    Mutation("manifest-line-not-written", DP, "        append_line(folder / MANIFEST",
             "        0 and append_line(folder / MANIFEST",
             ("tests/test_data_parallelism.py", "-k", "one_process_makes")),
    Mutation("group-check-removed", DP, "    check_group_formed(distributed_state)\n",
             "    pass\n", ("tests/test_data_parallelism.py", "-k", "formed_no_group")),
    Mutation("resume-makes-everything-again", DP, "done = set() if args.overwrite else",
             "done = set() if True else", ("tests/test_data_parallelism.py", "-k", "second_run")),
    Mutation("layer-by-layer-check-removed", DP, 'if not plan["fits"] and args.offload == "auto":',
             "if False:", ("tests/test_memory_modes.py", "-k", "even_one_layer")),
    Mutation("zero-steps-accepted", DP, "getattr(args, name) < 1:", "getattr(args, name) < 0:",
             ("tests/test_data_parallelism.py", "-k", "below_one")),
    Mutation("process-group-not-left", DP, "        gc.collect()\n        torch.distributed.destroy_process_group()",
             "        gc.collect()", ("tests/test_long_runs.py", "-k", "leaves_the_group")),
    Mutation("metadata-not-a-dataset", DP, '{**record, "file_name": name,', '{**record, "file": name,',
             ("tests/test_data_parallelism.py", "-k", "one_process_makes")),
    # --- data-parallelism-accelerate.py with groups (--context-parallel, --cfg-parallel) ---
    Mutation("groups-split-over-every-process", DP, "    if len(group.ranks) == 1:\n        with distributed_state",
             "    if True:\n        with distributed_state", ("tests/test_groups.py", "-k", "share_the_prompts")),
    Mutation("groups-every-process-saves", DP, '            if record["rank"] == group.ranks[0]:',
             "            if True:", ("tests/test_groups.py", "-k", "killed_in_a_group")),
    Mutation("groups-images-counted-by-every-process", DP,
             'made = sum(s["images"] for s in stats if s["rank"] == s["ranks"][0])',
             'made = sum(s["images"] for s in stats)', ("tests/test_groups.py", "-k", "same_command_again")),
    Mutation("groups-idle-group-skips-the-collectives", DP, "    wait_for_everyone(device)\n    if layout[",
             "    if pipeline is None:\n        return\n    wait_for_everyone(device)\n    if layout[",
             ("tests/test_groups.py", "-k", "same_command_again")),
    Mutation("groups-killed-process-not-said", DP, "        if unsaid and self.rank == min(left):",
             "        if False:", ("tests/test_groups.py", "-k", "killed_in_a_group")),
    Mutation("groups-stall-not-watched", DP, "        my_share)) if in_a_group else None\n",
             "        my_share)) if False else None\n", ("tests/test_groups.py", "-k", "stops_mid_image")),
    Mutation("groups-offload-allowed", DP, '    if args.offload in ("model", "sequential") and (args.context_parallel',
             '    if False and args.offload in ("model", "sequential") and (args.context_parallel',
             ("tests/test_groups.py", "-k", "offload")),
    # --- model-parallelism-flux.py ---
    Mutation("sharding-seed-ignored", MP, "generator=torch.Generator(\"cpu\").manual_seed(args.seed),",
             "generator=torch.Generator(\"cpu\").manual_seed(0),",
             ("tests/test_model_parallelism.py", "-k", "cpu_image_is_what_diffusers_makes")),
    Mutation("sharding-does-not-fit-check-removed", MP, '    if not plan["fits"]:\n        fail(f"{args.model} does '
             'not fit', '    if False:\n        fail(f"{args.model} does not fit',
             ("tests/test_model_parallelism.py", "-k", "does_not_fit_stops")),
    Mutation("sharding-text-stage-kept-while-the-next-loads", MP, "            del pipeline, split\n",
             "            pass\n", ("tests/test_model_parallelism.py", "-k", "keeps_nothing")),
    Mutation("sharding-balanced-without-the-budgets", MP, 'max_memory=stage["max_memory"], dtype=dtype, **split',
             "dtype=dtype, **split", ("tests/test_model_parallelism.py", "-k", "balanced_load")),
    # --- context-parallelism-flux.py ---
    Mutation("context-every-rank-saves-and-reports", CP,
             "    if distributed_state.is_main_process:\n        save(image", "    if True:\n        save(image",
             ("tests/test_context_parallelism.py", "-k", "only_the_main_process")),
    Mutation("context-seed-per-rank", CP, "manual_seed(\n        args.seed)",
             "manual_seed(\n        args.seed + distributed_state.process_index)",
             ("tests/test_context_parallelism.py", "-k", "two_processes_make_the_image_diffusers_makes")),
    Mutation("context-tokens-not-split", CP, "        pipeline.transformer.enable_parallelism(config=config)",
             "        pass", ("tests/test_context_parallelism.py", "-k", "half_of_the_tokens")),
    Mutation("context-ulysses-anything-not-set", CP, 'ulysses_anything=plan["ulysses_anything"],',
             "ulysses_anything=False,", ("tests/test_context_parallelism.py", "-k", "do_not_divide")),
    Mutation("context-prompt-counted-as-padded", CP, 'if index.get("_class_name") not in TEMPLATED_PIPELINES:',
             "if True:", ("tests/test_context_parallelism.py", "-k", "real_prompt_tokens")),
    Mutation("group-without-gloo", DP, '        backend = "cpu:gloo"\n', '        backend = "gloo"\n',
             ("tests/test_gpu_machines.py", "-k", "wait_for_the_others_for_days")),
    Mutation("context-heads-check-removed", CP, "        fail(plan[\"problems\"][0])", "        pass",
             ("tests/test_context_parallelism.py", "-k", "cannot_share or degrees")),
    # --- cfg-parallelism-sd3.py ---
    # --- context-parallelism-flux.py --shard-weights ---
    Mutation("shard-every-process-reads-the-weights", CP, "    if torch.distributed.get_rank() == 0:\n        library",
             "    if True:\n        library",
             ("tests/test_sharded_weights.py", "-k", "only_the_main_process_reads")),
    Mutation("shard-blocks-kept-gathered", CP, "        fully_shard(unit, mesh=mesh, reshard_after_forward=True)",
             "        fully_shard(unit, mesh=mesh, reshard_after_forward=False)",
             ("tests/test_sharded_weights.py", "-k", "between_steps")),
    Mutation("shard-buffers-not-sent", CP,
             "        setattr(component.get_submodule(owner), attribute, buffer.to(device))", "        pass",
             ("tests/test_sharded_weights.py", "-k", "what_from_pretrained_loads")),
    Mutation("shard-text-encoder-left-whole", CP, '    names = ["transformer", *([max(texts, key=components.get)] '
             'if texts else [])]', '    names = ["transformer"]',
             ("tests/test_sharded_weights.py", "-k", "between_steps")),
    Mutation("shard-staged-text-encoders-whole", CP,
             "    text = load_pipeline(args, plan, device, shard_mesh, without=",
             "    text = load_pipeline(args, plan, device, None, without=",
             ("tests/test_sharded_weights.py", "-k", "staged")),
    Mutation("shard-no-prefetch", CP, "            block.set_modules_to_forward_prefetch([following])",
             "            pass", ("tests/test_sharded_weights.py", "-k", "asks_for_the_next")),
    Mutation("shard-plan-counts-whole-components", CP, "            share += -(-rows // processes) * (bytes_ // rows)",
             "            share += bytes_", ("tests/test_sharded_weights.py", "-k", "plan or fits")),
    Mutation("shard-ram-check-removed", CP, "        if ram > psutil.virtual_memory().available:",
             "        if False:", ("tests/test_sharded_weights.py", "-k", "process_0s_whole_read")),
    Mutation("shard-ram-check-counts-process-0-alone", CP,
             '    return (max(s["bytes"] for s in plan["sharded"].values()) if process_0_here else 0) + processes_here '
             '* whole', '    return (max(s["bytes"] for s in plan["sharded"].values()) if process_0_here else 0)',
             ("tests/test_sharded_weights.py", "-k", "ram_check_counts")),
    Mutation("shard-gathers-on-the-default-group", CP,
             "DeviceMesh.from_group(torch.distributed.new_group(timeout=timedelta(days=7)), device.type,",
             "DeviceMesh.from_group(torch.distributed.group.WORLD, device.type,",
             ("tests/test_sharded_weights.py", "-k", "group_of_their_own")),
    Mutation("shard-plan-float16-weights-all-in-half", CP,
             '            bytes_ = parameter.numel() * (4 if set(parameter_name.split(".")) & keep else itemsize)',
             "            bytes_ = parameter.numel() * itemsize",
             ("tests/test_sharded_weights.py", "-k", "float16_plan")),
    Mutation("cfg-halves-swapped", CFG, "value.chunk(2)[rank] if name", "value.chunk(2)[1 - rank] if name",
             ("tests/test_cfg_parallelism.py", "-k", "two_processes_make_the_image")),
    Mutation("cfg-batch-not-split", CFG, "        split[0] = is_the_guidance_batch(kwargs)\n",
             "        split[0] = False\n", ("tests/test_cfg_parallelism.py", "-k", "its_half_of_the_guidance_batch")),
    Mutation("cfg-stall-timeout-ignored", CFG, "StallWatchdog(args.stall_timeout,", "StallWatchdog(3600,",
             ("tests/test_cfg_parallelism.py", "-k", "stops_mid_image")),
    # --- the guards for GPU machines: a group's barrier, one process per GPU, FP64 ---
    Mutation("barrier-on-the-local-ranks-device", CP,
             'torch.distributed.barrier(device_ids=None if device.type == "cpu" else [device.index])',
             'torch.distributed.barrier(device_ids=[int(os.environ.get("LOCAL_RANK", "0"))])',
             ("tests/test_gpu_machines.py", "-k", "barrier_names")),
    Mutation("two-processes-on-one-gpu-let-through", DP, "        if gpu in first:\n", "        if False:\n",
             ("tests/test_gpu_machines.py", "-k", "uuid_through_any_mask")),
    Mutation("fp64-remedy-for-any-rotary-embedding", CP, " or not asks_for_float64(pos_embed):", ":",
             ("tests/test_context_parallelism.py", "-k", "without_fp64")),
]


def copy_repository(into):
    """The repository's files as git sees them (tracked, and untracked but not ignored), and its environment."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=ROOT,
                            capture_output=True, text=True, check=True).stdout.split("\0")
    for name in filter(None, listed):
        source = ROOT / name
        if source.is_file():
            (into / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, into / name)
    os.symlink(ROOT / ".venv", into / ".venv")


def apply(mutation, root):
    path = root / mutation.file
    text = path.read_text(encoding="utf-8")
    if text.count(mutation.old) != 1:
        return False
    path.write_text(text.replace(mutation.old, mutation.new), encoding="utf-8")
    return True


def pytest(root, *args, timeout=3600):
    """Run pytest in the copy, stopping at the first failure: (passed, what failed or None, seconds). What failed is
    the first failing test and the first line of its error, so that a kill for another reason (a test that fails
    without the mutation too) shows; the check assumes a suite that passes (`uv run pytest`) before it starts."""
    python = root / ".venv" / "bin" / "python"
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}  # no bytecode of a mutated script left behind
    started = time.monotonic()
    try:
        result = subprocess.run([str(python), "-m", "pytest", "-x", "-q", "-rfE", "-p", "no:cacheprovider", *args],
                                cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return False, f"(no result in {timeout} s: a hang)", time.monotonic() - started
    if result.returncode == 0:
        return True, None, time.monotonic() - started
    if result.returncode == 5:
        sys.exit(f"error: pytest {' '.join(args)} selects no test: update the mutation's tests")
    failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", result.stdout, flags=re.MULTILINE)
    why = re.search(r"^E +(.+)$", result.stdout, flags=re.MULTILINE)
    # The test's id without pytest-xdist's group suffix (@name)
    killer = re.sub(r"@\w+$", "", failed[0]) if failed else f"(pytest exited {result.returncode})"
    if why:  # the first line of the error, for a table: no pipe in it
        killer += f" ({why.group(1).strip()[:100].replace('|', '/')})"
    return False, killer, time.monotonic() - started


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", help="the mutations to try (default: all)")
    parser.add_argument("--list", action="store_true", help="print each mutation and what it changes, and stop")
    parser.add_argument("--suite", action="store_true", help="run the whole suite for each mutation, not the "
                                                             "likeliest tests first")
    args = parser.parse_args()
    unknown = set(args.names) - {m.name for m in MUTATIONS}
    if unknown:
        sys.exit(f"error: no mutation named {', '.join(sorted(unknown))}: --list shows them")
    chosen = [m for m in MUTATIONS if not args.names or m.name in args.names]
    if args.list:
        for m in chosen:
            print(f"{m.name}\n  {m.file}: {m.old.strip()!r}\n  -> {m.new.strip()!r}")
        return

    rows, stale = [], []
    print(f"{len(chosen)} mutations, each on a copy of {ROOT}", flush=True)
    for m in chosen:
        with tempfile.TemporaryDirectory(prefix=f"mutation-{m.name}-") as tmp:
            root = Path(tmp)
            copy_repository(root)
            if not apply(m, root):
                stale.append(m.name)
                print(f"{m.name:40} NOT APPLIED: its line is not in {m.file} exactly once", flush=True)
                continue
            passed, killer, seconds = (True, None, 0.0) if args.suite else pytest(root, *m.tests)
            if passed:  # the likeliest tests missed it: the whole suite
                passed, killer, more = pytest(root)
                seconds += more
        rows.append((m.name, m.file, killer))
        print(f"{m.name:40} {'survived' if passed else 'killed by ' + killer}  ({seconds:.0f} s)", flush=True)

    print("\n| mutation | script | killed by |\n| --- | --- | --- |")
    for name, file, killer in rows:
        print(f"| {name} | {file} | {killer or '**survived**'} |")
    survived = [name for name, _, killer in rows if killer is None]
    print(f"\n{len(rows) - len(survived)} of {len(rows)} killed" + (f"; survived: {', '.join(survived)}" if survived
                                                                 else ""))
    sys.exit(2 if stale else 1 if survived else 0)


if __name__ == "__main__":
    main()
