"""Class-conditional (ImageNet) BitDance: the model, its blocks, its next-patch decoder and its official checkpoints."""
