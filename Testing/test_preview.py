"""The ``--preview`` sheet (LiverSegLib.preview) on real data: a small palette PNG, the same picture whatever the
CT's storage order, lesion outlines only where lesions were segmented; the CLI writes it and the Markdown
report embeds it."""

from __future__ import annotations

import io
import sys

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import read_case
from PIL import Image

from LiverSegLib.cli import main
from LiverSegLib.outputs import volume_report
from LiverSegLib.preview import BACKGROUND_RGB, FAILED_RGB, FLAGGED_RGB, SHEET_WIDTH_PX, write_contact_sheets, write_preview
from LiverSegLib.segments import LIVER, LIVER_LESION

MAX_SHEET_BYTES = 400 * 1024


def expert_report(label: sitk.Image, lesions: bool = True) -> dict:
    """A report dict with the figures of an expert label map (what the title shows), without running the model."""
    voxel_ml = float(np.prod(label.GetSpacing())) / 1000
    array = sitk.GetArrayViewFromImage(label)
    lesion_ml = float(np.count_nonzero(array == LIVER_LESION.label_value)) * voxel_ml
    return {"input": "ircad_17/ct.nii.gz", "liver_volume_ml": float(np.count_nonzero(array >= 1)) * voxel_ml,
            "lesions_segmented": lesions, "lesions_validated": False, "lesion_count": 2 if lesions else None,
            "lesion_total_ml": lesion_ml, "model": {"name": "expert", "version": "-"}, "qc_warnings": []}


def sheet_pixels(path) -> np.ndarray:
    """The sheet as an (H, W, 3) uint8 array, after checking that it is a PNG of the expected width."""
    picture = Image.open(path)
    assert picture.format == "PNG" and picture.mode == "P"
    assert picture.width == SHEET_WIDTH_PX and 500 < picture.height < 2000
    return np.asarray(picture.convert("RGB"))


def colour_pixels(pixels: np.ndarray, rgb: tuple[float, float, float]) -> int:
    """How many pixels have exactly a segment's colour (the palette keeps it exact)."""
    return int(np.all(pixels == np.round(np.array(rgb) * 255).astype(np.uint8), axis=-1).sum())


def test_sheet_is_a_small_png_independent_of_storage_order(data_root, tmp_path):
    ct, label = read_case(data_root, "ircad_17")
    report = expert_report(label)
    sizes = {}
    for storage, flip in (("lps", False), ("ras", True)):
        image, labels = (sitk.Flip(ct, [True, True, False]), sitk.Flip(label, [True, True, False])) if flip else (ct, label)
        sizes[storage] = write_preview(image, labels, report, tmp_path / f"{storage}.png")
        assert (tmp_path / f"{storage}.png").stat().st_size == sizes[storage] <= MAX_SHEET_BYTES
    lps, ras = sheet_pixels(tmp_path / "lps.png"), sheet_pixels(tmp_path / "ras.png")
    assert np.array_equal(lps, ras), "radiological display must not depend on the storage order"
    assert colour_pixels(lps, LIVER.color_rgb) > 2000
    assert colour_pixels(lps, LIVER_LESION.color_rgb) > 200
    assert not list(tmp_path.glob(".*")), "a temporary file was left behind"


def test_outlines_follow_the_label(data_root, tmp_path):
    """Outline pixels appear only where the label is: an empty label map draws none, and a lesion-free one
    no lesion outline."""
    ct, label = read_case(data_root, "ircad_17")
    liver_only = sitk.Cast(sitk.Clamp(label, upperBound=LIVER.label_value), label.GetPixelID())
    empty = label * 0
    write_preview(ct, liver_only, expert_report(liver_only, lesions=False), tmp_path / "liver.png")
    write_preview(ct, empty, expert_report(empty, lesions=False), tmp_path / "empty.png")
    liver, nothing = sheet_pixels(tmp_path / "liver.png"), sheet_pixels(tmp_path / "empty.png")
    assert colour_pixels(liver, LIVER.color_rgb) > 2000 and colour_pixels(liver, LIVER_LESION.color_rgb) == 0
    assert colour_pixels(nothing, LIVER.color_rgb) == 0 and colour_pixels(nothing, LIVER_LESION.color_rgb) == 0


def test_no_lesions_run_shows_no_lesion_colour(data_root, segmenter, tmp_path):
    ct, _ = read_case(data_root, "totalseg_example_sm_MODEL")
    result = segmenter.segment(ct, lesions=False)
    report = volume_report(ct, result)
    size = write_preview(ct, result.label_image, report, tmp_path / "sheet.png")
    pixels = sheet_pixels(tmp_path / "sheet.png")
    assert size <= MAX_SHEET_BYTES
    assert colour_pixels(pixels, LIVER.color_rgb) > 200
    assert colour_pixels(pixels, LIVER_LESION.color_rgb) == 0


