"""The README's Python examples run as written, in order (they build real packaged encoders)."""

from __future__ import annotations

import re
from pathlib import Path


def test_readme_example_runs(tmp_path, monkeypatch):
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, re.S)
    assert len(blocks) >= 2  # build + train + save, then load the HF way and ask
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for code in blocks:
        exec(compile(code, "README.md", "exec"), namespace)
    assert (tmp_path / "my-metalm" / "model.safetensors").exists()
    assert namespace["loss"].item() > 0
    assert type(namespace["processor"]).__name__ == "MetaLMProcessor"  # from AutoProcessor
