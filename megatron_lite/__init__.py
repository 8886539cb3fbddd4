"""megatron_lite: Megatron-style 3D-parallel pretraining for Mistral and Mixtral."""

__version__ = "0.1.0"
