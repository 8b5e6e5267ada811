"""What the training scripts share, written once and tested here.

How a batch flows (``training/train_ldm.py``; finetune_lora.py, train_dreambooth.py and train_vae.py the same):

1. ``training/train_ldm.py`` parses the flags (``args``: each defined once, checked before any work), makes
   the Accelerator (``run``), loads the models (``models.load_models``) and sets up the task
   (``text_to_image.TextToImage``: what trains, the latent cache, data loader, optimizer, EMA, LR schedule).
2. ``loop.train`` is the loop, every step of it in its body: it resumes (``checkpointing``: weights,
   optimizer, schedule, EMA, RNG and the data position), then for each micro-batch asks the task for its
   loss, steps (``loop.optimizer_step``: NaN guard, backward, clip, update) and, after each optimizer step,
   updates the EMA, logs, checkpoints and validates.
3. ``TextToImage.loss``: latents z ~ q(z|x) (or cached), the text states with some captions dropped for
   guidance, then ``diffusion_loss.diffusion_loss`` (DDPM's objective for every prediction type, min-SNR),
   per sample, plus the prior term for DreamBooth (``dreambooth``).
4. ``checkpointing.save_checkpoint`` writes ``checkpoints/checkpoint-N`` atomically with a manifest of its
   files; at the end the script exports the pipeline folder (``validation.export_pipeline``) or the LoRA file.

The autoencoder is the same loop over another task (``autoencoder.AutoencoderTraining``: ``vae_loss``,
``perceptual``, a PatchGAN as a second param group of the one optimizer). Also here: ``ema``, ``progress``
(tqdm with loss, lr and images/s; validation grids), ``metrics`` (PSNR, SSIM), ``lora`` (peft adapters in
diffusers' file format).
"""
