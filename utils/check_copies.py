"""Keep the functions the scripts copy from one another identical, as diffusers keeps its `# Copied from` code.

Each script stands alone: a reader copies one file and has everything it needs. So the guards every script has
(the one-line failure, the checks of the machine's GPUs, the FP64 fix, ...) are written in each script, and each
copy is marked on the line above its `def` (or `class`, or decorator) with the script and the name it copies:

    # Copied from data-parallelism-accelerate.py::fail
    def fail(message, code=2, every_process=False):

This finds the markers itself, in every script at the top of the repository, and checks that each copy is the
source's code to the letter, that it sits with the other guards (below the script's banner, a comment line that
starts with `# ---` and names this file), and that no function is written the same in two scripts without a
marker. With --fix it writes each copy anew from its source (a source that is itself a copy is fixed first).

    uv run utils/check_copies.py          # exit 0: every copy is its source; else each difference, and exit 1
    uv run utils/check_copies.py --fix    # rewrite the copies from their sources
"""

import argparse
import ast
import difflib
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MARKER = re.compile(r"^# Copied from (?P<script>[\w.-]+\.py)::(?P<name>\w+)\s*$")
BANNER = re.compile(r"^# ---.*utils/check_copies\.py")


def definitions(text):
    """Each top-level function and class of a script: name -> (first line, last line), 0-based, decorators
    included."""
    spans = {}
    for node in ast.parse(text).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            first = min([node.lineno, *(d.lineno for d in node.decorator_list)]) - 1
            spans[node.name] = (first, node.end_lineno - 1)
    return spans


class Script:
    def __init__(self, path):
        self.path, self.name = path, path.name
        self.lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
        self.spans = definitions("".join(self.lines))
        self.banner = next((i for i, line in enumerate(self.lines) if BANNER.match(line)), None)

    def code(self, name):
        first, last = self.spans[name]
        return "".join(self.lines[first:last + 1])

    def copies(self):
        """(line of the marker, 0-based; source script; source name; copied name) for each marker."""
        found = []
        for i, line in enumerate(self.lines):
            if match := MARKER.match(line):
                copied = next((n for n, (first, _) in self.spans.items() if first == i + 1), None)
                found.append((i, match["script"], match["name"], copied))
        return found


def scripts(root):
    return {path.name: Script(path) for path in sorted(root.glob("*.py"))}


def problems(root=ROOT):
    """Every way the copies are not as they should be, one string each (empty: all is well)."""
    found, by_name = [], scripts(root)
    marked = {}  # (script, name) of every marked copy
    for script in by_name.values():
        for i, source_script, source_name, copied in script.copies():
            where = f"{script.name}:{i + 1}"
            if copied is None:
                found.append(f"{where}: the `# Copied from` marker is not on the line above a def or class")
                continue
            marked[script.name, copied] = (source_script, source_name)
            if copied != source_name:
                found.append(f"{where}: {copied} is marked as a copy of {source_script}::{source_name}: a copy keeps "
                             "its source's name")
                continue
            source = by_name.get(source_script)
            if source is None or source_name not in source.spans:
                found.append(f"{where}: {source_script}::{source_name} does not exist")
                continue
            if script.code(copied) != source.code(source_name):
                diff = difflib.unified_diff(source.code(source_name).splitlines(), script.code(copied).splitlines(),
                                            f"{source_script}::{source_name}", f"{script.name}::{copied}",
                                            lineterm="", n=0)
                found.append(f"{where}: {copied} differs from {source_script}::{source_name} (--fix copies it "
                             "again):\n    " + "\n    ".join(list(diff)[2:]))
            for name, holder in ((copied, script), (source_name, source)):
                if holder.banner is None or holder.spans[name][0] < holder.banner:
                    found.append(f"{holder.name}: {name} is shared with another script but is not below the banner "
                                 "of shared guards (a `# --- ... utils/check_copies.py ...` line)")
    # A function written the same in two scripts, but not marked: the next change to one would miss the other.
    # Alike whatever the name: a copy renamed is still a copy.
    alike = {}
    for script in by_name.values():
        for name in script.spans:
            body = re.sub(rf"\b(def|class) {name}\b", r"\1 _", script.code(name), count=1)
            alike.setdefault(body, []).append((script.name, name))
    for holders in alike.values():
        unmarked = [(holder, name) for holder, name in holders if (holder, name) not in marked]
        if len(holders) > 1 and len(unmarked) > 1:
            (source, source_name), where = unmarked[0], ", ".join(f"{n} in {h}" for h, n in unmarked)
            found.append(f"{where}: written alike, unmarked: keep one as the source, and give the others its name "
                         f"and the marker `# Copied from {source}::{source_name}`")
    return sorted(set(found), key=found.index)


def fix(root=ROOT):
    """Rewrite every marked copy from its source, sources that are copies first; returns the copies rewritten."""
    rewritten = []
    while True:  # one copy a round, the scripts read again after each; a chain of copies settles too
        changed = False
        by_name = scripts(root)
        for script in by_name.values():
            for _, source_script, source_name, copied in script.copies():
                source = by_name.get(source_script)
                if copied != source_name or source is None or source_name not in source.spans:
                    continue  # nothing to copy from: check() says so
                if script.code(copied) != source.code(source_name):
                    first, last = script.spans[copied]
                    script.lines[first:last + 1] = [source.code(source_name)]
                    script.path.write_text("".join(script.lines), encoding="utf-8")
                    rewritten.append(f"{script.name}::{copied}")
                    changed = True
                    break  # the line numbers moved: read the scripts again
            if changed:
                break
        if not changed:
            return rewritten


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fix", action="store_true", help="rewrite each copy from its source")
    parser.add_argument("--root", type=Path, default=ROOT, help="the repository (default: this one)")
    args = parser.parse_args()
    if args.fix:
        for name in fix(args.root):
            print(f"copied again: {name}")
    found = problems(args.root)
    for problem in found:
        print(problem)
    copies = sum(len(s.copies()) for s in scripts(args.root).values())
    print(f"{copies} copies checked: {len(found)} problem(s)" if found else f"{copies} copies checked: all identical")
    sys.exit(1 if found else 0)


if __name__ == "__main__":
    main()
