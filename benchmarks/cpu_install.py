"""The CPU install (no torch) against the torch path: download size, installed size, cold start, whole command.

    python benchmarks/cpu_install.py [--cpu-venv /tmp/liverseg-cpu] [--full-venv .venv] [--repeats 3] [--cold-repeats 5]
                                     [--no-download] [--no-full-onnxruntime] [--no-torch] [--checkout DIR ...]
                                     [--cts dcmqi_ct3slice ircad_01 stacked]

Three ways to segment on the CPU, each in fresh processes:

- **CPU install**: a venv with ``pip install -e .`` only (ONNX Runtime, the graph that ships with the model, no
  torch). Created with ``python3 -m venv DIR && DIR/bin/pip install -e .`` when ``--cpu-venv`` does not exist.
- **torch path**: the full venv (``--full-venv``) with ``--runtime torch``.
- **full venv, default runtime**: the full venv with the default runtime (ONNX Runtime; torch is installed but
  must not be imported: checked by running the command with ``sys.modules`` inspected at exit).
- **CPU install, checkout DIR** (``--checkout DIR``, repeatable): the CPU install running the engine of another
  checkout (``PYTHONPATH=DIR/LiverSeg``), e.g. the commit before a change (``git worktree add DIR COMMIT``), so
  that before and after run in turn under the same load.

Figures:

1. Bytes ``pip download`` saves for ``.`` and for ``.[gpu]`` (a temporary folder each, sum of the file sizes),
   with how much of it pip took from local files (it says ``Processing /path`` instead of ``Downloading``);
   the disk size (``du -s``) of each venv's site-packages.
2. Cold start to a ready network: wall time of ``python -c "from LiverSegLib.pipeline import LiverSegmenter;
   LiverSegmenter(device='cpu'[, runtime='torch'])"``, a fresh process each, median of ``--cold-repeats``.
3. The whole command ``liverseg segment CT -o OUT.nii.gz --device cpu [--runtime torch]``: wall time (median of
   ``--repeats``, after one untimed run that warms the page cache) and the process's peak RSS (``os.wait4``, the largest of the runs) on
   the 3-slice ``dcmqi_ct3slice``, the 129-slice ``ircad_01`` and a 302-slice CT (``ircad_07`` stacked on
   itself, written to ``--stacked``). The repeats go round the configurations in turn. Each run also writes
   ``--report``: the medians of its stages of ``segment`` are printed, with the 1-minute load average
   (``/proc/loadavg``) before and after each series (other processes on the machine slow every figure).

CTs come from ``$LIVERSEG_DATA`` (default ``../shared/data``). Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

PROJECT = Path(__file__).resolve().parent.parent
CT_NAMES = {"dcmqi_ct3slice": "dcmqi_ct3slice (512×512×3)", "ircad_01": "ircad_01 (512×512×129)",
            "stacked": "ircad_07 stacked (512×512×302)"}
TORCH_FAMILY = ("torch", "segmentation_models_pytorch", "timm", "torchvision")
COLD_START = "from LiverSegLib.pipeline import LiverSegmenter; LiverSegmenter(device='cpu'{runtime})"
# Runs the CLI's main as `liverseg` does and reports, at exit, which of the torch family were imported.
IMPORT_CHECK = """
import atexit, sys
atexit.register(lambda: print("imported:", [m for m in {family!r} if m in sys.modules], file=sys.stderr))
from LiverSegLib.cli import main
sys.argv = ["liverseg"] + {argv!r}
sys.exit(main())
"""


@dataclass(frozen=True)
class Config:
    """One way of segmenting on the CPU: which venv, which --runtime (None: the default)."""

    name: str
    venv: Path
    runtime: str | None
    checkout: Path | None = None  # run this checkout's engine (PYTHONPATH) instead of the venv's own

    @property
    def env(self) -> dict[str, str]:
        if self.checkout is None:
            return dict(os.environ)
        return {**os.environ, "PYTHONPATH": str(self.checkout / "LiverSeg")}

    @property
    def python(self) -> Path:
        return self.venv / "bin" / "python"

    @property
    def liverseg(self) -> Path:
        return self.venv / "bin" / "liverseg"


@dataclass(frozen=True)
class Download:
    """What one ``pip download`` saved."""

    total_bytes: int
    files: int
    local_bytes: int  # the part pip took from local files ("Processing /path")
    torch_line: str  # what pip said about torch, "" when torch was not part of it


@dataclass(frozen=True)
class Run:
    """One whole command: wall seconds, peak resident memory and the stages of its ``segment`` (report)."""

    wall_s: float
    peak_rss_bytes: int
    stages_s: dict[str, float]


def ensure_cpu_venv(venv: Path) -> None:
    """Creates the CPU-only venv (``pip install -e .``, no extras) unless it exists."""
    if (venv / "bin" / "liverseg").exists():
        return
    print(f"creating {venv}: python3 -m venv {venv} && {venv}/bin/pip install -e {PROJECT}", flush=True)
    subprocess.run(["python3", "-m", "venv", str(venv)], check=True)
    subprocess.run([str(venv / "bin" / "pip"), "install", "--quiet", "-e", str(PROJECT)], check=True)


def pip_download(pip: Path, requirement: str) -> Download:
    """``pip download --dest TMP requirement`` run in the project; sizes of what it saved."""
    with tempfile.TemporaryDirectory(prefix="liverseg-download-") as dest:
        log = subprocess.run([str(pip), "download", "--dest", dest, requirement], cwd=PROJECT,
                             capture_output=True, text=True, check=True).stdout
        saved = [path for path in Path(dest).iterdir() if path.is_file()]
        local_names = {Path(match).name for match in re.findall(r"^Processing (/\S+\.whl)", log, flags=re.MULTILINE)}
        torch_lines = [line.strip() for line in log.splitlines()
                       if re.search(r"[/ ]torch-\d", line) and line.lstrip().startswith(("Processing", "Downloading"))]
        return Download(
            total_bytes=sum(path.stat().st_size for path in saved),
            files=len(saved),
            local_bytes=sum(path.stat().st_size for path in saved if path.name in local_names),
            torch_line=torch_lines[0] if torch_lines else "",
        )


def site_packages_bytes(venv: Path) -> int:
    """Disk usage (``du -s``) of the venv's site-packages."""
    purelib = subprocess.run([str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    return int(subprocess.run(["du", "-s", "-B1", purelib], capture_output=True, text=True, check=True).stdout.split()[0])


def cold_start_s(config: Config) -> float:
    """Wall seconds of one fresh process that builds the segmenter (imports + ready network)."""
    runtime = f", runtime={config.runtime!r}" if config.runtime else ""
    started = time.perf_counter()
    subprocess.run([str(config.python), "-c", COLD_START.format(runtime=runtime)], check=True, env=config.env,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - started


def segment_command(config: Config, ct: Path, output: Path) -> list[str]:
    """The ``liverseg segment`` command line of ``config``."""
    command = [str(config.liverseg), "segment", str(ct), "-o", str(output), "--device", "cpu", "--progress", "none"]
    return command + (["--runtime", config.runtime] if config.runtime else [])


def whole_command(config: Config, ct: Path, folder: Path) -> Run:
    """One ``liverseg segment`` in a fresh process: wall seconds, its own peak RSS (``os.wait4``), its stages."""
    output, report = folder / "label.nii.gz", folder / "report.json"
    output.unlink(missing_ok=True)
    report.unlink(missing_ok=True)
    with open(folder / "stderr.txt", "w+b") as stderr:
        started = time.perf_counter()
        child = subprocess.Popen(segment_command(config, ct, output) + ["--report", str(report)], env=config.env,
                                 stdout=subprocess.DEVNULL, stderr=stderr)
        _, status, usage = os.wait4(child.pid, 0)
        wall_s = time.perf_counter() - started
        child.returncode = os.waitstatus_to_exitcode(status)
        stderr.seek(0)
        errors = stderr.read().decode(errors="replace")
    if child.returncode != 0 or not output.exists():
        raise RuntimeError(f"{config.name} on {ct} failed ({child.returncode}): {errors[-2000:]}")
    report_json = json.loads(report.read_text(encoding="utf-8"))
    stages = {"segment": report_json["seconds"], **report_json["timings_s"]}
    return Run(wall_s=wall_s, peak_rss_bytes=usage.ru_maxrss * 1024, stages_s=stages)  # ru_maxrss is in KiB on Linux


def torch_family_imported(config: Config, ct: Path, folder: Path) -> str:
    """Which of torch, smp, timm, torchvision ``liverseg segment`` imported (``sys.modules`` at exit)."""
    argv = segment_command(config, ct, folder / "check.nii.gz")[1:]
    result = subprocess.run([str(config.python), "-c", IMPORT_CHECK.format(family=TORCH_FAMILY, argv=argv)],
                            capture_output=True, text=True, check=True, env=config.env)
    return next(line for line in result.stderr.splitlines() if line.startswith("imported:")).removeprefix("imported: ")


def stacked_ct(source: Path, destination: Path) -> Path:
    """``source`` stacked on itself along z (same spacing, origin, direction), written once to ``destination``."""
    if destination.exists():
        return destination
    import numpy as np
    import SimpleITK as sitk

    image = sitk.ReadImage(str(source))
    voxels = sitk.GetArrayFromImage(image)
    stacked = sitk.GetImageFromArray(np.concatenate([voxels, voxels], axis=0))
    stacked.SetSpacing(image.GetSpacing())
    stacked.SetOrigin(image.GetOrigin())
    stacked.SetDirection(image.GetDirection())
    sitk.WriteImage(stacked, str(destination), useCompression=True)
    return destination


def versions(config: Config) -> str:
    """The onnxruntime and torch versions installed in the config's venv."""
    code = ("import importlib.metadata as m\n"
            "for name in ('onnxruntime', 'torch'):\n"
            "    try: print(name, m.version(name))\n"
            "    except m.PackageNotFoundError: print(name, 'not installed')")
    return ", ".join(subprocess.run([str(config.python), "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")[:-1])


def machine() -> str:
    """Cores, architecture, CPU model (``lscpu``) and Python version of this machine."""
    model = next((line.split(":", 1)[1].strip() for line in subprocess.run(["lscpu"], check=False, capture_output=True, text=True).stdout.splitlines()
                  if line.startswith("Model name")), platform.processor())
    return f"{os.cpu_count()} cores, {platform.machine()}, {model}, Python {platform.python_version()}"


def load_1min() -> str:
    """The 1-minute load average of the machine."""
    return Path("/proc/loadavg").read_text(encoding="ascii").split()[0]


def megabytes(count: int) -> str:
    return f"{count / 1e6:,.0f} MB"


def gigabytes(count: int) -> str:
    return f"{count / 1e9:.2f} GB"


def print_table(header: list[str], rows: list[list[str]]) -> None:
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(row) + " |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu-venv", type=Path, default=Path("/tmp/liverseg-cpu"))
    parser.add_argument("--full-venv", type=Path, default=PROJECT / ".venv")
    parser.add_argument("--data", type=Path, default=Path(os.environ.get("LIVERSEG_DATA", PROJECT.parent / "shared" / "data")))
    parser.add_argument("--stacked", type=Path, default=Path("/tmp/bench_302.nii.gz"), help="where the 302-slice CT is written")
    parser.add_argument("--repeats", type=int, default=3, help="timed whole commands per CT and configuration")
    parser.add_argument("--cold-repeats", type=int, default=5)
    parser.add_argument("--no-download", action="store_true", help="skip the pip download sizes")
    parser.add_argument("--no-full-onnxruntime", action="store_true", help="skip the full venv with the default runtime")
    parser.add_argument("--no-torch", action="store_true", help="skip the torch path")
    parser.add_argument("--checkout", type=Path, action="append", default=[],
                        help="also run the CPU install on the engine of this checkout (PYTHONPATH=DIR/LiverSeg); repeatable")
    parser.add_argument("--cts", nargs="+", choices=CT_NAMES, default=list(CT_NAMES))
    args = parser.parse_args()

    ensure_cpu_venv(args.cpu_venv)
    configs = [Config("CPU install (`pip install -e .`), default runtime", args.cpu_venv, None)]
    configs += [Config(f"CPU install, checkout {checkout}", args.cpu_venv, None, checkout.resolve()) for checkout in args.checkout]
    if not args.no_torch:
        configs.append(Config("full venv, `--runtime torch`", args.full_venv, "torch"))
    full_default = not args.no_full_onnxruntime
    if full_default:
        configs.append(Config("full venv, default runtime", args.full_venv, None))
    paths = {"dcmqi_ct3slice": lambda: args.data / "cases" / "dcmqi_ct3slice" / "ct.nii.gz",
             "ircad_01": lambda: args.data / "cases" / "ircad_01" / "ct.nii.gz",
             "stacked": lambda: stacked_ct(args.data / "cases" / "ircad_07" / "ct.nii.gz", args.stacked)}
    cts = {CT_NAMES[name]: paths[name]() for name in CT_NAMES if name in args.cts}

    print(f"machine: {machine()}")
    for config in configs:
        print(f"{config.name}: {config.venv} ({versions(config)})")

    def per_config(cpu: str, torch: str) -> list[str]:
        """A figure of the installs, not of the runs: the CPU install's for its columns, the full venv's for the others."""
        return [cpu if config.venv == args.cpu_venv else torch for config in configs]

    rows: list[list[str]] = []
    if not args.no_download:
        pip = args.cpu_venv / "bin" / "pip"
        base, gpu = pip_download(pip, "."), pip_download(pip, ".[gpu]")
        rows.append(["`pip download` (files)"] + per_config(f"{megabytes(base.total_bytes)} ({base.files})",
                                                            f"{megabytes(gpu.total_bytes)} ({gpu.files}), `.[gpu]`"))
        rows.append(["… of which pip took from local files"] + per_config(megabytes(base.local_bytes), megabytes(gpu.local_bytes)))
        print(f"pip on torch for .[gpu]: {gpu.torch_line or 'not mentioned'}")
    full_size = gigabytes(site_packages_bytes(args.full_venv)) if any(config.venv != args.cpu_venv for config in configs) else ""
    rows.append(["site-packages (`du -s`)"] + per_config(gigabytes(site_packages_bytes(args.cpu_venv)), full_size))

    cold = {config.name: [] for config in configs}
    for _ in range(args.cold_repeats):
        for config in configs:
            cold[config.name].append(cold_start_s(config))
    rows.append([f"cold start to a ready network (median of {args.cold_repeats})"]
                + [f"{statistics.median(cold[config.name]):.2f} s" for config in configs])

    stage_lines: list[str] = []
    with tempfile.TemporaryDirectory(prefix="liverseg-bench-") as folder:
        if full_default:
            config = configs[-1]
            print(f"{config.name} imported of {', '.join(TORCH_FAMILY)}: "
                  f"{torch_family_imported(config, next(iter(cts.values())), Path(folder))}")
        for label, ct in cts.items():
            for config in configs:
                whole_command(config, ct, Path(folder))  # warms the page cache; not counted
            runs: dict[str, list[Run]] = {config.name: [] for config in configs}
            load_before = load_1min()
            for _ in range(args.repeats):
                for config in configs:
                    runs[config.name].append(whole_command(config, ct, Path(folder)))
            load = f"1-min load {load_before} before, {load_1min()} after"
            rows.append([f"whole command, {label}: wall (median of {args.repeats}) / peak RSS"]
                        + [f"{statistics.median(run.wall_s for run in runs[config.name]):.2f} s / "
                           f"{gigabytes(max(run.peak_rss_bytes for run in runs[config.name]))}" for config in configs])
            print(f"  {label} ({load}):", flush=True)
            for config in configs:
                print(f"    {config.name}: " + ", ".join(f"{run.wall_s:.2f} s ({gigabytes(run.peak_rss_bytes)})" for run in runs[config.name]), flush=True)
                stages = {name: statistics.median(run.stages_s[name] for run in runs[config.name]) for name in runs[config.name][0].stages_s}
                stage_lines.append(f"{label}, {config.name} ({load}): " + ", ".join(f"{name} {seconds:.2f}" for name, seconds in stages.items()))

    print()
    print_table(["", *(config.name for config in configs)], rows)
    print("\nstages of `segment` (s, medians; `segment` is the whole of it):\n" + "\n".join(stage_lines))
    print("\ncold starts (s): " + "; ".join(f"{name}: " + ", ".join(f"{s:.2f}" for s in seconds) for name, seconds in cold.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
