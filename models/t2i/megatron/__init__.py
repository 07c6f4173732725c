"""The text-to-image model on megatron-core: config, layer spec, model, weight mapping (needs the `megatron` extra).

Nothing here is imported by `models/`; megatron-core itself is imported only by the submodules.
"""
