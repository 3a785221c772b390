"""The defaults of `stepnet analyze`, torch-free so that the command's help can show them."""

DEFAULT_DEPTH, DEFAULT_SEEDS, DEFAULT_EPOCHS = 20, 3, 5
DEFAULT_SPARSE_K = (1, 3)       # numbers of stiffest blocks that get an adaptor
OOD_SEEDS = 1                   # models per family of --study ood
