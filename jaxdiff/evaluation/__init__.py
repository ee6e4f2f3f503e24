"""FID and Inception Score from the FID Inception network (weights read from a local file)."""

from jaxdiff.evaluation.features import FeatureExtractor, dataset_batches, load_images, load_reference
from jaxdiff.evaluation.inception import InceptionV3, convert_state_dict, load_variables, random_state_dict
from jaxdiff.evaluation.metrics import Statistics, frechet_distance, inception_score

__all__ = ['FeatureExtractor', 'InceptionV3', 'Statistics', 'convert_state_dict', 'dataset_batches',
           'frechet_distance', 'inception_score', 'load_images', 'load_reference', 'load_variables',
           'random_state_dict']
