"""The stiffness estimates of docs/design.md 1.1, implemented once for the model, the export and the tests.

For consecutive blocks t-1, t of one stage, x is the value on the skip path (the block input,
projected by the shortcut in a stage's first block) and f the raw residual branch output.
"""

import torch

EPS = 1e-6


def estimates(x: torch.Tensor, x_prev: torch.Tensor, f: torch.Tensor, f_prev: torch.Tensor,
              eps: float = EPS) -> tuple[torch.Tensor, torch.Tensor]:
    """Channel stiffness s_{t,c} (B, C) and neural stiffness index NSI_t (B,), per sample.

    s_{t,c} = ||f_{t,c} - f_{t-1,c}|| / (||x_{t,c} - x_{t-1,c}|| + eps), norms over the spatial
    elements of one channel; NSI_t = ||f_t - f_{t-1}|| / (||x_t - x_{t-1}|| + eps), norms over all
    elements of the sample. A sample's norm is the norm of its channels' norms
    (||D|| = sqrt(sum_c ||D_c||^2)), so NSI reuses the channel norms and both differences are read
    once: the diagnostics then cost no extra pass over the feature maps.

    Under autocast (bf16, fp16 training) the differences and norms are taken in float32: a
    difference of two close half-precision maps, squared and summed, would lose the estimate.
    """
    if torch.is_autocast_enabled(f.device.type):
        x, x_prev, f, f_prev = x.float(), x_prev.float(), f.float(), f_prev.float()
    num = (f - f_prev).flatten(2).norm(dim=2)        # (B, C)
    den = (x - x_prev).flatten(2).norm(dim=2)
    return num / (den + eps), num.norm(dim=1) / (den.norm(dim=1) + eps)
