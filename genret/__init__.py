"""Generative cross-modal retrieval: a multimodal LM that memorizes a catalog of images
under identifiers and retrieves them by generating those identifiers."""
