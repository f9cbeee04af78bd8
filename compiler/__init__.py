"""The compiler: quantized transformer graphs to instruction streams.

It reads a LLaMA-family decoder (a Hugging Face model, a GGUF file or a config alone), lowers
it to a graph IR of LLM operators, quantizes and sparsifies it with the numerics of `trimem`,
places each operator on the FPGA DSP chains, the PIM banks or the in-storage attention engine
by arithmetic intensity, tiles and maps it onto the memories, schedules the engines with
dependency tokens, and emits a bundle. Each stage is a small pass over one IR.
"""
