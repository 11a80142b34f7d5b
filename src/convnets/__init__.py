"""Keras convnets on small image data sets (Deep Learning with Python, chapter 8) as DVC stages."""
