"""Reading CT volumes (NIfTI, NRRD, MHA or a DICOM series folder), and checking them.

This is the one reader of the project: the CLI, the training package, the Slicer module's engine process
and the tests all go through ``read_ct`` / ``check_ct``, so a volume is checked the same way wherever it
comes from. Writing lives in ``outputs``.
"""

from __future__ import annotations

import contextlib
import gzip
import math
import os
import re
import struct
import warnings
import zlib
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .errors import LiverSegInputError

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
LABEL_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha")
# A header claiming more voxels than this is refused before any pixel is read (2 GiB of int16).
MAX_VOXELS = 1 << 30
AIR_HU = -1024.0  # what NaN or infinite voxels are read as


CT_IMAGE_STORAGE = {"1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.2.1"}  # CT, Enhanced CT
# A gap between neighbouring slices larger than this many times the usual step is a missing slice.
MISSING_SLICE_FACTOR = 1.5


@dataclass(frozen=True)
class DicomSeries:
    """One CT series found in a folder, files sorted by position along the slice normal."""

    uid: str
    files: tuple[str, ...]
    description: str
    number: str
    positions_mm: tuple[float, ...] = ()
    handle: str = ""  # what ``--series`` takes to choose it: its number, else its UID, else @position in the listing

    @property
    def label(self) -> str:
        uid = "" if self.handle == self.uid else f" {self.uid or '(no UID)'}"
        return f"{self.handle} '{self.description}' ({len(self.files)} slices, {self.spacing_mm:.2f} mm){uid}"

    @property
    def spacing_mm(self) -> float:
        return float(np.median(np.diff(self.positions_mm))) if len(self.positions_mm) > 1 else 0.0


