"""Reading CT volumes (NIfTI, NRRD, MHA or a DICOM series folder) and writing label maps.

This is the one reader of the project: the CLI, the training package and the tests all go through
``read_ct``, so a volume is checked the same way wherever it comes from.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .errors import LiverSegInputError

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
LABEL_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha")
# A header claiming more voxels than this is refused before any pixel is read (2 GiB of int16).
MAX_VOXELS = 1 << 30


@dataclass(frozen=True)
class DicomSeries:
    """One DICOM series found in a folder, with its files sorted along the slice normal."""

    uid: str
    files: tuple[str, ...]
    description: str
    number: str


def image_suffix(path: str | os.PathLike) -> str:
    """The recognised image extension of ``path`` ('' when it has none)."""
    name = str(path).lower()
    return next((s for s in IMAGE_SUFFIXES if name.endswith(s)), "")


def list_dicom_series(folder: str | os.PathLike) -> list[DicomSeries]:
    """The DICOM series in ``folder``; GDCM sorts each by image position, not by file name."""
    reader = sitk.ImageSeriesReader()
    series = []
    for uid in reader.GetGDCMSeriesIDs(str(folder)) or ():
        files = tuple(reader.GetGDCMSeriesFileNames(str(folder), uid))
        probe = sitk.ImageFileReader()
        probe.SetFileName(files[0])
        try:
            probe.ReadImageInformation()
            description = probe.GetMetaData("0008|103e").strip() if probe.HasMetaDataKey("0008|103e") else ""
            number = probe.GetMetaData("0020|0011").strip() if probe.HasMetaDataKey("0020|0011") else ""
        except RuntimeError:
            description, number = "", ""
        series.append(DicomSeries(uid=uid, files=files, description=description, number=number))
    return series


def select_series(folder: str | os.PathLike, series_uid: str | None = None) -> DicomSeries:
    """The one series to read from ``folder``: the only one, or the one ``series_uid`` names (UID or number)."""
    folder = Path(folder)
    series = list_dicom_series(folder)
    if not series:
        raise LiverSegInputError(f"no DICOM series found in folder: {folder}")
    if series_uid is not None:
        chosen = [s for s in series if series_uid in (s.uid, s.number)]
        if not chosen:
            raise LiverSegInputError(f"series {series_uid} not found in {folder}; it holds: " + _describe(series))
        series = chosen
    if len(series) > 1:
        raise LiverSegInputError(
            f"{folder} holds {len(series)} DICOM series, choose one with --series: " + _describe(series)
        )
    return series[0]


def read_dicom_series(series: DicomSeries) -> sitk.Image:
    """The series' slices in GDCM's position order, checked like any CT: slice k is ``series.files[k]``."""
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(list(series.files))
    folder = Path(series.files[0]).parent
    try:
        image = reader.Execute()
    except RuntimeError as error:
        raise LiverSegInputError(f"unreadable DICOM series in {folder}: {_first_line(error)}") from None
    return check_ct(image, str(folder))


def _describe(series: list[DicomSeries]) -> str:
    return "; ".join(f"{s.uid} (#{s.number or '?'} '{s.description}', {len(s.files)} slices)" for s in series)


def _first_line(error: Exception) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    meaningful = [line for line in lines if not line.startswith(("sitk::ERROR", "itk::ERROR"))] or lines
    return (meaningful[-1] if meaningful else type(error).__name__)[:200]


def _read_file(path: Path) -> sitk.Image:
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        raise LiverSegInputError(f"not a readable image: {path}") from None
    voxels = int(np.prod(reader.GetSize(), dtype=np.int64)) * reader.GetNumberOfComponents()
    if voxels > MAX_VOXELS:
        raise LiverSegInputError(f"image header claims {voxels} voxels, more than LiverSeg accepts: {path}")
    try:
        return reader.Execute()
    except RuntimeError as error:
        raise LiverSegInputError(f"corrupted or truncated image {path}: {_first_line(error)}") from None


def read_ct(path: str | os.PathLike, series_uid: str | None = None) -> sitk.Image:
    """Read a CT volume and check that it is a single-channel 3D image with some content.

    Returns a SimpleITK image of 32-bit floats in Hounsfield units, with the file's geometry.
    """
    path = Path(path)
    if not path.exists():
        raise LiverSegInputError(f"input does not exist: {path}")
    if path.is_dir():
        return read_dicom_series(select_series(path, series_uid))
    # NIfTI/NRRD/MHA, or a single DICOM file / unknown extension: ITK decides from the content.
    return check_ct(_read_file(path), str(path))


def check_ct(image: sitk.Image, source: str) -> sitk.Image:
    """Refuse what cannot be a CT volume: 2D, 4D, multi-channel, one slice, or constant content."""
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise LiverSegInputError(f"{source} has {image.GetNumberOfComponentsPerPixel()} channels per voxel; a CT has one")
    if image.GetDimension() == 4 and image.GetSize()[3] == 1:
        image = image[:, :, :, 0]
    if image.GetDimension() != 3:
        raise LiverSegInputError(f"{source} is a {image.GetDimension()}D image; LiverSeg needs a 3D CT volume")
    size = image.GetSize()
    if min(size) < 2:
        raise LiverSegInputError(f"{source} has size {size}: a single slice, not a 3D volume")
    stats = sitk.MinimumMaximumImageFilter()
    stats.Execute(image)
    low, high = stats.GetMinimum(), stats.GetMaximum()
    if high == low:
        raise LiverSegInputError(f"{source} is empty: every voxel is {low:g}")
    integer = image.GetPixelID() in (sitk.sitkUInt8, sitk.sitkInt8, sitk.sitkUInt16, sitk.sitkInt16, sitk.sitkUInt32, sitk.sitkInt32)
    if integer and low >= 0 and high <= 255:
        raise LiverSegInputError(f"{source} looks like a label map (integer values {low:g}..{high:g}), not a CT in HU")
    if low > -500 or high < 200:
        warnings.warn(f"{source}: intensities {low:g}..{high:g} do not look like CT Hounsfield units (MR or unscaled?); results may be poor")
    return sitk.Cast(image, sitk.sitkFloat32)


def check_output_path(path: str | os.PathLike, suffixes: tuple[str, ...] = LABEL_SUFFIXES) -> Path:
    """Validate an output path before any work is done, so a bad path costs nothing."""
    path = Path(path)
    if not any(str(path).lower().endswith(s) for s in suffixes):
        raise LiverSegInputError(f"output must end with one of {', '.join(suffixes)}: {path}")
    if not path.parent.is_dir():
        raise LiverSegInputError(f"output folder does not exist: {path.parent}")
    if not os.access(path.parent, os.W_OK):
        raise LiverSegInputError(f"output folder is not writable: {path.parent}")
    return path


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, suffix: str = ""):
    """Yield a temporary path beside ``path``; on success rename it over ``path``, on failure delete it.

    The rename is atomic on one file system, so readers see the old file or the complete new one and a
    failed run leaves nothing. The file gets the permissions a plain ``open`` would give it.
    """
    path = Path(path)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(handle)
    try:
        yield temporary
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary, 0o666 & ~umask)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def write_image_atomic(image: sitk.Image, path: str | os.PathLike) -> None:
    """Write an image (format from the extension) without ever leaving a half-written file."""
    suffix = next(s for s in LABEL_SUFFIXES + IMAGE_SUFFIXES if str(path).lower().endswith(s))
    with atomic_output(path, suffix) as temporary:
        sitk.WriteImage(image, temporary, useCompression=True)
