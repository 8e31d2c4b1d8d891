"""Shared test settings: never touch a network hub, never talk to W&B servers, keep CPU threads bounded."""

import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def _remove_stale_deepspeed_shm(min_age_s: float = 600.0) -> None:
    """Remove the /dev/shm all-reduce buffers that DeepSpeed launches on this machine left behind before the ZeRO
    strategy unlinked them (69 MB of RAM each, never freed otherwise). Only names older than ten minutes go: a
    launch maps its peers' buffers within seconds of starting, so an older name is either mapped already (its
    memory stays until the processes exit) or left by a job that has ended."""
    import time

    now = time.time()
    for path in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_{os.getuid()}_*"):
        try:
            if now - path.stat().st_mtime > min_age_s:
                path.unlink()
        except OSError:
            pass


_remove_stale_deepspeed_shm()
