"""gptjax: pretrain, fine-tune and evaluate GPT models with JAX and Flax."""

from gptjax import libtpu_env

libtpu_env.quiet()  # before jax starts: no libtpu errors on a machine without a TPU

__version__ = "0.1.0"
