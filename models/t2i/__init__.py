"""Text-to-image BitDance: the Qwen3-backbone model, sequence packing, the text tokenizer, its next-patch decoder,
the official folder layout, and its megatron-core port (`models.t2i.megatron`)."""
