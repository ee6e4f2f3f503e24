"""Which training timesteps to draw: uniform, or improved DDPM's importance sampling by the loss's second moment."""

import enum

import flax.struct
import jax
import jax.numpy as jnp

from jaxdiff.errors import ConfigError


class TimestepSampler(enum.Enum):
  UNIFORM = "uniform"
  LOSS_SECOND_MOMENT = "loss_second_moment"  # p_t proportional to sqrt(E[L_t^2]) (improved DDPM, sec 3.3)


def parse_timestep_sampler(name: str) -> TimestepSampler:
  try:
    return TimestepSampler(name)
  except ValueError:
    raise ConfigError(f"Unknown train.timestep_sampler {name!r}: use one of "
                      f"{', '.join(m.value for m in TimestepSampler)}.") from None


@flax.struct.dataclass
class LossHistory:
  """The last `history` losses seen at each timestep; lives in the train state, so a resumed run keeps it."""
  losses: jax.Array  # [T, history] float32, oldest first
  counts: jax.Array  # [T] int32, how many losses are recorded (at most history)

  @classmethod
  def create(cls, num_timesteps: int, history: int = 10) -> "LossHistory":
    return cls(losses=jnp.zeros((num_timesteps, history), jnp.float32),
               counts=jnp.zeros((num_timesteps,), jnp.int32))

  def probabilities(self, uniform_prob: float = 1e-3) -> jax.Array:
    """Uniform until every timestep has a full history, then sqrt(E[L_t^2]) mixed with `uniform_prob` of uniform."""
    num_timesteps, history = self.losses.shape
    w = jnp.sqrt(jnp.mean(self.losses ** 2, axis=-1))
    w = w / jnp.sum(w) * (1 - uniform_prob) + uniform_prob / num_timesteps
    return jnp.where(jnp.all(self.counts == history), w, 1.0 / num_timesteps)

  def sample(self, key: jax.Array, batch_size: int) -> tuple[jax.Array, jax.Array]:
    """Timesteps t [B] and the weights 1 / (T p_t) that keep the weighted loss an unbiased estimate."""
    p = self.probabilities()
    t = jax.random.choice(key, p.shape[0], (batch_size,), p=p)
    return t.astype(jnp.int32), 1.0 / (p.shape[0] * p[t])

  def update(self, t: jax.Array, losses: jax.Array) -> "LossHistory":
    """Records the batch's per-example losses in order, each full history dropping its oldest entry."""
    history = self.losses.shape[1]

    def record(state, t_and_loss):
      rows, counts = state
      ti, loss = t_and_loss
      row, count = rows[ti], counts[ti]
      row = jnp.where(count == history, jnp.roll(row, -1).at[-1].set(loss),
                      row.at[jnp.minimum(count, history - 1)].set(loss))
      return (rows.at[ti].set(row), counts.at[ti].set(jnp.minimum(count + 1, history))), None

    (rows, counts), _ = jax.lax.scan(record, (self.losses, self.counts),
                                     (t, jax.lax.stop_gradient(losses).astype(jnp.float32)))
    return LossHistory(losses=rows, counts=counts)
