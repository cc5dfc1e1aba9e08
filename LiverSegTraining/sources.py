"""Readers for the labelled data layouts a user may have, each yielding ``Case`` records.

- case folders: ``CASE/ct.nii.gz`` + ``CASE/label.nii.gz`` (0/1/2), as in ``$LIVERSEG_DATA/cases``
- 3D-IRCADb: ``3Dircadb1.N/PATIENT_DICOM/`` + ``MASKS_DICOM/liver`` + ``MASKS_DICOM/livertumor*``
- LiTS: ``volume-N.nii`` + ``segmentation-N.nii``
- MSD Task03: ``imagesTr/liver_N.nii.gz`` + ``labelsTr/liver_N.nii.gz``
- 2D slice sets: ``images/`` + ``masks/`` (PNG or NPY) with a patient id per slice; a patient's slices
  are stacked in name order into a pseudo-volume so the 2.5D input works as for real volumes.

Every CT goes through the engine's ``read_ct``. Label kinds: "expert" labels may be test cases;
"model" (model-made, e.g. TotalSegmentator) and "semi-automatic" labels are weak: training or
checkpoint selection only, never a reported accuracy.
"""

from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import SimpleITK as sitk

from LiverSegLib.errors import LiverSegInputError
from LiverSegLib.io import read_ct

LoadFunction = Callable[[], tuple[sitk.Image, np.ndarray]]
LAYOUTS = ("cases", "ircad", "lits", "msd", "slices")


@dataclass(frozen=True)
class Case:
    """One labelled volume; ``load`` returns the CT image and its label array (k, j, i) with 0/1/2."""

    name: str
    patient: str
    source: str
    label_kind: str
    has_lesion_label: bool
    licence: str
    load: LoadFunction = field(compare=False, repr=False)

    @property
    def is_expert(self) -> bool:
        return self.label_kind == "expert"


def _label_array(label_image: sitk.Image, ct: sitk.Image, name: str) -> np.ndarray:
    if label_image.GetSize() != ct.GetSize():
        raise LiverSegInputError(f"{name}: label size {label_image.GetSize()} differs from CT size {ct.GetSize()}")
    label = sitk.GetArrayFromImage(label_image)
    if label.min() < 0 or label.max() > 2:
        raise LiverSegInputError(f"{name}: label values must be 0/1/2, found {label.min()}..{label.max()}")
    return label.astype(np.uint8)


def _nifti_pair_loader(ct_path: Path, label_path: Path, name: str) -> LoadFunction:
    def load() -> tuple[sitk.Image, np.ndarray]:
        ct = read_ct(ct_path)
        return ct, _label_array(sitk.ReadImage(str(label_path)), ct, name)

    return load


def case_folders(root: Path) -> list[Case]:
    """``root/NAME/ct.nii.gz`` + ``label.nii.gz``; metadata from ``stats.json`` or ``info.json``."""
    cases = []
    for folder in sorted(p for p in root.iterdir() if (p / "ct.nii.gz").is_file() and (p / "label.nii.gz").is_file()):
        meta: dict = {}
        for meta_name in ("info.json", "stats.json"):
            if (folder / meta_name).is_file():
                meta.update(json.loads((folder / meta_name).read_text(encoding="utf-8")))
        origin = str(meta.get("label_origin", "")).upper()
        if folder.name.endswith("_MODEL") or "MODEL-MADE" in origin:
            kind = "model"
        elif "SEMI" in origin or "semi" in str(meta.get("label", "")).lower() or folder.name.startswith("dcmqi"):
            kind = "semi-automatic"
        else:
            kind = "expert"
        if "lesion_labelled" in meta:
            has_lesion = bool(meta["lesion_labelled"])
        elif "tumour_masks" in meta:
            has_lesion = bool(meta["tumour_masks"])
        else:
            has_lesion = float(meta.get("lesion_ml", 0.0)) > 0
        licence = str(meta.get("licence", "CC BY-NC-ND 4.0 (3D-IRCADb)" if folder.name.startswith("ircad") else "see data README"))
        cases.append(
            Case(
                name=folder.name,
                patient=folder.name,
                source=str(folder),
                label_kind=kind,
                has_lesion_label=has_lesion,
                licence=licence,
                load=_nifti_pair_loader(folder / "ct.nii.gz", folder / "label.nii.gz", folder.name),
            )
        )
    return cases


def ircad_dicom(root: Path) -> list[Case]:
    """Public 3D-IRCADb layout: one DICOM file per slice for the CT and for each mask."""
    cases = []
    for folder in sorted(root.glob("3Dircadb1.*")):
        if not (folder / "PATIENT_DICOM").is_dir() or not (folder / "MASKS_DICOM" / "liver").is_dir():
            continue
        tumour_folders = sorted((folder / "MASKS_DICOM").glob("livertumor*"))

        def load(folder: Path = folder, tumour_folders: list[Path] = tumour_folders) -> tuple[sitk.Image, np.ndarray]:
            ct = read_ct(folder / "PATIENT_DICOM")
            liver = _mask_series(folder / "MASKS_DICOM" / "liver", ct)
            label = liver.astype(np.uint8)
            for tumour_folder in tumour_folders:
                label[_mask_series(tumour_folder, ct) & liver] = 2
            return ct, label

        name = "ircad_" + folder.name.split(".")[-1].zfill(2)
        cases.append(Case(name, name, str(folder), "expert", bool(tumour_folders), "CC BY-NC-ND 4.0 (3D-IRCADb)", load))
    return cases


