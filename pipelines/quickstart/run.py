"""Quick start: record two runs of train.py with different learning rates, then query them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import flordb_build as flor

HERE = Path(__file__).resolve().parent


def main() -> None:
    for lr in ("0.05", "0.2"):
        subprocess.run([sys.executable, str(HERE / "train.py"), "--kwargs", f"lr={lr}"], check=True)
    frame = flor.dataframe("lr", "val_acc", where="filename = 'pipelines/quickstart/train.py'")
    print("flor.dataframe('lr', 'val_acc') of the two newest runs:")
    newest_two = sorted(frame["run_id"].unique(), key=lambda r: frame.loc[frame.run_id == r, "tstamp"].iloc[0])[-2:]
    print(frame[frame["run_id"].isin(newest_two)].to_string(index=False))


if __name__ == "__main__":
    main()
