"""Build the packaged MP-20 demo subset (crystals/demo_data/{train,val,test}.csv.gz) from a full MP-20 copy.

    python -m crystals.demo_data.build_demo_subset [--source DATA_DIR] [--out DIR] [--seed 0]

Each split is a seeded uniform sample of rows (kept in the source's row order) with the columns the
package uses. The gzip header carries no timestamp, so rebuilding from the same source gives the same bytes.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from crystals.data import split_path

OUT_DIR = Path(__file__).resolve().parent
DEFAULT_SOURCE = OUT_DIR.parents[2] / "shared" / "data"  # ../shared/data beside the repo
ROWS = {"train": 1500, "val": 150, "test": 150}
COLUMNS = [
    "material_id",
    "pretty_formula",
    "formation_energy_per_atom",
    "e_above_hull_mp20hull",
    "elements",
    "cif",
    "spacegroup.number",
]


def build(source: Path, out: Path = OUT_DIR, seed: int = 0) -> dict[str, int]:
    """Write one ``{split}.csv.gz`` per split into ``out``; returns the rows written per split."""
    out.mkdir(parents=True, exist_ok=True)
    written = {}
    for split, n in ROWS.items():
        frame = pd.read_csv(split_path(split, source), usecols=COLUMNS)[COLUMNS]
        subset = frame.sample(n=n, random_state=seed).sort_index()
        subset.to_csv(out / f"{split}.csv.gz", index=False, compression={"method": "gzip", "mtime": 0})
        written[split] = len(subset)
    return written


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--source", type=Path, default=DEFAULT_SOURCE, help="data dir holding mp20/ (or mp20/)"
    )
    parser.add_argument("--out", type=Path, default=OUT_DIR)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    for split, n in build(args.source, args.out, args.seed).items():
        print(f"{split}: {n} rows -> {args.out / (split + '.csv.gz')}")


if __name__ == "__main__":
    main()
