"""Checkpoint readers for files that are not a HF directory of 16/32-bit safetensors: each keeps
the weights in the bits the file has them (memory-mapped where it can) and hands out the
runtime's tensor names, a quantized matrix as a QWeight in the file's own format."""
