"""The README's Python quick start runs as written (with a shorter fit and a temporary folder)."""

from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def _quick_start() -> str:
    text = README.read_text()
    start = text.index("```python\nimport lightning as L")
    return text[start + len("```python\n") : text.index("```", start + 10)]


@pytest.mark.slow
def test_readme_python_quick_start_trains(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = _quick_start()
    assert "L.Trainer(max_epochs=10, callbacks=[LossDiagnostics()])" in code
    code = code.replace("max_epochs=10", "max_epochs=1, enable_progress_bar=False")
    namespace: dict = {}
    exec(compile(code, str(README), "exec"), namespace)
    model = namespace["MyModel"]()
    assert type(model.criterion).__name__ == "HuberLoss"  # the default loss name became a torch module
    assert list(tmp_path.glob("lightning_logs/version_0/events.out.tfevents.*"))
