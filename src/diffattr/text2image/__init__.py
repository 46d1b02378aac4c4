"""Text-to-image (latent, LoRA) models: Stable-Diffusion-style pipelines fine-tuned with
LoRA, attributed in latent space with gradients of the LoRA parameters only.

``pipeline`` (load a local pipeline folder / build a tiny one), ``lora`` (peft adapters),
``latents`` (cached VAE latents and caption embeddings), ``training`` (LoRA fine-tuning),
``sampling`` (prompts, seeds, initial latents recorded). The family that runs, attributes and
retrains them is :mod:`diffattr.families.text2image`.
"""
