"""finetune-cli: config-driven fine-tuning of pretrained torchvision image classifiers."""

__version__ = "0.1.0"
