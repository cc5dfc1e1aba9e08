"""What a user can name for ``device`` and ``runtime``: kept free of torch so that the CLI can offer the
choices, and refuse others, before anything heavy is imported."""

DEVICES = ("auto", "cpu", "cuda", "mps")
RUNTIMES = ("auto", "torch", "onnxruntime")
