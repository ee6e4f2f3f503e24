"""XLA:CPU settings that jaxdiff's jobs add to XLA_FLAGS before JAX starts its backends.

Measured on a 2-core CPU with jaxlib 0.10 (benchmarks/RESULTS.md): XLA routes convolutions to YNNPACK by default,
and its own convolutions are faster for these UNets (sampling about 1.3x, training about 1.1x). The flag is
experimental, and XLA aborts on a flag it does not know, so it is added only for the jaxlib versions it was measured
on. A flag already present in XLA_FLAGS is left as the user set it; the flags do nothing on GPU or TPU.
"""

import importlib.metadata
import os

CPU_FLAGS = {'xla_cpu_experimental_ynn_fusion_type': '-individual_convolution'}
MEASURED_JAXLIB = ('0.10.',)


def add_cpu_defaults(environ=os.environ) -> list[str]:
  """Appends CPU_FLAGS that XLA_FLAGS does not set yet (call before JAX creates a backend); returns those added."""
  try:
    jaxlib_version = importlib.metadata.version('jaxlib')
  except importlib.metadata.PackageNotFoundError:
    return []
  if not jaxlib_version.startswith(MEASURED_JAXLIB):
    return []
  current = environ.get('XLA_FLAGS', '')
  added = [f'--{name}={value}' for name, value in CPU_FLAGS.items() if f'--{name}=' not in current]
  if added:
    environ['XLA_FLAGS'] = ' '.join([current, *added]).strip()
  return added
