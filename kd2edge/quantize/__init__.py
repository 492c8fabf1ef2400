"""GPTQ 4-bit quantization (Frantar et al., 2022), implemented in-project."""
