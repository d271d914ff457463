"""Build the packaged MP-20 hull (crystals/hull_data/) from a full data directory.

    python -m crystals.hull_data.build --data-dir ../shared/data [--out DIR]

Writes ``mp20-hull-<first 16 hex of the meta CSV's sha256>.json.gz``: the stable phases of the hull of all
MP-20 formation energies (``crystals.hull.MP20Hull.build``, ~75 s on 2 idle cores; never read from a cache,
so the file is always rebuilt from the CSV), and copies the elemental reference entries beside it. A hull
file of another source is removed, so the directory holds exactly one. Same source, same bytes (sorted
phases, gzip without timestamp). Update the sha256 in README.md after a rebuild from a new CSV.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from crystals.data import DataError
from crystals.hull import (
    META_FILE,
    REFERENCES_FILE,
    STABLE_GLOB,
    MP20Hull,
    full_data_hull_files,
    stable_file_name,
    write_stable,
)

OUT_DIR = Path(__file__).resolve().parent


def build(data_dir: str | Path | None, out: Path = OUT_DIR) -> tuple[Path, Path]:
    """Write the hull of ``data_dir``'s meta CSV and its elemental references into ``out``; returns both paths."""
    files = full_data_hull_files(data_dir)
    if files is None:
        raise DataError(
            f"{data_dir} is not a full data directory: it needs mp20/{META_FILE} and hull/{REFERENCES_FILE}"
        )
    meta, refs = files
    hull = MP20Hull.build(meta)
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob(STABLE_GLOB):
        stale.unlink()
    stable = out / stable_file_name(hull.source_sha256)
    write_stable(stable, hull.stable)
    shutil.copyfile(refs, out / REFERENCES_FILE)
    return stable, out / REFERENCES_FILE


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="data dir holding mp20/ and hull/ (default: $CRYSTAL_GRPO_DATA)",
    )
    parser.add_argument("--out", type=Path, default=OUT_DIR)
    args = parser.parse_args()
    for path in build(args.data_dir, args.out):
        print(f"{path} ({path.stat().st_size:,} bytes)")


if __name__ == "__main__":
    main()
