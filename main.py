"""Train the from-scratch CIFAR10Net on CIFAR-10 with the README's recipe.

    python main.py --data-dir ./data

Loads CIFAR-10 and splits its 50,000 training images 45,000 / 5,000 exactly as the README did,
normalises with the training split's statistics, trains CIFAR10Net (Kaiming-normal initialisation,
cross-entropy, Adam lr 1e-3 and weight decay 5e-4, batch 64, 100 epochs, the README's augmentation),
prints and plots train/validation loss and accuracy per epoch, reports test accuracy, saves the
weights and draws t-SNE plots of the penultimate-layer features. Everything lands in runs/CIFAR10Net/.
"""
from __future__ import annotations

import argparse

import torch
from torch import nn

import engine


class CIFAR10Net(nn.Module):
    """Conv-BN-ReLU-pool twice, then three fully connected layers: the README's first model.

    Parameter names are the README's, so a state dict saved by the original scripts loads unchanged.
    ``dropout`` after the ReLUs of fc1 and fc2 (none here) is the README's Change #6.
    """

    def __init__(self, fc1_size: int = 124, fc2_size: int = 64, dropout: float = 0.0):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels=3, out_channels=20, kernel_size=3)  # 32 -> 30, pooled to 15
        self.bn1 = nn.BatchNorm2d(20)
        self.conv2 = nn.Conv2d(20, 40, 4)  # 15 -> 12, pooled to 6
        self.bn2 = nn.BatchNorm2d(40)
        self.pool = nn.MaxPool2d(kernel_size=2, stride=2)
        self.fc1 = nn.Linear(40 * 6 * 6, fc1_size)
        self.bnfc1 = nn.BatchNorm1d(fc1_size)
        self.fc2 = nn.Linear(fc1_size, fc2_size)
        self.bnfc2 = nn.BatchNorm1d(fc2_size)
        self.fc3 = nn.Linear(fc2_size, 10)
        self.relu = nn.ReLU()
        self.dropout = nn.Dropout(dropout)

    def conv_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.relu(self.bn1(self.conv1(x))))
        x = self.pool(self.relu(self.bn2(self.conv2(x))))
        return torch.flatten(x, 1)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """fc2's activations: the penultimate features the t-SNE analysis projects."""
        x = self.dropout(self.relu(self.bnfc1(self.fc1(self.conv_features(x)))))
        return self.relu(self.bnfc2(self.fc2(x)))

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc3(self.dropout(features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classify(self.forward_features(x))


README_RECIPE = engine.Recipe()  # Adam(1e-3, betas (0.9, 0.999), weight decay 5e-4), batch 64, 100 epochs, readme augmentation


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    engine.add_training_arguments(parser, README_RECIPE, run_name="CIFAR10Net")
    args = parser.parse_args()
    config = engine.config_from_args(args, model="CIFAR10Net", recipe=README_RECIPE, run_name="CIFAR10Net")
    engine.train(config, CIFAR10Net())


if __name__ == "__main__":
    engine.run_cli(main)
