"""Train the README's modified models, one at a time or all under identical settings, and compare them.

    python modified_models.py --list
    python modified_models.py --model CIFAR10Net_7 --data-dir ./data
    python modified_models.py --all --epochs 20 --augment standard --data-dir ./data

The README's Results change CIFAR10Net one idea at a time (Changes #1 to #6), then tune it
(CIFAR10Net_optim). Each model here trains through the same engine as main.py, with its own
run folder. ``--all`` (or ``--models A B ...``) trains each under one setting, skips models that
already finished, resumes the one that was interrupted, and writes comparison.csv,
comparison.md and comparison.png into --out-dir.

FastVGG and FastVGG_narrow go past the README: a small fast VGG with its own recipe (SGD with
Nesterov momentum, one-cycle schedule, label smoothing, light augmentation, flip TTA; --list shows
it). The recipe defaults printed below are the README's; any flag given overrides either recipe.
"""
from __future__ import annotations

import argparse
import shlex
import sys
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Callable

import torch
from torch import nn

import engine
import functions as fn
from main import README_RECIPE, CIFAR10Net


# --------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------
class ConvBN(nn.Module):
    """A convolution and its own BatchNorm (the original shared one BatchNorm between two convolutions)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size)
        self.bn = nn.BatchNorm2d(out_channels)

    def forward(self, x: torch.Tensor, shortcut: torch.Tensor | None = None) -> torch.Tensor:
        x = self.conv(x)
        return torch.relu(self.bn(x if shortcut is None else x + shortcut))


class FCBN(nn.Sequential):
    """Linear, BatchNorm, ReLU."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__(nn.Linear(in_features, out_features), nn.BatchNorm1d(out_features), nn.ReLU())


# --------------------------------------------------------------------------------------------
# The models of the README's Changes
# --------------------------------------------------------------------------------------------
class CIFAR10Net_2(CIFAR10Net):
    """Change #1: CIFAR10Net with smaller fully connected layers, 1440 -> 32 -> 16 -> 10."""

    def __init__(self):
        super().__init__(fc1_size=32, fc2_size=16)


class CIFAR10Net_3(CIFAR10Net):
    """Change #2: CIFAR10Net's two conv stages straight into one linear layer, 1440 -> 10."""

    def __init__(self):
        super().__init__()
        del self.fc1, self.bnfc1, self.fc2, self.bnfc2, self.fc3
        self.fc1 = nn.Linear(40 * 6 * 6, 10)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The flattened conv features: the only layer before the class scores."""
        return self.conv_features(x)

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc1(features)


class CIFAR10Net_4(nn.Module):
    """Change #3: four convolutions (5x5, 5x5, 3x3, 3x3) in two pooled stages, then 512 -> 64 -> 32 -> 10."""

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = ConvBN(3, 16, 5), ConvBN(16, 16, 5)  # 32 -> 28 -> 24, pooled to 12
        self.conv3, self.conv4 = ConvBN(16, 32, 3), ConvBN(32, 32, 3)  # 12 -> 10 -> 8, pooled to 4
        self.pool = nn.MaxPool2d(2, 2)
        self.fc1, self.fc2 = FCBN(32 * 4 * 4, 64), FCBN(64, 32)
        self.fc3 = nn.Linear(32, 10)

    def conv_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.conv2(self.conv1(x)))
        return torch.flatten(self.pool(self.conv4(self.conv3(x))), 1)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.fc1(self.conv_features(x)))

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc3(features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classify(self.forward_features(x))


class CIFAR10Net_5(CIFAR10Net_4):
    """Change #4: wider convolutions (32, 32, 64, 64; all 3x3) and one hidden layer, 1600 -> 32 -> 10."""

    def __init__(self):
        nn.Module.__init__(self)
        self.conv1, self.conv2 = ConvBN(3, 32, 3), ConvBN(32, 32, 3)  # 32 -> 30 -> 28, pooled to 14
        self.conv3, self.conv4 = ConvBN(32, 64, 3), ConvBN(64, 64, 3)  # 14 -> 12 -> 10, pooled to 5
        self.pool = nn.MaxPool2d(2, 2)
        self.fc1 = FCBN(64 * 5 * 5, 32)
        self.fc2 = nn.Linear(32, 10)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc1(self.conv_features(x))

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc2(features)


class CIFAR10Net_6(CIFAR10Net_4):
    """Change #5: CIFAR10Net_4 with two residual connections, each through a learned projection convolution."""

    def __init__(self):
        super().__init__()
        self.shortcut1 = nn.Conv2d(3, 16, 9)  # 3x32x32 -> 16x24x24, the shape of conv2's output
        self.shortcut2 = nn.Conv2d(16, 32, 5)  # 16x12x12 -> 32x8x8, the shape of conv4's output

    def conv_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.conv2(self.conv1(x), shortcut=self.shortcut1(x)))  # added before conv2's BatchNorm
        x = self.pool(self.conv4(self.conv3(x), shortcut=self.shortcut2(x)))
        return torch.flatten(x, 1)


