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
from kd2edge.models import decoder_layers


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

    _, layers = decoder_layers(model)
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

    path, layers = decoder_layers(model)
    kept = torch.nn.ModuleList([layers[i] for i in keep])
    for new_index, layer in enumerate(kept):
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_index
    parent, _, attr = path.rpartition(".")
    setattr(model.get_submodule(parent), attr, kept)
    model.config.num_hidden_layers = len(keep)
    if getattr(model.config, "layer_types", None) is not None:
        model.config.layer_types = [model.config.layer_types[i] for i in keep]
    return model


def mlp_projections(layer):
    """A decoder layer's gated MLP (llama, qwen2, mistral): (gate_proj, up_proj, down_proj).

    Raises:
        ModelError: the layer has no gated MLP of that shape (gpt_neox and others: no width pruning).
    """
    mlp = getattr(layer, "mlp", None)
    parts = tuple(getattr(mlp, name, None) for name in ("gate_proj", "up_proj", "down_proj"))
    if any(p is None for p in parts):
        raise ModelError(f"{type(layer).__name__} has no gated MLP (gate_proj, up_proj, down_proj): MLP width "
                         "pruning supports llama-, qwen2- and mistral-style models; leave distill.intermediate_size unset")
    return parts


def measure_mlp_importance(model, batches: Iterable[dict]) -> list:
    """Activation importance of every MLP neuron of every decoder layer (Muralidharan et al. 2024, "Minitron").

    A neuron's importance is the mean over calibration tokens of |h_j|, where h = act(gate(x)) * up(x)
    is the input of down_proj [B, L, I]: a neuron that is rarely active contributes little to the
    layer's output whatever its down_proj column holds.

    Args:
        model: a transformers causal LM with gated MLPs.
        batches: dicts with input_ids [B, L] and attention_mask [B, L].

    Returns:
        Per decoder layer, a float tensor [I] of mean absolute activations.
    """
    import torch

    _, layers = decoder_layers(model)
    sums = [None] * len(layers)
    count = [0]
    mask_now: list = [None]

    def hook(index):
        def record(module, args):
            h = args[0].detach().abs().float()                              # [B, L, I]
            keep = mask_now[0].to(h.dtype).unsqueeze(-1)                    # [B, L, 1]
            total = (h * keep).sum(dim=(0, 1))                              # [I]
            sums[index] = total if sums[index] is None else sums[index] + total
        return record

    handles = [mlp_projections(layer)[2].register_forward_pre_hook(hook(i)) for i, layer in enumerate(layers)]
    try:
        with torch.no_grad():
            for batch in batches:
                mask_now[0] = batch["attention_mask"].bool()
                count[0] += int(mask_now[0].sum())
                model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    finally:
        for h in handles:
            h.remove()
    if not count[0]:
        raise ModelError("MLP importance saw no calibration tokens: the calibration batches are empty")
    return [s / count[0] for s in sums]


def prune_mlp(model, importance: list, size: int):
    """Keep the `size` most important neurons of every MLP (rows of gate/up, columns of down), in place.

    Args:
        model: a transformers causal LM with gated MLPs.
        importance: per layer a tensor [I] (`measure_mlp_importance`).
        size: neurons to keep per layer, 1 <= size <= I.

    Returns:
        The same model, `config.intermediate_size` = size.

    Raises:
        ValueError: `size` out of range.
    """
    import torch

    _, layers = decoder_layers(model)
    for layer, scores in zip(layers, importance):
        gate, up, down = mlp_projections(layer)
        if not 1 <= size <= gate.out_features:
            raise ValueError(f"cannot keep {size} of {gate.out_features} MLP neurons")
        keep = torch.sort(torch.topk(scores, size).indices).values            # [size], in the original order
        for linear, dim in ((gate, 0), (up, 0), (down, 1)):
            linear.weight = torch.nn.Parameter(linear.weight.detach().index_select(dim, keep).clone())
            if linear.bias is not None and dim == 0:
                linear.bias = torch.nn.Parameter(linear.bias.detach().index_select(0, keep).clone())
        gate.out_features = up.out_features = down.in_features = size
    model.config.intermediate_size = size
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


CALIBRATION_ITEMS = 32   # training sequences used to measure block influence


