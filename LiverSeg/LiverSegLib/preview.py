"""``liverseg segment … --preview sheet.png``: one PNG that shows at a glance whether a segmentation is right.

Three axial slices through the liver (at 25, 50 and 75 % of its craniocaudal extent, cranial first) and a
coronal and a sagittal reformat through the liver's centre, at the CT's real aspect ratio, in a liver
window (W 400 / L 50), with the liver and the lesions outlined in their segment colours, orientation
letters, and the run's figures (from the report dict) in the title.

Every panel is drawn from the canonical (S, P, L) array of ``geometry.canonical_transform``, so the picture
is the radiological display (patient's right on the image's left) whatever the CT's storage order: an LPS
and an RAS copy of one scan give the same sheet. matplotlib is an optional dependency (the ``preview``
extra) and is imported only when a sheet is drawn, with its Agg canvas (no display, no pyplot state).
"""

from __future__ import annotations

import io
import os
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import SimpleITK as sitk

from . import __version__
from .errors import LiverSegInputError
from .geometry import canonical_transform
from .outputs import atomic_output
from .segments import LIVER, LIVER_LESION

if TYPE_CHECKING:
    from matplotlib.axes import Axes

PREVIEW_SUFFIX = ".png"
MATPLOTLIB_MISSING = "--preview needs matplotlib: pip install 'liverseg[preview]'"
WINDOW_HU = (50 - 400 / 2, 50 + 400 / 2)  # liver window, W 400 / L 50
AXIAL_FRACTIONS = (0.25, 0.5, 0.75)  # of the liver's craniocaudal extent, from its top
BACKGROUND_RGB = (0.067, 0.075, 0.094)
TEXT_RGB = (0.92, 0.92, 0.92)
SHEET_WIDTH_PX = 1200
SHEET_DPI = 100
GREY_LEVELS = 96  # of the palette PNG: a 4 HU step in the window, small files, no visible banding
BODY_HU = -500  # above this: the body (and the table), for the crop
FAILED_RGB = (0.86, 0.15, 0.15)  # contact sheet frames: a failed case, a case with QC warnings
FLAGGED_RGB = (0.95, 0.6, 0.1)


@dataclass(frozen=True)
class CanonicalVolume:
    """A CT and its label map as (S, P, L)-ordered arrays, with each axis's voxel size in mm."""

    ct_hu: np.ndarray
    label: np.ndarray
    spacing_spl_mm: tuple[float, float, float]


def check_matplotlib() -> None:
    """Refuse ``--preview`` before any work when matplotlib is missing (it is not in the base install)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise LiverSegInputError(MATPLOTLIB_MISSING) from None


def check_preview_path(path: str | os.PathLike) -> Path:
    """Validate the sheet's path before the segmentation runs, so a typo costs nothing."""
    path = Path(path)
    if path.suffix.lower() != PREVIEW_SUFFIX:
        raise LiverSegInputError(f"preview must end with .png: {path}")
    if path.is_dir():
        raise LiverSegInputError(f"preview is an existing folder, not a file name: {path}")
    if not path.parent.is_dir():
        raise LiverSegInputError(f"preview folder does not exist: {path.parent}")
    return path


def canonical_volume(ct: sitk.Image, label: sitk.Image) -> CanonicalVolume:
    """Both images in canonical (S, P, L) order by axis permutations and flips only (no resampling)."""
    transform = canonical_transform(ct.GetDirection())
    # Canonical axis a is numpy axis transform.axes[a] of the (k, j, i) array, i.e. index axis 2 - axes[a].
    spacing = tuple(float(ct.GetSpacing()[2 - axis]) for axis in transform.axes)
    return CanonicalVolume(
        transform.to_canonical(sitk.GetArrayViewFromImage(ct)).astype(np.float32),
        np.ascontiguousarray(transform.to_canonical(sitk.GetArrayViewFromImage(label))),
        spacing,  # type: ignore[arg-type]
    )


