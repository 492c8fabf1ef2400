"""Vocabulary trimming for byte-level BPE tokenizers: fewer embedding and head rows.

A small student spends a large share of its parameters on the vocabulary (SmolLM2-135M:
49,152 x 576 = 28.3M of 135M, tied). Most of those tokens never occur in the deployment
languages, so the student can keep only the tokens it needs and drop the rest of the rows.

What is kept (`choose_vocabulary`):

* every byte-alphabet token of the vocabulary: the byte-level pre-tokenizer maps any text
  to these 256 characters, so any text stays encodable (a tokenizer may lack the few
  byte characters that valid UTF-8 never produces, such as 0xC0 and 0xF5-0xFF; then
  those stay missing, exactly as before);
* every added and special token, the BPE unknown token, and the tokens of the chat
  template's literal text ("<|im_start|>", "assistant", "\\n", the default system prompt...),
  so that prompts are built from whole words as in the teacher;
* then the tokens most frequent in the given counts (real text of the deployment
  languages, the training data), then the remaining tokens in id order (in a trained BPE
  vocabulary, ids follow merge order: earlier merges were more frequent in the
  tokenizer's own corpus), each only if it and the parts it needs fit in `size`.

Consistency of the rebuilt BPE (`trim_tokenizer_json`). A BPE tokenizer splits each
pre-tokenized word into byte characters and repeatedly applies the adjacent merge of
lowest rank. The kept set is closed under "a kept token keeps every merge that makes it
and both of its parts" (`merge_closure`); a merge survives when its two parts and its
result are kept, and the surviving merges keep their relative order (rank). Then:

* any text still encodes: the byte characters are all there, merges only shorten;
* a word whose original tokens are all kept encodes to exactly the same tokens: every
  merge the original applied to it built a kept token or one of its parts, so it
  survives, and since the surviving merges are a subset in the same order, the lowest
  surviving applicable merge at each step is the one the original applied;
* a word that lost its token splits into the pieces the original merges would have
  reached had they stopped earlier: tokens the model has seen elsewhere.

Ids are renumbered 0..n-1 in old-id order (`old_ids[new] = old`) everywhere: the BPE
vocabulary, the added tokens, the post-processor's special tokens, padding, the
tokenizer config, and the model's embedding and head rows and its config/generation
config token ids (`trim_model`). Token-level distillation then runs on text tokenized by
the trimmed tokenizer: the teacher reads `old_ids[student_ids]` and its logits are taken
at the kept columns (`kept_logits`).
"""

from __future__ import annotations

import ast
import json
import re
import tempfile
from collections import Counter
from pathlib import Path
from typing import Iterable

from kd2edge.errors import ConfigError, ModelError

_SOURCE = "vocabulary trimming"
_TAG = re.compile(r"\{%.*?%\}|\{\{.*?\}\}|\{#.*?#\}", re.S)              # Jinja statements, expressions, comments
_STRING = re.compile(r"'(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\"", re.S)   # a quoted string literal inside a tag
_ROLES = ("system", "user", "assistant")


# --- tokenizer.json helpers -------------------------------------------------------------

def tokenizer_json(tokenizer) -> dict:
    """The `tokenizer.json` content of a transformers fast tokenizer (a fresh copy)."""
    return json.loads(tokenizer.backend_tokenizer.to_str())


def _merge_pairs(merges: list) -> list[tuple[str, str]]:
    """Merges as (left, right) pairs, from either saved format ("a b" strings or [a, b] lists)."""
    return [tuple(m.split(" ", 1)) if isinstance(m, str) else (m[0], m[1]) for m in merges]


def _has_byte_level(pre_tokenizer: dict | None) -> bool:
    if not pre_tokenizer:
        return False
    if pre_tokenizer.get("type") == "ByteLevel":
        return True
    return any(_has_byte_level(p) for p in pre_tokenizer.get("pretokenizers") or [])


