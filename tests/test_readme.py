"""The README's Python example runs as written (it builds real packaged encoders)."""

from __future__ import annotations

import re
from pathlib import Path


def test_readme_example_runs(tmp_path, monkeypatch):
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    code = re.search(r"```python\n(.*?)```", readme, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert (tmp_path / "my-metalm" / "model.safetensors").exists()
    assert namespace["loss"].item() > 0
