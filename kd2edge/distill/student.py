"""Building the student: layer pruning by block influence, or a separate pretrained model.

Block influence (Men et al. 2024, "ShortGPT"): a decoder layer that barely turns its
input hidden state is doing little, so

    BI_i = 1 - E_t[ cos(x_i,t , x_{i+1},t) ]

where x_i,t is layer i's input at token t and x_{i+1},t its output, averaged over the
(non-padding) tokens of calibration prompts. The student keeps the layers with the
highest BI, always including the first and the last layer (they map to and from the
embedding space and are known to be the least removable).
"""

from __future__ import annotations

from typing import Iterable

from kd2edge.errors import ModelError


def decoder_layers(model):
    """The model's list of decoder layers (llama/qwen2: model.model.layers, gpt_neox: gpt_neox.layers).

    Raises:
        ModelError: the architecture has no `layers` list on its base model.
    """
    import torch

    layers = getattr(model.base_model, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise ModelError(f"{type(model).__name__} has no decoder layer list (base_model.layers): "
                         "layer pruning supports llama-, qwen2-, mistral- and gpt_neox-style models; pass --student")
    return layers


def block_influence(inputs, outputs, mask=None):
    """Per-token block influence summed over tokens, and the token count.

    Args:
        inputs: [B, L, H] a layer's input hidden states.
        outputs: [B, L, H] its output hidden states.
        mask: [B, L] bool, tokens to count (None = all).

    Returns:
        (sum over kept tokens of 1 - cos(input, output), number of kept tokens), so that
        batches can be accumulated before dividing.
    """
    import torch.nn.functional as F

    cos = F.cosine_similarity(inputs.float(), outputs.float(), dim=-1, eps=1e-8)  # [B, L]
    influence = 1.0 - cos
    if mask is None:
        return influence.sum().item(), influence.numel()
    mask = mask.to(influence.dtype)
    return (influence * mask).sum().item(), int(mask.sum().item())


def choose_layers(scores: list[float], keep: int) -> list[int]:
    """The `keep` most influential layers, always with the first and the last, in model order.

    Args:
        scores: block influence per layer.
        keep: how many layers to keep, 1 <= keep <= len(scores).

    Raises:
        ValueError: `keep` out of range.
    """
    n = len(scores)
    if not 1 <= keep <= n:
        raise ValueError(f"cannot keep {keep} of {n} layers")
    if keep == 1:
        return [0]
    forced = {0, n - 1}
    rest = sorted((i for i in range(n) if i not in forced), key=lambda i: (-scores[i], i))
    return sorted(forced | set(rest[:keep - 2]))


def measure_block_influence(model, batches: Iterable[dict]) -> list[float]:
    """Block influence of every decoder layer of `model`, averaged over the calibration batches.

    Args:
        model: a transformers causal LM.
        batches: dicts with input_ids [B, L] and attention_mask [B, L].

    Returns:
        One score per decoder layer.
    """
    import torch

    layers = decoder_layers(model)
    sums = [0.0] * len(layers)
    counts = [0] * len(layers)
    captured: dict[int, torch.Tensor] = {}
    current_mask: list[torch.Tensor | None] = [None]

    def pre_hook(index):
        def hook(module, args, kwargs):
            captured[index] = args[0] if args else kwargs["hidden_states"]
        return hook

    def post_hook(index):
        def hook(module, args, kwargs, output):
            out = output[0] if isinstance(output, tuple) else output
            s, c = block_influence(captured.pop(index), out, current_mask[0])
            sums[index] += s
            counts[index] += c
        return hook

    handles = []
    for i, layer in enumerate(layers):
        handles.append(layer.register_forward_pre_hook(pre_hook(i), with_kwargs=True))
        handles.append(layer.register_forward_hook(post_hook(i), with_kwargs=True))
    try:
        with torch.no_grad():
            for batch in batches:
                current_mask[0] = batch["attention_mask"].bool()
                model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    finally:
        for h in handles:
            h.remove()
    if not any(counts):
        raise ModelError("block influence saw no calibration tokens: the calibration batches are empty")
    return [s / max(c, 1) for s, c in zip(sums, counts)]


def prune_layers(model, keep: list[int]):
    """Keep only the decoder layers `keep` (in order), in place, and fix the config to match.

    Each kept attention module gets its new position as `layer_idx` so the KV cache
    indexes it correctly; per-layer config lists (`layer_types`) are sliced the same way.

    Returns:
        The same model.
    """
    import torch

    layers = decoder_layers(model)
    kept = torch.nn.ModuleList([layers[i] for i in keep])
    for new_index, layer in enumerate(kept):
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_index
    model.base_model.layers = kept
    model.config.num_hidden_layers = len(keep)
    if getattr(model.config, "layer_types", None) is not None:
        model.config.layer_types = [model.config.layer_types[i] for i in keep]
    return model


def check_same_tokenizer(teacher_tokenizer, student_tokenizer, teacher_id: str, student_id: str) -> int:
    """Check that two tokenizers map text to the same ids; return the real vocabulary size.

    Padded embedding tables (Qwen2.5 0.5B has 151,936 rows, 7B 152,064) are fine: only the
    len(tokenizer) real tokens are compared, and logits are sliced to that size.

    Raises:
        ModelError: the vocabularies differ.
    """
    if len(teacher_tokenizer) != len(student_tokenizer) or teacher_tokenizer.get_vocab() != student_tokenizer.get_vocab():
        raise ModelError(f"student {student_id} does not share the teacher's tokenizer ({len(student_tokenizer)} vs "
                         f"{len(teacher_tokenizer)} tokens, or different ids): choose a student from the teacher's family")
    return len(teacher_tokenizer)


def real_vocab_size(tokenizer, *models) -> int:
    """len(tokenizer), checked against every model's output size.

    Raises:
        ModelError: a model predicts fewer tokens than the tokenizer has.
    """
    vocab = len(tokenizer)
    for m in models:
        rows = m.get_output_embeddings().weight.shape[0]
        if rows < vocab:
            raise ModelError(f"{m.config.model_type} predicts {rows} tokens but its tokenizer has {vocab}: the folder is inconsistent")
    return vocab
