"""SDXL end to end: tiny random diffusers StableDiffusionXLPipeline (base: two text encoders) and refiner
(StableDiffusionXLImg2ImgPipeline: the bigG-like encoder alone, aesthetic scores) saved to folders, loaded with
`jaxdiff.load_pipeline` and sampled from the same prompts, micro-conditioning (original size, crop, target size),
initial latents and img2img noise as diffusers: text-to-image, img2img at a strength, and the base-to-refiner
handoff (denoising_end / denoising_start) give the same images to 1e-4. Also sample.py running the handoff."""

import os
import shutil

import numpy as np
import pytest

import jaxdiff
from helpers import REPO
from jaxdiff import cli
from jaxdiff.models import tokenizer as tokenizer_lib

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
pytestmark = [pytest.mark.torch, pytest.mark.usefixtures("torch_one_thread")]

PROMPTS = ["a red circle on a blue square", "two cats, 3 dogs & a horse"]  # no "!": diffusers pads tokenizer_2 with it
CORPUS = PROMPTS + ["a photo of a green triangle", "the quick brown fox jumps over the lazy dog",
                    "numbers 0 1 2 3 4 5 6 7 8 9"]
MICRO_DIM = 8  # addition_time_embed_dim of the tiny UNets (SDXL: 256)
SIZE = dict(height=16, width=24)  # a non-square image: 8x12 latents of the f=2 VAE
MICRO = dict(original_size=(40, 56), crops_coords_top_left=(4, 2), target_size=(16, 24))


def relative_error(ours, theirs):
  return float(np.linalg.norm(ours - theirs) / np.linalg.norm(theirs))


def _text_encoders(tokenizer):
  common = dict(vocab_size=len(tokenizer), intermediate_size=256, num_hidden_layers=2, max_position_embeddings=77,
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id)
  # One 64-channel head each: a single file's heads are read as width / 64, as CLIP's and SDXL's.
  clip_l = transformers.CLIPTextModel(transformers.CLIPTextConfig(hidden_size=64, num_attention_heads=1, **common))
  big_g = transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(
      hidden_size=64, num_attention_heads=1, projection_dim=24, hidden_act="gelu", **common))
  return clip_l, big_g


def _unet(*, context: int, pooled: int, scalars: int):
  return diffusers.UNet2DConditionModel(
      sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
      down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
      transformer_layers_per_block=(1, 2), attention_head_dim=(1, 1), use_linear_projection=True,
      cross_attention_dim=context, addition_embed_type="text_time", addition_time_embed_dim=MICRO_DIM,
      projection_class_embeddings_input_dim=pooled + scalars * MICRO_DIM, norm_num_groups=32)


def _vae():
  return diffusers.AutoencoderKL(
      in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64), layers_per_block=1,
      norm_num_groups=32, sample_size=16, scaling_factor=0.13025,
      down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)


def _scheduler():
  return diffusers.DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                                 set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading")


@pytest.fixture(scope="module")
def sdxl_folders(tmp_path_factory):
  """(base folder, refiner folder, diffusers base, diffusers refiner) sharing the VAE and the bigG-like encoder."""
  root = tmp_path_factory.mktemp("sdxl")
  torch.manual_seed(0)
  tokenizer_dir = str(root / "_tokenizer")
  tokenizer_lib.build_tokenizer(CORPUS, tokenizer_dir)
  tokenizer = transformers.CLIPTokenizer.from_pretrained(tokenizer_dir)
  tokenizer_2 = transformers.CLIPTokenizer.from_pretrained(tokenizer_dir, pad_token="!")  # OpenCLIP's padding
  clip_l, big_g = _text_encoders(tokenizer)
  vae = _vae()
  base = diffusers.StableDiffusionXLPipeline(
      vae=vae, text_encoder=clip_l, text_encoder_2=big_g, tokenizer=tokenizer, tokenizer_2=tokenizer_2,
      unet=_unet(context=128, pooled=24, scalars=6), scheduler=_scheduler(), force_zeros_for_empty_prompt=True)
  refiner = diffusers.StableDiffusionXLImg2ImgPipeline(
      vae=vae, text_encoder=None, text_encoder_2=big_g, tokenizer=None, tokenizer_2=tokenizer_2,
      unet=_unet(context=64, pooled=24, scalars=5), scheduler=_scheduler(), requires_aesthetics_score=True,
      force_zeros_for_empty_prompt=False)
  base_dir, refiner_dir = str(root / "base"), str(root / "refiner")
  base.save_pretrained(base_dir)
  refiner.save_pretrained(refiner_dir)
  shutil.rmtree(tokenizer_dir)
  return (base_dir, refiner_dir, diffusers.StableDiffusionXLPipeline.from_pretrained(base_dir),
          diffusers.StableDiffusionXLImg2ImgPipeline.from_pretrained(refiner_dir))


