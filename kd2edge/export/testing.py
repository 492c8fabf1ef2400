"""Tiny models with decisive logits, for export and runtime tests and benchmarks.

`kd2edge.testing.tiny_model` initialises weights with std 0.02, so its next-token
distribution is nearly flat and greedy decoding repeats one token: useless to tell
a right KV cache from a wrong one. Re-drawing the matrices with a larger spread
gives varied greedy sequences while staying a real transformers model.
"""

from __future__ import annotations

from pathlib import Path


def sharp_tiny_model(arch: str = "llama", seed: int = 0, std: float = 0.15):
    """(model, tokenizer): `kd2edge.testing.tiny_model(arch)` with its matrices redrawn from N(0, std²)."""
    import torch

    from kd2edge.testing import tiny_model

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
                         seed: int = 0, shared_inputs: bool = False) -> Path:
    """A 4-bit GPTQ checkpoint of `sharp_tiny_model(arch, seed)`, written by kd2edge.quant.

    Each Linear of the decoder layers is quantized with GPTQ against a Hessian of
    random inputs whose features have unequal scales, so act-order really permutes
    the columns (non-contiguous g_idx). lm_head and embeddings stay float, as in GPTQ.
    By default every Linear gets its own Hessian (q, k and v end up with different
    act-order permutations); `shared_inputs` gives Linears that read the same
    activations (q/k/v, gate/up) one Hessian, as real GPTQ calibration does, so
    their permutations coincide.
    """
    import torch

    from kd2edge.quant.checkpoint import write_gptq_checkpoint
    from kd2edge.quant.gptq import gptq_quantize_weight

    model, tokenizer = sharp_tiny_model(arch, seed)
    generator = torch.Generator().manual_seed(seed + 2)
    head = model.get_output_embeddings()
    results, hessians = {}, {}
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or module is head:
            continue
        k = module.in_features
        # q/k/v (and gate/up) sit in one parent module and read the same input
        key = (name.rsplit(".", 1)[0], k, name.endswith(("o_proj", "down_proj"))) if shared_inputs else name
        if key not in hessians:
            x = (torch.randn(k, 256, generator=generator)
                 * torch.linspace(0.2, 2.0, k)[torch.randperm(k, generator=generator)][:, None])
            hessians[key] = 2 * x @ x.T / 256
        results[name] = gptq_quantize_weight(module.weight.detach(), hessians[key], bits=4,
                                             group_size=group_size, act_order=act_order)
    write_gptq_checkpoint(model, tokenizer, results, folder, bits=4, group_size=group_size, desc_act=act_order,
                          sym=False)
    return Path(folder)


def embedded_rtn_checkpoint(folder: str | Path, group_size: int = 64) -> Path:
    """A 4-bit round-to-nearest GPTQ-format checkpoint of the embedded teacher (a fast stand-in for GPTQ).

    For slow tests and benchmarks: loads SmolLM2-135M-Instruct from kd2edge's cache.
    """
    import torch

    from kd2edge.models import load_causal_lm, resolve_model
    from kd2edge.quant.checkpoint import write_gptq_checkpoint
    from kd2edge.quant.gptq import rtn_quantize_weight

    model, tokenizer = load_causal_lm(resolve_model("embedded").path)
    head = model.get_output_embeddings()
    results = {n: rtn_quantize_weight(m.weight, 4, group_size) for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and m is not head}
    write_gptq_checkpoint(model, tokenizer, results, folder, bits=4, group_size=group_size, desc_act=False,
                          sym=False)
    return Path(folder)