def body_box(ct_hu: np.ndarray, margin_voxels: int = 6) -> tuple[slice, slice, slice]:
    """The body's bounding box (all slices; rows and columns with a margin), so panels are not mostly air.

    The body: the largest connected region above -500 HU (the table is a separate, smaller one).
    """
    regions = sitk.RelabelComponent(
        sitk.ConnectedComponent(sitk.GetImageFromArray((ct_hu > BODY_HU).astype(np.uint8))), sortByObjectSize=True)
    body = sitk.GetArrayViewFromImage(regions) == 1
    box = []
    for axis in range(3):
        hits = np.nonzero(body.any(tuple(a for a in range(3) if a != axis)))[0]
        low, high = (hits[0], hits[-1] + 1) if hits.size else (0, ct_hu.shape[axis])
        pad = 0 if axis == 0 else margin_voxels
        box.append(slice(max(low - pad, 0), min(high + pad, ct_hu.shape[axis])))
    return tuple(box)  # type: ignore[return-value]


def liver_planes(label: np.ndarray) -> tuple[list[int], int, int]:
    """(axial slice indices, cranial first; coronal row; sagittal column) through the liver.

    The axial slices lie at ``AXIAL_FRACTIONS`` of the liver's craniocaudal extent, the reformats through
    its centroid; without a liver, through the volume's middle, so a failed run still shows the scan.
    """
    liver = label >= LIVER.label_value
    if not liver.any():
        n_s, n_p, n_l = label.shape
        return [round((n_s - 1) * (1 - f)) for f in AXIAL_FRACTIONS], n_p // 2, n_l // 2
    s_hits = np.nonzero(liver.any((1, 2)))[0]
    bottom, top = int(s_hits[0]), int(s_hits[-1])  # S grows upwards: the top is the cranial end
    axial = [round(top - f * (top - bottom)) for f in AXIAL_FRACTIONS]
    _, p_centre, l_centre = (round(float(c)) for c in np.argwhere(liver).mean(axis=0))
    return axial, p_centre, l_centre


def _extent_mm(rows: slice, cols: slice, row_mm: float, col_mm: float, rows_up: bool) -> tuple[float, float, float, float]:
    """imshow extent (left, right, bottom, top) in mm; ``rows_up``: the last row at the top (origin 'lower')."""
    left, right = cols.start * col_mm, cols.stop * col_mm
    low, high = rows.start * row_mm, rows.stop * row_mm
    return (left, right, low, high) if rows_up else (left, right, high, low)


def draw_panel(ax: Axes, ct_hu: np.ndarray, label: np.ndarray, extent_mm: tuple[float, float, float, float],
               rows_up: bool, letters: tuple[str, str, str, str], title: str) -> None:
    """One slice at its physical size: CT in the liver window, segment outlines, letters (left, right, top, bottom)."""
    origin = "lower" if rows_up else "upper"
    ax.imshow(ct_hu, cmap="gray", vmin=WINDOW_HU[0], vmax=WINDOW_HU[1], extent=extent_mm, origin=origin,
              interpolation="bilinear")
    if min(label.shape) >= 2:  # a contour needs a 2×2 grid (a one-slice CT has one-row reformats)
        for spec, mask in ((LIVER, label >= LIVER.label_value), (LIVER_LESION, label == LIVER_LESION.label_value)):
            if mask.any():
                ax.contour(mask.astype(np.float32), levels=[0.5], colors=[spec.color_rgb], linewidths=1.2,
                           extent=extent_mm, origin=origin, antialiased=False)
    left, right, top, bottom = letters
    style = {"color": TEXT_RGB, "fontsize": 10, "fontweight": "bold", "transform": ax.transAxes}
    ax.text(0.01, 0.5, left, ha="left", va="center", **style)
    ax.text(0.99, 0.5, right, ha="right", va="center", **style)
    ax.text(0.5, 0.99, top, ha="center", va="top", **style)
    ax.text(0.5, 0.01, bottom, ha="center", va="bottom", **style)
    ax.set_title(title, color=TEXT_RGB, fontsize=9, pad=2)
    ax.set_axis_off()