def test_cli_writes_the_preview_and_the_markdown_report_embeds_it(capsys, data_root, tmp_path):
    ct_path = data_root / "cases" / "totalseg_example_sm_MODEL" / "ct.nii.gz"
    (tmp_path / "pictures").mkdir()
    code = main(["segment", str(ct_path), "-o", str(tmp_path / "label.nii.gz"), "--report", str(tmp_path / "r.md"),
                 "--preview", str(tmp_path / "pictures" / "sheet.png"), "--progress", "none"])
    assert code == 0, capsys.readouterr().err
    sheet_pixels(tmp_path / "pictures" / "sheet.png")
    assert "![preview](pictures/sheet.png)" in (tmp_path / "r.md").read_text(encoding="utf-8")


@pytest.mark.parametrize("name, message", [("sheet.jpg", "preview must end with .png: {path}"),
                                           ("missing/sheet.png", "preview folder does not exist: {folder}")])
def test_bad_preview_path_is_refused_before_work(capsys, data_root, tmp_path, name, message):
    ct_path = data_root / "cases" / "totalseg_example_sm_MODEL" / "ct.nii.gz"
    code = main(["segment", str(ct_path), "-o", str(tmp_path / "label.nii.gz"), "--preview", str(tmp_path / name)])
    err = capsys.readouterr().err
    assert code == 2 and err.strip() == "liverseg: error: " + message.format(path=tmp_path / name, folder=(tmp_path / name).parent)
    assert not (tmp_path / "label.nii.gz").exists()


def test_preview_without_matplotlib_is_refused_before_work(capsys, data_root, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    ct_path = data_root / "cases" / "totalseg_example_sm_MODEL" / "ct.nii.gz"
    code = main(["segment", str(ct_path), "-o", str(tmp_path / "label.nii.gz"), "--preview", str(tmp_path / "s.png")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.strip() == "liverseg: error: --preview needs matplotlib: pip install 'liverseg[preview]'"
    assert not list(tmp_path.iterdir())


def test_sheet_bytes_are_a_png(data_root, tmp_path):
    """The file starts with the PNG signature (the atomic write renames a complete file)."""
    ct, label = read_case(data_root, "totalseg_example_sm_MODEL")
    write_preview(ct, label, expert_report(label, lesions=False), tmp_path / "s.png")
    data = (tmp_path / "s.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert Image.open(io.BytesIO(data)).size[0] == SHEET_WIDTH_PX


def test_contact_sheet_frames_failed_cases_red_and_flagged_ones_orange(data_root, tmp_path):
    """The cohort's contact sheet: a thumbnail per case; red only when a case failed, orange only when one has
    QC warnings; 48 cases a page."""
    ct, label = read_case(data_root, "ircad_17")
    write_preview(ct, label, expert_report(label), tmp_path / "a.png")
    done = {"name": "a", "status": "done", "preview": "a.png", "liver_ml": "1900.0", "lesion_count": "2", "qc_warnings": ""}
    failed = {"name": "b", "status": "failed", "error": "not a readable image: b.nii.gz"}
    flagged = {**done, "name": "c", "qc_warnings": "the liver reaches the first or last slice"}
    figures = {}
    for name, rows in (("clean", [done]), ("failed", [done, failed]), ("flagged", [done, flagged])):
        (folder := tmp_path / name).mkdir()
        (folder / "a.png").write_bytes((tmp_path / "a.png").read_bytes())
        [page] = write_contact_sheets(rows, folder)
        assert page.name == "contact_sheet.png"
        pixels = np.asarray(Image.open(page).convert("RGB"))
        figures[name] = (colour_pixels(pixels, FAILED_RGB), colour_pixels(pixels, FLAGGED_RGB), pixels[..., 0].size - colour_pixels(pixels, BACKGROUND_RGB))
    assert figures["clean"][:2] == (0, 0) and figures["clean"][2] > 30_000  # the thumbnail: a 300-px-wide sheet
    assert figures["failed"][0] > 500 and figures["failed"][1] == 0
    assert figures["flagged"][1] > 500 and figures["flagged"][0] == 0
    pages = write_contact_sheets([{**failed, "name": f"case{i}"} for i in range(49)], tmp_path)
    assert [p.name for p in pages] == ["contact_sheet.png", "contact_sheet_2.png"]