class CIFAR10Net_7(CIFAR10Net):
    """Change #6: CIFAR10Net with dropout 0.5 after the ReLUs of fc1 and fc2 (same parameter names)."""

    def __init__(self, fc1_size: int = 124, fc2_size: int = 64, dropout: float = 0.5):
        super().__init__(fc1_size, fc2_size, dropout)


class CIFAR10Net_optim(CIFAR10Net_7):
    """The original tuning run's best trial: CIFAR10Net_7 with fc 128 and 128, dropout 0.46."""

    def __init__(self):
        super().__init__(fc1_size=128, fc2_size=128, dropout=0.46)


# --------------------------------------------------------------------------------------------
# Past the README: a small fast VGG in the airbench line of work
# --------------------------------------------------------------------------------------------
class ConvGroup(nn.Sequential):
    """conv 3x3, max-pool 2, BN, GELU, conv 3x3, BN, GELU: a VGG stage that halves the resolution.

    Pooling right after the first convolution (airbench's order) runs the second one on a quarter of the pixels.
    """

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(
            nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False), nn.MaxPool2d(2), nn.BatchNorm2d(out_channels), nn.GELU(),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False), nn.BatchNorm2d(out_channels), nn.GELU())


class FastVGG(nn.Module):
    """A 7-conv BatchNorm VGG (2x2 stem, three pooled stages of two 3x3 convs), after Keller Jordan's airbench94.

    32x32 -> 31 (stem) -> 15 -> 7 -> 3 -> max-pooled to 1x1; the class scores are scaled by ``logit_scale``
    (airbench's 1/9), which keeps the early logits small so label-smoothed cross-entropy trains at a high lr.
    """

    def __init__(self, widths: tuple[int, int, int] = (64, 256, 256), stem_width: int = 24, logit_scale: float = 1 / 9):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, stem_width, 2), nn.BatchNorm2d(stem_width), nn.GELU())
        self.stages = nn.Sequential(ConvGroup(stem_width, widths[0]), ConvGroup(widths[0], widths[1]), ConvGroup(widths[1], widths[2]))
        self.pool = nn.AdaptiveMaxPool2d(1)
        self.fc = nn.Linear(widths[2], 10, bias=False)
        self.logit_scale = logit_scale

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The pooled output of the last stage: the penultimate features the t-SNE analysis projects."""
        return torch.flatten(self.pool(self.stages(self.stem(x))), 1)

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc(features) * self.logit_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classify(self.forward_features(x))


# --------------------------------------------------------------------------------------------
# Registry: name -> network and the recipe it trains with
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelSpec:
    build: Callable[[], nn.Module]
    recipe: engine.Recipe
    description: str


def first_line(cls: type) -> str:
    return cls.__doc__.strip().splitlines()[0]


MODELS: dict[str, ModelSpec] = {
    cls.__name__: ModelSpec(cls, README_RECIPE, first_line(cls))
    for cls in (CIFAR10Net, CIFAR10Net_2, CIFAR10Net_3, CIFAR10Net_4, CIFAR10Net_5, CIFAR10Net_6, CIFAR10Net_7)
}
MODELS["CIFAR10Net_optim"] = ModelSpec(
    CIFAR10Net_optim, replace(README_RECIPE, lr=0.00216, weight_decay=0.000925, batch_size=128),
    first_line(CIFAR10Net_optim) + " Trains with lr 0.00216, weight decay 0.000925, batch 128.")
README_MODELS = tuple(MODELS)  # CIFAR10Net and the seven modified models, the --all set

# FastVGG's own recipe: every choice a flag, each measured in benchmarks/bench_fast.py (see the README).
FAST_RECIPE = engine.Recipe(epochs=10, batch_size=512, optimizer="sgd", lr=0.8, momentum=0.9, weight_decay=5e-4,
                            label_smoothing=0.2, scheduler="onecycle", warmup_epochs=2.0, augment="light", tta="flip")


def recipe_summary(r: engine.Recipe) -> str:
    return (f"Trains {r.epochs} epochs, batch {r.batch_size}, {r.optimizer} lr {r.lr:g} (momentum {r.momentum}, weight decay {r.weight_decay:g}), "
            f"{r.scheduler} schedule with {r.warmup_epochs:g} warm-up epochs, label smoothing {r.label_smoothing}, "
            f"{r.augment} augmentation{f', {r.tta} TTA' if r.tta != 'none' else ''}.")


MODELS["FastVGG"] = ModelSpec(FastVGG, FAST_RECIPE, first_line(FastVGG) + " " + recipe_summary(FAST_RECIPE))
MODELS["FastVGG_narrow"] = ModelSpec(partial(FastVGG, widths=(32, 128, 128)), FAST_RECIPE,
                                     "FastVGG at half the width (32, 128, 128): a quarter of the arithmetic. " + recipe_summary(FAST_RECIPE))


def model_spec(name: str) -> ModelSpec:
    if name not in MODELS:
        raise fn.UserError(f"unknown model {name!r}; choose one of: {', '.join(MODELS)}")
    return MODELS[name]


def parameter_count(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def print_model_list() -> None:
    width = max(map(len, MODELS))
    for name, spec in MODELS.items():
        print(f"{name:<{width}}  {parameter_count(spec.build()):>9,} parameters  {spec.description}")


# --------------------------------------------------------------------------------------------
# Comparison of several models under one setting
# --------------------------------------------------------------------------------------------
COMPARISON_COLUMNS = ("model", "parameters", "epochs", "best_val_accuracy", "final_val_accuracy", "best_val_loss",
                      "final_val_loss", "test_accuracy", "train_val_gap", "seconds_per_epoch")


def comparison_row(name: str, run_dir: Path) -> dict[str, float | str]:
    history = engine.read_metrics_csv(run_dir / "metrics.csv")
    report = engine.read_json(run_dir / "test.json")
    final = history[-1]
    return {
        "model": name,
        "parameters": parameter_count(MODELS[name].build()),
        "epochs": len(history),
        "best_val_accuracy": max(row["val_accuracy"] for row in history),
        "final_val_accuracy": final["val_accuracy"],
        "best_val_loss": min(row["val_loss"] for row in history),
        "final_val_loss": final["val_loss"],
        "test_accuracy": report["test_accuracy"],
        "train_val_gap": final["train_accuracy"] - final["val_accuracy"],
        "seconds_per_epoch": sum(row["seconds"] for row in history) / len(history),
    }


def write_comparison(rows: list[dict], histories: dict[str, list[dict]], out_dir: Path, setting: str) -> None:
    engine.write_csv(out_dir / "comparison.csv", rows, COMPARISON_COLUMNS)
    lines = [f"Setting: {setting}", "",
             "| model | parameters | best val acc | final val acc | best val loss | final val loss | test acc | train-val gap | s/epoch |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['parameters']:,} | {r['best_val_accuracy']:.2%} | {r['final_val_accuracy']:.2%} | "
                     f"{r['best_val_loss']:.3f} | {r['final_val_loss']:.3f} | {r['test_accuracy']:.2%} | "
                     f"{r['train_val_gap']:+.2%} | {r['seconds_per_epoch']:.1f} |")
    fn.write_atomically(out_dir / "comparison.md", lambda tmp: tmp.write_text("\n".join(lines) + "\n"))
    plot_comparison(histories, out_dir / "comparison.png", setting)


def plot_comparison(histories: dict[str, list[dict]], path: Path, setting: str) -> None:
    """Every model's curves in one figure: validation solid, training dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(13, 5))
    colours = plt.get_cmap("tab10")
    for index, (name, history) in enumerate(histories.items()):
        epochs = [row["epoch"] for row in history]
        for axis, key in zip(axes, ("loss", "accuracy")):
            axis.plot(epochs, [row[f"val_{key}"] for row in history], color=colours(index), label=name)
            axis.plot(epochs, [row[f"train_{key}"] for row in history], color=colours(index), linestyle="--", alpha=0.6)
    for axis, key in zip(axes, ("Loss", "Accuracy")):
        axis.set_xlabel("epoch")
        axis.set_ylabel(f"{key} (solid: validation, dashed: training)")
        axis.grid(alpha=0.3)
    axes[1].legend(fontsize=8)
    figure.suptitle(setting)
    figure.tight_layout()
    engine.save_figure(figure, path)


