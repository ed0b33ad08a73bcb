#!/usr/bin/python3
"""Fails when a tracked file points outside the repository at the design brief it started from.

The repository's readers have only the repository: code, tests and docs cite docs/ (the facts
were copied there), and tests read the repository's own copies (tests/unit/formats/keys).
Checked: paths into the brief's folder and citations of the brief's own files (its design
document, style guide, toolchain notes, architecture, DisTorch2-semantics and anchors notes),
as PATTERNS lists them. The patterns are assembled from pieces so this file does not match itself.
"""
import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[3]
S = "shared"
PATTERNS = [
    re.escape("../" + S), re.escape("/work/" + S), re.escape(S + "/reference"),
    r"\b" + "DESIGN" + r"\.md\b", r"\b" + "STYLE" + r"\.md\b",
    r"(?<![\w/])" + "reference/" + r"toolchain\.md",
    r"\barchitectures\.md\b", r"\bdistorch2-semantics\.md\b", r"\banchors\.md\b",
]
PATTERN = re.compile("|".join(PATTERNS))


def main():
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                           cwd=ROOT, capture_output=True, check=True).stdout.split(b"\0")
    problems = []
    for name in filter(None, files):
        path = ROOT / name.decode()
        if not path.is_file():
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue  # binary files
        for number, line in enumerate(text.splitlines(), 1):
            m = PATTERN.search(line)
            if m:
                problems.append(f"{name.decode()}:{number}: '{m.group(0)}' points outside the "
                                "repository (cite docs/ and copy the facts there)")
    for p in problems:
        print(f"FAIL {p}")
    if problems:
        print(f"repo_stands_alone: {len(problems)} reference(s) outside the repository")
        return 1
    print(f"repo_stands_alone: {len([f for f in files if f])} files checked, none points outside")
    return 0


if __name__ == "__main__":
    sys.exit(main())
