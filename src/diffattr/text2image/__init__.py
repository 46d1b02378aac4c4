"""Text-to-image (latent, LoRA) model family: Stable-Diffusion-style pipelines fine-tuned with
LoRA, attributed in latent space with gradients of the LoRA parameters only.

``pipeline`` (load a local pipeline folder / build a tiny one), ``lora`` (peft adapters),
``latents`` (cached VAE latents and caption embeddings), ``training`` (LoRA fine-tuning),
``sampling`` (prompts, seeds, initial latents recorded), ``family`` (what the commands
dispatch to for a text-to-image run), ``evaluation`` (LDS and counterfactual retraining),
``cli`` (the ``finetune`` command and ``generate``'s prompt options).
"""
