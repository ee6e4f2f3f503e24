"""One 3x3 convolution, XLA on CPU against PyTorch (oneDNN): where jaxdiff's CPU time goes at small widths.

  python benchmarks/conv_microbench.py

Prints the median forward and forward+backward time of a single NHWC convolution at a few (batch, size, channels).
"""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from compare_pytorch import cpu_description, median_time, xla_flags  # noqa: E402  pylint: disable=wrong-import-position

SHAPES = [(8, 32, 64), (8, 16, 128), (32, 28, 16)]  # (batch, height = width, channels in = out)


def main():
  added = xla_flags.add_cpu_defaults()
  print(f"CPU: {cpu_description()}; XLA_FLAGS: {os.environ.get('XLA_FLAGS', '')!r} ({added} added as the jobs do)")
  conv = jax.jit(lambda a, k: jax.lax.conv_general_dilated(a, k, (1, 1), "SAME",
                                                           dimension_numbers=("NHWC", "HWIO", "NHWC")))
  grad = jax.jit(jax.grad(lambda a, k: conv(a, k).sum(), argnums=(0, 1)))
  print("| batch x size x channels | XLA fwd ms | torch fwd ms | XLA fwd+bwd ms | torch fwd+bwd ms |")
  print("|---|---|---|---|---|")
  for b, hw, c in SHAPES:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((b, hw, hw, c), np.float32)
    w = rng.standard_normal((3, 3, c, c), np.float32)
    jx, jw = jnp.asarray(x), jnp.asarray(w)
    tx = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous().requires_grad_()
    tw = torch.from_numpy(w).permute(3, 2, 0, 1).contiguous().requires_grad_()

    def torch_grad():
      return torch.autograd.grad(torch.nn.functional.conv2d(tx, tw, padding=1).sum(), (tx, tw))

    reps = 10
    times = [median_time(lambda: conv(jx, jw), reps, jax.block_until_ready),
             median_time(lambda: torch.nn.functional.conv2d(tx.detach(), tw.detach(), padding=1), reps, lambda r: r),
             median_time(lambda: grad(jx, jw), reps, jax.block_until_ready),
             median_time(torch_grad, reps, lambda r: r)]
    print(f"| {b} x {hw}x{hw} x {c} | " + " | ".join(f"{t * 1e3:.2f}" for t in times) + " |")


if __name__ == "__main__":
  main()