def _dicom_headers(folder: Path):
    """(path, header) of every DICOM file below ``folder`` (recursively); other files are skipped."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    for path in sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")):
        try:
            header = pydicom.dcmread(path, stop_before_pixels=True)
        except (InvalidDicomError, OSError, ValueError, EOFError, AttributeError, TypeError):
            continue
        yield path, header


def _is_ct_slice(header) -> bool:
    sop_class = str(getattr(header, "SOPClassUID", "") or "")
    is_ct = sop_class in CT_IMAGE_STORAGE or (not sop_class and getattr(header, "Modality", "") == "CT")
    image_type = [str(v).upper() for v in (getattr(header, "ImageType", None) or [])]
    has_geometry = "ImagePositionPatient" in header and "ImageOrientationPatient" in header and "Rows" in header
    return is_ct and has_geometry and "LOCALIZER" not in image_type


def list_dicom_series(folder: str | os.PathLike) -> list[DicomSeries]:
    """The CT series below ``folder``: grouped by SeriesInstanceUID, then by orientation and size (for
    series that mix them), localizers and non-CT objects dropped, single-slice groups (reformats, lone
    slices) dropped, each sorted by position along the slice normal — never by file name."""
    groups: dict[tuple, list[tuple[float, str, object]]] = {}
    for path, header in _dicom_headers(Path(folder)):
        if not _is_ct_slice(header):
            continue
        orientation = np.array([float(v) for v in header.ImageOrientationPatient])
        normal = np.cross(orientation[:3], orientation[3:])
        position = float(np.dot([float(v) for v in header.ImagePositionPatient], normal))
        key = (str(getattr(header, "SeriesInstanceUID", "") or ""), tuple(np.round(orientation, 3)), int(header.Rows), int(header.Columns))
        groups.setdefault(key, []).append((position, str(path), header))
    series = []
    for key, members in groups.items():
        if len(members) < 2:
            continue
        members.sort(key=lambda member: member[0])
        header = members[0][2]
        series.append(
            DicomSeries(
                uid=key[0],
                files=tuple(m[1] for m in members),
                description=str(getattr(header, "SeriesDescription", "") or "").strip(),
                number=str(getattr(header, "SeriesNumber", "") or "").strip(),
                positions_mm=tuple(m[0] for m in members),
            )
        )
    return _with_handles(sorted(series, key=lambda s: (s.number, s.uid)))


def _with_handles(series: list[DicomSeries]) -> list[DicomSeries]:
    """Give each series a handle that names it alone: its series number when no other has it, else its UID
    when no other has that, else its position in the listing (``@2``); exported series often lack both."""
    numbers = [s.number for s in series]
    uids = [s.uid for s in series]
    handled = []
    for position, one in enumerate(series, start=1):
        if one.number and numbers.count(one.number) == 1:
            handle = one.number
        elif one.uid and uids.count(one.uid) == 1:
            handle = one.uid
        else:
            handle = f"@{position}"
        handled.append(replace(one, handle=handle))
    return handled


def select_series(folder: str | os.PathLike, series_uid: str | None = None) -> DicomSeries:
    """The one series to read from ``folder``: the only one, or the one ``series_uid`` names (UID or number)."""
    folder = Path(folder)
    series = list_dicom_series(folder)
    if not series:
        raise LiverSegInputError(f"no DICOM CT series found in folder: {folder}")
    if series_uid is not None:
        chosen = [s for s in series if s.handle == series_uid] or [s for s in series if series_uid in (s.uid, s.number)]
        if not chosen:
            raise LiverSegInputError(f"series {series_uid} not found in {folder}; it holds: " + _describe(series))
        series = chosen
    if len(series) > 1:
        raise LiverSegInputError(
            f"{folder} holds {len(series)} DICOM CT series, choose one with --series: " + _describe(series)
        )
    return series[0]


def check_slice_spacing(series: DicomSeries) -> None:
    """Refuse a series with a missing or duplicated slice rather than interpolating over the gap."""
    steps = np.diff(series.positions_mm)
    usual = series.spacing_mm
    if usual <= 1e-3 or np.any(steps <= 1e-3):
        raise LiverSegInputError(f"DICOM series {series.label} has slices at the same position (duplicates or mixed series)")
    gaps = np.flatnonzero(steps > MISSING_SLICE_FACTOR * usual)
    if gaps.size:
        where = ", ".join(f"{series.positions_mm[i]:.1f}–{series.positions_mm[i + 1]:.1f} mm" for i in gaps[:3])
        raise LiverSegInputError(f"DICOM series {series.label} has missing slice(s): gap at {where} (usual step {usual:.2f} mm)")


def _check_pixel_spacing(series: DicomSeries) -> None:
    """ITK reads a missing or zero Pixel Spacing (0028,0030) as 1 mm: refuse instead of measuring wrongly."""
    import pydicom

    header = pydicom.dcmread(series.files[0], stop_before_pixels=True)
    spacing = [float(v) for v in (getattr(header, "PixelSpacing", None) or [])]
    if len(spacing) != 2 or not all(math.isfinite(v) and v > 0 for v in spacing):
        raise LiverSegInputError(f"DICOM series {series.label} has pixel spacing {spacing or 'missing'} (0028,0030); "
                                 "the voxel size is unknown")


def _unreadable_slice(series: DicomSeries) -> str:
    """Which file of a series that ITK could not read is at fault, and why (read one by one: error path only)."""
    for index, file in enumerate(series.files):
        try:
            with _itk_warnings_off():
                sitk.ReadImage(file)
        except RuntimeError as error:
            return f"slice {index + 1} of {len(series.files)}, {file}{_because(error) or ' (unreadable pixel data)'}"
    return f"{len(series.files)} slices that cannot be read together"


def read_dicom_series(series: DicomSeries) -> sitk.Image:
    """The series' slices in position order, checked like any CT: slice k is ``series.files[k]``."""
    check_slice_spacing(series)
    _check_pixel_spacing(series)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(list(series.files))
    folder = Path(series.files[0]).parent
    try:
        with _itk_warnings_off():
            image = reader.Execute()
    except RuntimeError:
        raise LiverSegInputError(f"unreadable DICOM series in {folder}: {_unreadable_slice(series)}") from None
    return check_ct(image, str(folder))


def _describe(series: list[DicomSeries]) -> str:
    return "; ".join(s.label for s in series)


