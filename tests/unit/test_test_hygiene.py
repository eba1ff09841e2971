"""The suite cannot hide a broken import of the project: no test skips on our own modules."""

from __future__ import annotations

import re
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
OWN = r"(onerec_prod|jobs|dags|bench)"
SKIP_CALL = "importor" + "skip"  # spelled apart so this file does not match the scanners it mirrors


def test_no_test_skips_on_the_projects_own_modules():
    patterns = [
        re.compile(rf"{SKIP_CALL}\(\s*['\"]{OWN}[.'\"]"),  # pytest's import-or-skip on our own module
        re.compile(r"except\s+(ImportError|ModuleNotFoundError)\b[^\n]*:\s*\n\s*pytest\.skip"),
    ]
    imports_own = re.compile(rf"^\s*(from|import)\s+{OWN}\b", re.M)
    found = []
    for f in sorted(TESTS.rglob("*.py")):
        if f == Path(__file__).resolve():
            continue
        text = f.read_text()
        for pat in patterns:
            for m in pat.finditer(text):
                line = text.count("\n", 0, m.start()) + 1
                # an ImportError skip is only allowed around third-party imports
                if pat is patterns[1] and not imports_own.search(text[max(0, m.start() - 300): m.start()]):
                    continue
                found.append(f"{f.relative_to(TESTS.parent)}:{line}: {m.group(0).strip()!r}")
    assert not found, "tests skip when our own code fails to import:\n" + "\n".join(found)
