"""The surgeon toolkit: router profiling and expert removal on safetensors MoE checkpoints.

Runs on the DGX, driven over SSH by ``epiconsole surgeon inspect|profile|drop|validate``. ``inspect``,
``drop`` and the structural part of ``validate`` parse safetensors headers themselves and copy byte
ranges, so they never import torch; only ``profile`` and validation's generation step load torch and
transformers (the ``surgeon`` extra), lazily.
"""
