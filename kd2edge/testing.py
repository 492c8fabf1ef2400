"""Tiny models and tokenizers built in-process, for tests and benchmarks.

No hub, no files: `tiny_model_dir(tmp, "llama")` writes a 2-layer, hidden-64
transformers folder (random weights, fixed seed) with a small byte-level BPE
tokenizer trained here on a fixed English/Spanish text, with a ChatML template.
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
