"""The LoRA training loop: encode -> noise -> predict -> loss -> step, top to bottom.

``python -m lora_lab.train model=tiny data=demo`` trains one LoRA and writes
``<output_dir>/lora/<output_name>-000001.safetensors`` ... ``<output_name>.safetensors``
(kohya keys and ``ss_*`` metadata) and TensorBoard events in ``<output_dir>/tb``.
"""

from __future__ import annotations

import logging
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from lora_lab.config import ADAPTIVE_OPTIMIZERS, Config, to_yaml
from lora_lab.data.buckets import bucket_batches
from lora_lab.data.captions import process as process_caption
from lora_lab.data.dataset import Dataset, load_dataset
from lora_lab.data.steps import epoch_order, placements, total_steps
from lora_lab.device import pick_device
from lora_lab.errors import LoraLabError, TrainingError
from lora_lab.lora import adapters as lora_io
from lora_lab.lora import kohya as kohya_io
from lora_lab.models import sdxl
from lora_lab.models.base import BaseModel, load_base, module_fingerprint
from lora_lab.train import cache
from lora_lab.train import metadata as train_meta
from lora_lab.train import preflight
from lora_lab.train.optimizers import check_environment, make_optimizer, warmup_steps
from lora_lab.train.preflight import text_encoding
from lora_lab.train.validation_loss import ValidationLoss

log = logging.getLogger(__name__)

# on_epoch(epoch, lora_file, epoch_loss) -> True to stop training early (pruning).
EpochCallback = Callable[[int, Path, float], bool]


@dataclass
class TrainResult:
    """What a finished (or stopped) run left behind."""

    output_dir: Path
    lora_files: Dict[int, Path] = field(default_factory=dict)
    steps: int = 0
    epochs_done: int = 0
    stopped_early: bool = False
    final_loss: float = float("nan")
    setup_s: float = 0.0  # from train() to the first step: adapters, optimizer, cache look-ups
    train_s: float = 0.0  # the loop itself, without the per-epoch callbacks
    callback_s: float = 0.0
    validation_loss: Dict[int, float] = field(default_factory=dict)  # epoch -> held-out loss
    trainable_params: int = 0  # the network's trainable tensors' elements (UNet and text encoders)


def _snr_weights(noise_scheduler, timesteps: torch.Tensor, gamma: float, prediction: str) -> torch.Tensor:
    """Min-SNR loss weighting (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR
    Weighting Strategy"): min(SNR, gamma) / SNR for epsilon targets, / (SNR + 1) for v."""
    alphas = noise_scheduler.alphas_cumprod.to(timesteps.device)[timesteps]
    snr = alphas / (1 - alphas)
    clipped = torch.clamp(snr, max=gamma)
    return clipped / (snr + 1) if prediction == "v_prediction" else clipped / snr


