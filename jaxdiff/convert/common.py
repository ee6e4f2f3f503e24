"""What the converters share: reading PyTorch weight files, and filling a params tree from a state dict by name.

A converter describes its layout as `sources(path) -> torch keys` for each jaxdiff parameter path; `fill_params`
then checks every key and shape in both directions before converting anything, so a wrong checkpoint fails with
one line naming the missing, unexpected and mis-shaped tensors.
"""

import json
import os
import struct
from typing import Callable

import jax
import ml_dtypes
import numpy as np

from jaxdiff.errors import CheckpointError

SAFETENSORS_DTYPES = {'F64': np.float64, 'F32': np.float32, 'F16': np.float16, 'BF16': ml_dtypes.bfloat16,
                      'I64': np.int64, 'I32': np.int32, 'I16': np.int16, 'I8': np.int8, 'U8': np.uint8,
                      'BOOL': np.bool_}


def read_safetensors(path: str) -> dict[str, np.ndarray]:
  """A .safetensors file as NumPy arrays; read directly (the format is a JSON header and raw little-endian data),
  so converting needs neither torch nor the safetensors package, and a truncated file is named as such."""
  size = os.path.getsize(path)
  with open(path, 'rb') as f:
    head = f.read(8)
    if len(head) < 8:
      raise CheckpointError(f'{path} is not a safetensors file ({size} bytes): re-download it.')
    header_len = struct.unpack('<Q', head)[0]
    if header_len > size - 8:
      raise CheckpointError(f'{path} is truncated or not a safetensors file (header of {header_len} bytes in a '
                            f'{size}-byte file): re-download it.')
    try:
      header = json.loads(f.read(header_len))
    except ValueError as e:
      raise CheckpointError(f'{path} has a corrupt safetensors header ({e}): re-download it.') from None
    data = f.read()
  header.pop('__metadata__', None)
  tensors = {}
  for name, info in header.items():
    start, end = info['data_offsets']
    if end > len(data):
      raise CheckpointError(f'{path} is truncated: tensor {name!r} ends at byte {end} of {len(data)} data bytes; '
                            're-download it.')
    if info['dtype'] not in SAFETENSORS_DTYPES:
      raise CheckpointError(f'{path}: tensor {name!r} has dtype {info["dtype"]}, which jaxdiff cannot convert.')
    tensors[name] = np.frombuffer(data[start:end], SAFETENSORS_DTYPES[info['dtype']]).reshape(info['shape'])
  return tensors


def read_torch(path: str) -> dict[str, np.ndarray]:
  """A PyTorch state dict file (.pt/.pth/.bin), loaded with weights_only=True (no pickled code runs)."""
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise CheckpointError(f'{path} is a PyTorch file and reading it needs torch: pip install torch==2.13.0, or '
                          'convert it to .safetensors.') from None
  try:
    state = torch.load(path, map_location='cpu', weights_only=True)
  except Exception as e:  # torch raises RuntimeError/EOFError/UnpicklingError on truncated or foreign files.
    detail = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
    raise CheckpointError(f'{path} is not a readable PyTorch state dict ({detail}): re-download it.') from None
  if isinstance(state, dict) and isinstance(state.get('state_dict'), dict):
    state = state['state_dict']
  if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
    raise CheckpointError(f'{path} holds a {type(state).__name__}, not a state dict of tensors.')
  return {k: v.detach().float().numpy() if v.dtype == torch.bfloat16 else v.detach().numpy()
          for k, v in state.items()}


def read_state_dict(path: str) -> dict[str, np.ndarray]:
  """Reads .safetensors directly and anything else with torch.load."""
  if not os.path.isfile(path):
    raise CheckpointError(f'No checkpoint file at {path}: check the path.')
  return read_safetensors(path) if path.endswith('.safetensors') else read_torch(path)


def to_jax_layout(leaf: str, tensor: np.ndarray) -> np.ndarray:
  """A torch tensor in the layout of the flax leaf it becomes (OIHW conv -> HWIO, [out, in] linear -> [in, out])."""
  if leaf != 'kernel':
    return tensor
  if tensor.ndim == 4:
    return tensor.transpose(2, 3, 1, 0)
  if tensor.ndim == 3 and tensor.shape[-1] == 1:  # guided-diffusion's 1x1 conv1d projections are linear layers
    tensor = tensor[..., 0]
  return tensor.T


def _summary(kind: str, names: list[str]) -> str:
  shown = ', '.join(names[:3])
  return f'{len(names)} {kind} ({shown}{", ..." if len(names) > 3 else ""})'


def fill_params(state_dict: dict, shapes, sources: Callable[[tuple[str, ...]], list[str]], *, what: str):
  """The params tree of `shapes` (ShapeDtypeStructs) filled from `state_dict`.

  `sources(path)` gives the torch keys of one jaxdiff leaf; several keys are concatenated along the torch output
  axis (diffusers' separate q, k, v into the fused qkv). Raises CheckpointError listing missing, unexpected and
  mis-shaped tensors.
  """
  flat = {tuple(k.key for k in path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(shapes)[0]}
  plan = {path: sources(path) for path in flat}
  used = {key for keys in plan.values() for key in keys}
  missing = sorted(key for key in used if key not in state_dict)
  unexpected = sorted(key for key in state_dict if key not in used)
  misshaped, converted = [], {}
  for path, keys in plan.items():
    if any(key not in state_dict for key in keys):
      continue
    tensor = np.concatenate([state_dict[k] for k in keys]) if len(keys) > 1 else np.asarray(state_dict[keys[0]])
    value = to_jax_layout(path[-1], tensor)
    if value.shape != flat[path].shape:
      misshaped.append(f'{"+".join(keys)} {tuple(tensor.shape)} for {"/".join(path)} {flat[path].shape}')
    converted[path] = value.astype(flat[path].dtype)
  problems = [_summary(kind, names) for kind, names in
              (('missing', missing), ('unexpected', unexpected), ('mis-shaped', misshaped)) if names]
  if problems:
    raise CheckpointError(f'{what} does not match the model: {"; ".join(problems)}. Check that the config '
                          'describes the network the checkpoint was trained with.')
  return jax.tree_util.tree_map_with_path(lambda p, _: converted[tuple(k.key for k in p)], shapes)
