"""BitDance models in plain single-device PyTorch, one folder per family (`family.py`: the registry of families) over
a shared core (`core/`): binary tokenizer, diffusion head, AR backbones, samplers."""