def title_lines(report: dict) -> list[str]:
    """The run's figures: liver and lesion volumes (or "lesions off"), QC warnings, model, input."""
    model = report.get("model", {})
    if report.get("lesions_segmented"):
        count = report["lesion_count"]
        lesions = f"{count} lesion{'' if count == 1 else 's'}, {report['lesion_total_ml']:.1f} mL"
        lesions += "" if report.get("lesions_validated") else " (experimental)"
    else:
        lesions = "lesions off"
    warnings = report.get("qc_warnings") or []
    qc = "QC: " + ("; ".join(warnings) if warnings else "no warnings")
    name = Path(str(report.get("input", ""))).name
    head = f"liver {report['liver_volume_ml']:.1f} mL  |  {lesions}"
    tail = f"LiverSeg {__version__}, model {model.get('name', '?')} {model.get('version', '?')}" + (f"  |  {name}" if name else "")
    return [head, *textwrap.wrap(qc, 150), tail]


def _row_height_in(panels_wide: int, width_in: float, aspects: list[float]) -> float:
    """The height (inches) a row of equal-width panels needs for the tallest one (aspect = height / width)."""
    return width_in / panels_wide * max(aspects)


def sheet_figure(ct: sitk.Image, label: sitk.Image, report: dict, width_px: int = SHEET_WIDTH_PX,
                 dpi: int = SHEET_DPI):
    """The sheet as a matplotlib Figure (Agg canvas): three axial panels over a coronal and a sagittal one."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    volume = canonical_volume(ct, label)
    s_mm, p_mm, l_mm = volume.spacing_spl_mm
    ss, ps, ls = body_box(volume.ct_hu)
    axial, p_centre, l_centre = liver_planes(volume.label)
    height_s_mm, height_p_mm, width_l_mm = (
        (ss.stop - ss.start) * s_mm, (ps.stop - ps.start) * p_mm, (ls.stop - ls.start) * l_mm)

    width_in = width_px / dpi
    lines = title_lines(report)
    title_in = 0.22 * len(lines) + 0.15
    axial_in = _row_height_in(3, width_in, [height_p_mm / width_l_mm]) + 0.25
    reformat_in = min(_row_height_in(2, width_in, [height_s_mm / width_l_mm, height_s_mm / height_p_mm]) + 0.25,
                      1.5 * axial_in)
    height_in = title_in + axial_in + reformat_in
    figure = Figure(figsize=(width_in, height_in), dpi=dpi, facecolor=BACKGROUND_RGB)
    FigureCanvasAgg(figure)
    grid = figure.add_gridspec(2, 6, left=0.005, right=0.995, top=1 - title_in / height_in, bottom=0.005,
                               height_ratios=[axial_in, reformat_in], hspace=0.05, wspace=0.03)
    for index, s in enumerate(axial):
        fraction = AXIAL_FRACTIONS[index]
        draw_panel(figure.add_subplot(grid[0, 2 * index:2 * index + 2]), volume.ct_hu[s, ps, ls], volume.label[s, ps, ls],
                   _extent_mm(ps, ls, p_mm, l_mm, rows_up=False), False, ("R", "L", "A", "P"),
                   f"axial {fraction:.0%} down the liver (slice {s + 1} of {volume.ct_hu.shape[0]})")
    draw_panel(figure.add_subplot(grid[1, 0:3]), volume.ct_hu[ss, p_centre, ls], volume.label[ss, p_centre, ls],
               _extent_mm(ss, ls, s_mm, l_mm, rows_up=True), True, ("R", "L", "S", "I"),
               f"coronal through the liver's centre ({l_mm:.2f} x {s_mm:.2f} mm voxels)")
    draw_panel(figure.add_subplot(grid[1, 3:6]), volume.ct_hu[ss, ps, l_centre], volume.label[ss, ps, l_centre],
               _extent_mm(ss, ps, s_mm, p_mm, rows_up=True), True, ("A", "P", "S", "I"),
               f"sagittal through the liver's centre ({p_mm:.2f} x {s_mm:.2f} mm voxels)")
    for index, line in enumerate(lines):
        figure.text(0.006, 1 - (0.08 + 0.22 * (index + 0.5)) / height_in, line, color=TEXT_RGB,
                    fontsize=11 if index == 0 else 9, fontweight="bold" if index == 0 else "normal", va="center")
    figure.text(0.994, 1 - 0.19 / height_in, f"window W 400 / L 50 HU;  outlines: {LIVER.name}"
                + (f", {LIVER_LESION.name}" if report.get("lesions_segmented") else ""),
                color=TEXT_RGB, fontsize=8, ha="right", va="center")
    return figure


def sheet_palette() -> list[int]:
    """A fixed palette: ``GREY_LEVELS`` greys, the background, the text and the segment colours with blends.

    Fixed rather than adaptive, so the segment colours are always exact (a small lesion's few pixels are
    never merged into the greys) and the file stays small (few grey levels compress well).
    """
    colours = [(v, v, v) for v in np.linspace(0, 255, GREY_LEVELS).round().astype(int)]
    colours += [tuple(round(255 * c) for c in rgb) for rgb in (BACKGROUND_RGB, TEXT_RGB, FAILED_RGB, FLAGGED_RGB)]
    for spec in (LIVER, LIVER_LESION):
        rgb = np.array(spec.color_rgb) * 255
        colours.append(tuple(int(c) for c in rgb.round()))
        for grey in (0, 96, 192):
            for weight in (0.75, 0.5):  # anti-aliased letters and contour ends over the grey CT
                colours.append(tuple(int(c) for c in (weight * rgb + (1 - weight) * grey).round()))
    flat = [int(c) for rgb in colours for c in rgb]
    return flat + [0] * (768 - len(flat))


def sheet_png(figure) -> bytes:
    """The figure as a palette PNG: rendered by Agg, mapped without dithering onto ``sheet_palette``."""
    from PIL import Image  # Pillow comes with matplotlib

    figure.canvas.draw()
    rgb = Image.fromarray(np.asarray(figure.canvas.buffer_rgba())[..., :3])
    palette = Image.new("P", (1, 1))
    palette.putpalette(sheet_palette())
    buffer = io.BytesIO()
    rgb.quantize(palette=palette, dither=Image.Dither.NONE).save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def write_preview(ct: sitk.Image, label: sitk.Image, report: dict, path: str | os.PathLike) -> int:
    """Draw the sheet and write it atomically to ``path``; returns its size in bytes."""
    data = sheet_png(sheet_figure(ct, label, report))
    with atomic_output(path, PREVIEW_SUFFIX) as temporary:
        Path(temporary).write_bytes(data)
    return len(data)


CONTACT_COLUMNS = 6
CONTACT_ROWS = 8  # 48 cases a page: a cohort of hundreds is a few pages, each a few MB at most
CONTACT_TILE_PX = 300
CONTACT_CAPTION_CHARS = 52  # a caption line that fits under a tile at 7.5 pt
EMPTY_TILE_ASPECT = 0.75  # height / width of a tile without a sheet (a failed case)


def contact_caption(row: dict) -> tuple[str, tuple[float, float, float] | None]:
    """A tile's caption and frame colour: red for a failed case, orange for a case with QC warnings."""
    if row.get("status") == "failed":
        return f"{row['name']}\nFAILED", FAILED_RGB
    lesions = f", {row['lesion_count']} lesion(s)" if str(row.get("lesion_count", "")) not in ("", "None") else ""
    caption = f"{row['name']}\nliver {float(row['liver_ml']):.0f} mL{lesions}"
    if row.get("qc_warnings"):
        return caption + "\n" + textwrap.shorten("QC: " + str(row["qc_warnings"]), CONTACT_CAPTION_CHARS), FLAGGED_RGB
    return caption, None