def _check_byte_level_bpe(tj: dict) -> None:
    """Raise ConfigError unless `tj` is a byte-level BPE tokenizer this module can trim."""
    model = tj.get("model") or {}
    problems = []
    if model.get("type") != "BPE":
        problems.append(f"the tokenizer model is {model.get('type')!r}, not BPE")
    if not _has_byte_level(tj.get("pre_tokenizer")):
        problems.append("the tokenizer has no ByteLevel pre-tokenizer, so dropping tokens could make text unencodable")
    if model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        problems.append("BPE with a continuing-subword prefix or end-of-word suffix is not supported")
    if problems:
        raise ConfigError([p + ": vocabulary trimming supports byte-level BPE tokenizers only (GPT-2, Llama 3, "
                           "Qwen2, SmolLM style); train the student without trimming" for p in problems], _SOURCE)


def byte_alphabet() -> list[str]:
    """The 256 characters the byte-level pre-tokenizer maps bytes to."""
    from tokenizers import pre_tokenizers

    return sorted(pre_tokenizers.ByteLevel.alphabet())


def _id_to_token(tj: dict) -> dict[int, str]:
    """Every id of the tokenizer (BPE vocabulary and added tokens) to its token string."""
    token_of = {i: t for t, i in tj["model"]["vocab"].items()}
    token_of.update({a["id"]: a["content"] for a in tj.get("added_tokens") or []})
    return token_of


def _producers(vocab: dict[str, int], merges: list[tuple[str, str]]) -> dict[str, list[tuple[str, str]]]:
    """Result token -> the merges (left, right) that make it, for merges whose three tokens exist."""
    producers: dict[str, list[tuple[str, str]]] = {}
    for a, b in merges:
        if a in vocab and b in vocab and a + b in vocab:
            producers.setdefault(a + b, []).append((a, b))
    return producers


def _missing_closure(token: str, producers: dict, kept: set[str]) -> set[str]:
    """The tokens not in `kept` that keeping `token` requires: itself and, recursively, the parts of its merges."""
    missing: set[str] = set()
    stack = [token]
    while stack:
        t = stack.pop()
        if t in kept or t in missing:
            continue
        missing.add(t)
        for a, b in producers.get(t, ()):
            stack += (a, b)
    return missing


def merge_closure(vocab: dict[str, int], merges: list[tuple[str, str]], keep: set[str]) -> set[str]:
    """`keep` closed under "a kept token keeps every merge that makes it and both of its parts".

    Every merge producing a kept token is followed (not only one), so whichever merge the
    original tokenizer applies to reach the token survives trimming.

    Args:
        vocab: the BPE vocabulary, token -> id.
        merges: the BPE merges as (left, right) pairs (or "left right" strings), in rank order.
        keep: tokens to keep.

    Returns:
        The closed set (a superset of `keep`).

    Raises:
        ValueError: a token of `keep` is not in `vocab`.
    """
    unknown = sorted(t for t in keep if t not in vocab)
    if unknown:
        raise ValueError(f"{len(unknown)} tokens to keep are not in the vocabulary, e.g. {unknown[:3]}")
    producers = _producers(vocab, _merge_pairs(merges))
    closed: set[str] = set()
    for t in keep:
        closed |= _missing_closure(t, producers, closed)
    return closed


# --- choosing the vocabulary ------------------------------------------------------------

def template_literals(template: str) -> list[str]:
    """The literal text of a Jinja chat template: text between tags and string literals inside them.

    Args:
        template: a Jinja chat template.

    Returns:
        The non-empty pieces, e.g. ["<|im_start|>", "\\n", "<|im_end|>", "<|im_start|>assistant\\n"].
    """
    pieces = _TAG.split(template)
    for tag in _TAG.findall(template):
        for match in _STRING.finditer(tag):
            if tag[:match.start()].rstrip().endswith("[") and tag[match.end():].lstrip().startswith("]"):
                continue  # a subscript key such as message['role'], not text
            literal = match.group()
            try:  # Jinja string literals use Python escapes; a raw newline inside one is kept as is
                pieces.append(ast.literal_eval(literal.replace("\n", "\\n")))
            except (ValueError, SyntaxError):
                pieces.append(literal[1:-1])
    return [p for p in pieces if isinstance(p, str) and p]


