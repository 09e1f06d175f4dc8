"""What the demo shows: a live one-line-per-step table in the terminal, and at the end a PNG plot of
reward and sync time per step (matplotlib, Agg backend) beside the JSON log."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TextIO

BAR_WIDTH = 20
_BLOCKS = " ▏▎▍▌▋▊▉█"


def reward_bar(value: float, width: int = BAR_WIDTH) -> str:
    """A unicode bar of `width` cells for a value in [0, 1]."""
    value = min(1.0, max(0.0, value))
    eighths = round(value * width * 8)
    full, part = divmod(eighths, 8)
    return ("█" * full + (_BLOCKS[part] if part else "")).ljust(width)


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.1f}"


def sample_cell(example: dict | None, width: int = 16) -> str:
    """`4812= -> 2 ok`: the step's first rollout, its completion shown as Python would (escapes and all)."""
    if not example:
        return ""
    completion = repr(example["completion"])[1:-1]
    if len(completion) > width:
        completion = completion[: width - 1] + "…"
    mark = "ok" if example.get("reward") else "x"
    return f"{example['prompt']} -> {completion} {mark}"


class ProgressTable:
    """Prints a header, then one line per step as it completes."""

    COLUMNS = (("step", 5), ("rollouts@", 10), ("reward", 6), ("", BAR_WIDTH), ("gen ms", 8), ("train ms", 9),
               ("sync ms", 8), ("checksum", 8), ("pushed", 9), ("a rollout", 12))

    def __init__(self, out: TextIO | None = None):
        self.out = out or sys.stdout

    def _line(self, cells) -> str:
        parts = []
        for (name, width), cell in zip(self.COLUMNS, cells):
            parts.append(str(cell).ljust(width) if name in ("rollouts@", "", "checksum", "pushed", "a rollout") else str(cell).rjust(width))
        return "  ".join(parts).rstrip()

    def header(self) -> None:
        head = self._line([name for name, _ in self.COLUMNS])
        print(head, file=self.out)
        print("-" * len(head), file=self.out, flush=True)

    def row(self, rec: dict) -> None:
        push = rec.get("push") or {}
        train = rec.get("train") or {}
        check = push.get("checksum_ok")
        check_cell = "-" if not push else ("skipped" if check is None else ("ok" if check else "MISMATCH"))
        cells = [rec["step"], rec["weight_version"], f"{rec['reward']:.3f}", reward_bar(rec["reward"]), _ms(rec.get("gen_s")),
                 _ms(train.get("train_s")), _ms(push.get("sync_s")) if push else "-", check_cell, push.get("pushed_version", "-"),
                 sample_cell(rec.get("example"))]
        print(self._line(cells), file=self.out, flush=True)


def plot_log(log: dict, path: str | Path) -> Path:
    """Two panels sharing the step axis: the rollouts' mean reward, and the time of each weight push."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    steps = log["steps"]
    xs = [s["step"] for s in steps]
    rewards = [s["reward"] for s in steps]
    # the push after step k's rollouts installs version k+1; the initial push installs version 0
    pushes = [(0, log["initial_push"])] + [(s["step"] + 1, s["push"]) for s in steps if s.get("push")]
    cfg = log["config"]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(8, 6.5), sharex=True, gridspec_kw={"height_ratios": [3, 2]})
    ax1.plot(xs, rewards, color="tab:blue", marker="o", markersize=2.5, linewidth=1.4, label="mean reward of the step's rollouts")
    ax1.axhline(0.8, color="tab:green", linestyle="--", linewidth=1, label="target 0.8")
    chance = log["task"].get("chance_reward")
    if chance is not None:
        ax1.axhline(chance, color="gray", linestyle=":", linewidth=1, label=f"uniform chance {chance:.3f}")
    ax1.set_ylim(-0.02, 1.02)
    ax1.set_ylabel("reward")
    model = log["model"]
    params = f"{model['num_parameters'] / 1e6:.2f}M-param " if model.get("num_parameters") else ""
    ax1.set_title(f"hotswap demo: task '{log['task']['name']}', {params}{model['engine_dtype']} policy, sync={cfg['sync']}, "
                  f"{cfg['prompts_per_step']}x{cfg['group_size']} rollouts/step", fontsize=10)
    ax1.legend(loc="lower right", fontsize=8)
    ax1.grid(alpha=0.3)
    px = [v for v, _ in pushes]
    ax2.bar(px, [p["sync_s"] * 1000 for _, p in pushes], color="tab:orange", width=0.8, label="push (trainer wall time)")
    ver = [(v, p["verify_s"] * 1000) for v, p in pushes if p.get("checksum_ok") is not None]
    if ver:
        ax2.plot([v for v, _ in ver], [t for _, t in ver], color="tab:purple", linewidth=1, label="checksum verify")
    ax2.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax2.set_xlabel("step (weights after k updates; the push drawn at k installs version step-k)")
    ax2.set_ylabel("ms")
    ax2.legend(loc="upper right", fontsize=8)
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
