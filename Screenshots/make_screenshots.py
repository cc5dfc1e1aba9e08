"""Make the two LiverSeg screenshots (Slicer extension catalog, README) from a real run on the shipped sample.

Segments ``LiverSeg/Resources/Samples/CRLM-CT-1004.nii.gz`` (TCIA CRLM, CC BY 4.0) with the engine's
child-process runner ``LiverSegLib.job.SegmentationJob`` on the CPU, then writes:

* ``LiverSeg-overlay.png``: an axial and a coronal slice (abdominal window W 400 / L 50) with the liver and
  liver-lesion segments as semi-transparent fills with outlines, in the segments' colours, at the physical
  aspect ratio and in radiological orientation (axial: patient's right on the image's left, anterior at
  the top; coronal: head at the top), captioned with the run's own figures;
* ``LiverSeg-3d.png``: a smoothed 3D surface rendering of the liver (semi-transparent) and the lesions,
  in patient coordinates (LPS), seen from the front (patient's right on the image's left), rendered
  off-screen with VTK. On Linux without a display the script asks VTK for its EGL window (Mesa's llvmpipe
  where there is no GPU); set ``VTK_DEFAULT_OPENGL_WINDOW=vtkOSOpenGLRenderWindow`` to use OSMesa instead.

Run from the repository root (the project's virtual environment active)::

    LIVERSEG_CACHE=/tmp/lscache python Screenshots/make_screenshots.py [--output-dir Screenshots]
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

# Without a display, ask VTK for its EGL window (its default, the X window, warns before falling back to it).
if sys.platform.startswith("linux") and not os.environ.get("DISPLAY"):
    os.environ.setdefault("VTK_DEFAULT_OPENGL_WINDOW", "vtkEGLRenderWindow")

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import SimpleITK as sitk
from matplotlib.patches import Patch
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT / "LiverSeg"))  # the engine (LiverSegLib) lives there

import LiverSegLib
from LiverSegLib.job import SegmentationJob, SegmentationOptions
from LiverSegLib.preview import WINDOW_HU
from LiverSegLib.preview import body_box as crop_box  # the body's bounding box, so slices are not mostly air
from LiverSegLib.segments import LIVER, LIVER_LESION

SAMPLE = REPO_ROOT / "LiverSeg" / "Resources" / "Samples" / "CRLM-CT-1004.nii.gz"
SAMPLE_CREDIT = "CT: TCIA Colorectal-Liver-Metastases (CRLM), CC BY 4.0"
FILL_ALPHA = {1: 0.3, 2: 0.45}  # by label value: the small lesions a little stronger
BACKGROUND = "#111318"


@dataclass
class Run:
    """A finished segmentation: the CT and its label map (both LPS-oriented) and the run's report."""

    name: str
    ct: sitk.Image
    label: sitk.Image
    report: dict
    seconds: float


# -- the run --