def chat_template_ids(tokenizer) -> set[int]:
    """Ids of the tokens the chat template produces: its literal pieces and empty conversations rendered by it.

    Rendering catches the tokens of pieces joined across tags ("<|im_start|>" + role + "\\n");
    the literals catch the branches a rendering does not take. A tokenizer without a chat
    template gives an empty set.
    """
    from jinja2 import TemplateError

    template = tokenizer.chat_template
    if not template:
        return set()
    templates = list(template.values()) if isinstance(template, dict) else [template]
    texts = [p for t in templates for p in template_literals(t)] + list(_ROLES)
    conversations = [[{"role": r, "content": ""} for r in _ROLES], [{"role": r, "content": ""} for r in _ROLES[1:]]]
    for conversation in conversations:
        try:
            texts.append(tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True))
        except (TemplateError, ValueError, TypeError, KeyError):
            continue  # a template that rejects this conversation shape: its literals are still kept
    ids: set[int] = set()
    for encoded in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        ids.update(encoded)
    return ids


def mandatory_ids(tokenizer, required: Iterable[int] = ()) -> set[int]:
    """The ids every trimmed vocabulary keeps, closed under merges.

    Args:
        tokenizer: a transformers fast tokenizer with a byte-level BPE model.
        required: more ids to keep (e.g. the model config's bos/eos/pad ids).

    Returns:
        Byte-alphabet tokens present in the vocabulary, added and special tokens, the BPE
        unknown token, chat-template tokens, `required`, and the merge parts they need.

    Raises:
        ConfigError: the tokenizer is not a byte-level BPE, or a required id does not exist.
    """
    tj = tokenizer_json(tokenizer)
    _check_byte_level_bpe(tj)
    vocab = tj["model"]["vocab"]
    token_of = _id_to_token(tj)
    ids = {vocab[c] for c in byte_alphabet() if c in vocab}
    ids |= {a["id"] for a in tj.get("added_tokens") or []}
    ids |= {i for i in tokenizer.all_special_ids if i is not None}
    unk = tj["model"].get("unk_token")
    if unk in vocab:
        ids.add(vocab[unk])
    ids |= chat_template_ids(tokenizer)
    required = set(required)
    unknown = sorted(i for i in required if i not in token_of)
    if unknown:
        raise ConfigError(f"required token ids {unknown[:5]} do not exist in the {len(token_of)}-token vocabulary",
                          _SOURCE)
    ids |= required
    producers = _producers(vocab, _merge_pairs(tj["model"]["merges"]))
    closed: set[str] = set()
    for t in {token_of[i] for i in ids if token_of[i] in vocab}:
        closed |= _missing_closure(t, producers, closed)
    return ids | {vocab[t] for t in closed}


def choose_vocabulary(tokenizer, counts: Counter, size: int, required: Iterable[int] = ()) -> list[int]:
    """The old ids of a trimmed vocabulary of at most `size` tokens, sorted ascending.

    Args:
        tokenizer: a transformers fast tokenizer with a byte-level BPE model.
        counts: token id -> occurrences in real text of the deployment languages and the
            training data (`token_counts`).
        size: the largest number of tokens to keep.
        required: ids that must be kept besides the mandatory set (`mandatory_ids`).

    Returns:
        The mandatory ids, then the most frequent ids of `counts`, then the remaining ids in
        id order, each added only when it and its missing merge parts fit: never more than
        `size` ids; fewer only when the whole vocabulary is smaller. Closed under merges.

    Raises:
        ConfigError: `size` is below the mandatory set, or the tokenizer cannot be trimmed.
    """
    tj = tokenizer_json(tokenizer)
    _check_byte_level_bpe(tj)
    vocab = tj["model"]["vocab"]
    token_of = _id_to_token(tj)
    kept_ids = mandatory_ids(tokenizer, required)
    if size < len(kept_ids):
        raise ConfigError(f"a vocabulary of {size} tokens is too small: every trimmed vocabulary keeps {len(kept_ids)} "
                          f"tokens (byte alphabet, added/special tokens, chat template, their merge parts); "
                          f"choose a size of at least {len(kept_ids)}", _SOURCE)
    producers = _producers(vocab, _merge_pairs(tj["model"]["merges"]))
    kept_tokens = {token_of[i] for i in kept_ids if token_of[i] in vocab}
    ranked = [i for i, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])) if i in token_of]
    candidates = ranked + sorted(set(token_of) - set(ranked))
    for i in candidates:
        if len(kept_ids) >= size:
            break
        if i in kept_ids:
            continue
        token = token_of[i]
        missing = _missing_closure(token, producers, kept_tokens) if token in vocab else {token}
        if len(kept_ids) + len(missing) <= size:
            kept_tokens |= missing
            kept_ids |= {vocab[t] for t in missing} if token in vocab else {i}
    return sorted(kept_ids)


