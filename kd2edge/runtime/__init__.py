"""What the device image runs: the ONNX language model, the HTTP server and the profiler.

Every module here imports only the standard library, numpy, onnxruntime, tokenizers and
jinja2 at module level (psutil and tqdm optional), and runs on Python 3.10 (the JetPack 6
image): `kd2edge.package` copies this package into the image and checks that by reading
the imports. torch and transformers are never imported here.

- `lm`: `OnnxLM`, the exported artifact with its KV cache, tokenizer and chat template.
- `serve`: the HTTP server (`kd2edge serve`, the image's default command).
- `profiler`, `host`, `stats`, `budgets`: latency, memory and size measurement and the budget verdicts.
- `entrypoint`: the image's command line (serve / profile / healthcheck).
"""