def _thumbnail(path: Path, width_px: int) -> np.ndarray | None:
    from PIL import Image

    try:
        with Image.open(path) as sheet:
            sheet = sheet.convert("RGB")
            sheet.thumbnail((width_px, width_px * 2))
            return np.asarray(sheet)
    except OSError:
        return None


def contact_sheet_figure(rows: list[dict], out_dir: Path):
    """One page of the cohort: each case's sheet as a thumbnail with its name and liver volume; failed and
    QC-flagged cases framed in red and orange, so they are the first thing seen."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    columns = min(CONTACT_COLUMNS, max(1, len(rows)))
    lines = -(-len(rows) // columns)
    tile_in = CONTACT_TILE_PX / SHEET_DPI
    figure = Figure(figsize=(columns * tile_in, lines * tile_in * 1.05 + 0.3), dpi=SHEET_DPI, facecolor=BACKGROUND_RGB)
    FigureCanvasAgg(figure)
    grid = figure.add_gridspec(lines, columns, left=0.01, right=0.99, top=1 - 0.3 / (lines * tile_in * 1.05 + 0.3),
                               bottom=0.01, hspace=0.35, wspace=0.05)
    failed = sum(1 for row in rows if row.get("status") == "failed")
    flagged = sum(1 for row in rows if row.get("status") != "failed" and row.get("qc_warnings"))
    figure.suptitle(f"LiverSeg cohort: {len(rows)} cases, {failed} failed (red), {flagged} with QC warnings (orange)",
                    color=TEXT_RGB, fontsize=11, y=1 - 0.12 / (lines * tile_in * 1.05 + 0.3), va="top")
    for index, row in enumerate(rows):
        ax = figure.add_subplot(grid[index // columns, index % columns])
        ax.set_facecolor(BACKGROUND_RGB)
        ax.set_xticks([])
        ax.set_yticks([])
        caption, frame = contact_caption(row)
        thumbnail = _thumbnail(out_dir / row["preview"], CONTACT_TILE_PX) if row.get("preview") else None
        if thumbnail is not None:
            ax.imshow(thumbnail, interpolation="antialiased")
        else:  # a blank tile of a sheet's shape, with the error (failed) or a note in it
            ax.set_xlim(0, CONTACT_TILE_PX)
            ax.set_ylim(EMPTY_TILE_ASPECT * CONTACT_TILE_PX, 0)
            ax.set_aspect("equal")
            note = "\n".join(textwrap.wrap(str(row.get("error", "")), 40)[:6]) if row.get("status") == "failed" else "no sheet"
            ax.text(0.5, 0.5, note, color=frame or TEXT_RGB, ha="center", va="center", transform=ax.transAxes, fontsize=7.5)
        for spine in ax.spines.values():
            spine.set_color(frame or BACKGROUND_RGB)
            spine.set_linewidth(3 if frame else 0.5)
        ax.set_xlabel(caption, color=frame or TEXT_RGB, fontsize=7.5, labelpad=2)
    return figure


def write_contact_sheets(rows: list[dict], out_dir: str | os.PathLike) -> list[Path]:
    """``contact_sheet.png`` (then ``contact_sheet_2.png``… for more than 48 cases), written atomically."""
    out_dir = Path(out_dir)
    page_size = CONTACT_COLUMNS * CONTACT_ROWS
    written = []
    for page, start in enumerate(range(0, len(rows), page_size), start=1):
        path = out_dir / ("contact_sheet.png" if page == 1 else f"contact_sheet_{page}.png")
        data = sheet_png(contact_sheet_figure(rows[start:start + page_size], out_dir))
        with atomic_output(path, PREVIEW_SUFFIX) as temporary:
            Path(temporary).write_bytes(data)
        written.append(path)
    return written
