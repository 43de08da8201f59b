"""Architecture only: encoder, projection, quantizer, decoder, text tower, and the whole UniTok."""
