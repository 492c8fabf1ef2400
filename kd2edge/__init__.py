"""kd2edge: teacher LLM -> distilled, 4-bit, ONNX, profiled, evaluated, packaged edge artifact.

Importing this package is cheap: no torch, no transformers. Heavy libraries are
imported inside the functions that need them.
"""

__version__ = "0.1.0"
