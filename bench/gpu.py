"""The paper model on one CUDA device: a bf16 training step at batch 8, inference at batch 32,
for each temporal pooling of the vision tower (`VisionConfig.temporal_pool`: the frames before
the backbone, as the paper's formula, or its feature maps after it, ClipBERT's way).

Usage: python bench/gpu.py [--preset paper] [--pool frames features] [--train-batch 8] [--infer-batch 32]
                           [--warmup 3] [--steps 10]

Prints one JSON object, a section per pooling. The inputs are synthetic, of the paper's geometry: uint8 frames
[B, 8, 224, 224, 3] (normalised on the device, as in the jobs) and 5 s waveforms at 16 kHz. A
quarter of every batch has no audio track (audio_len 0) and one clip has half a track, so the
audio masking runs on the device too: every logit, the loss and every gradient must be finite
(reported, and exit status 1 if not).

- train: the step of ray_jobs.train.loop (bf16 autocast, label-smoothed loss in fp32, the
  project's Adam groups), timed over --steps after --warmup: clips/s, peak memory allocated,
  and model FLOPs utilisation, the FLOPs of one step (counted by torch's FlopCounterMode,
  forward and backward) per second over the device's dense bf16 peak, looked up from its name
  (null for a device not in the table).
- infer: eval mode, inference_mode, bf16 autocast: clips/s and peak memory.
Out of memory in a section is reported as that section's error (exit status 1); the other
sections still run.

The GPU machine has no Ray, PyAV or s3fs: this imports only groupemotion_core's PyTorch parts.
Without CUDA it prints {"cuda": false, ...} and exits 0. `--device cpu` runs the same code on
the CPU, in full precision as the jobs run there (with `--preset tiny`: a smoke test of this
script; its figures mean nothing).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from groupemotion_core.model.config import PRESETS, TEMPORAL_POOLS, preset  # noqa: E402
from groupemotion_core.model.classifier import GroupEmotionModel  # noqa: E402
from groupemotion_core.model.training import build_optimizer, loss_fn  # noqa: E402

# Dense (not 2:4 sparse) bf16 tensor-core peaks from the vendor's data sheets, first match wins.
BF16_DENSE_PEAK_FLOPS = (
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),  # SXM ("H100 80GB HBM3")
    ("H200", 989e12),  # also GH200
    ("A100", 312e12),
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="paper", choices=PRESETS)
    parser.add_argument("--pool", nargs="+", default=list(TEMPORAL_POOLS), choices=TEMPORAL_POOLS,
                        help="the temporal poolings to measure, each with the preset's other sizes")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--train-batch", type=int, default=8)
    parser.add_argument("--infer-batch", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()

    if args.device == "cuda" and not torch.cuda.is_available():
        print(json.dumps({"cuda": False, "reason": "no CUDA device visible to torch "
                          f"{torch.__version__}; nothing was measured"}))
        return 0
    device = torch.device(args.device)
    result = {"cuda": device.type == "cuda", "preset": args.preset, **_device_info(device),
              "torch": torch.__version__, "warmup_steps": args.warmup, "timed_steps": args.steps}
    sections = []
    for pool in args.pool:
        cfg = preset(args.preset)
        cfg.vision = dataclasses.replace(cfg.vision, temporal_pool=pool)
        torch.manual_seed(0)
        model = GroupEmotionModel(cfg).to(device)
        result["parameters"] = sum(p.numel() for p in model.parameters())  # the same for every pooling
        result[pool] = {"train": _section(device, lambda: _train(model, device, args)),
                        "infer": _section(device, lambda: _infer(model, device, args))}
        sections += result[pool].values()
        del model
    print(json.dumps(result, indent=2))
    ok = all("error" not in s and all(s["finite"].values()) for s in sections)
    return 0 if ok else 1


def _device_info(device: torch.device) -> dict:
    if device.type != "cuda":
        return {"device": "cpu", "bf16_dense_peak_tflops": None}
    name = torch.cuda.get_device_name(device)
    peak = next((flops for key, flops in BF16_DENSE_PEAK_FLOPS if key in name), None)
    return {"device": name, "bf16_dense_peak_tflops": peak / 1e12 if peak else None,
            "gpu_memory_gib": round(torch.cuda.get_device_properties(device).total_memory / 2**30, 1)}


def _section(device: torch.device, measure) -> dict:
    """Run one measurement; out of memory becomes the section's error, not the end of the script."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    try:
        out = measure()
    except torch.cuda.OutOfMemoryError as e:
        return {"error": "out of memory", "detail": str(e).splitlines()[0]}
    if device.type == "cuda":
        out["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    return out


def _batch(model: GroupEmotionModel, batch: int, device: torch.device, seed: int) -> dict[str, torch.Tensor]:
    """Random clips of the model's geometry: a quarter without audio, one with half a track."""
    cfg, samples = model.config, model.audio_samples
    g = torch.Generator(device=device).manual_seed(seed)
    frames = torch.randint(0, 256, (batch, cfg.num_frames, cfg.image_size, cfg.image_size, 3),
                           generator=g, device=device, dtype=torch.uint8)
    audio_len = torch.full((batch,), samples, dtype=torch.int64, device=device)
    audio_len[: max(1, batch // 4)] = 0
    audio_len[-1] = samples // 2
    audio = torch.randn(batch, samples, generator=g, device=device) * 0.1
    audio *= torch.arange(samples, device=device) < audio_len[:, None]  # zero padded, as decoded
    labels = torch.randint(0, len(cfg.labels), (batch,), generator=g, device=device)
    return {"frames": frames, "audio": audio, "audio_len": audio_len, "label": labels}


def _autocast(device: torch.device):
    """bf16 on the GPU, as the jobs run; full precision on the CPU, as they do there."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def _train(model: GroupEmotionModel, device: torch.device, args) -> dict:
    model.train()
    optimizer = build_optimizer(model)
    batch = _batch(model, args.train_batch, device, seed=1)

    def step(check: bool = False) -> dict[str, bool] | None:
        with _autocast(device):
            logits = model(batch["frames"], batch["audio"], batch["audio_len"])
        loss = loss_fn(logits.float(), batch["label"])
        loss.backward()
        finite = _finite(logits, batch, loss=loss, gradients=[p.grad for p in model.parameters()]) if check else None
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return finite

    for _ in range(args.warmup):
        step()
    with FlopCounterMode(display=False) as counter:
        step()
    flops = counter.get_total_flops()
    seconds, _ = _timed(device, step, args.steps)
    out = {
        "batch": args.train_batch,
        "clips_per_s": round(args.train_batch * args.steps / seconds, 2),
        "step_ms": round(1000 * seconds / args.steps, 1),
        "flops_per_step": flops,
        "achieved_tflops": round(flops * args.steps / seconds / 1e12, 2),
        "finite": step(check=True),
    }
    peak = _device_info(device)["bf16_dense_peak_tflops"]
    out["mfu"] = round(flops * args.steps / seconds / 1e12 / peak, 4) if peak else None
    return out


def _infer(model: GroupEmotionModel, device: torch.device, args) -> dict:
    model.eval()
    model.zero_grad(set_to_none=True)  # what a training step that ran out of memory may have left
    batch = _batch(model, args.infer_batch, device, seed=2)

    def step() -> torch.Tensor:
        with torch.inference_mode(), _autocast(device):
            return model(batch["frames"], batch["audio"], batch["audio_len"])

    for _ in range(args.warmup):
        step()
    seconds, logits = _timed(device, step, args.steps)
    return {
        "batch": args.infer_batch,
        "clips_per_s": round(args.infer_batch * args.steps / seconds, 2),
        "step_ms": round(1000 * seconds / args.steps, 1),
        "finite": _finite(logits, batch),
    }


def _finite(logits: torch.Tensor, batch: dict[str, torch.Tensor], loss: torch.Tensor | None = None,
            gradients: list[torch.Tensor | None] | None = None) -> dict[str, bool]:
    """Which outputs are free of NaN and inf; the clips without audio are checked on their own too."""
    checks = {"logits": logits, "no_audio_logits": logits[batch["audio_len"] == 0]}
    if loss is not None:
        checks["loss"] = loss
    out = {name: bool(torch.isfinite(t).all()) for name, t in checks.items()}
    if gradients is not None:
        out["gradients"] = all(bool(torch.isfinite(g).all()) for g in gradients if g is not None)
    return out


def _timed(device: torch.device, step, steps: int):
    """Seconds for `steps` calls of `step` (the device drained before and after), and the last output."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    for _ in range(steps):
        out = step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - started, out


if __name__ == "__main__":
    sys.exit(main())
