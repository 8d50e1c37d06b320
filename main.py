"""Train the from-scratch CIFAR10Net on CIFAR-10 with the original study's recipe.

    python main.py --data-dir ./data

Loads CIFAR-10 and splits its 50,000 training images 45,000 / 5,000 exactly as the original study did,
normalises with the training split's statistics, trains CIFAR10Net (Kaiming-normal initialisation,
cross-entropy, Adam lr 1e-3 and weight decay 5e-4, batch 64, 100 epochs, the original study's augmentation),
prints and plots train/validation loss and accuracy per epoch, reports test accuracy, saves the
weights and draws t-SNE plots of the penultimate-layer features. Everything lands in runs/CIFAR10Net/.
"""

from __future__ import annotations

import argparse

import engine
import tsne
from models.study import README_RECIPE, CIFAR10Net

# The study's names, as the study's own main.py offered them: from main import CIFAR10Net.
__all__ = ["CIFAR10Net", "main"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    engine.add_training_arguments(parser, README_RECIPE, run_name="CIFAR10Net")
    engine.add_model_arguments(parser, {"CIFAR10Net": engine.model_spec("CIFAR10Net")})
    tsne.add_arguments(parser)
    args = engine.parse_arguments(parser, model="CIFAR10Net")
    config = engine.config_from_args(args, model="CIFAR10Net", run_name="CIFAR10Net")
    engine.train(config, engine.model_spec("CIFAR10Net"), analyses=tsne.analyses(config))


if __name__ == "__main__":
    engine.run_cli(main)
