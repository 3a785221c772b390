"""StepNet and the ResNet / SE baselines in PyTorch: networks, data, training, checkpoints.

The entry point is `models.net.build(family, depth, num_classes, input_size)`. This file imports
nothing, so that `stepnet --help` and the torch-free serving image can import `models.cli`.
"""
