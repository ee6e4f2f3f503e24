"""Stable Diffusion end to end: a tiny random diffusers StableDiffusionPipeline saved to a folder, loaded with
`jaxdiff.load_pipeline` and sampled from the same prompts and initial latents as diffusers, with DDIM and
DPM-Solver++ at 10 steps and guidance 7.5: the decoded images agree to 1e-4. Also sample.py on the same folder, and
the one-line errors of parts that do not fit together."""

import json
import os
import shutil

import numpy as np
import pytest

import jaxdiff
from helpers import REPO
from jaxdiff import cli
from jaxdiff.errors import CheckpointError
from jaxdiff.models import tokenizer as tokenizer_lib

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
pytestmark = [pytest.mark.torch, pytest.mark.usefixtures("torch_one_thread")]

PROMPTS = ["a red circle on a blue square", "two cats, 3 dogs & a horse!", "an astronaut riding a horse"]
CORPUS = PROMPTS + ["a photo of a green triangle", "the quick brown fox jumps over the lazy dog",
                    "numbers 0 1 2 3 4 5 6 7 8 9", "a painting of a lighthouse at night"]


def relative_error(ours, theirs):
  return float(np.linalg.norm(ours - theirs) / np.linalg.norm(theirs))


def tiny_pipeline(folder, *, cross_attention_dim=64, latent_channels=4, prediction_type="epsilon"):
  """A random SD-shaped pipeline: 2-level UNet with cross-attention on 8x8x4 latents, f=2 KL VAE (16x16 images),
  2-layer CLIP text encoder of one 64-channel head (a single file's heads are read as width / 64, as CLIP's), the SD
  1.x DDIM scheduler config."""
  torch.manual_seed(0)
  tokenizer_dir = os.path.join(folder, "_tokenizer")
  tokenizer_lib.build_tokenizer(CORPUS, tokenizer_dir)
  tokenizer = transformers.CLIPTokenizer.from_pretrained(tokenizer_dir)
  unet = diffusers.UNet2DConditionModel(
      sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
      down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
      cross_attention_dim=cross_attention_dim, attention_head_dim=8, norm_num_groups=32)  # SD 1.x: 8 heads, 32 groups
  vae = diffusers.AutoencoderKL(
      in_channels=3, out_channels=3, latent_channels=latent_channels, block_out_channels=(32, 64),
      layers_per_block=1, norm_num_groups=32, sample_size=16,
      down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
  text_encoder = transformers.CLIPTextModel(transformers.CLIPTextConfig(
      vocab_size=len(tokenizer), hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=1,
      max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
      pad_token_id=tokenizer.pad_token_id))
  scheduler = diffusers.DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                      clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                                      prediction_type=prediction_type)
  pipe = diffusers.StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                           scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                           requires_safety_checker=False)
  pipe.save_pretrained(folder)
  shutil.rmtree(tokenizer_dir)
  # As users load it: a scheduler built from_config of the saved config keeps its saved timestep spacing.
  return diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, feature_extractor=None,
                                                           requires_safety_checker=False)


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
  folder = str(tmp_path_factory.mktemp("sd"))
  return folder, tiny_pipeline(folder)


@pytest.mark.parametrize("sampler", ["ddim", "dpm_solver++"])
def test_images_match_diffusers_stable_diffusion_pipeline(sd_folder, sampler):
  folder, pipe = sd_folder
  ours = jaxdiff.load_pipeline(folder)
  x_T = ours.initial_latents(len(PROMPTS), seed=3)
  images = ours(PROMPTS, num_steps=10, guidance_scale=7.5, seed=3, sampler=sampler, output="float")
  if sampler == "dpm_solver++":
    pipe.scheduler = diffusers.DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
  else:
    pipe.scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler.config)
  with torch.no_grad():
    theirs = pipe(PROMPTS, num_inference_steps=10, guidance_scale=7.5, height=16, width=16, output_type="np",
                  latents=torch.from_numpy(x_T.transpose(0, 3, 1, 2).copy())).images
  assert images.shape == theirs.shape == (3, 16, 16, 3)
  error = relative_error((np.asarray(images) + 1) / 2, theirs)
  print(f"StableDiffusionPipeline parity, {sampler}, 10 steps, guidance 7.5: relative error {error:.2e}")
  assert error < 1e-4, error
  # uint8 output and a negative prompt: other images from the same compiled program.
  uint8 = ours(PROMPTS[:1], num_steps=10, guidance_scale=7.5, seed=3, sampler=sampler)
  negative = ours(PROMPTS[:1], num_steps=10, guidance_scale=7.5, seed=3, sampler=sampler,
                  negative_prompt="a blue square")
  assert uint8.dtype == np.uint8 and uint8.shape == (1, 16, 16, 3) and not np.array_equal(uint8, negative)