def _mask_series(folder: Path, ct: sitk.Image) -> np.ndarray:
    reader = sitk.ImageSeriesReader()
    files = reader.GetGDCMSeriesFileNames(str(folder))
    if not files:
        raise LiverSegInputError(f"no DICOM mask slices in {folder}")
    reader.SetFileNames(files)
    mask = reader.Execute()
    if mask.GetSize() != ct.GetSize():
        raise LiverSegInputError(f"mask {folder} size {mask.GetSize()} differs from CT size {ct.GetSize()}")
    return sitk.GetArrayFromImage(mask) > 0


def lits(root: Path) -> list[Case]:
    """LiTS: ``volume-N.nii`` with ``segmentation-N.nii`` (0 background, 1 liver, 2 tumour)."""
    cases = []
    for volume in sorted(root.rglob("volume-*.nii*"), key=lambda p: int(re.findall(r"\d+", p.name)[0])):
        number = re.findall(r"\d+", volume.name)[0]
        label = next(iter(volume.parent.glob(f"segmentation-{number}.nii*")), None)
        if label is not None:
            name = f"lits_{number}"
            cases.append(Case(name, name, str(volume), "expert", True, "LiTS (CC BY-NC-SA 4.0)", _nifti_pair_loader(volume, label, name)))
    return cases


def msd_task03(root: Path) -> list[Case]:
    """Medical Segmentation Decathlon Task03 Liver: ``imagesTr/liver_N.nii.gz`` + ``labelsTr/``."""
    cases = []
    for image in sorted((root / "imagesTr").glob("liver_*.nii*")):
        if image.name.startswith("."):
            continue
        label = root / "labelsTr" / image.name
        if label.is_file():
            name = "msd_" + image.name.split(".")[0].split("_")[-1]
            cases.append(Case(name, name, str(image), "expert", True, "MSD (CC BY-SA 4.0)", _nifti_pair_loader(image, label, name)))
    return cases


def slice_sets(root: Path, png_window_hu: tuple[float, float] = (-250.0, 250.0), label_kind: str = "expert") -> list[Case]:
    """2D slice sets: ``images/X`` + ``masks/X`` (PNG or NPY) and ``patients.csv`` (file,patient).

    NPY images hold HU; 8-bit PNG images are mapped back to HU through ``png_window_hu``, the window
    they were exported with. Masks: 0 background, 1 liver, 2 lesion (PNG 255 counts as liver).
    Without ``patients.csv`` the patient is the file-name prefix before the first '_'.
    """
    images = sorted(p for p in (root / "images").iterdir() if p.suffix.lower() in (".png", ".npy"))
    patients: dict[str, str] = {}
    if (root / "patients.csv").is_file():
        with open(root / "patients.csv", newline="", encoding="utf-8") as stream:
            patients = {row["file"]: row["patient"] for row in csv.DictReader(stream)}
    by_patient: dict[str, list[Path]] = {}
    for image in images:
        by_patient.setdefault(patients.get(image.name, image.stem.split("_")[0]), []).append(image)

    def load(files: list[Path]) -> tuple[sitk.Image, np.ndarray]:
        ct = np.stack([_read_slice(f, png_window_hu, is_mask=False) for f in files]).astype(np.float32)
        label = np.stack([_read_slice(root / "masks" / f.name, png_window_hu, is_mask=True) for f in files])
        image = sitk.GetImageFromArray(ct)
        return image, label.astype(np.uint8)

    return [
        Case(f"slices_{patient}", f"slices_{patient}", str(root), label_kind, True, "see slice set", lambda f=files: load(f))
        for patient, files in sorted(by_patient.items())
    ]


def _read_slice(path: Path, png_window_hu: tuple[float, float], is_mask: bool) -> np.ndarray:
    if not path.is_file():
        raise LiverSegInputError(f"missing slice file: {path}")
    if path.suffix.lower() == ".npy":
        values = np.load(path)
    else:
        values = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
        if values.ndim == 3:
            values = values[..., 0]
    if is_mask:
        return np.where(values == 255, 1, values).astype(np.uint8)
    if path.suffix.lower() == ".npy":
        return values.astype(np.float32)
    low, high = png_window_hu
    return low + values.astype(np.float32) / 255.0 * (high - low)


def discover(layout: str, path: str | Path, **options) -> list[Case]:
    """The cases of ``layout`` found under ``path``."""
    path = Path(path)
    if not path.is_dir():
        raise LiverSegInputError(f"data folder does not exist: {path}")
    readers = {"cases": case_folders, "ircad": ircad_dicom, "lits": lits, "msd": msd_task03, "slices": slice_sets}
    if layout not in readers:
        raise LiverSegInputError(f"unknown data layout '{layout}', choose one of {', '.join(LAYOUTS)}")
    return readers[layout](path, **options)
