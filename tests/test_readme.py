"""The README's Python quick start runs as written (with a shorter fit and a temporary folder)."""

import re
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


def _documented_key_patterns() -> list[re.Pattern[str]]:
    """The README's keys table as regexes: `<name>` is one path component, `...` any rest; bare names in a cell
    (`mse` after `metrics/<stage>/mae`) share the folder of the key before them."""
    text = README.read_text()
    table = text[text.index("| key | kind | when | written by |") :]
    table = table[: table.index("\n\n")]
    patterns = []
    for row in table.splitlines()[2:]:
        folder = ""
        for key in re.findall(r"`([^`]+)`", row.split("|")[1].split("(e.g.")[0]):
            if "/" in key:
                folder = key.rsplit("/", 1)[0] + "/"
            elif folder:
                key = folder + key
            rx = re.sub(r"<[^>]+>", "[^/]+", re.escape(key).replace(re.escape("..."), ".+"))
            patterns.append(re.compile(rx + "$"))
    return patterns


@pytest.mark.slow
@pytest.mark.parametrize("config", ["regression", "binary_imbalanced", "multitask"])
def test_every_key_a_run_writes_is_in_the_readme_keys_table(config, tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from lightning_lossdiag.cli import main

    monkeypatch.chdir(tmp_path)
    args = ["fit", "--config", str(README.parent / "configs" / f"{config}.yaml"), "--trainer.max_epochs=2"]
    args += ["--trainer.limit_train_batches=6", "--trainer.log_every_n_steps=3", "--trainer.gradient_clip_val=1.0"]
    args += ["--trainer.enable_progress_bar=false", f"--trainer.logger.init_args.save_dir={tmp_path}"]
    assert main(args) == 0
    (run_dir,) = sorted((tmp_path / config).glob("version_*"))
    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "histograms": 0, "images": 0, "tensors": 0})
    acc.Reload()
    tags = acc.Tags()
    written = {*tags["scalars"], *tags["histograms"], *tags["images"]}
    written |= {t.removesuffix("/text_summary") for t in tags["tensors"] if t != "custom_scalars__config__"}
    written -= {"epoch", "hp_metric"}  # Lightning's own
    patterns = _documented_key_patterns()
    undocumented = sorted(t for t in written if not any(p.match(t) for p in patterns))
    assert undocumented == []
    assert len(written) > 40  # the run really wrote the families of keys the table lists