# --- rebuilding the tokenizer -----------------------------------------------------------

def _new_id(new_of: dict[int, int], old: int, what: str) -> int:
    if old not in new_of:
        raise ConfigError(f"{what} (old id {old}) is not in the kept vocabulary: keep it (choose_vocabulary's "
                          f"`required`) or do not trim", _SOURCE)
    return new_of[old]


def _renumber_processor(proc: dict | None, new_of: dict[int, int]) -> dict | None:
    """The post-processor with its special-token ids renumbered (in place)."""
    if not proc:
        return proc
    kind = proc.get("type")
    if kind == "Sequence":
        proc["processors"] = [_renumber_processor(p, new_of) for p in proc.get("processors") or []]
    elif kind == "TemplateProcessing":
        for name, spec in (proc.get("special_tokens") or {}).items():
            spec["ids"] = [_new_id(new_of, i, f"post-processor token {name!r}") for i in spec["ids"]]
    elif kind in ("BertProcessing", "RobertaProcessing"):
        for key in ("sep", "cls"):
            token, old = proc[key]
            proc[key] = [token, _new_id(new_of, old, f"post-processor token {token!r}")]
    return proc


def trim_tokenizer_json(tokenizer_json: dict, keep_old_ids: Iterable[int]) -> tuple[dict, list[int]]:
    """A byte-level BPE `tokenizer.json` restricted to `keep_old_ids`, renumbered 0..n-1.

    Args:
        tokenizer_json: the parsed `tokenizer.json` (not modified).
        keep_old_ids: old ids to keep; should be closed under merges (`choose_vocabulary`'s are).

    Returns:
        (new tokenizer.json content, old_ids): new id i is old id old_ids[i] (old_ids sorted).
        The BPE vocabulary, added tokens, post-processor and padding ids are renumbered; a
        merge survives when its two parts and its result are kept, in its original order.

    Raises:
        ConfigError: not a byte-level BPE; an id that does not exist; a byte-alphabet token
            of the vocabulary dropped; a kept token whose every merge lost a part (it could
            never be produced: close the set with `merge_closure`); a dropped id the
            post-processor or padding needs.
    """
    tj = json.loads(json.dumps(tokenizer_json))  # deep copy: the caller's dict stays as it was
    _check_byte_level_bpe(tj)
    model = tj["model"]
    token_of = _id_to_token(tj)
    old_ids = sorted(set(keep_old_ids))
    unknown = [i for i in old_ids if i not in token_of]
    if unknown:
        raise ConfigError(f"ids {unknown[:5]} do not exist in the {len(token_of)}-token vocabulary", _SOURCE)
    new_of = {old: new for new, old in enumerate(old_ids)}
    vocab = {t: new_of[i] for t, i in model["vocab"].items() if i in new_of}
    lost_bytes = [c for c in byte_alphabet() if c in model["vocab"] and c not in vocab]
    if lost_bytes:
        raise ConfigError(f"{len(lost_bytes)} byte-alphabet tokens would be dropped (e.g. {lost_bytes[:3]}): keep them "
                          f"all so that any text stays encodable", _SOURCE)
    pairs = _merge_pairs(model["merges"])
    kept = [k for k, (a, b) in enumerate(pairs) if a in vocab and b in vocab and a + b in vocab]
    if not model.get("ignore_merges"):
        # Without ignore_merges a multi-character token is only reached through a merge.
        reachable = {pairs[k][0] + pairs[k][1] for k in kept}
        made = set(_producers(model["vocab"], pairs))
        orphans = sorted(t for t in vocab if t in made and t not in reachable)
        if orphans:
            raise ConfigError(f"{len(orphans)} kept tokens lost every merge that makes them (e.g. {orphans[:3]}) and "
                              f"could never be produced: keep their merge parts (merge_closure)", _SOURCE)
    model["vocab"] = vocab
    model["merges"] = [model["merges"][k] for k in kept]
    tj["added_tokens"] = [dict(a, id=new_of[a["id"]]) for a in tj.get("added_tokens") or [] if a["id"] in new_of]
    tj["post_processor"] = _renumber_processor(tj.get("post_processor"), new_of)
    padding = tj.get("padding")
    if padding and padding.get("pad_id") is not None:
        padding["pad_id"] = _new_id(new_of, padding["pad_id"], f"padding token {padding.get('pad_token')!r}")
    return tj, old_ids


