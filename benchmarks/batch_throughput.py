"""``liverseg batch`` on this machine: cases per hour against the number of local workers, and each worker's
peak memory.

    python benchmarks/batch_throughput.py [--workers 1 2] [--copies 2] [--device cpu] [--stacked /tmp/bench_302.nii.gz]

The cohort is every real CT here at full size: ``ircad_01`` (129 slices), ``ircad_07`` (151), ``ircad_17``
(119), the TCIA ``CRLM-CT-1004`` (41 slices, 5 mm) and a 302-slice CT (``ircad_07`` stacked on itself, as in
``cpu_install.py``), each linked ``--copies`` times into a folder, so that every worker has several cases
and the start-up (cluster, model load per worker) is paid as in a real cohort. For each worker count the
script runs ``liverseg batch FOLDER -o OUT --workers N --device DEVICE`` in a fresh process and a fresh
output folder, samples the resident memory (RSS) of each worker process every 0.1 s, and prints the wall
time, cases per hour, the median seconds a case took inside its worker (the summary's ``seconds``) and the
largest worker RSS. Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cpu_install import machine, print_table, stacked_ct  # noqa: E402

PROJECT = Path(__file__).resolve().parent.parent
CASES = ("ircad_01", "ircad_07", "ircad_17")


def cohort_folder(data: Path, stacked: Path, copies: int, folder: Path) -> int:
    sources = {name: data / "cases" / name / "ct.nii.gz" for name in CASES}
    sources["CRLM-CT-1004"] = data / "unlabelled" / "CRLM-CT-1004" / "ct.nii.gz"
    sources["stacked_302"] = stacked
    for copy in range(1, copies + 1):
        for name, source in sources.items():
            (folder / f"{name}_{copy}.nii.gz").symlink_to(source.resolve())
    return len(sources) * copies


class WorkerMemory(threading.Thread):
    """The largest RSS any child process of ``pid`` (Dask's worker processes) reached while it ran."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.driver = psutil.Process(pid)
        self.peak_bytes = 0
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                children = self.driver.children()
            except psutil.Error:
                return
            for child in children:
                try:
                    self.peak_bytes = max(self.peak_bytes, child.memory_info().rss)
                except psutil.Error:
                    continue
            time.sleep(0.1)


def run_batch(folder: Path, out: Path, workers: int, device: str) -> tuple[float, int, list[dict]]:
    command = [sys.executable, "-m", "LiverSegLib.cli", "batch", str(folder), "-o", str(out), "--workers", str(workers), "--device", device]
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    memory = WorkerMemory(process.pid)
    memory.start()
    process.wait()
    wall_s = time.perf_counter() - started
    memory.stop.set()
    memory.join()
    with (out / "summary.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    if process.returncode != 0:
        raise SystemExit(f"liverseg batch exited {process.returncode}: " + "; ".join(r["error"] for r in rows if r["error"]))
    return wall_s, memory.peak_bytes, rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--copies", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--data", type=Path, default=Path(os.environ.get("LIVERSEG_DATA", PROJECT.parent / "shared" / "data")))
    parser.add_argument("--stacked", type=Path, default=Path("/tmp/bench_302.nii.gz"), help="where the 302-slice CT is written")
    args = parser.parse_args()
    print(f"machine: {machine()}; load average before: {os.getloadavg()[0]:.2f}")
    stacked = stacked_ct(args.data / "cases" / "ircad_07" / "ct.nii.gz", args.stacked)
    rows = []
    with tempfile.TemporaryDirectory() as temporary:
        folder = Path(temporary) / "cohort"
        folder.mkdir()
        count = cohort_folder(args.data, stacked, args.copies, folder)
        for workers in args.workers:
            wall_s, peak_bytes, summary = run_batch(folder, Path(temporary) / f"out_{workers}", workers, args.device)
            per_case = statistics.median(float(r["seconds"]) for r in summary)
            rows.append([str(workers), str(count), f"{wall_s:.1f}", f"{3600 * count / wall_s:.0f}", f"{per_case:.2f}",
                         f"{peak_bytes / 1e9:.2f}"])
    print_table(["workers", "cases", "wall s", "cases/hour", "median s/case in a worker", "peak worker RSS GB"], rows)
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