def train(config: Config, base: BaseModel, dataset: Dataset, output_dir: Path,
          on_epoch: Optional[EpochCallback] = None, cache_dir: Optional[Path] = None) -> TrainResult:
    """Train one LoRA on an already-loaded base model; the adapter is removed on return.

    Args:
        config: The validated run config.
        base: The base model, loaded once per process and shared by runs.
        dataset: The checked samples.
        output_dir: Where ``lora/`` and ``tb/`` go (must exist and be writable).
        on_epoch: Called after each saved epoch; returning True stops training.
        cache_dir: Latent / text cache root (default ``config.cache_dir``).

    Raises:
        TrainingError: on a NaN or infinite loss, naming the step and epoch.
    """
    from accelerate import Accelerator
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
    from diffusers.optimization import get_scheduler
    from torch.utils.tensorboard import SummaryWriter

    t = config.train
    device = base.device
    check_environment(t, device)
    accelerator = Accelerator(mixed_precision=t.mixed_precision, cpu=device.type == "cpu")
    cache_root = Path(cache_dir or config.cache_dir)
    resolution = config.resolution
    unet, vae, encoders = base.unet, base.vae, base.text_encoders
    lora_io.check_network(unet, encoders, t)
    layers = min(e.config.num_hidden_layers for e in encoders)
    if t.clip_skip > layers - (1 if base.is_sdxl else 0):
        raise TrainingError(f"train.clip_skip={t.clip_skip} but the text encoder has only {layers} layers")
    if t.text_encoder_2_lr and not base.is_sdxl:
        raise TrainingError("train.text_encoder_2_lr is for SDXL's second text encoder; this model has one "
                            "text encoder (use train.text_encoder_lr)")

    entered = time.perf_counter()
    where = placements(dataset, config)
    vae_id = module_fingerprint(vae)
    latent_params = cache.cache_latents(dataset.samples, vae, where, vae_id, cache_root, flips=True) \
        if t.cache_latents else None
    validation = ValidationLoss(dataset.validation, cache.cache_latents(
        dataset.validation, vae, where, vae_id, cache_root), base,
        config.data.validation_seed, resolution) if dataset.validation else None
    online_text = text_encoding(t, dataset) is not None
    text_cache = {} if online_text else cache.cache_text(
        [s.caption for s in dataset.samples], base.tokenizers, encoders, t.clip_skip,
        "+".join(module_fingerprint(e) for e in encoders), cache_root,
    )

    torch.manual_seed(t.seed)
    random.seed(t.seed)
    lora_io.detach(unet, encoders)
    trainable = lora_io.attach(unet, encoders, t)
    try:
        unet_params = trainable[0]
        groups = [{"params": unet_params, "lr": t.effective_unet_lr}]
        te_params = []
        for index, params in enumerate(trainable[1:]):  # each text encoder at its own rate (SDXL: two)
            if params:
                groups.append({"params": params, "lr": t.text_encoder_lr_of(index)})
                te_params += params
        if t.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        optimizer = accelerator.prepare_optimizer(make_optimizer(t, groups, device))
        per_epoch, max_steps = total_steps(dataset, t, where)
        warmup = warmup_steps(t, max_steps)
        lr_scheduler = get_scheduler(
            t.lr_scheduler, optimizer, num_warmup_steps=warmup, num_training_steps=max_steps,
            num_cycles=t.lr_scheduler_num_cycles, power=t.lr_scheduler_power,
        )
        result = _loop(config, base, dataset, output_dir, on_epoch, accelerator, optimizer, lr_scheduler,
                       latent_params, text_cache, online_text, unet_params + te_params, per_epoch,
                       max_steps, warmup, DiagonalGaussianDistribution, SummaryWriter, entered, validation, where)
        result.trainable_params = sum(p.numel() for p in unet_params + te_params)
        return result
    finally:
        if t.gradient_checkpointing:
            unet.disable_gradient_checkpointing()
        lora_io.detach(unet, encoders)
        for module in (unet, *encoders):
            module.eval()


