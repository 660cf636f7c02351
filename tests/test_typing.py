"""Indexes are generic: to a type checker, ``tx.find(Node.by_user, ...)`` is ``list[Node]``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def test_query_results_are_typed_by_model() -> None:
    target = HERE / "typing" / "check_generic_indexes.py"
    done = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-incremental", str(target)],
        capture_output=True, text=True, timeout=300, cwd=HERE.parent,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_a_wrong_type_is_reported(tmp_path: Path) -> None:
    """The check above can fail: a wrong expectation is an error."""
    source = (HERE / "typing" / "check_generic_indexes.py").read_text()
    wrong = tmp_path / "wrong.py"
    wrong.write_text(source.replace("list[Node])", "list[str])", 1))
    done = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-incremental", str(wrong)],
        capture_output=True, text=True, timeout=300, cwd=HERE.parent,
    )
    assert done.returncode != 0 and "[assert-type]" in done.stdout
