"""BitDance models in plain single-device PyTorch: binary tokenizer, diffusion head, AR backbones, samplers."""
