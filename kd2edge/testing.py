"""Tiny models and tokenizers built in-process, for tests and benchmarks.

No hub, no files: `tiny_model_dir(tmp, "llama")` writes a 2-layer, hidden-64
transformers folder (random weights, fixed seed) with a small byte-level BPE
tokenizer trained here on a fixed English/Spanish text, with a ChatML template.

`tiny_model` initialises weights with std 0.02, so its next-token distribution is
nearly flat and greedy decoding repeats one token: useless to tell a right KV cache
from a wrong one. `sharp_tiny_model` redraws the matrices with a larger spread, which
gives varied greedy sequences while staying a real transformers model (export and
runtime tests). `tiny_gptq_checkpoint` and `embedded_rtn_checkpoint` write GPTQ-format
checkpoints for the export tests and benchmarks.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

ARCHS = ("llama", "qwen2", "gpt_neox")
CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_CORPUS = [
    "Context: The Velmora Institute was founded in 1871 by Adaline Qorr in the city of Tessaly.",
    "Question: Who founded the Velmora Institute? Answer: Adaline Qorr",
    "Contexto: La ciudad de Brimor fue fundada en 1620 por el explorador Tomás Ivarra junto al río Selen.",
    "Pregunta: ¿Quién fundó Brimor? Respuesta: Tomás Ivarra",
    "The quick brown fox jumps over the lazy dog. Numbers 0 1 2 3 4 5 6 7 8 9 and years 1999 2024.",
    "A river flows north through the valley; its water feeds the orchards of the old monastery.",
    "El puerto exporta café, cacao y madera; su faro tiene ciento veinte años de historia.",
] * 4


@lru_cache(maxsize=1)
def tiny_tokenizer():
    """A byte-level BPE tokenizer (~400 tokens) as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_CORPUS, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   bos_token=None, unk_token=None)
    fast.chat_template = CHATML
    return fast


def tiny_config(arch: str, vocab_size: int, num_layers: int = 2, hidden: int = 64):
    """A transformers config for a tiny model of `arch` (llama, qwen2, gpt_neox; also mistral,
    used by the fused-exporter tests only)."""
    from transformers import GPTNeoXConfig, LlamaConfig, MistralConfig, Qwen2Config

    common = dict(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=num_layers,
                  num_attention_heads=4, intermediate_size=hidden * 2, max_position_embeddings=512)
    if arch == "llama":
        return LlamaConfig(**common, num_key_value_heads=2, tie_word_embeddings=True)
    if arch == "qwen2":
        return Qwen2Config(**common, num_key_value_heads=2, tie_word_embeddings=False)
    if arch == "mistral":
        # Full attention (no sliding window): the configuration the fused exporter supports.
        return MistralConfig(**common, num_key_value_heads=2, sliding_window=None, tie_word_embeddings=False)
    if arch == "gpt_neox":
        return GPTNeoXConfig(**common, rotary_pct=0.25, use_parallel_residual=True, tie_word_embeddings=False)
    raise ValueError(f"unknown tiny arch {arch!r} (known: {', '.join(ARCHS)}, mistral)")


def tiny_model(arch: str = "llama", num_layers: int = 2, hidden: int = 64, seed: int = 0):
    """(model, tokenizer): a tiny randomly initialised causal LM in eval mode."""
    import torch
    from transformers import AutoModelForCausalLM

    tokenizer = tiny_tokenizer()
    torch.manual_seed(seed)
    config = tiny_config(arch, len(tokenizer), num_layers, hidden)
    config.eos_token_id = tokenizer.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model.eval(), tokenizer


def tiny_model_dir(folder: str | Path, arch: str = "llama", num_layers: int = 2, hidden: int = 64,
                   seed: int = 0) -> Path:
    """Write a tiny model + tokenizer as a transformers folder and return its path."""
    folder = Path(folder)
    model, tokenizer = tiny_model(arch, num_layers, hidden, seed)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def sharp_tiny_model(arch: str = "llama", seed: int = 0, std: float = 0.15):
    """(model, tokenizer): `kd2edge.testing.tiny_model(arch)` with its matrices redrawn from N(0, std²)."""
    import torch

    model, tokenizer = tiny_model(arch, seed=seed)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 2:  # Linear and embedding matrices; norms keep their ones
                param.copy_(torch.randn(param.shape, generator=generator) * std)
    return model, tokenizer


def sharp_tiny_model_dir(folder: str | Path, arch: str = "llama", seed: int = 0) -> Path:
    """Write `sharp_tiny_model(arch, seed)` as a transformers folder and return it."""
    folder = Path(folder)
    model, tokenizer = sharp_tiny_model(arch, seed)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def tiny_gptq_checkpoint(folder: str | Path, arch: str = "llama", group_size: int = 32, act_order: bool = True,
                         seed: int = 0, shared_inputs: bool = False, quantize_head: bool = False) -> Path:
    """A 4-bit GPTQ checkpoint of `sharp_tiny_model(arch, seed)`, written by kd2edge.quantize.

    Each Linear of the decoder layers is quantized with GPTQ against a Hessian of
    random inputs whose features have unequal scales, so act-order really permutes
    the columns (non-contiguous g_idx). lm_head and embeddings stay float, as in GPTQ.
    By default every Linear gets its own Hessian (q, k and v end up with different
    act-order permutations); `shared_inputs` gives Linears that read the same
    activations (q/k/v, gate/up) one Hessian, as real GPTQ calibration does, so
    their permutations coincide. `quantize_head` also quantizes lm_head (tied for llama:
    the embedding too), with static groups as the quantize stage does.
    """
    import torch

    from kd2edge.gptq_checkpoint import write_gptq_checkpoint
    from kd2edge.quantize.gptq import gptq_quantize_weight

    model, tokenizer = sharp_tiny_model(arch, seed)
    generator = torch.Generator().manual_seed(seed + 2)
    head = model.get_output_embeddings()
    results, hessians = {}, {}
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or (module is head and not quantize_head):
            continue
        k = module.in_features
        # q/k/v (and gate/up) sit in one parent module and read the same input
        key = (name.rsplit(".", 1)[0], k, name.endswith(("o_proj", "down_proj"))) if shared_inputs else name
        if key not in hessians:
            x = (torch.randn(k, 256, generator=generator)
                 * torch.linspace(0.2, 2.0, k)[torch.randperm(k, generator=generator)][:, None])
            hessians[key] = 2 * x @ x.T / 256
        results[name] = gptq_quantize_weight(module.weight.detach(), hessians[key], bits=4,
                                             group_size=group_size, act_order=act_order,
                                             static_groups=module is head)
    write_gptq_checkpoint(model, tokenizer, results, folder, bits=4, group_size=group_size, desc_act=act_order,
                          sym=False)
    return Path(folder)


def embedded_rtn_checkpoint(folder: str | Path, group_size: int = 64) -> Path:
    """A 4-bit round-to-nearest GPTQ-format checkpoint of the embedded teacher (a fast stand-in for GPTQ).

    For slow tests and benchmarks: loads SmolLM2-135M-Instruct from kd2edge's cache.
    """
    import torch

    from kd2edge.models import load_causal_lm, resolve_model
    from kd2edge.gptq_checkpoint import write_gptq_checkpoint
    from kd2edge.quantize.gptq import rtn_quantize_weight

    model, tokenizer = load_causal_lm(resolve_model("embedded").path)
    head = model.get_output_embeddings()
    results = {n: rtn_quantize_weight(m.weight, 4, group_size) for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and m is not head}
    write_gptq_checkpoint(model, tokenizer, results, folder, bits=4, group_size=group_size, desc_act=False,
                          sym=False)
    return Path(folder)
