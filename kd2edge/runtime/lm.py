"""Run an exported artifact: ONNX decoder with a KV cache, tokenizers, a jinja2 chat template.

This module is what ships on the device, so it imports only the standard library,
numpy, onnxruntime, tokenizers and jinja2 (never torch or transformers, not even
indirectly: `kd2edge/__init__.py` and `kd2edge/errors.py` import nothing heavy).

It runs every artifact layout the export stage writes:
  - "onnx", traced: optimum-style decoder (inputs input_ids, attention_mask, [position_ids],
    past_key_values.{i}.key/.value; outputs logits, present.{i}.key/.value),
  - "onnx", fused (Llama family, `exporters/fused.py`): the same names without position_ids,
    GroupQueryAttention deriving positions from attention_mask,
  - "onnx-genai": onnxruntime-genai's model builder (the fused names, genai_config.json).
Both are driven with plain onnxruntime sessions; tokenization always goes through
`tokenizers` (genai's own tokenizer mis-decodes some byte-level BPE vocabularies).

    lm = OnnxLM.load("runs/demo/export")
    ids = lm.encode(lm.format_prompt("Who founded the Velmora Institute?"))
    out = lm.generate(ids, max_new_tokens=32)
    print(out.text, out.ttft_s)
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from kd2edge.errors import ArtifactError, ConfigError, DataError

MODEL_FILE = "model.onnx"
GENAI_CONFIG = "genai_config.json"
_ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}
# The exporter's contract with this runtime (exporters/fused.py writes both):
# a graph whose metadata has SHARED_KV_METADATA = "1" lets past and present KV share one buffer
# (GroupQueryAttention appends in place), and an input LOGITS_TO_KEEP (int64 [1]) limits the
# logits to the last positions (0: all).
SHARED_KV_METADATA = "kd2edge.past_present_share_buffer"
LOGITS_TO_KEEP = "logits_to_keep"
KV_CHUNK = 256            # a growing shared KV buffer gets room for this many more tokens at a time


@dataclass
class Generation:
    """The result of `OnnxLM.generate`.

    `tokens` are the new tokens (the stop token included when one ended the answer,
    as transformers' generate does); `text` is their decoding without special tokens.
    """

    tokens: list[int]
    text: str
    ttft_s: float                      # prefill + first token
    token_latencies_s: list[float]     # each later decode step
    prompt_tokens: int
    stop_reason: str = "length"        # "stop" (a stop token) or "length" (max_new_tokens)

    @property
    def decode_tokens_per_s(self) -> float | None:
        """Decode rate after the first token (None with fewer than two tokens)."""
        total = sum(self.token_latencies_s)
        return len(self.token_latencies_s) / total if total > 0 else None


@dataclass
class KVCache:
    """Past keys/values of one sequence, kept as onnxruntime values between steps.

    Two layouts, chosen by the graph (`OnnxLM.shares_kv_buffer`):
      - shared: one preallocated buffer per past input, [1, kv_heads, capacity, head_dim],
        bound as both past input and present output; GroupQueryAttention writes each step's
        keys/values in place at rows [length, length + new), so no token copies the cache.
        `buffers` are the numpy arrays the OrtValues live in; `binding` is reused every step.
      - growing (traced graphs): each step returns new present tensors [1, kv_heads, length,
        head_dim] that replace `values`.
    """

    values: list = field(default_factory=list)   # OrtValue per past input, in `names` order
    length: int = 0
    names: list[str] = field(default_factory=list)
    capacity: int | None = None                   # rows of each shared buffer; None: growing
    buffers: list = field(default_factory=list)   # shared: the numpy arrays behind `values`
    binding: object = None                        # shared: the IOBinding holding past/present
    bound: dict = field(default_factory=dict)     # shared: input/output name -> the object `binding` points at
    # Per sequence, so that two sequences can run at once: the decode step's input id [1, 1] and the
    # one-position logits [1, 1, vocab] (with the OrtValue over them), written in place every step.
    token: np.ndarray = field(default_factory=lambda: np.zeros((1, 1), dtype=np.int64))
    logits: np.ndarray | None = None
    logits_value: object = None

    def arrays(self) -> dict[str, np.ndarray]:
        """What the cache holds: past input name -> float array [1, kv_heads, length, head_dim] (a copy)."""
        if self.capacity is not None:
            return {n: np.array(b[:, :, :self.length]) for n, b in zip(self.names, self.buffers)}
        return {n: np.array(v.numpy()) for n, v in zip(self.names, self.values)}


class OnnxLM:
    """A causal LM exported to ONNX, with its tokenizer and chat template."""

    def __init__(self, path: Path, session, tokenizer, *, chat_template: str | None, special_tokens: dict,
                 eos_token_ids: list[int], context_length: int, notes: list[str], manifest: dict):
        self.path = path
        self.session = session
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self.eos_token_ids = eos_token_ids
        self.context_length = context_length
        self.notes = notes
        self.manifest = manifest
        self._special_tokens = special_tokens
        self._template = None
        inputs = {i.name: i for i in session.get_inputs()}
        self._past_names = sorted((n for n in inputs if n.startswith("past_key_values.")), key=_layer_order)
        self._present_names = [n.replace("past_key_values.", "present.") for n in self._past_names]
        self._output_names = ["logits"] + self._present_names
        self._has_mask = "attention_mask" in inputs
        self._has_positions = "position_ids" in inputs
        self._has_keep = LOGITS_TO_KEEP in inputs
        outputs = {o.name: o for o in session.get_outputs()}
        missing = [n for n in self._output_names if n not in outputs]
        if "input_ids" not in inputs or not self._past_names or missing:
            raise ArtifactError(f"{path / MODEL_FILE} is not a decoder with a KV cache (needs input_ids, "
                                f"past_key_values.*, logits, present.*): re-export it with `kd2edge export`")
        self._kv_shape, self._kv_dtype = _kv_layout(inputs[self._past_names[0]], path)
        metadata = session.get_modelmeta().custom_metadata_map
        # Shared buffers need GQA's in-place append and a mask that states the length (the fused graph)
        self.shares_kv_buffer = metadata.get(SHARED_KV_METADATA) == "1" and self._has_mask
        vocab = outputs["logits"].shape[-1]
        self._vocab = vocab if isinstance(vocab, int) else None
        # Read-only arrays every step may bind (io_binding points at their memory): the mask's ones
        # (a view of the first `total`), the usual logits_to_keep values.
        self._ones = np.ones((1, 0), dtype=np.int64)
        self._keep = {k: np.array([k], dtype=np.int64) for k in (0, 1)}

    # ------------------------------------------------------------------ loading
    @classmethod
    def load(cls, path: str | os.PathLike, providers: Sequence[str] | None = None, threads: int | None = None,
             allow_fallback: bool = False, session_config: dict[str, str] | None = None) -> "OnnxLM":
        """Open an exported artifact folder.

        Args:
            path: the export stage's output folder (or any folder holding model.onnx,
                tokenizer.json and config.json / genai_config.json).
            providers: onnxruntime execution providers in order of preference (default CPU).
            threads: intra-op threads (default: onnxruntime's choice, one per core).
            allow_fallback: run on CPU (noted in `.notes`) when a requested provider is missing.
            session_config: onnxruntime session config entries, e.g.
                {"session.intra_op.allow_spinning": "0"} (benchmarks/bench_decode_overhead.py measures it).

        Returns:
            The loaded model.

        Raises:
            ArtifactError: not a folder, a required file missing, or an unreadable ONNX model.
            ConfigError: a requested execution provider is not available on this host.
        """
        import onnxruntime as ort
        from tokenizers import Tokenizer

        path = Path(path)
        if not path.is_dir():
            raise ArtifactError(f"{path} is not a folder: give the output folder of `kd2edge export`")
        manifest = _read_json(path / "manifest.json") if (path / "manifest.json").is_file() else {}
        genai = (path / GENAI_CONFIG).is_file()
        required = [MODEL_FILE, "tokenizer.json", GENAI_CONFIG if genai else "config.json"]
        required += [f for f in manifest.get("files", []) if f not in required]
        missing = [f for f in required if not (path / f).is_file()]
        if missing:
            raise ArtifactError(f"{path} is not a complete exported artifact: missing {', '.join(missing)}; "
                                f"re-run `kd2edge export`")
        notes: list[str] = []
        chosen = _choose_providers(list(providers or ["CPUExecutionProvider"]), ort.get_available_providers(),
                                   allow_fallback, notes)
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.inter_op_num_threads = 1
        if threads:
            options.intra_op_num_threads = int(threads)
        for key, value in (session_config or {}).items():
            options.add_session_config_entry(key, str(value))
        try:
            session = ort.InferenceSession(str(path / MODEL_FILE), options, providers=chosen)
        except _ort_load_errors() as e:
            raise ArtifactError(f"{path / MODEL_FILE} cannot be loaded by onnxruntime "
                                f"({str(e).splitlines()[0][:200]}): re-run `kd2edge export`") from None
        in_use = session.get_providers()
        lost = [p for p in chosen if p not in in_use]
        if lost:  # listed as available but failed to initialise (e.g. CUDA libraries missing)
            if not allow_fallback:
                raise ConfigError(f"execution provider {lost[0]} failed to start on this host: install its "
                                  f"libraries or choose another provider (or allow CPU fallback)",
                                  source="runtime")
            notes.append(f"{', '.join(lost)} failed to start; running on {', '.join(in_use)}")
        try:
            tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
        except Exception as e:  # noqa: BLE001 - tokenizers raises a bare Exception for a bad file
            raise ArtifactError(f"{path}/tokenizer.json is unreadable ({e}): re-run `kd2edge export`") from None
        tok_config = _read_json(path / "tokenizer_config.json") if (path / "tokenizer_config.json").is_file() else {}
        special = _special_tokens(tok_config, path)
        config = _read_json(path / "config.json") if (path / "config.json").is_file() else {}
        genai_config = _read_json(path / GENAI_CONFIG) if genai else {}
        gen_config = _read_json(path / "generation_config.json") if (path / "generation_config.json").is_file() else {}
        context = (config.get("max_position_embeddings") or config.get("n_positions")
                   or genai_config.get("model", {}).get("context_length") or 2048)
        eos = _eos_ids(gen_config, config, genai_config.get("model", {}), tokenizer, special)
        return cls(path, session, tokenizer, chat_template=_chat_template(path, tok_config),
                   special_tokens=special, eos_token_ids=eos, context_length=int(context), notes=notes,
                   manifest=manifest)

    @property
    def providers(self) -> list[str]:
        """The execution providers the session runs on."""
        return self.session.get_providers()

    @property
    def format(self) -> str:
        """"onnx-genai" for model-builder artifacts, else "onnx"."""
        return self.manifest.get("format") or ("onnx-genai" if (self.path / GENAI_CONFIG).is_file() else "onnx")

    # ---------------------------------------------------------------- text side
    def format_prompt(self, user_text: str) -> str:
        """The prompt for one user turn, through the model's chat template.

        Renders the template as transformers' `apply_chat_template(messages,
        add_generation_prompt=True, tokenize=False)` does; without a template the text
        is returned unchanged.
        """
        if not self.chat_template:
            return user_text
        if self._template is None:
            self._template = _compile_template(self.chat_template)
        return self._template.render(messages=[{"role": "user", "content": user_text}], tools=None,
                                     documents=None, add_generation_prompt=True, **self._special_tokens)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of `text`.

        Special tokens are not added by default, as for a chat-formatted prompt (the
        template already holds them, like apply_chat_template(tokenize=True)); pass
        True to get what `tokenizer(text)` would give (e.g. a BOS).
        """
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`, special tokens skipped."""
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    # ---------------------------------------------------------------- model side
    def new_cache(self, capacity: int | None = None) -> KVCache:
        """An empty KV cache (length 0) for one sequence.

        Args:
            capacity: tokens to preallocate room for when the graph shares past/present buffers
                (prompt + new tokens; default KV_CHUNK). The buffers grow, with one copy, if a
                longer sequence comes; ignored for a growing cache.
        """
        import onnxruntime as ort

        if not self.shares_kv_buffer:
            kv_heads, head_dim = self._kv_shape
            empty = np.zeros((1, kv_heads, 0, head_dim), dtype=self._kv_dtype)
            return KVCache([ort.OrtValue.ortvalue_from_numpy(empty) for _ in self._past_names], 0,
                           names=list(self._past_names))
        cache = KVCache(names=list(self._past_names), capacity=0)
        self._grow(cache, min(capacity or KV_CHUNK, self.context_length))
        return cache

    def forward(self, input_ids: Sequence[int], cache: KVCache, logits_to_keep: int = 0) -> np.ndarray:
        """Run the decoder on `input_ids` after what `cache` holds, and extend the cache.

        Args:
            input_ids: the new tokens (the whole prompt for prefill, one token per decode step).
            cache: the sequence's KV cache; updated in place.
            logits_to_keep: logits for the last this many positions only (0: every position).
                Graphs without the input compute them all and the runtime cuts.

        Returns:
            Logits, float32 [len(input_ids), vocab] (or [min(logits_to_keep, len), vocab]), a new array.
        """
        logits = self._step(input_ids, cache, logits_to_keep)
        return np.array(logits, dtype=np.float32)

    def _step(self, input_ids: Sequence[int], cache: KVCache, keep: int) -> np.ndarray:
        """`forward` without the copy: the one-position logits come back as a view of a buffer the next step overwrites."""
        n = len(input_ids)
        total = cache.length + n
        if cache.capacity is not None and total > cache.capacity:
            self._grow(cache, min(max(total, cache.capacity + KV_CHUNK), self.context_length))
        shared = cache.capacity is not None
        binding = cache.binding if shared else self.session.io_binding()
        bound = cache.bound if shared else {}

        def bind(name: str, value, output: bool = False) -> None:
            # A reused binding already points at this object's memory (the decode step's token array,
            # logits_to_keep, the logits buffer): written in place, it needs no new binding. numpy inputs
            # must stay alive until the run; io_binding only points at their memory.
            if bound.get(name) is value:
                return
            if output:
                binding.bind_ortvalue_output(name, value)
            else:
                binding.bind_cpu_input(name, value)
            bound[name] = value

        if n == 1:
            cache.token[0, 0] = input_ids[0]
            bind("input_ids", cache.token)
        else:
            bind("input_ids", np.asarray([input_ids], dtype=np.int64))
        if self._has_mask:
            if self._ones.shape[1] < total:
                self._ones = np.ones((1, max(total, 2 * self._ones.shape[1])), dtype=np.int64)
            bind("attention_mask", self._ones[:, :total])             # a new view (width = total) every step
        if self._has_positions:
            bind("position_ids", np.arange(cache.length, total, dtype=np.int64)[None, :])
        kept = n if keep <= 0 else min(keep, n)
        if self._has_keep:
            bind(LOGITS_TO_KEEP, self._keep.get(keep) if keep in self._keep else np.array([keep], dtype=np.int64))
        one_row = kept == 1 and (self._has_keep or n == 1) and self._vocab is not None
        if one_row:
            bind("logits", self._logits_value(cache), output=True)
        else:
            binding.bind_output("logits", "cpu")
            bound.pop("logits", None)
        if cache.capacity is None:
            for name, value in zip(self._past_names, cache.values):
                binding.bind_ortvalue_input(name, value)
            for name in self._present_names:
                binding.bind_output(name, "cpu")
        self.session.run_with_iobinding(binding)
        cache.length = total
        outputs = None
        if cache.capacity is None:
            outputs = binding.get_outputs()             # logits first, then the new present tensors
            cache.values = list(outputs[1:])
        if one_row:
            return cache.logits[0]
        logits = (outputs or binding.get_outputs())[0].numpy()[0]
        return logits[-kept:] if logits.shape[0] > kept else logits

    def _logits_value(self, cache: KVCache):
        """The OrtValue over `cache.logits` [1, 1, vocab], made on the sequence's first one-position step."""
        import onnxruntime as ort

        if cache.logits_value is None:
            cache.logits = np.zeros((1, 1, self._vocab), dtype=np.float32)
            cache.logits_value = ort.OrtValue.ortvalue_from_numpy(cache.logits)
        return cache.logits_value

    def _grow(self, cache: KVCache, capacity: int) -> None:
        """Give a shared cache buffers of `capacity` rows (copying what it holds) and bind them as past and present."""
        import onnxruntime as ort

        kv_heads, head_dim = self._kv_shape
        buffers = []
        for old in cache.buffers or [None] * len(self._past_names):
            new = np.zeros((1, kv_heads, capacity, head_dim), dtype=self._kv_dtype)
            if old is not None:
                new[:, :, :cache.length] = old[:, :, :cache.length]
            buffers.append(new)
        cache.buffers, cache.capacity = buffers, capacity
        cache.values = [ort.OrtValue.ortvalue_from_numpy(b) for b in buffers]
        cache.binding, cache.bound = self.session.io_binding(), {}
        cache.binding.bind_output("logits", "cpu")       # first: get_outputs() lists outputs in binding order
        for past, present, value in zip(self._past_names, self._present_names, cache.values):
            cache.binding.bind_ortvalue_input(past, value)
            cache.binding.bind_ortvalue_output(present, value)

    def logprobs(self, input_ids: Sequence[int]) -> np.ndarray:
        """Log-softmax of every position's next-token logits, float32 [seq, vocab].

        Row t scores the token at position t+1 (multiple-choice log-likelihood scoring).
        """
        self._check_length(len(input_ids), 0)
        return log_softmax(self.forward(input_ids, self.new_cache(len(input_ids))))

    def generate(self, input_ids: Sequence[int], max_new_tokens: int, temperature: float = 0.0,
                 top_p: float = 1.0, seed: int = 0, stop_token_ids: Sequence[int] | None = None,
                 on_token: Callable[[int, str], None] | None = None) -> Generation:
        """Continue `input_ids`: prefill once, then one cached decode step per token.

        Args:
            input_ids: the prompt's token ids (e.g. `encode(format_prompt(q))`).
            max_new_tokens: the most tokens to generate.
            temperature: 0 for greedy decoding, else softmax temperature for sampling.
            top_p: nucleus sampling mass (sampling only).
            seed: sampling seed.
            stop_token_ids: tokens that end the answer (default `eos_token_ids`).
            on_token: called after each token with (token id, the new text it completes).

        Returns:
            The tokens, text and timings.

        Raises:
            DataError: an empty prompt, or one longer than the model's context.
        """
        if not input_ids:
            raise DataError("the prompt is empty: give at least one token")
        max_new_tokens = self._check_length(len(input_ids), max_new_tokens)
        stops = set(self.eos_token_ids if stop_token_ids is None else stop_token_ids)
        rng = np.random.default_rng(seed)
        cache = self.new_cache(len(input_ids) + max_new_tokens)
        tokens: list[int] = []
        latencies: list[float] = []
        streamed = ""
        ttft = 0.0
        step_ids = list(input_ids)
        stop_reason = "length"
        for step in range(max_new_tokens):
            started = time.perf_counter()
            logits = self._step(step_ids, cache, 1)[-1]           # next-token logits only
            token = pick_token(logits, temperature, top_p, rng)
            elapsed = time.perf_counter() - started
            if step == 0:
                ttft = elapsed
            else:
                latencies.append(elapsed)
            tokens.append(token)
            if on_token is not None:
                text = self.decode(tokens)
                # Hold back a partial UTF-8 character (decoded as U+FFFD) until it completes.
                if not text.endswith("\ufffd"):
                    on_token(token, text[len(streamed):])
                    streamed = text
            if token in stops:
                stop_reason = "stop"
                break
            step_ids = [token]
        return Generation(tokens=tokens, text=self.decode(tokens), ttft_s=ttft, token_latencies_s=latencies,
                          prompt_tokens=len(input_ids), stop_reason=stop_reason)

    def _check_length(self, prompt: int, new: int) -> int:
        if prompt >= self.context_length:
            raise DataError(f"the prompt has {prompt} tokens but the model's context is {self.context_length}: "
                            f"shorten the prompt or its context")
        return max(0, min(new, self.context_length - prompt))

    def info(self) -> dict:
        """What runs: format, exporter, providers, onnxruntime version, file sizes (bytes)."""
        import onnxruntime as ort

        files = {p.name: p.stat().st_size for p in sorted(self.path.iterdir()) if p.is_file()}
        model_bytes = sum(size for name, size in files.items() if name.startswith("model.onnx"))
        return {"path": str(self.path), "format": self.format,
                "exporter": self.manifest.get("exporter") or self.format,
                "providers": self.providers, "onnxruntime": ort.__version__, "files": files,
                "model_bytes": model_bytes, "size_bytes": sum(files.values()),
                "context_length": self.context_length, "eos_token_ids": self.eos_token_ids, "notes": self.notes}