def test_sample_py_draws_from_the_folder_with_prompts(sd_folder, tmp_path):
  folder, _ = sd_folder
  prompts = tmp_path / "prompts.txt"
  prompts.write_text("\n".join(PROMPTS) + "\n")
  cwd = os.getcwd()
  os.chdir(REPO)
  try:
    cli.run_in_process("sample", ["sample", f"--config=configs/stable_diffusion.py:{folder}",
                                  f"--workdir={tmp_path / 'out'}", f"--config.sample.prompt_file={prompts}",
                                  "--config.sample.num_samples=3", "--config.sample.per_device_batch_size=3",
                                  "--config.sample.timestep_respacing=leading4"])
  finally:
    os.chdir(cwd)
  found = list((tmp_path / "out" / "samples").rglob("samples_3x16x16x3.npz"))
  with np.load(found[0]) as f:
    assert list(f["arr_1"]) == [0, 1, 2]
  with open(found[0].parent / "job.json") as f:
    assert json.load(f)["prompts"] == PROMPTS


def test_a_single_file_checkpoint_is_the_same_pipeline(sd_folder, tmp_path):
  """The folder's weights renamed into an SD 1.x single file (model.diffusion_model.*, first_stage_model.*,
  cond_stage_model.transformer.*): the layout is read from the shapes and the images are the folder's."""
  from safetensors.numpy import save_file
  from test_autoencoder import ldm_state_dict
  from test_unet_cross_attention import ldm_state
  folder, pipe = sd_folder
  numpy = lambda state: {k: v.detach().numpy().copy() for k, v in state.items()}
  unet = {k: v for k, v in ldm_state(numpy(pipe.unet.state_dict()), dict(pipe.unet.config)).items()
          if k.startswith("model.diffusion_model.")}
  state = {**unet, **{f"first_stage_model.{k}": v for k, v in numpy(ldm_state_dict(pipe.vae)).items()},
           **{f"cond_stage_model.transformer.{k}": v for k, v in numpy(pipe.text_encoder.state_dict()).items()}}
  path = str(tmp_path / "sd-tiny.safetensors")
  save_file(state, path)
  single = jaxdiff.load_pipeline(path, tokenizer=os.path.join(folder, "tokenizer"), image_size=16)
  assert single.experiment.diffusion_shape == (8, 8, 4) and single.config.diffusion.mean_type == "epsilon"
  ours = jaxdiff.load_pipeline(folder)
  kwargs = dict(num_steps=4, guidance_scale=7.5, seed=1, output="float")
  error = relative_error(np.asarray(single(PROMPTS, **kwargs)), np.asarray(ours(PROMPTS, **kwargs)))
  assert error < 1e-6, error


@pytest.mark.parametrize("part,change,message", [
    ("text_encoder", dict(hidden_size=48, intermediate_size=192), "width is 48 and the UNet"),
    ("vae", dict(latent_channels=3), "latents have 3 channels and the UNet takes 4"),
])
def test_parts_that_do_not_fit_stop_in_one_line(sd_folder, tmp_path, part, change, message):
  folder, _ = sd_folder
  copy = tmp_path / "sd"
  shutil.copytree(folder, copy)
  path = copy / part / "config.json"
  cfg = json.loads(path.read_text())
  cfg.update(change)
  path.write_text(json.dumps(cfg))
  with pytest.raises(CheckpointError) as info:
    jaxdiff.load_pipeline(str(copy))
  assert message in str(info.value) and "\n" not in str(info.value)


def test_a_folder_missing_a_part_stops_in_one_line(sd_folder, tmp_path):
  folder, _ = sd_folder
  copy = tmp_path / "sd"
  shutil.copytree(folder, copy)
  shutil.rmtree(copy / "tokenizer")
  with pytest.raises(CheckpointError, match="has no tokenizer/"):
    jaxdiff.load_pipeline(str(copy))
