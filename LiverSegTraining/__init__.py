"""Headless training of the LiverSeg network: data sources, cached slices, augmentation, losses,
multi-cycle training, evaluation, cross-validation by patient, plots and export.

It imports the engine (``LiverSegLib``) for reading, preprocessing, the network and inference; the
engine never imports this package.
"""
