"""utils/check_copies.py: the functions the scripts copy from one another stay identical, and --fix restores them.

Each check runs the tool as a maintainer does (`uv run utils/check_copies.py`, here with the project's Python), on
the repository itself or on a copy of its scripts with one change made."""

import re
import shutil
import subprocess
import sys

import pytest

from tests.conftest import ROOT

TOOL = ROOT / "utils" / "check_copies.py"
SCRIPTS = sorted(ROOT.glob("*.py"))


def check(root=ROOT, *flags):
    return subprocess.run([sys.executable, TOOL, "--root", root, *flags], capture_output=True, text=True, timeout=60)


@pytest.fixture
def scripts(tmp_path):
    """The top-level scripts, copied into a folder of their own."""
    for script in SCRIPTS:
        shutil.copy(script, tmp_path / script.name)
    return tmp_path


def marked_copies(path):
    """{name: source} of each `# Copied from SOURCE::NAME` marker in the script."""
    return {m[2]: m[1] for m in re.finditer(r"^# Copied from ([\w.-]+)::(\w+)$", path.read_text(), flags=re.M)}


def test_every_copy_in_the_repository_is_its_source():
    result = check()
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip().endswith("all identical")


def test_every_script_marks_its_copies_and_the_guards_sit_below_one_banner():
    for script in SCRIPTS:
        text = script.read_text(encoding="utf-8")
        banners = [line for line in text.splitlines() if line.startswith("# ---") and "utils/check_copies.py" in line]
        assert len(banners) == 1, script.name
        sources = set(marked_copies(script).values())
        assert script.name not in sources, f"{script.name} copies from itself"
    # Every script but the one the guards are taken from holds copies of them.
    copies = {script.name: marked_copies(script) for script in SCRIPTS}
    assert all(copies[name] for name in copies if name != "data-parallelism-accelerate.py"), copies
    assert {"fail", "check_torch_can_use_the_gpus", "why_hidden", "no_fp64_remedy"} <= set(
        copies["model-parallelism-flux.py"])


def test_a_changed_copy_is_named_and_fix_copies_its_source_again(scripts):
    script = scripts / "model-parallelism-flux.py"
    original = script.read_text(encoding="utf-8")
    assert marked_copies(script)["size"] == "data-parallelism-accelerate.py"
    changed = original.replace('return f"{b / GiB:.2f} GiB" if', 'return f"{b / GiB:.1f} GiB" if')
    assert changed != original
    script.write_text(changed, encoding="utf-8")

    result = check(scripts)
    assert result.returncode == 1
    line = next(line for line in result.stdout.splitlines() if "differs" in line)
    assert re.fullmatch(r"model-parallelism-flux\.py:\d+: size differs from data-parallelism-accelerate\.py::size "
                        r"\(--fix copies it again\):", line), result.stdout
    assert '+    return f"{b / GiB:.1f} GiB"' in result.stdout  # and how it differs

    fixed = check(scripts, "--fix")
    assert fixed.returncode == 0, fixed.stdout
    assert "copied again: model-parallelism-flux.py::size" in fixed.stdout
    assert script.read_text(encoding="utf-8") == original


def test_a_change_to_the_source_is_carried_to_every_copy_by_fix(scripts):
    source = scripts / "data-parallelism-accelerate.py"
    text = source.read_text(encoding="utf-8")
    source.write_text(text.replace('"""One line on stderr and a non-zero exit, no traceback.',
                                   '"""One line on stderr, and a non-zero exit: no traceback.'), encoding="utf-8")
    holders = [s.name for s in SCRIPTS if marked_copies(s).get("fail") == source.name]
    assert holders
    result = check(scripts)
    assert result.returncode == 1 and all(f"{name}:" in result.stdout for name in holders), result.stdout
    assert check(scripts, "--fix").returncode == 0
    for name in holders:
        assert '"""One line on stderr, and a non-zero exit: no traceback.' in (scripts / name).read_text()


def test_an_unmarked_copy_a_stray_marker_and_a_copy_above_the_banner_are_each_said(scripts):
    script = scripts / "model-parallelism-flux.py"
    text = script.read_text(encoding="utf-8")
    text = text.replace("# Copied from data-parallelism-accelerate.py::why_hidden\n", "")  # unmarked
    text = text.replace("# Copied from data-parallelism-accelerate.py::gpu_memory\ndef gpu_memory(",
                        "def memory_of_one_gpu(")  # renamed and unmarked: still a copy
    size = "# Copied from data-parallelism-accelerate.py::size\ndef size(b):\n"  # moved up, above the banner
    size = text[text.index(size):text.index("\n\n\n", text.index(size))]
    text = text.replace(size + "\n\n\n", "").replace("def parse_args():", size + "\n\n\ndef parse_args():")
    text = text.replace("def make_plan(", "# Copied from data-parallelism-accelerate.py::nothing_here\n\n"
                        "def make_plan(")  # a marker above no def
    script.write_text(text, encoding="utf-8")

    out = check(scripts).stdout
    assert ("why_hidden in data-parallelism-accelerate.py, why_hidden in model-parallelism-flux.py: written alike, "
            "unmarked") in out
    assert "gpu_memory in data-parallelism-accelerate.py, memory_of_one_gpu in model-parallelism-flux.py" in out
    assert re.search(r"model-parallelism-flux\.py:\d+: the `# Copied from` marker is not on the line above a def", out)
    assert "model-parallelism-flux.py: size is shared with another script but is not below the banner" in out
