"""Inference: engines (transformers now, vLLM on GPUs), the chat loop, dataset evaluation, LoRA merging.

The Python API is in `martlet.llm` (`inference`, `inference_stream`, `infer_main`, `merge_lora`).
"""
