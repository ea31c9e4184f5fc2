"""Exports of jaxvision models to other runtimes (ONNX: `jaxvision.export.onnx`)."""
