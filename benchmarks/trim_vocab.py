"""A vocabulary-trimmed copy of a GPTQ checkpoint, for speed measurements only.

    python benchmarks/trim_vocab.py CHECKPOINT OUT [--keep 24576]

Keeps the first --keep token ids: rows of the embedding, columns of a 4-bit lm_head (its qweight
and scales columns; qzeros hold 8 columns a word, so --keep must be a multiple of 8 and the packed
words are sliced whole, without unpacking), rows of a float untied lm_head. config.json gets
vocab_size = keep. The tokenizer is copied unchanged: this is NOT vocabulary trimming (the distill
stage does that, remapping the tokenizer to the tokens its data uses), only a model of the same
shape as a trimmed one, to time what a smaller head costs. Text with tokens beyond the first --keep
ids does not fit it: the timing benchmarks (bench_vs_llamacpp.py, bench_decode_overhead.py) fold such
ids below the vocabulary (id % vocab), which keeps the token count, all that the timings depend on.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path


def trim_checkpoint(src: Path, out: Path, keep: int) -> Path:
    """Write `src` with its vocabulary cut to the first `keep` ids into `out` (see the module docstring).

    Raises:
        SystemExit: keep not a multiple of 8, or not smaller than the vocabulary.
    """
    from safetensors.torch import load_file, save_file

    from kd2edge.gptq_checkpoint import WEIGHTS_FILE

    config = json.loads((src / "config.json").read_text())
    vocab = int(config["vocab_size"])
    if keep % 8 or not 0 < keep < vocab:
        raise SystemExit(f"--keep {keep}: give a multiple of 8 below the vocabulary size {vocab}")
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(src, out, ignore=shutil.ignore_patterns("manifest.json", "*.png", "quant_report.json"))
    tensors = load_file(str(out / WEIGHTS_FILE))
    trimmed = {}
    for name, t in tensors.items():
        if name.endswith(("embed_tokens.weight", "lm_head.weight")) and t.shape[0] == vocab:
            trimmed[name] = t[:keep]                                     # [V, H] rows
        elif name.startswith("lm_head.") and name.endswith(("qweight", "scales")) and t.shape[1] == vocab:
            trimmed[name] = t[:, :keep]                                  # [*, V] columns
        elif name == "lm_head.qzeros" and t.shape[1] * 8 == vocab:
            trimmed[name] = t[:, :keep // 8]                             # 8 columns a 32-bit word
        else:
            trimmed[name] = t
    save_file({k: v.contiguous() for k, v in trimmed.items()}, str(out / WEIGHTS_FILE), metadata={"format": "pt"})
    config["vocab_size"] = keep
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--keep", type=int, default=24576)
    args = parser.parse_args()
    trim_checkpoint(args.checkpoint, args.out, args.keep)
    from tokenizers import Tokenizer

    from kd2edge.runtime.profiler import PROMPT_TEXT

    ids = Tokenizer.from_file(str(args.out / "tokenizer.json")).encode(PROMPT_TEXT).ids
    beyond = sum(i >= args.keep for i in ids)
    print(f"{args.out}: vocab {args.keep}; {beyond} of the profiling prompt's {len(ids)} tokens lie beyond it"
          + (" (timing benchmarks fold them below: `kd2edge profile` cannot run this model)" if beyond else ""))


if __name__ == "__main__":
    main()
