"""The cost of checkpoints verified by content: sha256 of every file of a checkpoint, on this machine.

    python bench/checkpoint_hash.py                 # full fine-tuning checkpoints of Qwen2.5-0.5B and -1.5B
    python bench/checkpoint_hash.py --params 0.1    # a quick run (0.1B parameters)

A full fine-tuning checkpoint holds fp32 weights (4 bytes/param) and AdamW's two moments (8 bytes/param), plus
optimizer.pt's framing: ~16 bytes/param is the budget used here (the tokenizer and the small files are noise).
For each size a file of that many bytes is written and fsynced (the save's own writing), then hashed as
save_checkpoint hashes it (checkpoint.file_sha256, right after the write), then read back once without hashing:
the obvious alternative a verify-by-reading pass would cost. What it measures is sha256 throughput (and the disk
and page cache) of this machine; a GPU server's CPU and NVMe give other figures.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from e2h_min.run.checkpoint import HASH_CHUNK, file_sha256  # noqa: E402
from e2h_min.errors import OneLineErrorParser  # noqa: E402

BYTES_PER_PARAM = 16


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def write_file(path: Path, size: int) -> None:
    block = os.urandom(HASH_CHUNK)
    with open(path, "wb") as handle:
        for offset in range(0, size, len(block)):
            handle.write(block[:size - offset])
        handle.flush()
        os.fsync(handle.fileno())


def read_back(path: Path) -> None:
    with open(path, "rb", buffering=0) as handle:
        while handle.read(HASH_CHUNK):
            pass


def main() -> None:
    parser = OneLineErrorParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=float, nargs="+", default=[0.494, 1.54],
                        help="billions of parameters (Qwen2.5-0.5B: 0.494, -1.5B: 1.54)")
    parser.add_argument("--dir", default=None, help="where to write the files (default: the system temp folder)")
    args = parser.parse_args()
    folder = Path(args.dir or tempfile.gettempdir())
    if not folder.is_dir():
        parser.error(f"--dir {folder} is not a directory")
    free = shutil.disk_usage(folder).free
    for billions in args.params:
        if not 0 < billions * 1e9 * BYTES_PER_PARAM <= free:
            parser.error(f"--params {billions:g}: a checkpoint of {billions:g}B parameters needs "
                         f"{billions * BYTES_PER_PARAM:g} GB; {folder} has {free / 1e9:.1f} GB free (pass 0 < "
                         f"--params that fits, or --dir elsewhere)")
    buffer = os.urandom(1 << 30)
    in_memory = timed(lambda: hashlib.sha256(buffer).digest())
    del buffer
    print(f"sha256 of 1 GiB in memory: {in_memory:.2f} s ({(1 << 30) / in_memory / 1e9:.2f} GB/s), one core")
    print(f"{'params':>7} {'checkpoint':>10} {'write+fsync':>11} {'sha256 pass':>11} {'plain read':>10} "
          f"{'sha256/read':>11} {'sha256/write':>12}")
    for billions in args.params:
        size = int(billions * 1e9 * BYTES_PER_PARAM)
        with tempfile.TemporaryDirectory(dir=args.dir) as folder:
            path = Path(folder) / "checkpoint.bin"
            write = timed(lambda: write_file(path, size))
            hashed = timed(lambda: file_sha256(path))
            plain = timed(lambda: read_back(path))
        print(f"{billions:>6.3g}B {size / 1e9:>8.1f}GB {write:>10.1f}s {hashed:>10.1f}s {plain:>9.1f}s "
              f"{hashed / plain:>10.2f}x {hashed / write:>11.2f}x")


if __name__ == "__main__":
    main()
