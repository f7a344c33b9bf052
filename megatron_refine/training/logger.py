"""Metrics: a console progress line on rank 0, TensorBoard scalars, and W&B when asked for."""

from __future__ import annotations

import time

import torch


class MetricsLogger:
    def __init__(self, total_steps: int, tensorboard_dir: str | None = None, wandb_project: str | None = None,
                 config: dict | None = None):
        self.total_steps = total_steps
        self.main = torch.distributed.get_rank() == 0
        self.start = time.perf_counter()
        self.tb = self.wandb = None
        if self.main and tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(tensorboard_dir)
        if self.main and wandb_project:
            try:
                import wandb
            except ImportError:
                raise RuntimeError("logging.wandb_project is set but wandb is not installed: pip install wandb") from None
            self.wandb = wandb.init(project=wandb_project, config=config)

    def log(self, step: int, metrics: dict[str, float], console: bool = True) -> None:
        if not self.main:
            return
        for name, value in metrics.items():
            if self.tb:
                self.tb.add_scalar(name, value, step)
        if self.wandb:
            self.wandb.log(metrics, step=step)
        if console:
            elapsed = time.perf_counter() - self.start
            done = max(step, 1)
            eta = elapsed / done * (self.total_steps - step)
            line = f"step {step:5d}/{self.total_steps}"
            for name in ("loss", "lr", "grad_norm", "tokens_per_s"):
                if name in metrics:
                    value = metrics[name]
                    line += f" | {name.replace('_', ' ')} " + (f"{value:.2e}" if name == "lr" else f"{value:.4g}")
            if "post/prompt_loss" in metrics:  # refine-post: `loss` is the SFT step's, on the answers
                line += f" | prompt loss {metrics['post/prompt_loss']:.4g}"
            if "refine/reward_mean" in metrics:
                line += (f" | REFINE reward {metrics['refine/reward_mean']:.3f} pg {metrics['refine/pg_loss']:.3g}"
                         f" clip {metrics['refine/clip_fraction']:.2f} ent {metrics['refine/selected_entropy']:.2f}"
                         f" | logp gap {metrics['refine/logprob_diff_mean']:.1e}/{metrics['refine/logprob_diff_max']:.1e}"
                         f" ratio {metrics['refine/ratio_mean']:.4f}")
            if metrics.get("skipped_steps"):
                line += f" | skipped steps {int(metrics['skipped_steps'])}"
            print(f"{line} | ETA {time.strftime('%H:%M:%S', time.gmtime(eta))}", flush=True)

    def close(self) -> None:
        if self.tb:
            self.tb.close()
        if self.wandb:
            self.wandb.finish()
