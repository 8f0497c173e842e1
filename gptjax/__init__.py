"""gptjax: pretrain, fine-tune and evaluate GPT models with JAX and Flax."""

__version__ = "0.1.0"
