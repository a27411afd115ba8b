"""Child process for the kill -9 test: writes checkpoint step 2, announcing (via a marker file) when it is
half-way through, then stalls so the parent can kill it mid-write."""

import sys
from pathlib import Path

import torch

import e2h_min.run.checkpoint as ckpt
from tests.test_checkpoint import make_state

run_dir, marker = Path(sys.argv[1]), Path(sys.argv[2])
real_fsync_tree = ckpt._fsync_tree


def stall(path):
    marker.write_text("writing")  # weights and optimizer files exist, the rename has not happened
    import time
    time.sleep(600)  # held mid-write until the parent's SIGKILL


ckpt._fsync_tree = stall
model, tokenizer, optimizer, scheduler = make_state(seed=2)
ckpt.save_checkpoint(run_dir, 2, model, tokenizer, optimizer.state_dict(), scheduler, {"sampler": {}}, torch.Generator())