# ---------------------------------------------------------------------- maths
def log_softmax(logits: np.ndarray) -> np.ndarray:
    """log softmax over the last axis, computed stably in float64, returned as float32."""
    x = logits.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return (x - np.log(np.exp(x).sum(axis=-1, keepdims=True))).astype(np.float32)


def pick_token(logits: np.ndarray, temperature: float, top_p: float, rng: np.random.Generator) -> int:
    """The next token from one position's logits [vocab].

    Greedy (argmax, lowest id on ties) when temperature == 0; otherwise samples from
    softmax(logits / temperature) restricted to the smallest set of tokens whose
    probability mass reaches top_p (nucleus sampling, Holtzman et al. 2020).
    """
    if temperature <= 0:
        return int(np.argmax(logits))
    probs = np.exp(log_softmax(logits / temperature).astype(np.float64))
    if top_p < 1.0:
        order = np.argsort(-probs, kind="stable")
        mass = np.cumsum(probs[order])
        keep = order[: int(np.searchsorted(mass, top_p) + 1)]
        nucleus = np.zeros_like(probs)
        nucleus[keep] = probs[keep]
        probs = nucleus
    return int(rng.choice(len(probs), p=probs / probs.sum()))


# ------------------------------------------------------------------- helpers
def _layer_order(name: str) -> tuple[int, int]:
    # "past_key_values.12.value" -> (12, 1): layer order, key before value
    parts = name.split(".")
    return int(parts[1]), 0 if parts[2] == "key" else 1