def _loop(config, base, dataset, output_dir, on_epoch, accelerator, optimizer, lr_scheduler,
          latent_params, text_cache, online_text, params, per_epoch, max_steps, warmup,
          Gaussian, SummaryWriter, entered: float, validation=None, where=None) -> TrainResult:
    t = config.train
    device = base.device
    unet, vae, encoders = base.unet, base.vae, base.text_encoders
    noise_scheduler = base.noise_scheduler
    unet_dtype, vae_dtype = unet.dtype, vae.dtype  # each a walk over every parameter: once, not per step
    scaling = vae.config.scaling_factor
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    generator = torch.Generator(device=device).manual_seed(t.seed)
    caption_rng = random.Random(t.seed)
    flip_rng = random.Random(t.seed + 1)
    order_rng = random.Random(t.seed + 2)
    lora_dir = output_dir / "lora"
    lora_dir.mkdir(parents=True, exist_ok=True)
    writer = SummaryWriter(log_dir=str(output_dir / "tb"))
    result = TrainResult(output_dir=output_dir)
    started = train_meta.now()
    session_id = random.SystemRandom().randint(0, 2**32)  # kohya's: one id for all of a run's epoch files
    unet.train()
    for index, encoder in enumerate(encoders):
        encoder.train(bool(t.text_encoder_lr_of(index)))
    step = 0
    micro = 0
    try:
        progress = tqdm(total=max_steps, desc="training", unit="step", dynamic_ncols=True, mininterval=1.0)
        for epoch in range(1, t.epochs + 1):
            epoch_losses: List[float] = []
            for batch in bucket_batches(epoch_order(dataset, t.seed, epoch), t.batch_size,
                                        lambda s: where[s.id].bucket, order_rng):
                if step == 0 and micro == 0:
                    result.setup_s = time.perf_counter() - entered
                    loop_start = time.perf_counter()
                flips = [s.options.flip_aug and flip_rng.random() < 0.5 for s in batch]
                if latent_params is not None:
                    params_lat = torch.stack([latent_params[(s.id, f)] for s, f in zip(batch, flips)]).to(device)
                else:  # no cache: the VAE encodes every image every step
                    with torch.no_grad():
                        pixels = torch.stack([cache.image_tensor(s, where[s.id], f) for s, f in zip(batch, flips)])
                        params_lat = vae.encode(pixels.to(device, vae_dtype)).latent_dist.parameters.float()
                    cache.check_latents(params_lat, [s.path for s in batch], vae)
                latents = (Gaussian(params_lat).sample(generator=generator) - shift) * scaling
                noise = torch.randn(latents.shape, generator=generator, device=device)
                if t.noise_offset:
                    # Offset noise (Guttenberg 2023): lets the model learn overall brightness.
                    noise = noise + t.noise_offset * torch.randn(
                        (latents.shape[0], latents.shape[1], 1, 1), generator=generator, device=device)
                timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],),
                                          generator=generator, device=device)
                noisy = noise_scheduler.add_noise(latents, noise, timesteps)
                captions = [process_caption(s.caption, s.options, caption_rng) for s in batch]
                with accelerator.autocast():
                    if online_text:
                        with torch.set_grad_enabled(t.trains_text_encoder):
                            hidden, pooled = cache.encode(captions, base.tokenizers, encoders, t.clip_skip)
                    else:
                        hidden = torch.stack([text_cache[c][0] for c in captions]).to(device)
                        pooled = torch.stack([text_cache[c][1] for c in captions]).to(device) \
                            if base.is_sdxl else None
                    added = None
                    if base.is_sdxl:  # SDXL's micro-conditioning: each image's size and crop
                        bucket = where[batch[0].id].bucket
                        added = {"text_embeds": pooled.to(unet_dtype), "time_ids": sdxl.time_ids(
                            [(s.size[1], s.size[0]) for s in batch],
                            [where[s.id].crop_for(f) for s, f in zip(batch, flips)],
                            (bucket[1], bucket[0]), device, unet_dtype)}
                    pred = unet(noisy, timesteps, hidden.to(unet_dtype), added_cond_kwargs=added).sample
                if base.prediction_type == "v_prediction":
                    target = noise_scheduler.get_velocity(latents, noise, timesteps)
                else:
                    target = noise
                per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
                if t.min_snr_gamma:
                    per_sample = per_sample * _snr_weights(noise_scheduler, timesteps, t.min_snr_gamma,
                                                           base.prediction_type)
                weights = torch.tensor([config.data.prior_loss_weight if s.is_reg else 1.0 for s in batch],
                                       device=device)
                loss = (per_sample * weights).mean()
                if not torch.isfinite(loss):
                    raise TrainingError(
                        f"loss became {loss.item()} at step {step + 1} (epoch {epoch}); the LoRA is "
                        f"burned. Lower the learning rate (unet_lr {t.effective_unet_lr:g}) or use "
                        "mixed_precision=no / bf16"
                    )
                accelerator.backward(loss / t.gradient_accumulation)
                micro += 1
                epoch_losses.append(loss.item())
                last_in_epoch = len(epoch_losses) == per_epoch
                if micro % t.gradient_accumulation == 0 or last_in_epoch:
                    if t.max_grad_norm:
                        accelerator.clip_grad_norm_(params, t.max_grad_norm)
                    lrs = lr_scheduler.get_last_lr()  # the rates this step used
                    optimizer.step()
                    lr_scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                    micro = 0
                    step += 1
                    avg = sum(epoch_losses) / len(epoch_losses)
                    writer.add_scalar("loss/current", loss.item(), step)
                    writer.add_scalar("loss/average", avg, step)
                    writer.add_scalar("lr/unet", _effective_lr(optimizer, 0, lrs[0], t.optimizer), step)
                    if len(lrs) > 1:
                        writer.add_scalar("lr/textencoder", _effective_lr(optimizer, 1, lrs[1], t.optimizer), step)
                    progress.update(1)
                    progress.set_postfix(epoch=f"{epoch}/{t.epochs}", loss=f"{avg:.4f}", lr=f"{lrs[0]:.2e}")
            epoch_loss = sum(epoch_losses) / len(epoch_losses)
            writer.add_scalar("loss/epoch", epoch_loss, epoch)
            if validation is not None:
                result.validation_loss[epoch] = validation(t.clip_skip)
                writer.add_scalar("loss/validation", result.validation_loss[epoch], epoch)
            result.steps, result.epochs_done, result.final_loss = step, epoch, epoch_loss
            last = epoch == t.epochs
            if last or epoch % t.save_every_n_epochs == 0:
                name = t.output_name if last else f"{t.output_name}-{epoch:06d}"
                path = lora_dir / f"{name}.safetensors"
                meta = train_meta.metadata(config, base, dataset, epoch=epoch, steps=step, max_steps=max_steps,
                                 started=started, finished=train_meta.now() if last else None, warmup=warmup,
                                 batches_per_epoch=per_epoch, session_id=session_id)
                kohya_io.save_kohya(path, kohya_io.kohya_state_dict(
                    unet, encoders if t.trains_text_encoder else None), meta)
                result.lora_files[epoch] = path
                writer.flush()
                callback_start = time.perf_counter()
                stop = on_epoch is not None and on_epoch(epoch, path, epoch_loss)
                result.callback_s += time.perf_counter() - callback_start
                if stop and not last:
                    result.stopped_early = True
                    break
        progress.close()
        result.train_s = time.perf_counter() - loop_start - result.callback_s
    finally:
        writer.close()
    return result