def compare(names: list[str], args: argparse.Namespace) -> None:
    """Train each model under the same flags into --out-dir/<model>; finished models are not trained again (unless --overwrite)."""
    out_dir = Path(args.out_dir or "runs/comparison")
    data = None
    for name in names:
        run_dir = out_dir / name
        if (run_dir / "test.json").is_file() and not args.overwrite:
            print(f"== {name}: finished earlier, kept ({run_dir})")
            continue
        run_args = argparse.Namespace(**vars(args))
        run_args.out_dir = str(run_dir)
        run_args.resume = "last" if (run_dir / "last.ckpt").is_file() and not args.overwrite else None
        print(f"== {name}" + (": resuming" if run_args.resume else ""))
        config = engine.config_from_args(run_args, name, MODELS[name].recipe, name)
        try:
            if data is None:
                engine.claim_run_folder(config)  # a busy folder fails before the data load
                data = engine.load_split(config)
            engine.train(config, MODELS[name].build(), data=data)
        except engine.RunInterrupted as interrupt:
            interrupt.continue_command = shlex.join(["python", *sys.argv])  # finished models are skipped, the interrupted one resumes
            raise
    rows = [comparison_row(name, out_dir / name) for name in names]
    histories = {name: engine.read_metrics_csv(out_dir / name / "metrics.csv") for name in names}
    r = engine.config_from_args(args, names[0], README_RECIPE, "comparison").recipe
    setting = (f"{rows[0]['epochs']} epochs, augment={r.augment}, seed {args.seed}"
               + (f", {args.limit_train} training images" if args.limit_train else "") + "; recipe per model unless overridden")
    write_comparison(rows, histories, out_dir, setting)
    print(f"Comparison written to {out_dir}/comparison.csv, comparison.md and comparison.png")
    print((out_dir / "comparison.md").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--model", help=f"train one model: {', '.join(MODELS)}")
    which.add_argument("--models", nargs="+", metavar="NAME", help="train these models under identical settings and compare them")
    which.add_argument("--all", action="store_true", help="train and compare CIFAR10Net and the README's seven modified models")
    which.add_argument("--list", action="store_true", help="list the models with their parameter counts and exit")
    engine.add_training_arguments(parser, README_RECIPE, run_name="<model>, or runs/comparison with --all/--models")
    args = parser.parse_args()
    if args.list:
        print_model_list()
        return
    for name in [args.model] if args.model else (args.models or []):
        model_spec(name)
    if args.model:
        config = engine.config_from_args(args, args.model, MODELS[args.model].recipe, args.model)
        engine.train(config, MODELS[args.model].build())
    else:
        compare(list(README_MODELS) if args.all else args.models, args)


if __name__ == "__main__":
    engine.run_cli(main)
