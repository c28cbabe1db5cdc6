"""lora_lab: hyperparameter sweeps and measured evaluation for Stable Diffusion LoRAs."""

__version__ = "0.1.0"