def trim_tokenizer_config(config: dict, old_ids: list[int]) -> dict:
    """A `tokenizer_config.json` with `added_tokens_decoder` and `*_token_id` fields renumbered.

    Args:
        config: the parsed `tokenizer_config.json` (not modified).
        old_ids: new id i is old id old_ids[i].

    Returns:
        The new config; added tokens that were dropped are left out.
    """
    new_of = {old: new for new, old in enumerate(old_ids)}
    out = dict(config)
    if "added_tokens_decoder" in config:
        out["added_tokens_decoder"] = {str(new_of[int(k)]): v for k, v in config["added_tokens_decoder"].items()
                                       if int(k) in new_of}
    for key, value in config.items():
        if key.endswith("_token_id") and isinstance(value, int):
            out[key] = new_of.get(value)
    return out


def _rebuild_tokenizer(tokenizer, new_json: dict, old_ids: list[int]):
    """The same tokenizer class and settings over the trimmed tokenizer.json.

    Going through save_pretrained/from_pretrained keeps everything transformers stores
    (special tokens, chat template, padding side, class-specific options such as Llama's
    add_bos_token, which rebuilds the post-processor from the new ids).
    """
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        tokenizer.save_pretrained(folder, legacy_format=False)  # tokenizer.json only: no stale vocab.json/merges.txt
        (folder / "tokenizer.json").write_text(json.dumps(new_json, ensure_ascii=False), encoding="utf-8")
        config_path = folder / "tokenizer_config.json"
        config = json.loads(config_path.read_text(encoding="utf-8"))
        config_path.write_text(json.dumps(trim_tokenizer_config(config, old_ids), ensure_ascii=False), encoding="utf-8")
        added_path = folder / "added_tokens.json"
        if added_path.is_file():
            new_of = {old: new for new, old in enumerate(old_ids)}
            added = json.loads(added_path.read_text(encoding="utf-8"))
            added_path.write_text(json.dumps({t: new_of[i] for t, i in added.items() if i in new_of}), encoding="utf-8")
        rebuilt = type(tokenizer).from_pretrained(folder)
    before = tokenizer.convert_ids_to_tokens(old_ids)
    if len(rebuilt) != len(old_ids) or rebuilt.convert_ids_to_tokens(list(range(len(old_ids)))) != before:
        raise ModelError(f"the trimmed tokenizer has {len(rebuilt)} tokens, not the {len(old_ids)} kept ones in order: "
                         f"a special token was probably re-added; keep every special token")
    return rebuilt


def trim_tokenizer(tokenizer, keep_old_ids: Iterable[int]):
    """The tokenizer alone trimmed to `keep_old_ids` (what `trim_model` gives, without a model).

    Returns:
        (new tokenizer, old_ids): new id i is old id old_ids[i].

    Raises:
        ConfigError, ModelError: as `trim_model`.
    """
    new_json, old_ids = trim_tokenizer_json(tokenizer_json(tokenizer), keep_old_ids)
    new_of = {old: new for new, old in enumerate(old_ids)}
    for token in tokenizer.all_special_tokens:
        _new_id(new_of, tokenizer.convert_tokens_to_ids(token), f"special token {token!r}")
    return _rebuild_tokenizer(tokenizer, new_json, old_ids), old_ids


# --- trimming the model -----------------------------------------------------------------

_ID_LISTS = ("suppress_tokens", "begin_suppress_tokens")  # generation options where a dropped id can just go