_INTERNALS = re.compile(r"\S+\.(?:cxx|cpp|hxx|h|txx):\d+:?|\b\w+\(0x[0-9a-fA-F]+\):\s*|Exception thrown in SimpleITK \w+:?|(?:sitk|itk)::ERROR:?|ITK ERROR:?")


def _first_line(error: Exception) -> str:
    """The library's message for a user: its last meaningful line without source paths, object addresses or
    ITK's exception prefixes; '' when nothing is left."""
    lines = [" ".join(_INTERNALS.sub(" ", line).split()).strip(" :") for line in str(error).splitlines()]
    meaningful = [line for line in lines if len(line) > 3]
    return meaningful[-1][:200] if meaningful else ""


def _because(error: Exception) -> str:
    reason = _first_line(error)
    return f" ({reason})" if reason else ""


def _nifti_bytes(header: bytes) -> int | None:
    """vox_offset + voxel data size from a NIfTI-1 header; None when ``header`` is not one."""
    if len(header) < 348:
        return None
    endian = next((e for e in "<>" if struct.unpack(e + "i", header[:4])[0] == 348), None)
    if endian is None:
        return None
    dims = struct.unpack(endian + "8h", header[40:56])
    bits = struct.unpack(endian + "h", header[72:74])[0]
    offset = int(struct.unpack(endian + "f", header[108:112])[0])
    return offset + int(np.prod([max(d, 1) for d in dims[1 : dims[0] + 1]], dtype=np.int64)) * bits // 8


def _gunzip_fully(path: Path) -> None:
    try:
        with gzip.open(path, "rb") as stream:
            while stream.read(1 << 24):
                pass
    except (EOFError, OSError, zlib.error) as error:
        raise LiverSegInputError(f"corrupted or truncated image {path}: {error}") from None


def _check_complete(path: Path) -> None:
    """ITK's NIfTI reader fills a truncated file with zeros without a word: check the bytes are all there.

    A ``.nii.gz`` whose gzip trailer (uncompressed size mod 2³²) equals what its header needs is
    complete without decompressing it a second time; anything else is decompressed to find out.
    """
    name = path.name.lower()
    if name.endswith(".gz"):
        try:
            with gzip.open(path, "rb") as stream:
                expected = _nifti_bytes(stream.read(348)) if name.endswith(".nii.gz") else None
            with open(path, "rb") as raw:
                raw.seek(-4, os.SEEK_END)
                stored_size = struct.unpack("<I", raw.read(4))[0]
        except (EOFError, OSError, zlib.error) as error:
            raise LiverSegInputError(f"corrupted or truncated image {path}: {error}") from None
        if expected is None or stored_size != expected % (1 << 32):
            _gunzip_fully(path)
    elif name.endswith(".nii"):
        with open(path, "rb") as stream:
            expected = _nifti_bytes(stream.read(348))
        if expected is not None and path.stat().st_size < expected:
            raise LiverSegInputError(f"truncated image {path}: {path.stat().st_size} bytes, header needs {expected}")


def _nifti_header(path: Path) -> bytes:
    """The first 348 bytes, or b'' when they cannot be read (ITK's reader then says what is wrong)."""
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    try:
        with opener(path, "rb") as stream:
            return stream.read(348)
    except (EOFError, OSError, zlib.error):
        return b""


def _check_nifti_spacing(path: Path) -> None:
    """ITK reads a NIfTI voxel size of 0 as 1 mm without a word (a liver measured on 5 mm slices then shrinks five-fold), and a
    negative one as its absolute value. Zero or unreadable: refused, the size is unknown; negative: a warning."""
    header = _nifti_header(path)
    endian = next((e for e in "<>" if len(header) >= 348 and struct.unpack(e + "i", header[:4])[0] == 348), None)
    if endian is None:
        return
    dims = struct.unpack(endian + "8h", header[40:56])
    pixdim = struct.unpack(endian + "8f", header[76:108])
    for axis in range(1, min(dims[0], 3) + 1):
        size_mm = pixdim[axis]
        if not math.isfinite(size_mm) or size_mm == 0:
            raise LiverSegInputError(f"{path}: the NIfTI header gives voxel size {size_mm:g} along axis {axis} (pixdim[{axis}]); "
                                     "the spacing is unknown, fix the header")
        if size_mm < 0:
            warnings.warn(f"{path}: the NIfTI header gives a negative voxel size {size_mm:g} along axis {axis} "
                          f"(pixdim[{axis}]); using {abs(size_mm):g} mm")