def _torch(latents):
  return torch.from_numpy(np.asarray(latents).transpose(0, 3, 1, 2).copy())


def _set_sampler(pipe, sampler):
  cls = diffusers.DPMSolverMultistepScheduler if sampler == "dpm_solver++" else diffusers.DDIMScheduler
  pipe.scheduler = cls.from_config(pipe.scheduler.config)


@pytest.mark.parametrize("sampler", ["ddim", "dpm_solver++"])
def test_images_match_diffusers_sdxl_pipeline(sdxl_folders, sampler):
  base_dir, _, pipe, _ = sdxl_folders
  ours = jaxdiff.load_pipeline(base_dir)
  config = ours.config
  assert config.latent.micro_conditioning == ("original_size", "crops_coords_top_left", "target_size")
  assert config.latent.text_null == "zeros" and config.text_encoder_2.projection_dim == 24
  x_T = ours.initial_latents(len(PROMPTS), seed=3, **SIZE)
  images = ours(PROMPTS, num_steps=8, guidance_scale=5.0, seed=3, sampler=sampler, output="float", **SIZE, **MICRO)
  _set_sampler(pipe, sampler)
  with torch.no_grad():
    theirs = pipe(PROMPTS, num_inference_steps=8, guidance_scale=5.0, output_type="np", latents=_torch(x_T),
                  **SIZE, **MICRO).images
  assert images.shape == theirs.shape == (2, 16, 24, 3)
  error = relative_error((np.asarray(images) + 1) / 2, theirs)
  print(f"StableDiffusionXLPipeline parity, {sampler}, 8 steps, guidance 5, 16x24: relative error {error:.2e}")
  assert error < 1e-4, error


def test_img2img_matches_diffusers_at_a_strength(sdxl_folders, monkeypatch):
  """SDEdit from given latents at strength 0.6: diffusers' noise is replaced by the noise jaxdiff draws (the
  sample's x_T), so both runs start from the same noised latents."""
  from diffusers.pipelines.stable_diffusion_xl import pipeline_stable_diffusion_xl_img2img as img2img
  base_dir, _, pipe, _ = sdxl_folders
  ours = jaxdiff.load_pipeline(base_dir)
  init = np.random.default_rng(0).standard_normal((2, 8, 12, 4)).astype(np.float32)
  images = ours(PROMPTS, num_steps=10, guidance_scale=5.0, seed=5, output="float", image=init, strength=0.6, **SIZE)
  noise = _torch(ours.initial_latents(2, seed=5, **SIZE))
  monkeypatch.setattr(img2img, "randn_tensor", lambda shape, **kwargs: noise)
  components = {k: v for k, v in pipe.components.items() if k not in ("image_encoder", "feature_extractor")}
  components["scheduler"] = diffusers.DDIMScheduler.from_config(pipe.scheduler.config)  # another test may swap it
  theirs_pipe = diffusers.StableDiffusionXLImg2ImgPipeline(**components, requires_aesthetics_score=False)
  with torch.no_grad():
    theirs = theirs_pipe(PROMPTS, image=_torch(init), strength=0.6, num_inference_steps=10, guidance_scale=5.0,
                         output_type="np", **SIZE).images
  error = relative_error((np.asarray(images) + 1) / 2, theirs)
  print(f"StableDiffusionXLImg2ImgPipeline parity, strength 0.6, 10 steps: relative error {error:.2e}")
  assert error < 1e-4, error


