"""The study's models: CIFAR10Net (the original study's first model) and the seven modified models of its Changes.

Parameter names are the original study's, so a state dict saved by the original scripts loads unchanged. Every model
here trains with the original study's recipe and starts from Kaiming-normal weights (the registry's defaults); only
CIFAR10Net_optim, the original tuning run's winner, brings its own learning rate, weight decay and batch size.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from engine import ModelOption, ModelSpec, Recipe, UserError, first_line, register, with_defaults

STUDY_RECIPE = (
    Recipe()
)  # Adam(1e-3, betas (0.9, 0.999), weight decay 5e-4), batch 64, 100 epochs, the study augmentation
# The original study's search (hyperparameter_tune.py --space study, in a --space file's form): CIFAR10Net_7's layer
# sizes and dropout, and the recipe's learning rate, weight decay and batch size. It is CIFAR10Net's and CIFAR10Net_7's
# own space (their registry entries keep the convolutions as they are).
POWERS_OF_TWO = [32, 64, 128, 256, 512]
STUDY_SPACE = {
    "fc1_size": {"kind": "categorical", "choices": POWERS_OF_TWO},
    "fc2_size": {"kind": "categorical", "choices": POWERS_OF_TWO},
    "dropout": {"kind": "float", "low": 0.1, "high": 0.9},
    "lr": {"kind": "float", "low": 1e-4, "high": 1e-1, "log": True},
    "weight_decay": {"kind": "float", "low": 5e-4, "high": 1e-1, "log": True},
    "batch_size": {"kind": "categorical", "choices": POWERS_OF_TWO},
}


def pooled_side(size: int, conv1_kernel: int, conv2_kernel: int) -> int:
    """The side of conv2's pooled output: each convolution is unpadded, each followed by a 2x2 max-pool."""
    return ((size - conv1_kernel + 1) // 2 - conv2_kernel + 1) // 2


class CIFAR10Net(nn.Module):
    """Conv-BN-ReLU-pool twice, then three fully connected layers: the original study's first model.

    Parameter names are the original study's, so a state dict saved by the original scripts loads unchanged. The
    defaults are the original study's sizes (20 filters 3x3, 40 filters 4x4, fc 124 and 64); ``dropout`` after the ReLUs
    of fc1 and fc2 (none here) is the original study's Change #6. Every size is an option, so a tuned network is this
    class with other options.
    """

    def __init__(
        self,
        conv1_width: int = 20,
        conv1_kernel: int = 3,
        conv2_width: int = 40,
        conv2_kernel: int = 4,
        fc1_size: int = 124,
        fc2_size: int = 64,
        dropout: float = 0.0,
        num_classes: int = 10,
    ):
        super().__init__()
        side = pooled_side(32, conv1_kernel, conv2_kernel)
        if side < 1:
            raise UserError(
                f"conv1_kernel {conv1_kernel} and conv2_kernel {conv2_kernel} leave nothing of a 32x32 image; "
                "choose smaller kernels"
            )
        # 32 -> 30, pooled to 15
        self.conv1 = nn.Conv2d(in_channels=3, out_channels=conv1_width, kernel_size=conv1_kernel)
        self.bn1 = nn.BatchNorm2d(conv1_width)
        self.conv2 = nn.Conv2d(conv1_width, conv2_width, conv2_kernel)  # 15 -> 12, pooled to 6
        self.bn2 = nn.BatchNorm2d(conv2_width)
        self.pool = nn.MaxPool2d(kernel_size=2, stride=2)
        self.fc1 = nn.Linear(conv2_width * side * side, fc1_size)
        self.bnfc1 = nn.BatchNorm1d(fc1_size)
        self.fc2 = nn.Linear(fc1_size, fc2_size)
        self.bnfc2 = nn.BatchNorm1d(fc2_size)
        self.fc3 = nn.Linear(fc2_size, num_classes)
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


# --------------------------------------------------------------------------------------------
# Building blocks of the modified models
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
# The models of the original study's Changes
# --------------------------------------------------------------------------------------------
class CIFAR10Net_2(CIFAR10Net):
    """Change #1: CIFAR10Net with smaller fully connected layers, 1440 -> 32 -> 16 -> 10."""

    def __init__(self, num_classes: int = 10):
        super().__init__(fc1_size=32, fc2_size=16, num_classes=num_classes)


class CIFAR10Net_3(CIFAR10Net):
    """Change #2: CIFAR10Net's two conv stages straight into one linear layer, 1440 -> 10."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        del self.fc1, self.bnfc1, self.fc2, self.bnfc2, self.fc3
        self.fc1 = nn.Linear(40 * 6 * 6, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The flattened conv features: the only layer before the class scores."""
        return self.conv_features(x)

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc1(features)


class CIFAR10Net_4(nn.Module):
    """Change #3: four convolutions (5x5, 5x5, 3x3, 3x3) in two pooled stages, then 512 -> 64 -> 32 -> 10."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv1, self.conv2 = ConvBN(3, 16, 5), ConvBN(16, 16, 5)  # 32 -> 28 -> 24, pooled to 12
        self.conv3, self.conv4 = ConvBN(16, 32, 3), ConvBN(32, 32, 3)  # 12 -> 10 -> 8, pooled to 4
        self.pool = nn.MaxPool2d(2, 2)
        self.fc1, self.fc2 = FCBN(32 * 4 * 4, 64), FCBN(64, 32)
        self.fc3 = nn.Linear(32, num_classes)

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

    def __init__(self, num_classes: int = 10):
        nn.Module.__init__(self)
        self.conv1, self.conv2 = ConvBN(3, 32, 3), ConvBN(32, 32, 3)  # 32 -> 30 -> 28, pooled to 14
        self.conv3, self.conv4 = ConvBN(32, 64, 3), ConvBN(64, 64, 3)  # 14 -> 12 -> 10, pooled to 5
        self.pool = nn.MaxPool2d(2, 2)
        self.fc1 = FCBN(64 * 5 * 5, 32)
        self.fc2 = nn.Linear(32, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc1(self.conv_features(x))

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc2(features)


class CIFAR10Net_6(CIFAR10Net_4):
    """Change #5: CIFAR10Net_4 with two residual connections, each through a learned projection convolution."""

    def __init__(self, num_classes: int = 10):
        super().__init__(num_classes)
        self.shortcut1 = nn.Conv2d(3, 16, 9)  # 3x32x32 -> 16x24x24, the shape of conv2's output
        self.shortcut2 = nn.Conv2d(16, 32, 5)  # 16x12x12 -> 32x8x8, the shape of conv4's output

    def conv_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.conv2(self.conv1(x), shortcut=self.shortcut1(x)))  # added before conv2's BatchNorm
        x = self.pool(self.conv4(self.conv3(x), shortcut=self.shortcut2(x)))
        return torch.flatten(x, 1)


