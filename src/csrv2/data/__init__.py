"""Inputs: backbones that embed texts and images, packaged corpora and user files, training arrays, the embedding cache."""