def test_base_to_refiner_handoff_matches_diffusers(sdxl_folders):
  base_dir, refiner_dir, pipe, refiner_pipe = sdxl_folders
  _set_sampler(pipe, "ddim")
  base, refiner = jaxdiff.load_pipeline(base_dir), jaxdiff.load_pipeline(refiner_dir)
  assert refiner.config.latent.micro_conditioning == ("original_size", "crops_coords_top_left", "aesthetic_score")
  assert not refiner.config.text_encoder_2.kind and refiner.config.text_encoder.projection_dim == 24
  x_T = base.initial_latents(2, seed=7, **SIZE)
  steps = dict(num_steps=10, guidance_scale=5.0)
  latents = base(PROMPTS, seed=7, output="latents", denoising_end=0.8, **steps, **SIZE)
  images = refiner(PROMPTS, seed=7, output="float", image=latents, denoising_start=0.8, aesthetic_score=7.0,
                   negative_aesthetic_score=2.0, **steps, **SIZE)
  with torch.no_grad():
    their_latents = pipe(PROMPTS, num_inference_steps=10, guidance_scale=5.0, denoising_end=0.8,
                         output_type="latent", latents=_torch(x_T), **SIZE).images
    theirs = refiner_pipe(PROMPTS, image=their_latents, num_inference_steps=10, guidance_scale=5.0,
                          denoising_start=0.8, aesthetic_score=7.0, negative_aesthetic_score=2.0,
                          output_type="np").images
  latent_error = relative_error(np.asarray(latents), their_latents.numpy().transpose(0, 2, 3, 1))
  error = relative_error((np.asarray(images) + 1) / 2, theirs)
  print(f"SDXL base -> refiner handoff at 0.8: latents {latent_error:.2e}, images {error:.2e}")
  assert latent_error < 1e-4 and error < 1e-4, (latent_error, error)


def test_sample_py_runs_the_handoff(sdxl_folders, tmp_path):
  """sample.py on the base with denoising_end writes latents; sample.py on the refiner continues from them."""
  base_dir, refiner_dir, _, _ = sdxl_folders
  common = ["--config.sample.num_samples=2", "--config.sample.per_device_batch_size=2",
            "--config.sample.timestep_respacing=leading6", f"--config.sample.prompt={PROMPTS[0]}",
            "--config.sample.sampler=ddim", "--config.sample.guidance_scale=5", "--config.sample.height=16",
            "--config.sample.width=24"]
  cwd = os.getcwd()
  os.chdir(REPO)
  try:
    cli.run_in_process("sample", ["sample", f"--config=configs/stable_diffusion.py:{base_dir}",
                                  f"--workdir={tmp_path / 'base'}", "--config.sample.denoising_end=0.75", *common])
    handoff = next((tmp_path / "base" / "samples").rglob("samples_2x8x12x4.npz"))
    cli.run_in_process("sample", ["sample", f"--config=configs/stable_diffusion.py:{refiner_dir}",
                                  f"--workdir={tmp_path / 'refiner'}", "--config.sample.denoising_start=0.75",
                                  f"--config.sample.init_images={handoff}", *common])
  finally:
    os.chdir(cwd)
  with np.load(handoff) as f:
    assert f["arr_0"].dtype == np.float32
  found = next((tmp_path / "refiner" / "samples").rglob("samples_2x16x24x3.npz"))
  with np.load(found) as f:
    images = f["arr_0"]
  assert images.dtype == np.uint8 and images.std() > 0


def test_a_single_sgm_file_is_the_same_pipeline(sdxl_folders, tmp_path):
  """The base folder's weights renamed into a Stability single file (model.diffusion_model.*, first_stage_model.*,
  conditioner.embedders.0.transformer.* and .1.model.*): the layout is read from the shapes, both tokenizers are
  folders, and the images are the folder's."""
  from safetensors.torch import save_file
  from test_autoencoder import ldm_state_dict
  from test_sdxl_text import openclip_state, transformers_state
  from test_sdxl_unet import sgm_state
  base_dir, _, pipe, _ = sdxl_folders
  numpy = lambda state: {k: v.detach().numpy().copy() for k, v in state.items()}
  unet = sgm_state(numpy(pipe.unet.state_dict()), dict(pipe.unet.config))
  state = {**{k: torch.from_numpy(v) for k, v in unet.items() if k.startswith("model.diffusion_model.")},
           **{f"first_stage_model.{k}": v.contiguous() for k, v in ldm_state_dict(pipe.vae).items()},
           **transformers_state(pipe.text_encoder, "conditioner.embedders.0.transformer."),
           **openclip_state(pipe.text_encoder_2, "conditioner.embedders.1.model.")}
  path = str(tmp_path / "sdxl-tiny.safetensors")
  save_file(state, path)
  single = jaxdiff.load_pipeline(path, tokenizer=os.path.join(base_dir, "tokenizer"),
                                 tokenizer_2=os.path.join(base_dir, "tokenizer_2"), image_size=16)
  assert single.config.latent.micro_conditioning == ("original_size", "crops_coords_top_left", "target_size")
  ours = jaxdiff.load_pipeline(base_dir)
  kwargs = dict(num_steps=4, guidance_scale=5.0, seed=1, output="float", **SIZE, **MICRO)
  error = relative_error(np.asarray(single(PROMPTS, **kwargs)), np.asarray(ours(PROMPTS, **kwargs)))
  assert error < 1e-5, error