def _kv_layout(meta, path: Path) -> tuple[tuple[int, int], type]:
    """(kv_heads, head_dim) and dtype of the past inputs [batch, kv_heads, past, head_dim]."""
    shape = meta.shape
    if len(shape) != 4 or not isinstance(shape[1], int) or not isinstance(shape[3], int):
        raise ArtifactError(f"{path / MODEL_FILE}: past input {meta.name} has shape {shape}, expected "
                            f"[batch, kv_heads, past, head_dim]: re-export it with `kd2edge export`")
    if meta.type not in _ORT_TYPES:
        raise ArtifactError(f"{path / MODEL_FILE}: KV cache of type {meta.type} is not supported (float or float16)")
    return (shape[1], shape[3]), _ORT_TYPES[meta.type]


def _choose_providers(wanted: list[str], available: list[str], allow_fallback: bool, notes: list[str]) -> list[str]:
    absent = [p for p in wanted if p not in available]
    if not absent:
        return wanted
    if not allow_fallback:
        raise ConfigError(f"execution provider {absent[0]} is not available in this onnxruntime build "
                          f"(available: {', '.join(available)}): install the onnxruntime package that has it, "
                          f"or use a profile for this host", source="runtime")
    kept = [p for p in wanted if p in available] or ["CPUExecutionProvider"]
    notes.append(f"{', '.join(absent)} not available here; running on {', '.join(kept)}")
    return kept


