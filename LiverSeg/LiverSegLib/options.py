"""What a user can name for ``device``, ``runtime`` and a batch's output ``format``: kept free of torch so that the CLI can offer the
choices, and refuse others, before anything heavy is imported."""

DEVICES = ("auto", "cpu", "cuda", "mps")
RUNTIMES = ("auto", "torch", "onnxruntime")
PRECISIONS = ("auto", "fp32")  # auto: the card's int8 graph on the CPU when it ships one
BATCH_FORMATS = {"nii.gz": ".nii.gz", "seg.nrrd": ".seg.nrrd", "dcm": ".dcm"}  # --format → output suffix
