"""The binary tokenizer: the sign-quantized autoencoder, its quantizer losses and its official file layouts."""
