"""The README's ring/ example runs as written, on real KVM (the default backend)."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_example_runs(capsys) -> None:
    text = README.read_text()
    block = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    exec(compile(block, "README.md", "exec"), {})
    out = capsys.readouterr().out
    entries = int(re.search(r"ring full on vCPU \d -> (\d+) entries", out).group(1))
    assert 960 <= entries <= 2 * 960
    assert re.search(r"^kvm \d+ pages;", out, re.M), f"the example did not run on KVM: {out!r}"