def sample_name(path: Path) -> str:
    """``CRLM-CT-1004`` for ``CRLM-CT-1004.nii.gz``."""
    name = path.name
    for suffix in (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def segment(input_path: Path, device: str) -> Run:
    """Segment with the engine in a child process (what the Slicer module does) and read back the result."""
    started = time.monotonic()
    job = SegmentationJob(input_path, SegmentationOptions(device=device))
    try:
        job.wait()
        label = job.label_image()  # raises for a failed or cancelled job
        report = dict(job.report)
    finally:
        job.close()
    seconds = time.monotonic() - started
    ct = sitk.ReadImage(str(input_path))
    # One orientation for drawing: array axes (z, y, x) increase towards patient superior, posterior, left.
    return Run(sample_name(input_path), sitk.DICOMOrient(ct, "LPS"), sitk.DICOMOrient(label, "LPS"), report, seconds)


def caption(run: Run) -> str:
    """The run's figures in one line, e.g. 'LiverSeg 0.1.0 (model ... 0.2.0) on CRLM-CT-1004: liver 1282.7 mL, ...'."""
    report = run.report
    model = report["model"]
    text = (f"LiverSeg {LiverSegLib.__version__} (model {model['name']} {model['version']}) on {run.name}: "
            f"liver {report['liver_volume_ml']:.1f} mL")
    if report.get("lesions_segmented"):
        count = report["lesion_count"]
        text += f", {count} lesion{'s' if count != 1 else ''} {report['lesion_total_ml']:.1f} mL"
        text += "" if report.get("lesions_validated") else " (experimental)"
    return text


# -- the slices --


def choose_slices(label: np.ndarray) -> tuple[int, int]:
    """(axial z, coronal y): through the largest lesion if there is one, else through the most liver."""
    lesion = sitk.GetImageFromArray((label == LIVER_LESION.label_value).astype(np.uint8))
    components = sitk.ConnectedComponent(lesion)
    shapes = sitk.LabelShapeStatisticsImageFilter()
    shapes.Execute(components)
    if shapes.GetNumberOfLabels():
        largest = max(shapes.GetLabels(), key=shapes.GetNumberOfPixels)
        parts = sitk.GetArrayViewFromImage(components) == largest
        return int(parts.sum((1, 2)).argmax()), int(parts.sum((0, 2)).argmax())
    liver = label >= LIVER.label_value
    return int(liver.sum((1, 2)).argmax()), int(liver.sum((0, 2)).argmax())


def overlay_rgba(label: np.ndarray) -> np.ndarray:
    """Semi-transparent fills: liver parenchyma and lesions in their segment colours, the rest clear."""
    rgba = np.zeros(label.shape + (4,), dtype=float)
    for spec in (LIVER, LIVER_LESION):
        rgba[label == spec.label_value] = (*spec.color_rgb, FILL_ALPHA[spec.label_value])
    return rgba


def draw_slice(ax: plt.Axes, ct: np.ndarray, label: np.ndarray, extent: tuple[float, float, float, float],
               origin: str, marks: tuple[str, str, str, str], title: str) -> None:
    """One slice at its physical size (extent in mm): fills, outlines, orientation letters (left, right, top, bottom)."""
    ax.imshow(ct, cmap="gray", vmin=WINDOW_HU[0], vmax=WINDOW_HU[1], extent=extent, origin=origin,
              interpolation="bilinear")
    ax.imshow(overlay_rgba(label), extent=extent, origin=origin, interpolation="nearest")
    for spec, mask in ((LIVER, label >= LIVER.label_value), (LIVER_LESION, label == LIVER_LESION.label_value)):
        if mask.any():
            ax.contour(mask.astype(float), levels=[0.5], colors=[spec.color_rgb], linewidths=1.1, extent=extent,
                       origin=origin)
    left, right, top, bottom = marks
    style = {"color": "#d8d8d8", "fontsize": 9, "fontweight": "bold", "transform": ax.transAxes}
    ax.text(0.015, 0.5, left, ha="left", va="center", **style)
    ax.text(0.985, 0.5, right, ha="right", va="center", **style)
    ax.text(0.5, 0.985, top, ha="center", va="top", **style)
    ax.text(0.5, 0.015, bottom, ha="center", va="bottom", **style)
    ax.set_title(title, color="#d8d8d8", fontsize=9, pad=3)
    ax.set_axis_off()


def overlay_figure(run: Run, width_px: int, dpi: int = 150) -> plt.Figure:
    """Axial and coronal slices side by side, each at its physical aspect, with a legend and the caption."""
    ct = sitk.GetArrayFromImage(run.ct).astype(np.float32)
    label = sitk.GetArrayFromImage(run.label)
    z, y = choose_slices(label)
    zs, ys, xs = crop_box(ct)
    sx, sy, sz = run.ct.GetSpacing()
    x0, x1 = xs.start * sx, xs.stop * sx
    axial_extent = (x0, x1, ys.stop * sy, ys.start * sy)  # origin 'upper': row 0 (anterior) at the top
    coronal_extent = (x0, x1, zs.start * sz, zs.stop * sz)  # origin 'lower': the last slice (superior) at the top
    axial_h, coronal_h = (ys.stop - ys.start) * sy, (zs.stop - zs.start) * sz

    width_in = width_px / dpi
    panel_w = width_in / 2
    height_in = panel_w * max(axial_h, coronal_h) / (x1 - x0) + 0.75
    fig = plt.figure(figsize=(width_in, height_in), dpi=dpi, facecolor=BACKGROUND)
    grid = fig.add_gridspec(1, 2, left=0.005, right=0.995, top=1 - 0.3 / height_in, bottom=0.45 / height_in,
                            wspace=0.02)
    axial, coronal = fig.add_subplot(grid[0, 0]), fig.add_subplot(grid[0, 1])
    draw_slice(axial, ct[z, ys, xs], label[z, ys, xs], axial_extent, "upper", ("R", "L", "A", "P"),
               f"axial, slice {z + 1} of {ct.shape[0]}")
    draw_slice(coronal, ct[zs, y, xs], label[zs, y, xs], coronal_extent, "lower", ("R", "L", "S", "I"),
               f"coronal ({sx:.2f} x {sz:.1f} mm pixels)")
    handles = [Patch(facecolor=(*LIVER.color_rgb, 0.6), edgecolor=LIVER.color_rgb, label=LIVER.name),
               Patch(facecolor=(*LIVER_LESION.color_rgb, 0.8), edgecolor=LIVER_LESION.color_rgb,
                     label=LIVER_LESION.name + ("" if run.report.get("lesions_validated") else " (experimental)"))]
    fig.legend(handles=handles, loc="lower right", bbox_to_anchor=(0.995, 0.0), ncol=2, fontsize=7.5, frameon=False,
               labelcolor="#d8d8d8", handlelength=1.2, borderaxespad=0.3)
    fig.text(0.006, 0.24 / height_in, caption(run), color="#f0f0f0", fontsize=7.5, va="center")
    fig.text(0.006, 0.08 / height_in, f"{SAMPLE_CREDIT}; window W 400 / L 50 HU", color="#9a9a9a", fontsize=6.5,
             va="center")
    return fig


def figure_image(fig: plt.Figure) -> Image.Image:
    """The figure as an RGB picture at its own size and dpi."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=fig.dpi, facecolor=fig.get_facecolor())
    plt.close(fig)
    buffer.seek(0)
    return Image.open(buffer).convert("RGB")


# -- the 3D rendering --


def segment_box(label: sitk.Image, values: list[int], margin_mm: float = 8.0) -> sitk.Image:
    """The segment's voxels (0/1 float) in its bounding box plus a margin of empty voxels, on ``label``'s grid."""
    mask = np.isin(sitk.GetArrayViewFromImage(label), values)
    inside = np.nonzero(mask)  # (z, y, x) indices
    spacing = np.array(label.GetSpacing())
    pad = np.maximum(2, np.ceil(margin_mm / spacing)).astype(int)  # (x, y, z) voxels: room for caps and blur
    low = np.array([inside[2 - axis].min() for axis in range(3)])
    high = np.array([inside[2 - axis].max() + 1 for axis in range(3)])
    box = np.pad(mask[low[2]:high[2], low[1]:high[1], low[0]:high[0]], [(p, p) for p in pad[::-1]])
    image = sitk.GetImageFromArray(box.astype(np.float32))
    image.SetSpacing(tuple(spacing))
    image.SetDirection(label.GetDirection())
    first = (low - pad) * spacing  # the padded box's first voxel in image millimetres (it may lie outside)
    image.SetOrigin(tuple(np.array(label.GetOrigin()) + np.array(label.GetDirection()).reshape(3, 3) @ first))
    return image


def to_fine_grid(image: sitk.Image, step_mm: float, outside: float) -> sitk.Image:
    """Linear resampling onto ``step_mm`` isotropic voxels over the same box."""
    size = [round(n * s / step_mm) for n, s in zip(image.GetSize(), image.GetSpacing())]
    return sitk.Resample(image, size, sitk.Transform(), sitk.sitkLinear, image.GetOrigin(), [step_mm] * 3,
                         image.GetDirection(), outside, sitk.sitkFloat32)


def interpolated_distance(label: sitk.Image, values: list[int], step_mm: float = 1.0,
                          sigma_mm: float = 1.5) -> sitk.Image:
    """Shape-based interpolation between slices (for the liver): zero level = the surface, negative inside.

    Each axial slice's signed in-plane distance (mm) to the segment's outline, interpolated linearly onto
    fine isotropic voxels and blurred a little, blends one slice's outline into the next: contouring the
    5 mm slices directly would show them as terraces. Slices without the segment get +slice spacing, which
    closes the ends with rounded caps.
    """
    box = segment_box(label, values)
    mask = sitk.GetArrayViewFromImage(box) > 0
    empty_mm = box.GetSpacing()[2]
    distances = np.full(mask.shape, empty_mm, dtype=np.float32)
    for z in np.nonzero(mask.any((1, 2)))[0]:
        plane = sitk.GetImageFromArray(mask[z].astype(np.uint8))
        plane.SetSpacing(box.GetSpacing()[:2])
        distances[z] = sitk.GetArrayFromImage(sitk.SignedMaurerDistanceMap(  # a copy: a view would outlive the image
            plane, insideIsPositive=False, squaredDistance=False, useImageSpacing=True))
    field = sitk.GetImageFromArray(distances)
    field.CopyInformation(box)
    return sitk.SmoothingRecursiveGaussian(to_fine_grid(field, step_mm, empty_mm), sigma_mm)


def blurred_mask(label: sitk.Image, values: list[int], step_mm: float = 0.5,
                 sigma_mm: tuple[float, float, float] = (1.0, 1.0, 1.5)) -> sitk.Image:
    """The segment's 0/1 mask blurred and on fine voxels, negated so that -0.5 is its surface (for the lesions).

    Lesions of one or two 5 mm slices would thin to lenses under shape-based interpolation; a blurred
    mask keeps their voxels' extent (rounded slabs), as Slicer's smoothed closed surface does.
    """
    blurred = sitk.SmoothingRecursiveGaussian(segment_box(label, values), list(sigma_mm))
    return to_fine_grid(-blurred, step_mm, 0.0)


def surface(field: sitk.Image, level: float, smoothing_iterations: int = 15, pass_band: float = 0.05):
    """The ``level`` surface of a smooth field (lower inside), lightly smoothed, in LPS millimetres (vtkPolyData).

    Contoured with flying edges, smoothed with a windowed-sinc filter (as Slicer smooths its closed
    surfaces) and moved from image millimetres to LPS with the field's origin and direction.
    """
    from vtkmodules.util.numpy_support import numpy_to_vtk
    from vtkmodules.vtkCommonDataModel import vtkImageData
    from vtkmodules.vtkCommonMath import vtkMatrix4x4
    from vtkmodules.vtkCommonTransforms import vtkTransform
    from vtkmodules.vtkFiltersCore import (
        vtkFlyingEdges3D,
        vtkPolyDataNormals,
        vtkWindowedSincPolyDataFilter,
    )
    from vtkmodules.vtkFiltersGeneral import vtkTransformPolyDataFilter

    array = sitk.GetArrayViewFromImage(field)  # (z, y, x): x fastest, as VTK stores points
    image = vtkImageData()
    image.SetDimensions(array.shape[2], array.shape[1], array.shape[0])
    image.SetSpacing(field.GetSpacing())
    image.SetOrigin(0.0, 0.0, 0.0)
    image.GetPointData().SetScalars(numpy_to_vtk(np.ascontiguousarray(array).ravel(), deep=True))

    contour = vtkFlyingEdges3D()
    contour.SetInputData(image)
    contour.SetValue(0, level)
    contour.ComputeNormalsOff()
    smoother = vtkWindowedSincPolyDataFilter()
    smoother.SetInputConnection(contour.GetOutputPort())
    smoother.SetNumberOfIterations(smoothing_iterations)
    smoother.SetPassBand(pass_band)
    smoother.BoundarySmoothingOff()
    smoother.FeatureEdgeSmoothingOff()
    smoother.NonManifoldSmoothingOn()
    smoother.NormalizeCoordinatesOn()

    # Index-times-spacing millimetres to LPS: point = origin + direction @ (index * spacing).
    matrix = vtkMatrix4x4()
    direction = np.array(field.GetDirection()).reshape(3, 3)
    for row in range(3):
        for col in range(3):
            matrix.SetElement(row, col, direction[row, col])
        matrix.SetElement(row, 3, field.GetOrigin()[row])
    transform = vtkTransform()
    transform.SetMatrix(matrix)
    to_patient = vtkTransformPolyDataFilter()
    to_patient.SetInputConnection(smoother.GetOutputPort())
    to_patient.SetTransform(transform)
    normals = vtkPolyDataNormals()
    normals.SetInputConnection(to_patient.GetOutputPort())
    normals.SplittingOff()
    normals.ConsistencyOn()
    normals.Update()
    return normals.GetOutput()


def render_3d(run: Run, width_px: int, supersample: int = 2) -> tuple[Image.Image, str]:
    """The liver (semi-transparent) and lesions from the front, off-screen; the picture and VTK's window class."""
    import vtkmodules.vtkRenderingOpenGL2  # noqa: F401  (registers the OpenGL render window)
    from vtkmodules.util.numpy_support import vtk_to_numpy
    from vtkmodules.vtkRenderingCore import (
        vtkActor,
        vtkPolyDataMapper,
        vtkRenderer,
        vtkRenderWindow,
        vtkWindowToImageFilter,
    )

    height_px = int(width_px * 0.75)
    window = vtkRenderWindow()
    window.SetOffScreenRendering(1)
    window.SetSize(width_px * supersample, height_px * supersample)
    window.SetMultiSamples(0)  # anti-aliasing by rendering at ``supersample`` times the size instead
    window.SetAlphaBitPlanes(1)
    renderer = vtkRenderer()
    renderer.SetBackground(0.067, 0.075, 0.094)
    renderer.SetUseDepthPeeling(1)  # exact translucency (the liver's front and back faces over the lesions)
    renderer.SetMaximumNumberOfPeels(16)
    renderer.SetOcclusionRatio(0.0)
    window.AddRenderer(renderer)

    liver = interpolated_distance(run.label, [LIVER.label_value, LIVER_LESION.label_value])
    parts = [(surface(liver, 0.0), LIVER.color_rgb, 0.35)]
    if (sitk.GetArrayViewFromImage(run.label) == LIVER_LESION.label_value).any():
        parts.append((surface(blurred_mask(run.label, [LIVER_LESION.label_value]), -0.5), LIVER_LESION.color_rgb, 1.0))
    for polydata, color, opacity in parts:
        mapper = vtkPolyDataMapper()
        mapper.SetInputData(polydata)
        mapper.ScalarVisibilityOff()
        actor = vtkActor()
        actor.SetMapper(mapper)
        prop = actor.GetProperty()
        prop.SetColor(*color)
        prop.SetOpacity(opacity)
        prop.SetAmbient(0.1)
        prop.SetSpecular(0.25)
        prop.SetSpecularPower(30)
        renderer.AddActor(actor)

    # LPS: anterior is -y. The camera stands in front of the patient looking backwards (+y), head up (+z),
    # so the screen's right is +x, the patient's left: the patient's right is on the image's left.
    liver_bounds = parts[0][0].GetBounds()
    center = [(liver_bounds[2 * i] + liver_bounds[2 * i + 1]) / 2 for i in range(3)]
    camera = renderer.GetActiveCamera()
    camera.SetFocalPoint(*center)
    camera.SetPosition(center[0], center[1] - 1000.0, center[2])
    camera.SetViewUp(0.0, 0.0, 1.0)
    camera.SetViewAngle(20.0)
    renderer.ResetCamera(liver_bounds)
    camera.Zoom(1.35)
    renderer.ResetCameraClippingRange()
    window.Render()

    grabber = vtkWindowToImageFilter()
    grabber.SetInput(window)
    grabber.SetInputBufferTypeToRGB()
    grabber.ReadFrontBufferOff()
    grabber.Update()
    output = grabber.GetOutput()
    w, h, _ = output.GetDimensions()
    pixels = vtk_to_numpy(output.GetPointData().GetScalars()).reshape(h, w, 3)[::-1]  # VTK rows run bottom-up
    window_class = window.GetClassName()
    window.Finalize()
    picture = Image.fromarray(np.ascontiguousarray(pixels)).resize((width_px, height_px), Image.LANCZOS)
    return picture, window_class


def annotate_3d(picture: Image.Image, run: Run) -> Image.Image:
    """The caption, orientation letters and the credit under and on the rendering (matplotlib's text)."""
    dpi = 150
    w, h = picture.size
    footer = 60
    fig = plt.figure(figsize=(w / dpi, (h + footer) / dpi), dpi=dpi, facecolor=BACKGROUND)
    ax = fig.add_axes((0, footer / (h + footer), 1, h / (h + footer)))
    ax.imshow(np.asarray(picture), interpolation="nearest")
    ax.set_axis_off()
    style = {"color": "#d8d8d8", "fontsize": 9, "fontweight": "bold", "transform": ax.transAxes}
    ax.text(0.015, 0.5, "R", ha="left", va="center", **style)
    ax.text(0.985, 0.5, "L", ha="right", va="center", **style)
    ax.text(0.5, 0.985, "S", ha="center", va="top", **style)
    ax.text(0.5, 0.015, "I", ha="center", va="bottom", **style)
    ax.text(0.015, 0.985, "anterior view", color="#d8d8d8", fontsize=8, ha="left", va="top", transform=ax.transAxes)
    handles = [Patch(facecolor=LIVER.color_rgb, alpha=0.6, label=LIVER.name),
               Patch(facecolor=LIVER_LESION.color_rgb, label=LIVER_LESION.name)]
    ax.legend(handles=handles, loc="upper right", fontsize=7.5, frameon=False, labelcolor="#d8d8d8", handlelength=1.2)
    fig.text(0.006, 0.62 * footer / (h + footer), caption(run), color="#f0f0f0", fontsize=7.5, va="center")
    note = "; liver surface interpolated between the 5 mm slices, surfaces smoothed"
    fig.text(0.006, 0.22 * footer / (h + footer), SAMPLE_CREDIT + note,
             color="#9a9a9a", fontsize=6.5, va="center")
    return figure_image(fig)


# -- writing --


def save_small_png(picture: Image.Image, path: Path, budget_kb: float = 140.0) -> int:
    """A palette PNG (median-cut quantized, optimized) with as many colours as fit ``budget_kb``; returns its size.

    Median cut keeps smooth shading and the CT's grey levels close (mean error under one level at 64
    colours here); Pillow's fast octree is smaller still but posterizes the 3D shading.
    """
    for colors in (256, 192, 128, 96, 64, 48, 32):
        small = picture.quantize(colors=colors, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
        buffer = io.BytesIO()
        small.save(buffer, format="PNG", optimize=True)
        if buffer.tell() <= budget_kb * 1024:
            break
    path.write_bytes(buffer.getvalue())
    return buffer.tell()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", type=Path, default=REPO_ROOT / "Screenshots")
    parser.add_argument("--input", type=Path, default=SAMPLE, help="CT to segment (default: the shipped sample)")
    parser.add_argument("--device", default="cpu", help="the engine's --device (default: cpu)")
    parser.add_argument("--width", type=int, default=1000, help="picture width in pixels (default: 1000)")
    args = parser.parse_args(argv)

    started = time.monotonic()
    args.output_dir.mkdir(parents=True, exist_ok=True)
    run = segment(args.input, args.device)
    print(f"segmented {run.name} in {run.seconds:.1f} s (SegmentationJob, child process): {caption(run)}")

    overlay_path = args.output_dir / "LiverSeg-overlay.png"
    size = save_small_png(figure_image(overlay_figure(run, args.width)), overlay_path)
    print(f"wrote {overlay_path} ({size / 1024:.1f} KB)")

    picture, window_class = render_3d(run, args.width)
    print(f"VTK rendered off-screen with {window_class}")
    render_path = args.output_dir / "LiverSeg-3d.png"
    size = save_small_png(annotate_3d(picture, run), render_path)
    print(f"wrote {render_path} ({size / 1024:.1f} KB)")
    print(f"done in {time.monotonic() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