def pruned_student(teacher, calibration: list[list[int]], pad_id: int, layers: int,
                   intermediate_size: int | None = None):
    """A copy of the teacher keeping its `layers` most influential decoder layers (first and last always)
    and, with `intermediate_size`, the most important neurons of each MLP (measured on the pruned copy).

    Args:
        teacher: the teacher causal LM (left unchanged).
        calibration: token id sequences to measure block influence on (the first CALIBRATION_ITEMS are used).
        pad_id: padding token id for batching them.
        layers: decoder layers to keep.
        intermediate_size: MLP neurons to keep per layer (None: all).

    Returns:
        (student, kept layer indices, block influence per teacher layer rounded to 6 decimals).
    """
    import copy

    from kd2edge.distill.train import TrainExample, collate

    seqs = calibration[:CALIBRATION_ITEMS]
    batches = [collate([TrainExample(tuple(s), tuple(s)) for s in seqs[i:i + 8]], pad_id)
               for i in range(0, len(seqs), 8)]
    importance = [round(x, 6) for x in measure_block_influence(teacher, batches)]
    kept = choose_layers(importance, layers)
    student = prune_layers(copy.deepcopy(teacher), kept)
    if intermediate_size is not None and intermediate_size < student.config.intermediate_size:
        prune_mlp(student, measure_mlp_importance(student, batches), intermediate_size)
    return student, kept, importance


def load_external_student(spec: str, teacher_tokenizer, teacher_params: int, teacher_id: str):
    """Resolve and load `--student`, checking its tokenizer and size before any training.

    Returns:
        (model, its artifact).

    Raises:
        ModelError: a different tokenizer, or a student not smaller than the teacher.
    """
    from transformers import AutoTokenizer

    from kd2edge.models import count_params, load_causal_lm, resolve_model

    artifact = resolve_model(spec)
    check_same_tokenizer(teacher_tokenizer, AutoTokenizer.from_pretrained(artifact.path), teacher_id, spec)
    model, _ = load_causal_lm(artifact.path)
    params = count_params(model)
    if params >= teacher_params:
        raise ModelError(f"student {spec} has {params:,} parameters, not fewer than the teacher's {teacher_params:,}: "
                         "choose a smaller student (or omit --student to plan one)")
    return model, artifact


def build_student(teacher, tokenizer, teacher_id: str, calibration: list[list[int]], layers: int | None = None,
                  spec: str | None = None, keep_ids: list[int] | None = None, intermediate_size: int | None = None):
    """The student: the teacher pruned to `layers` decoder layers (`pruned_student`) and, with `keep_ids`,
    its vocabulary trimmed (`kd2edge.distill.vocab.trim_model`); or the model `spec` names.

    Args:
        teacher: the teacher causal LM (left unchanged).
        tokenizer: the teacher's tokenizer (a `spec` student must share it).
        teacher_id: the teacher's name, for the student's id and messages.
        calibration: token id sequences in the teacher's ids, for block influence (pruning only).
        layers: decoder layers to keep (pruning); ignored with `spec`.
        spec: a separate student model (`kd2edge.models.resolve_model` spec), or None to prune.
        keep_ids: the teacher's token ids the student keeps (`vocab.choose_vocabulary`), or None for all.
        intermediate_size: MLP neurons the student keeps per layer (pruning only; None: all).

    Returns:
        (student, its tokenizer, {id, layers_kept, importance, teacher_params, vocab}).

    Raises:
        ModelError: a `spec` student with another tokenizer or not smaller than the teacher.
    """
    from kd2edge.distill.vocab import trim_model
    from kd2edge.models import count_params

    teacher_params = count_params(teacher)
    if spec:
        student, artifact = load_external_student(spec, tokenizer, teacher_params, teacher_id)
        built = {"id": artifact.manifest.get("id", spec), "layers_kept": None, "importance": None}
    else:
        student, kept, importance = pruned_student(teacher, calibration, tokenizer.pad_token_id, layers,
                                                   intermediate_size)
        built = {"id": f"{teacher_id} [layers {','.join(map(str, kept))}]", "layers_kept": kept,
                 "importance": importance}
        if intermediate_size is not None:
            built["id"] += f" [MLP {student.config.intermediate_size} of {teacher.config.intermediate_size}]"
    real_vocab_size(tokenizer, teacher, student)
    student_tokenizer = tokenizer
    if keep_ids is not None:
        student, student_tokenizer = trim_model(student, tokenizer, keep_ids)
        built["id"] += f" [vocabulary {len(keep_ids)} of {len(tokenizer)}]"
    return student, student_tokenizer, {**built, "teacher_params": teacher_params, "vocab": len(student_tokenizer)}
