"""Progress bars (rate and ETA) that stay readable in log files as well as terminals."""

import sys

from tqdm import tqdm


def progress_bar(**kwargs) -> tqdm:
  """A tqdm bar; without a terminal it prints every 30 s instead of every step, so logs stay short."""
  interactive = sys.stderr.isatty()
  return tqdm(mininterval=0.5 if interactive else 30, dynamic_ncols=interactive, **kwargs)
