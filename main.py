"""Train the from-scratch CIFAR10Net on CIFAR-10 with the original study's recipe.

    python main.py --data-dir ./data

    python main.py --data-dir ./data --epochs 5 --limit-train 5000      # a first look: 74 s on a 2-core CPU

Splits CIFAR-10's 50,000 training images 45,000 / 5,000 as the study did, trains CIFAR10Net (Kaiming-normal
initialisation, Adam lr 1e-3, weight decay 5e-4, batch 64, 100 epochs, the study's augmentation), prints and plots
loss and accuracy per epoch, reports test accuracy, saves the weights and draws t-SNE plots of the penultimate
features, all into runs/CIFAR10Net/. Runs, resuming and errors: docs/running.md; the data: docs/data.md.
"""

from __future__ import annotations

import engine
import tsne
from models.study import STUDY_RECIPE, CIFAR10Net

# The study's names, as the study's own main.py offered them: from main import CIFAR10Net.
__all__ = ["CIFAR10Net", "main"]


def main() -> None:
    parser = engine.script_parser(__doc__)
    engine.add_training_arguments(parser, STUDY_RECIPE, run_name="CIFAR10Net")
    engine.add_model_arguments(parser, {"CIFAR10Net": engine.model_spec("CIFAR10Net")})
    tsne.add_arguments(parser)
    args = engine.parse_arguments(parser, model="CIFAR10Net")
    config = engine.config_from_args(args, model="CIFAR10Net", run_name="CIFAR10Net")
    engine.train(config, engine.model_spec("CIFAR10Net"), analyses=tsne.analyses(config))


if __name__ == "__main__":
    engine.run_cli(main)
