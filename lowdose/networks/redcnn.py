"""RED-CNN: the residual encoder-decoder baseline of LDCT denoising."""

from __future__ import annotations

import torch
from torch import nn

from .registry import register_network


@register_network("redcnn")
class REDCNN(nn.Module):
    """Residual encoder-decoder CNN.

    H. Chen et al., "Low-Dose CT With a Residual Encoder-Decoder Convolutional Neural Network",
    IEEE Trans. Med. Imaging 36(12):2524-2535, 2017.

    Five unpadded convolutions shrink the image by ``kernel_size - 1`` pixels each, five transposed
    convolutions grow it back; three shortcuts add the input to the output, conv2's output to tconv3's
    and conv4's output to tconv1's (the sizes match), and a ReLU follows each sum.
    With the paper's 96 features and 5x5 kernels: 1.85 M parameters, 917 GFLOPs per 512x512 slice.

    Args:
        in_channels: 1 for a slice, 3 for a slice and its two neighbours (2.5-D); the input shortcut
            and the single output channel are the centre slice.
        features: channels of every hidden layer (96 in the paper).
        kernel_size: kernel of every layer (5 in the paper).
        output_relu: the paper's ReLU after the last sum; it assumes non-negative normalised images.
    """

    def __init__(self, in_channels: int = 1, features: int = 96, kernel_size: int = 5, output_relu: bool = True):
        super().__init__()
        self.in_channels = in_channels
        self.output_relu = output_relu
        self.shrink = 5 * (kernel_size - 1)
        self.conv1 = nn.Conv2d(in_channels, features, kernel_size)
        self.conv2 = nn.Conv2d(features, features, kernel_size)
        self.conv3 = nn.Conv2d(features, features, kernel_size)
        self.conv4 = nn.Conv2d(features, features, kernel_size)
        self.conv5 = nn.Conv2d(features, features, kernel_size)
        self.tconv1 = nn.ConvTranspose2d(features, features, kernel_size)
        self.tconv2 = nn.ConvTranspose2d(features, features, kernel_size)
        self.tconv3 = nn.ConvTranspose2d(features, features, kernel_size)
        self.tconv4 = nn.ConvTranspose2d(features, features, kernel_size)
        self.tconv5 = nn.ConvTranspose2d(features, 1, kernel_size)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if min(x.shape[-2:]) <= self.shrink:
            raise ValueError(f"RED-CNN needs images larger than {self.shrink} pixels, got {tuple(x.shape[-2:])}")
        centre = x[:, self.in_channels // 2 : self.in_channels // 2 + 1]
        out = self.relu(self.conv1(x))
        shortcut2 = out = self.relu(self.conv2(out))
        out = self.relu(self.conv3(out))
        shortcut3 = out = self.relu(self.conv4(out))
        out = self.relu(self.conv5(out))
        out = self.relu(self.tconv1(out) + shortcut3)
        out = self.relu(self.tconv2(out))
        out = self.relu(self.tconv3(out) + shortcut2)
        out = self.relu(self.tconv4(out))
        out = self.tconv5(out) + centre
        return self.relu(out) if self.output_relu else out
