"""What the device image runs: the ONNX language model, the HTTP server and the profiler.

Every module here imports only the standard library, numpy, onnxruntime, tokenizers,
jinja2 and the HTTP server's libraries (uvicorn, starlette, prometheus_client) at module
level (psutil and tqdm optional), and runs on Python 3.10 (the JetPack 6 image):
`kd2edge.package` copies the modules the entrypoint reaches into the image and checks that
by reading the imports. torch and transformers are never imported here.

- `lm`: `OnnxLM`, the exported artifact with its KV cache, tokenizer and chat template.
- `service`: request validation, the bounded queue, one generation at a time (no HTTP).
- `app`, `metrics`: the HTTP API (Starlette) and its Prometheus metrics.
- `serve`: the server (uvicorn; `kd2edge serve`, the image's default command).
- `access`: whether this user can read the artifact (a one-line error instead of onnxruntime's).
- `profiler`, `host`, `stats`, `budgets`: latency, memory and size measurement and the budget verdicts.
- `entrypoint`: the image's command line (serve / profile / healthcheck).
"""
