"""tunejob: a fine-tuning job for diffusion models, configured by one TOML file."""

__version__ = "0.1.0"
