"""Segmentation network, its ONNX export and its model card.

Importing this package is cheap and torch-free: :mod:`engines.models.preprocess` (numpy only) is what the
inference backends use to turn raw pixels into the network input. :mod:`engines.models.unet` imports torch
and is only imported by training/evaluation (the ``train`` extra) and by the torch backend.
"""
