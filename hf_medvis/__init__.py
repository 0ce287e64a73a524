"""hf_medvis: masked-autoencoder pretraining and ViT fine-tuning for medical images on the Hugging Face stack."""

__version__ = "0.1.0"
