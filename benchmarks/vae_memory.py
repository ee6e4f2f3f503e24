"""Peak host memory and time of the SDXL VAE decoder (fp32, batch 1) at 1024x1024 on CPU, whole or in tiles.

  python benchmarks/vae_memory.py            # both modes, each in a fresh process; prints a table
  python benchmarks/vae_memory.py --mode plain --size 1024

The weights are randomly initialised (the layout, not the values, sets the memory). Peak memory is the process's
maximum resident set size (getrusage), which includes the Python/JAX runtime (~0.4 GiB) and the weights (0.3 GiB).
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def measure(mode: str, size: int, tile: int) -> dict:
  import jax
  import numpy as np
  from jaxdiff.models import autoencoder

  kind, section, _ = autoencoder.PUBLISHED_LAYOUTS["sdxl"]
  model = autoencoder.create_autoencoder(section, channels=3)
  params = autoencoder.init_params(model, jax.random.key(0))
  factor = 2 ** (len(section["channel_mult"]) - 1)
  z = jax.random.normal(jax.random.key(1), (1, size // factor, size // factor, section["latent_channels"]))
  start = time.time()
  if mode == "plain":
    decode = jax.jit(lambda p, z: model.apply({"params": p}, z, method=model.decode))
    image = np.asarray(jax.block_until_ready(decode(params, z)))
  else:
    image = np.asarray(autoencoder.tiled_decode(model, params, z, tile=tile))
  seconds = time.time() - start
  assert image.shape == (1, size, size, 3) and np.isfinite(image).all()
  peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return {"mode": mode if mode == "plain" else f"tiled ({tile}x{tile} latents, 25% overlap)", "size": size,
          "seconds_with_compile": round(seconds, 1), "peak_rss_gib": round(peak_kib / 2 ** 20, 2)}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--mode", choices=("plain", "tiled"))
  parser.add_argument("--size", type=int, default=1024)
  parser.add_argument("--tile", type=int, default=64, help="latent pixels per tile (64 = 512x512 image tiles)")
  args = parser.parse_args(argv)
  if args.mode:
    print(json.dumps(measure(args.mode, args.size, args.tile)))
    return
  rows = []
  for mode in ("plain", "tiled"):
    out = subprocess.run([sys.executable, __file__, f"--mode={mode}", f"--size={args.size}", f"--tile={args.tile}"],
                         check=True, capture_output=True, text=True).stdout
    rows.append(json.loads(out.strip().splitlines()[-1]))
  print("| decoder (SDXL VAE, fp32, batch 1) | image | time incl. compile | peak RSS |")
  print("|---|---|---|---|")
  for r in rows:
    print(f"| {r['mode']} | {r['size']}x{r['size']} | {r['seconds_with_compile']} s | {r['peak_rss_gib']} GiB |")


if __name__ == "__main__":
  main()
