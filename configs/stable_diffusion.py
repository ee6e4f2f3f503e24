"""Stable Diffusion 1.x/2.x and SDXL (base or refiner) from local weights, for sample.py: a diffusers folder
(model_index.json with unet/, vae/, text_encoder/, tokenizer/ (SDXL: also text_encoder_2/, tokenizer_2/),
scheduler/) or a single CompVis/Stability checkpoint (.ckpt/.safetensors; then set --config.text_encoder.tokenizer
(and for SDXL --config.text_encoder_2.tokenizer) to tokenizer folders, and diffusion.mean_type=v for a 768-v SD 2.x
model). SDXL's base-to-refiner handoff: sample the base with --config.sample.denoising_end=0.8 (it writes latents),
then the refiner with --config.sample.denoising_start=0.8 --config.sample.init_images=<the base's samples .npz>.

  python sample.py --config configs/stable_diffusion.py:/models/stable-diffusion-v1-5 --workdir runs/sd15 \
      --config.sample.prompt="a photo of an astronaut riding a horse" --config.sample.num_samples=4

Every part's weights are read from the path (model/autoencoder/text_encoder.init_from); the scheduler config gives
the training process, and DDIM samples 50 steps with the scheduler's timestep spacing at guidance 7.5. The same
model in a notebook: `jaxdiff.load_pipeline(path)`. Each part of the config can still be overridden by flags.
"""

from jaxdiff import pipeline
from jaxdiff.convert import scheduler as convert_scheduler


def get_config(path=None):
  if not path:
    raise ValueError("configs/stable_diffusion.py needs the weights: --config=configs/stable_diffusion.py:<folder>")
  if path.endswith((".ckpt", ".safetensors", ".pt", ".pth", ".bin")):
    config, scheduler = pipeline.file_config(path)
  else:
    config, scheduler = pipeline.folder_config(path)
  s = config.sample
  s.sampler = "ddim"
  s.timestep_respacing = convert_scheduler.respacing_for(convert_scheduler.timestep_spacing(scheduler, "ddim"), 50)
  s.guidance_scale = 7.5
  s.use_ema = False
  s.num_samples = 4
  s.per_device_batch_size = 1
  return config
