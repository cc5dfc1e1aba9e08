"""LiverSeg engine: liver and liver-lesion segmentation of CT, without Slicer or Qt.

Layers, each importing only the ones before it:
``errors`` and ``options`` → ``io`` and ``geometry`` → ``preprocessing`` → ``model`` → ``inference`` →
``postprocessing`` → ``pipeline`` (the one entry point) → ``cli``.
Torch is imported lazily by the layers that need it, so ``io``/``geometry`` stay light.
"""

__version__ = "0.1.0"
