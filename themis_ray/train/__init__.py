"""Supervised fine-tuning of the judge on Ray Train + DeepSpeed ZeRO-3."""

from themis_ray.train.recipe import train_judge

__all__ = ["train_judge"]