def _ort_load_errors() -> tuple[type[BaseException], ...]:
    from onnxruntime.capi import onnxruntime_pybind11_state as state

    names = ("Fail", "InvalidArgument", "NoSuchFile", "NoModel", "InvalidProtobuf", "InvalidGraph",
             "RuntimeException", "NotImplemented", "EPFail")
    return tuple(getattr(state, n) for n in names if hasattr(state, n))


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ArtifactError(f"{path} is unreadable ({e}): re-run `kd2edge export`") from None
    if not isinstance(data, dict):
        raise ArtifactError(f"{path} should hold a JSON object: re-run `kd2edge export`")
    return data


def _chat_template(path: Path, tok_config: dict) -> str | None:
    """The chat template: chat_template.jinja, else tokenizer_config.json's (the "default" one of a list)."""
    if (path / "chat_template.jinja").is_file():
        return (path / "chat_template.jinja").read_text(encoding="utf-8")
    template = tok_config.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default") or next(iter(named.values()), None)
    return template or None


def _token_text(value) -> str | None:
    # tokenizer_config stores a special token as a string or as {"content": ...}
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _special_tokens(tok_config: dict, path: Path) -> dict:
    """The template variables transformers passes from the tokenizer's special tokens map."""
    merged = dict(tok_config)
    if (path / "special_tokens_map.json").is_file():
        merged.update(_read_json(path / "special_tokens_map.json"))
    out: dict = {}
    for key in ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token"):
        text = _token_text(merged.get(key))
        if text is not None:
            out[key] = text
    extra = [_token_text(v) for v in merged.get("additional_special_tokens") or []]
    out["additional_special_tokens"] = [t for t in extra if t is not None]
    return out


def _eos_ids(gen_config: dict, config: dict, genai_model: dict, tokenizer, special: dict) -> list[int]:
    """Stop tokens: generation_config.json's eos, else config.json's / genai's, else the tokenizer's eos."""
    for source in (gen_config, config, genai_model):
        value = source.get("eos_token_id")
        if value is not None:
            return sorted({int(v) for v in (value if isinstance(value, list) else [value])})
    eos = special.get("eos_token")
    token_id = tokenizer.token_to_id(eos) if eos else None
    return [token_id] if token_id is not None else []


def _compile_template(source: str):
    """A jinja2 template in the environment transformers renders chat templates with."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # Like transformers: no HTML escaping, unlike jinja2's own tojson.
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    class GenerationBlock(jinja2.ext.Extension):
        # `{% generation %}...{% endgeneration %}` marks assistant text for training masks;
        # rendering only needs its body.
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationBlock, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise ArtifactError(f"the artifact's chat template does not parse ({e}): fix its chat_template") from None