class CIFAR10Net_7(CIFAR10Net):
    """Change #6: CIFAR10Net with dropout 0.5 after the ReLUs of fc1 and fc2 (same parameter names)."""

    def __init__(
        self,
        conv1_width: int = 20,
        conv1_kernel: int = 3,
        conv2_width: int = 40,
        conv2_kernel: int = 4,
        fc1_size: int = 124,
        fc2_size: int = 64,
        dropout: float = 0.5,
        num_classes: int = 10,
    ):
        super().__init__(conv1_width, conv1_kernel, conv2_width, conv2_kernel, fc1_size, fc2_size, dropout, num_classes)


class CIFAR10Net_optim(CIFAR10Net_7):
    """The original tuning run's best trial: CIFAR10Net_7 with fc 128 and 128, dropout 0.46."""

    def __init__(self, num_classes: int = 10):
        super().__init__(fc1_size=128, fc2_size=128, dropout=0.46, num_classes=num_classes)


# CIFAR10Net's options: its layer sizes and dropout (what hyperparameter_tune.py searches), defaults the original
# study's.
CIFAR10NET_OPTIONS = (
    ModelOption("conv1_width", int, 20, "filters of the first convolution", low=1, high=512),
    ModelOption("conv1_kernel", int, 3, "kernel size of the first convolution", low=1, high=9),
    ModelOption("conv2_width", int, 40, "filters of the second convolution", low=1, high=512),
    ModelOption("conv2_kernel", int, 4, "kernel size of the second convolution", low=1, high=9),
    ModelOption("fc1_size", int, 124, "units of the first fully connected layer", low=1, high=4096),
    ModelOption("fc2_size", int, 64, "units of the second fully connected layer", low=1, high=4096),
    ModelOption("dropout", float, 0.0, "dropout after the ReLUs of fc1 and fc2", low=0.0, high=0.99),
)
STUDY_TUNING = {**dict.fromkeys(("conv1_width", "conv1_kernel", "conv2_width", "conv2_kernel")), **STUDY_SPACE}
register(
    "CIFAR10Net",
    ModelSpec(CIFAR10Net, STUDY_RECIPE, first_line(CIFAR10Net), options=CIFAR10NET_OPTIONS, tuning=STUDY_TUNING),
)
for model in (CIFAR10Net_2, CIFAR10Net_3, CIFAR10Net_4, CIFAR10Net_5, CIFAR10Net_6):
    register(model.__name__, ModelSpec(model, STUDY_RECIPE, first_line(model)))
register(
    "CIFAR10Net_7",
    ModelSpec(
        CIFAR10Net_7,
        STUDY_RECIPE,
        first_line(CIFAR10Net_7),
        options=with_defaults(CIFAR10NET_OPTIONS, dropout=0.5),
        tuning=STUDY_TUNING,
    ),
)
register(
    "CIFAR10Net_optim",
    ModelSpec(
        CIFAR10Net_optim,
        replace(STUDY_RECIPE, lr=0.00216, weight_decay=0.000925, batch_size=128),
        first_line(CIFAR10Net_optim) + " Trains with lr 0.00216, weight decay 0.000925, batch 128.",
    ),
)
# CIFAR10Net and the seven modified models: the --all set
STUDY_MODELS = (
    "CIFAR10Net",
    "CIFAR10Net_2",
    "CIFAR10Net_3",
    "CIFAR10Net_4",
    "CIFAR10Net_5",
    "CIFAR10Net_6",
    "CIFAR10Net_7",
    "CIFAR10Net_optim",
)
