"""The README's quickstart works as pasted: it runs in a fresh interpreter."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def test_quickstart_runs_as_pasted(tmp_path: Path) -> None:
    text = README.read_text()
    section = text[text.index("## Quickstart"):]
    code = re.search(r"```python\n(.*?)```", section, re.S)
    assert code is not None, "no python block in the quickstart"
    script = tmp_path / "quickstart.py"
    script.write_text(code.group(1) + "\nprint('quickstart ok')\n")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=60, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith("quickstart ok")
