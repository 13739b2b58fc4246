"""Llama 4's vision tower (config, encoder, weights) and the merge of image features into text embeddings."""
