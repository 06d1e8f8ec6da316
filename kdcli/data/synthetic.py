"""The synthetic mixed-feature data set of methods.md: images whose true label distribution p*(x) is known.

Generative model (after the SoTeacher paper's data model):

- A vocabulary of V latent features. Feature z has a prototype patch (3 x P x P,
  pixels uniform in [0, 1]), a home class ``z % C``, and a true label
  distribution ``p*(.|z) ~ Dirichlet(alpha + onehot(home))``: mostly its home
  class, with a feature-specific spread over the others.
- An input first draws a class-topic c uniformly, then m distinct features of
  topic c with Zipf-like frequencies (weight ``rank**-zipf_exponent`` within the
  topic), so every topic has common and rare features. Drawing all features of
  one input from one topic keeps p*(x) peaked: features drawn from the whole
  vocabulary would average p*(x) toward uniform.
- The image is a grid of P x P regions; the m features are placed in m distinct
  random regions (prototype + Gaussian pixel noise), every other region is
  fresh uniform noise, a distractor that looks like no particular prototype.
- ``p*(x)`` is the mean of its features' ``p*(.|z)``; the label is drawn from it,
  so labels are noisy the way real labels are.
- Optionally (``label_flip``), a fraction of the *train* labels is replaced by a
  uniformly drawn different class, as in label-noise studies. The flips come
  from a generator of their own, so images, ``p*`` and the test split are the
  same with or without them; ``p*`` stays the clean distribution.
  ``label_flip_val=False`` keeps the true labels of the samples that the run's
  validation split (``holdout``) will hold: a clean held-out set, which meta-learned
  sample weighting (TGeo-KD's upper level) assumes.

Everything is drawn from one ``torch.Generator``: a seed fixes the data set.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from kdcli.data.bundle import DataBundle, ImageSplit, holdout_index
from kdcli.data.memory import require_memory
from kdcli.errors import UsageError

CHANNELS = 3
# Every pixel's base value is uniform in [0, 1], so these are the data's
# population statistics, the same for every seed and size.
PIXEL_MEAN = 0.5
PIXEL_STD = 1.0 / math.sqrt(12.0)
LABEL_FLIP_SEED_OFFSET = 0x5EED_F11B


@dataclass(frozen=True)
class _Vocabulary:
    prototypes: Tensor  # float32 [V, 3, P, P], in [0, 1]
    label_distributions: Tensor  # float32 [V, C], p*(.|z)
    rank_weights: Tensor  # float32 [V / C], sampling weight of a topic's k-th feature


def make_synthetic(
    *,
    num_train: int = 10_000,
    num_test: int = 2_000,
    num_classes: int = 10,
    vocab_size: int = 100,
    features_per_input: int = 4,
    image_size: int = 16,
    patch_size: int = 4,
    noise_std: float = 0.2,
    dirichlet_alpha: float = 0.05,
    zipf_exponent: float = 1.0,
    label_flip: float = 0.0,
    label_flip_val: bool = True,
    holdout: tuple[float, int] = (0.1, 0),
    seed: int = 0,
) -> DataBundle:
    """Generate the synthetic data set; both splits carry ``p_star``.

    Recipe defaults are no crop and no flip: a shifted or mirrored image holds
    different features than the ones that define its p*(x).
    """
    _check_arguments(num_train, num_test, num_classes, vocab_size, features_per_input, image_size, patch_size)
    # Per sample: two float32 copies of the image being drawn and the uint8 one, region draws, p*, sampling weights.
    per_sample = CHANNELS * image_size**2 * 9 + (image_size // patch_size) ** 2 * 12 + num_classes * 8 + vocab_size * 8
    require_memory("the synthetic data set", (num_train + num_test) * per_sample, "data.synthetic.num_train, num_test or image_size")
    if not 0.0 <= label_flip < 1.0:
        raise UsageError(f"label_flip must be in [0, 1), got {label_flip}")
    generator = torch.Generator().manual_seed(seed)
    vocabulary = _make_vocabulary(
        vocab_size, num_classes, patch_size, dirichlet_alpha, zipf_exponent, generator
    )
    train, test = (
        _sample_split(vocabulary, size, features_per_input, image_size, noise_std, generator)
        for size in (num_train, num_test)
    )
    if label_flip > 0:
        flipped = flip_labels(train, label_flip, num_classes, seed)
        train = flipped if label_flip_val else _restore_holdout_labels(flipped, train, holdout)
    return DataBundle(
        name="synthetic",
        num_classes=num_classes,
        input_size=(CHANNELS, image_size, image_size),
        mean=(PIXEL_MEAN,) * CHANNELS,
        std=(PIXEL_STD,) * CHANNELS,
        train=train,
        test=test,
        crop_padding=0,
        hflip=False,
    )


def flip_labels(split: ImageSplit, fraction: float, num_classes: int, seed: int) -> ImageSplit:
    """Move ``round(fraction * N)`` randomly chosen labels to a uniformly drawn *other* class."""
    # A generator of its own (offset from the data seed), so the flips change nothing else.
    generator = torch.Generator().manual_seed(seed + LABEL_FLIP_SEED_OFFSET)
    count = round(fraction * len(split))
    flipped = torch.randperm(len(split), generator=generator)[:count]
    shift = torch.randint(1, num_classes, (count,), generator=generator)
    targets = split.targets.clone()
    targets[flipped] = (targets[flipped] + shift) % num_classes
    return ImageSplit(split.images, targets, split.p_star)


def _restore_holdout_labels(flipped: ImageSplit, clean: ImageSplit, holdout: tuple[float, int]) -> ImageSplit:
    """``flipped`` with the true labels back on the samples the validation split ``holdout`` will carve out."""
    fraction, split_seed = holdout
    if fraction == 0.0:
        return flipped
    _, val_index = holdout_index(len(clean), fraction, split_seed)
    targets = flipped.targets.clone()
    targets[val_index] = clean.targets[val_index]
    return ImageSplit(flipped.images, targets, flipped.p_star)


def bayes_accuracy(p_star: Tensor) -> float:
    """Accuracy of the Bayes classifier, ``E[max_k p*(k|x)]``: the ceiling for any model."""
    return p_star.max(dim=1).values.mean().item()


def _check_arguments(
    num_train: int,
    num_test: int,
    num_classes: int,
    vocab_size: int,
    features_per_input: int,
    image_size: int,
    patch_size: int,
) -> None:
    if min(num_train, num_test) < 1 or num_classes < 2:
        raise UsageError("synthetic data needs num_train, num_test >= 1 and num_classes >= 2")
    if image_size % patch_size:
        raise UsageError(f"image_size {image_size} is not a multiple of patch_size {patch_size}")
    if features_per_input > (image_size // patch_size) ** 2:
        raise UsageError(
            f"{features_per_input} features do not fit in a {image_size}px image of {patch_size}px patches"
        )
    if vocab_size % num_classes or vocab_size // num_classes < features_per_input:
        raise UsageError(
            f"vocab_size must be a multiple of num_classes with at least features_per_input "
            f"({features_per_input}) features per class, got {vocab_size} for {num_classes} classes"
        )


def _make_vocabulary(
    vocab_size: int,
    num_classes: int,
    patch_size: int,
    dirichlet_alpha: float,
    zipf_exponent: float,
    generator: torch.Generator,
) -> _Vocabulary:
    prototypes = torch.rand(vocab_size, CHANNELS, patch_size, patch_size, generator=generator)
    home_class = torch.arange(vocab_size) % num_classes
    concentration = dirichlet_alpha + torch.nn.functional.one_hot(home_class, num_classes).float()
    # torch.distributions.Dirichlet takes no generator; this is the op it samples with.
    label_distributions = torch._sample_dirichlet(concentration, generator=generator)
    ranks = torch.arange(1, vocab_size // num_classes + 1, dtype=torch.float32)
    return _Vocabulary(prototypes, label_distributions, ranks.pow(-zipf_exponent))


def _sample_split(
    vocabulary: _Vocabulary,
    size: int,
    features_per_input: int,
    image_size: int,
    noise_std: float,
    generator: torch.Generator,
) -> ImageSplit:
    features = _sample_features(vocabulary, size, features_per_input, generator)
    images = _render(vocabulary.prototypes, features, image_size, noise_std, generator)
    p_star = vocabulary.label_distributions[features].mean(dim=1)
    targets = torch.multinomial(p_star, 1, generator=generator).squeeze(1)
    return ImageSplit(images, targets, p_star)


def _sample_features(
    vocabulary: _Vocabulary, size: int, features_per_input: int, generator: torch.Generator
) -> Tensor:
    """int64 [size, m]: m distinct features per input, all of one uniformly drawn topic."""
    num_classes = vocabulary.label_distributions.shape[1]
    topics = torch.randint(num_classes, (size, 1), generator=generator)
    ranks = torch.multinomial(
        vocabulary.rank_weights.expand(size, -1), features_per_input, replacement=False, generator=generator
    )
    return ranks * num_classes + topics  # feature z = rank * C + home class


def _render(
    prototypes: Tensor, features: Tensor, image_size: int, noise_std: float, generator: torch.Generator
) -> Tensor:
    """uint8 [N, 3, S, S]: noisy prototypes in distinct random regions, uniform noise elsewhere."""
    size, features_per_input = features.shape
    patch_size = prototypes.shape[-1]
    grid = image_size // patch_size
    patches = torch.rand(size, grid * grid, CHANNELS, patch_size, patch_size, generator=generator)
    regions = torch.rand(size, grid * grid, generator=generator).argsort(dim=1)[:, :features_per_input]
    noise = torch.randn(size, features_per_input, CHANNELS, patch_size, patch_size, generator=generator)
    patches[torch.arange(size).unsqueeze(1), regions] = prototypes[features] + noise_std * noise
    # [N, grid_y, grid_x, C, P, P] -> [N, C, grid_y, P, grid_x, P] -> [N, C, S, S]
    images = patches.view(size, grid, grid, CHANNELS, patch_size, patch_size).permute(0, 3, 1, 4, 2, 5)
    images = images.reshape(size, CHANNELS, image_size, image_size)
    return images.clamp(0.0, 1.0).mul(255.0).round().to(torch.uint8)