def _effective_lr(optimizer, group: int, lr: float, name: str) -> float:
    """Adaptive optimizers scale lr by their own estimate ``d``: log what is applied."""
    if name in ADAPTIVE_OPTIMIZERS:
        g = optimizer.param_groups[group]
        return float(g.get("d", 1.0)) * lr
    return lr


def prepare_output_dir(path: Path) -> bool:
    """Create the run folder and prove it is writable; returns whether it was created here.

    Raises:
        LoraLabError: naming the folder, when it cannot be created or written.
    """
    existed = path.exists()
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write-test"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as exc:
        raise LoraLabError(f"output_dir: cannot write to {path} ({exc.strerror or exc}); "
                           "choose a writable folder with output_dir=...") from None
    if existed and (path / "lora").exists() and any((path / "lora").iterdir()):
        raise LoraLabError(f"output_dir: {path} already holds a trained LoRA; choose a new output_dir")
    return not existed


def run(config: Config) -> TrainResult:
    """Check everything, then load the model and train (the ``python -m lora_lab.train`` job)."""
    from lora_lab.data import kohya_toml

    config = kohya_toml.apply(config)  # a dataset_config.toml's resolution / batch_size
    for warning in config.train.warnings():
        log.warning(f"warning: {warning}")
    device = pick_device(config.device)
    check_environment(config.train, device)
    cache_dir = Path(config.cache_dir)
    dataset = load_dataset(config.data, cache_dir, config.explicit)
    out = Path(config.output_dir)
    created = prepare_output_dir(out)
    for line in preflight.describe(config, dataset):
        log.info(line)
    preflight.doctor(config, dataset, out)
    log.info(f"device: {device}, resolution {config.resolution}, output: {out}")
    try:
        (out / "config.yaml").write_text(to_yaml(config), encoding="utf-8")
        started = time.time()
        base = load_base(config.model, cache_dir, device)
        log.info(f"loaded {base.source} in {time.time() - started:.1f}s")
        result = train(config, base, dataset, out)
    except BaseException as exc:
        if created and not (out / "lora").exists():
            shutil.rmtree(out, ignore_errors=True)
        elif isinstance(exc, LoraLabError) and out.exists():
            (out / "error.txt").write_text(f"{exc}\n", encoding="utf-8")
        raise
    log.info(f"done: {result.steps} steps, final epoch loss {result.final_loss:.4f}")
    for epoch, path in sorted(result.lora_files.items()):
        log.info(f"  epoch {epoch}: {path}")
    log.info(f"TensorBoard: tensorboard --logdir {out / 'tb'}")
    return result


def main() -> None:
    from lora_lab.cli import exit_now, hydra_entry

    hydra_entry(run, "lora_lab.train")()
    exit_now()


if __name__ == "__main__":
    main()