def _remapped_ids(config, new_of: dict[int, int], where: str) -> dict:
    """{attribute: new value} for the token-id attributes of a (generation) config; raise if one was dropped."""
    updates = {}
    for key, value in config.to_dict().items():
        if key.endswith("_token_id") and value is not None:
            if isinstance(value, int):
                updates[key] = _new_id(new_of, value, f"{where} {key}")
            elif isinstance(value, (list, tuple)):
                updates[key] = [_new_id(new_of, v, f"{where} {key}") for v in value]
        elif key in _ID_LISTS and value:
            updates[key] = [new_of[v] for v in value if v in new_of]
    return updates


def trim_model(model, tokenizer, keep_old_ids: Iterable[int]):
    """Trim a causal LM and its tokenizer to `keep_old_ids`: slice the rows, remap the ids.

    The input embedding [V, H] and the output head [V, H] (and its bias) keep rows
    old_ids (-> [n, H]); a tied head stays tied to the embedding. `config.vocab_size`
    becomes n, and every `*_token_id` of `model.config` and `model.generation_config` is
    renumbered. Rows beyond the tokenizer (padded tables) are dropped too.

    Args:
        model: a transformers causal LM; modified in place.
        tokenizer: its transformers fast tokenizer (byte-level BPE); not modified.
        keep_old_ids: the ids to keep (`choose_vocabulary`).

    Returns:
        (model, new tokenizer): the same model object, and a tokenizer of the same class
        with the same special tokens, chat template and settings; new id i is old id
        old_ids[i] with old_ids = sorted(keep_old_ids).

    Raises:
        ConfigError: a special token, a config token id or a byte token is not kept, or the
            tokenizer cannot be trimmed (see `trim_tokenizer_json`).
        ModelError: an id beyond the model's embedding rows, or a rebuilt tokenizer whose ids
            do not match the kept tokens.
    """
    import torch

    new_json, old_ids = trim_tokenizer_json(tokenizer_json(tokenizer), keep_old_ids)
    new_of = {old: new for new, old in enumerate(old_ids)}
    for token in tokenizer.all_special_tokens:
        _new_id(new_of, tokenizer.convert_tokens_to_ids(token), f"special token {token!r}")
    embedding = model.get_input_embeddings()
    head = model.get_output_embeddings()
    if old_ids[-1] >= embedding.weight.shape[0]:
        raise ModelError(f"token id {old_ids[-1]} is beyond the model's {embedding.weight.shape[0]} embedding rows: "
                         "the tokenizer does not belong to this model")
    # Check everything before changing anything: a failure leaves the model as it was.
    config_updates = _remapped_ids(model.config, new_of, "model config")
    generation = getattr(model, "generation_config", None)
    generation_updates = _remapped_ids(generation, new_of, "generation config") if generation is not None else {}
    new_tokenizer = _rebuild_tokenizer(tokenizer, new_json, old_ids)

    tied = head is not None and head.weight is embedding.weight
    index = torch.tensor(old_ids, dtype=torch.long, device=embedding.weight.device)
    with torch.no_grad():
        # In place on the existing modules: subclasses (scaled embeddings) and their options survive.
        embedding.weight = torch.nn.Parameter(embedding.weight[index].clone(),      # [V, H] -> [n, H]
                                              requires_grad=embedding.weight.requires_grad)
        embedding.num_embeddings = len(old_ids)
        if getattr(embedding, "padding_idx", None) is not None:
            embedding.padding_idx = new_of.get(embedding.padding_idx)
        if head is not None:
            if tied:
                head.weight = embedding.weight
            else:
                head.weight = torch.nn.Parameter(head.weight[index.to(head.weight.device)].clone(),
                                                 requires_grad=head.weight.requires_grad)
            if getattr(head, "bias", None) is not None:
                head.bias = torch.nn.Parameter(head.bias[index.to(head.bias.device)].clone(),
                                               requires_grad=head.bias.requires_grad)
            if hasattr(head, "out_features"):
                head.out_features = len(old_ids)
    model.config.vocab_size = len(old_ids)
    for key, value in config_updates.items():
        setattr(model.config, key, value)
    for key, value in generation_updates.items():
        setattr(generation, key, value)
    return model, new_tokenizer