def _read_file(path: Path) -> sitk.Image:
    if path.is_file() and path.stat().st_size == 0:
        raise LiverSegInputError(f"empty file (0 bytes): {path}")
    if path.name.lower().endswith((".nii", ".nii.gz")):
        _check_nifti_spacing(path)
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    with _itk_warnings_off():
        try:
            reader.ReadImageInformation()
        except RuntimeError as error:
            raise LiverSegInputError(f"not a readable image: {path}{_because(error)}") from None
        voxels = int(np.prod(reader.GetSize(), dtype=np.int64)) * reader.GetNumberOfComponents()
        if voxels > MAX_VOXELS:
            raise LiverSegInputError(f"image header claims {voxels} voxels, more than LiverSeg accepts: {path}")
        _check_complete(path)
        try:
            return reader.Execute()
        except RuntimeError as error:
            raise LiverSegInputError(f"corrupted or truncated image {path}{_because(error)}") from None


@contextlib.contextmanager
def _itk_warnings_off():
    """ITK prints its warnings (source file, line, object address) straight to stderr; what matters to a
    user is checked and said by LiverSeg itself."""
    shown = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(shown)


def read_ct(path: str | os.PathLike, series_uid: str | None = None) -> sitk.Image:
    """Read a CT volume and check that it is a single-channel 3D image with some content.

    Returns a SimpleITK image of 32-bit floats in Hounsfield units, with the file's geometry.
    """
    path = check_input_path(path)
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
    spacing_mm = image.GetSpacing()
    if not all(math.isfinite(v) and v > 0 for v in spacing_mm):
        raise LiverSegInputError(f"{source} has voxel spacing {tuple(round(v, 4) for v in spacing_mm)} mm; every spacing must be above 0")
    if image.GetPixelID() in (sitk.sitkFloat32, sitk.sitkFloat64):
        image = _non_finite_as_air(sitk.Cast(image, sitk.sitkFloat32), source)
    stats = sitk.MinimumMaximumImageFilter()
    stats.Execute(image)
    low, high = stats.GetMinimum(), stats.GetMaximum()
    if high == low:
        raise LiverSegInputError(f"{source} is empty: every voxel is {low:g}")
    integer = image.GetPixelID() in (sitk.sitkUInt8, sitk.sitkInt8, sitk.sitkUInt16, sitk.sitkInt16, sitk.sitkUInt32, sitk.sitkInt32)
    if integer and low >= 0 and high <= 255:
        raise LiverSegInputError(f"{source} looks like a label map (integer values {low:g}..{high:g}), not a CT in HU")
    return sitk.Cast(image, sitk.sitkFloat32)


def _non_finite_as_air(image: sitk.Image, source: str) -> sitk.Image:
    """NaN or infinite voxels (a float volume with masked-out regions) are read as air with a warning: the
    network must never see them, and they must never become lesions."""
    voxels = sitk.GetArrayViewFromImage(image)
    finite = np.isfinite(voxels)
    if finite.all():
        return image
    if not finite.any():
        raise LiverSegInputError(f"{source} holds no finite value (every voxel is NaN or infinite)")
    count = int(voxels.size - np.count_nonzero(finite))
    warnings.warn(f"{source}: {count} voxels ({100 * count / voxels.size:.2g} %) are NaN or infinite; they are read as air ({AIR_HU:g} HU)")
    cleaned = sitk.GetImageFromArray(np.where(finite, voxels, np.float32(AIR_HU)))
    cleaned.CopyInformation(image)
    return cleaned


def check_input_path(path: str | os.PathLike) -> Path:
    """The input as a Path, refused at once when it does not exist (before any slow start-up)."""
    path = Path(path)
    if not path.exists():
        raise LiverSegInputError(f"input does not exist: {path}")
    return path
