"""Save the figures the ErrorDistributionMonitor writes, from real runs of the example configs, as PNG files.

Usage (from the repository root):

    .venv/bin/python docs/make_figures.py            # trains regression and multiclass briefly, writes docs/images/

The images are read back from the TensorBoard event files with TensorBoard's own reader, so they are exactly what
the dashboard shows.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_lossdiag.cli import main as lossdiag

FIGURES = {
    "regression": {"errors/val/pred_vs_true": "regression_pred_vs_true.png"},
    "multiclass": {"errors/val/confusion_matrix": "multiclass_confusion_matrix.png"},
}


def export(config: str, tags: dict[str, str], out: Path, workdir: Path) -> None:
    """Train ``configs/<config>.yaml`` into ``workdir`` and save the last image of each tag to ``out``."""
    code = lossdiag(
        [
            "fit",
            "--config",
            f"configs/{config}.yaml",
            f"--trainer.logger.init_args.save_dir={workdir}",
            "--trainer.enable_progress_bar=false",
        ]
    )
    if code != 0:
        raise SystemExit(f"lossdiag fit --config configs/{config}.yaml failed with exit code {code}")
    run = next((workdir / config).glob("version_*"))
    acc = EventAccumulator(str(run), size_guidance={"images": 0})
    acc.Reload()
    for tag, name in tags.items():
        events = acc.Images(tag)
        (out / name).write_bytes(events[-1].encoded_image_string)
        print(f"wrote {out / name} (step {events[-1].step})")


def main() -> None:
    """Parse the arguments and export every figure."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("docs/images"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="lossdiag_figures_"))
    try:
        for config, tags in FIGURES.items():
            export(config, tags, args.out, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
