"""Inference: sessions on the devices, the batcher, pre- and post-processing, the live stiffness statistics."""
