"""The weights a sampling or evaluation job runs: converted PyTorch weights (`model.init_from`) or the workdir's
newest checkpoint. The trainer never converts: `python -m jaxdiff.convert` writes a checkpoint it restores."""

from jaxdiff import convert
from jaxdiff.train import experiment as experiment_lib
from jaxdiff.train import mesh as mesh_lib


def load(exp: experiment_lib.Experiment, workdir: str, *, use_ema: bool):
  """(params on the mesh, step): step 0 for converted weights."""
  config = exp.config
  if config.model.init_from:
    params = convert.load_for_model(config.model.init_from, exp.model, image_size=config.data.image_size,
                                    in_channels=config.data.channels)
    return mesh_lib.host_to_mesh(params, exp.state_sharding.params, process_local=False), 0
  return exp.restore_params(workdir, use_ema=use_ema)
