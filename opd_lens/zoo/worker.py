"""A worker process of :func:`opd_lens.zoo.train_zoo`: ``python -m opd_lens.zoo.worker OUT RUN LINE PROGRESS``
trains one run of the zoo in ``OUT`` (preset and seed from its manifest), its progress bar on line ``LINE``."""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path

from .presets import Preset
from .runner import load_zoo, single_thread
from .train import train_run


def main(out: str, run: str, line: str, progress: str) -> int:
    threading.Thread(target=_exit_with_parent, args=(os.getppid(),), daemon=True).start()
    manifest = load_zoo(out)
    preset = Preset.from_dict(manifest["config"])
    try:
        with single_thread():
            train_run(Path(out), run, preset, manifest["seed"], progress == "1", int(line))
    except KeyboardInterrupt:  # the terminal's Ctrl-C reaches every worker; the parent reports it
        return 130
    return 0


def _exit_with_parent(parent: int) -> None:
    """Stop when the zoo that started this worker is gone (killed), as it would have stopped its workers;
    checkpoints are written atomically, so the run resumes from the last one."""
    while os.getppid() == parent:
        time.sleep(1)
    os._exit(1)


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