def trim_model_folder(src: str | Path, dst: str | Path, keep_old_ids: Iterable[int]) -> dict:
    """Load a transformers folder, trim it (`trim_model`), and save it to `dst` with `vocab_trim.json`.

    `vocab_trim.json` holds {"old_ids": [...], "old_vocab_size": V} so that teacher ids and
    logits can be mapped to the student's (`kept_logits`).

    Returns:
        {"vocab_before", "vocab_after", "params_before", "params_after", "param_reduction"}:
        parameters counted with tied weights once, so dropped rows count once when tied.

    Raises:
        ModelError: `src` cannot be loaded; see `trim_model` for the rest.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kd2edge.models import count_params

    keep = sorted(set(keep_old_ids))  # used twice below: an iterator would be consumed by the first use
    try:
        tokenizer = AutoTokenizer.from_pretrained(src)
        model = AutoModelForCausalLM.from_pretrained(src, dtype="auto")
    except (OSError, ValueError, KeyError) as e:
        raise ModelError(f"cannot load {src} as a causal language model ({str(e).splitlines()[0]})") from None
    vocab_before, params_before = model.get_input_embeddings().weight.shape[0], count_params(model)
    model, new_tokenizer = trim_model(model, tokenizer, keep)
    dst = Path(dst)
    model.save_pretrained(dst)
    new_tokenizer.save_pretrained(dst)
    (dst / "vocab_trim.json").write_text(json.dumps({"old_ids": keep, "old_vocab_size": vocab_before}))
    params_after = count_params(model)
    return {"vocab_before": vocab_before, "vocab_after": len(keep), "params_before": params_before,
            "params_after": params_after, "param_reduction": round(1 - params_after / params_before, 4)}


def kept_logits(logits, old_ids: list[int]):
    """A teacher's logits [..., V] at the kept columns [..., n], in the student's id order."""
    import torch

    return logits.index_select(-1, torch.as_tensor(old_ids, dtype=torch.long, device=logits.device))


# --- measuring --------------------------------------------------------------------------

def token_counts(tokenizer, texts: Iterable[str], batch_size: int = 256) -> Counter:
    """Occurrences of each token id over `texts` (no special tokens added).

    Args:
        tokenizer: a transformers fast tokenizer.
        texts: the texts to count.
        batch_size: texts per batched encoding call.

    Returns:
        Counter of token id -> occurrences.
    """
    texts = list(texts)
    counts: Counter = Counter()
    for start in range(0, len(texts), batch_size):
        for ids in tokenizer(texts[start:start + batch_size], add_special_tokens=False)["input_ids"]:
            counts.update(ids)
    return counts


def tokens_per_word(tokenizer, texts: Iterable[str]) -> float:
    """Tokens per whitespace-separated word over `texts` (no special tokens).

    Raises:
        ValueError: the texts have no words.
    """
    texts = list(texts)
    words = sum(len(t.split()) for t in texts)
    if not words:
        raise ValueError("tokens per word needs text with at least one word")
    return sum(token_counts(tokenizer, texts).values()) / words


def coverage_curve(counts: Counter, sizes: Iterable[int], tokenizer=None) -> list[tuple[int, float]]:
    """Share of the token occurrences in `counts` that a vocabulary of each size keeps.

    Args:
        counts: token id -> occurrences (`token_counts`).
        sizes: vocabulary sizes.
        tokenizer: if given, each vocabulary is `choose_vocabulary(tokenizer, counts, size)`
            (mandatory tokens and merge parts included); otherwise the `size` most frequent ids.

    Returns:
        [(size, share in [0, 1])], in the order of `sizes`.

    Raises:
        ValueError: `counts` is empty. ConfigError: see `choose_vocabulary`.
    """
    total = sum(counts.values())
    if not total:
        raise ValueError("coverage needs token counts from at least one token")
    ranked = [i for i, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))]
    curve = []
    for size in sizes:
        kept = set(choose_vocabulary(tokenizer, counts, size)) if tokenizer is not None else set(ranked[:size])
        curve.append((size, sum(c for i, c in counts.items() if i in kept) / total))
    return curve
