"""Input and output: models and checkpoints, data, atomic output files, verified ONNX export."""
