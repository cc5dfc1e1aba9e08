"""LiverSeg engine: liver and liver-lesion segmentation of CT, without Slicer or Qt.

Layers, each importing only layers above it in ``LAYERS`` (``Testing/test_project.py`` checks every
import, lazy ones included):

1. ``errors``, ``options``, ``segments``, ``dependencies``: names and definitions, no imports of ours;
2. ``io`` (the one reader and its checks), ``geometry`` (index axes ↔ patient axes) and ``mincut`` (the
   exact minimum cut of a grid graph, compiled by Numba: the ``graphcut`` extra, imported lazily);
3. ``outputs``: every file written (atomically), label maps, ``.seg.nrrd``, reports, summaries; it knows
   file formats, not the network, so the model cache writes its ONNX export through it too;
   then ``preview`` (the ``--preview`` PNG sheet; matplotlib, imported lazily);
4. ``preprocessing`` → ``model`` → ``runtime`` (torch or ONNX Runtime) → ``inference`` →
   ``postprocessing`` → ``qc`` → ``pipeline`` (the one entry point: a CT image in, a label map out);
5. ``dicom_seg`` (DICOM SEG output) → ``case`` (one case read, segmented and written, as both commands do
   it) → ``batch`` (cohorts on a Dask cluster) → ``cli`` (the ``liverseg`` command);
6. ``job`` (the CLI in a child process) → ``mrml`` (Slicer nodes in and out, through ``job``).

torch is imported only from ``preprocessing`` on, so ``io``, ``outputs``, ``job`` and ``mrml`` (all that
Slicer's own process loads) stay light.
"""

__version__ = "0.1.0"

LAYERS = (
    ("errors", "options", "segments", "dependencies"),
    ("io", "geometry", "mincut"),
    ("outputs",),
    ("preview",),
    ("preprocessing",),
    ("model",),
    ("runtime",),
    ("inference",),
    ("postprocessing",),
    ("qc",),
    ("pipeline",),
    ("dicom_seg",),
    ("case",),
    ("batch",),
    ("cli",),
    ("job",),
    ("mrml",),
)
